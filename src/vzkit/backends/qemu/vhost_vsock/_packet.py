"""The virtio-vsock packet header (virtio 1.2, section 5.10.6) and its constants.

Every packet starts with a 44-byte little-endian header::

    le64 src_cid, dst_cid; le32 src_port, dst_port, len; le16 type, op;
    le32 flags, buf_alloc, fwd_cnt

``len`` bytes of payload follow for ``RW`` packets only. ``buf_alloc`` and ``fwd_cnt`` carry
the sender's receive buffer size and how many bytes it has consumed, on every packet: the
credit the other side may use is ``buf_alloc - (tx_cnt - fwd_cnt)``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "HOST_CID",
    "MAX_PAYLOAD",
    "SHUTDOWN_RCV",
    "SHUTDOWN_SEND",
    "TYPE_STREAM",
    "Header",
    "Op",
]

HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = HEADER.size  # 44
HOST_CID = 2
TYPE_STREAM = 1
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
#: Largest payload accepted in one packet from the guest (Linux sends at most 64 KiB).
MAX_PAYLOAD = 64 * 1024


class Op(enum.IntEnum):
    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


@dataclass(frozen=True, slots=True)
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return HEADER.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            self.len,
            self.type,
            self.op,
            self.flags,
            self.buf_alloc,
            self.fwd_cnt,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        return cls(*HEADER.unpack_from(data))
