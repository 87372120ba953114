"""A fake front-end and guest driver for testing the vhost-user-vsock device without QEMU.

Test support, not packaged (the wheel holds ``src/vzkit`` only).

:class:`FakeDriver` plays QEMU and the guest's virtio-vsock driver at once, from the contracts
the device implements (vhost-user as QEMU 7.2 speaks it, split virtqueues, virtio-vsock
packets): it owns guest memory (a memfd shared as two adjacent regions), speaks vhost-user
over a socket (``SET_MEM_TABLE`` with the memfd, vring setup with eventfds), lays out the
rx/tx split rings in that memory, posts rx buffers the way Linux 6.1 does (a 44-byte header
descriptor plus a 4 KiB buffer descriptor, optionally indirect), sends tx packets and reads
the used rings. It honours event-idx notification suppression in both directions, so a
device that forgets to re-arm kicks stalls here too. Raw helpers let tests write arbitrary
(malformed) descriptors.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from vzkit.backends.qemu.vhost_vsock._packet import HEADER, HEADER_SIZE, HOST_CID, TYPE_STREAM, Op
from vzkit.backends.qemu.vhost_vsock._vhost_user import (
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    PF_CONFIG,
    PF_REPLY_ACK,
    VERSION,
    Request,
)
from vzkit.backends.qemu.vhost_vsock._vhost_user import HEADER as VU_HEADER
from vzkit.backends.qemu.vhost_vsock._virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    F_EVENT_IDX,
    F_INDIRECT_DESC,
)

__all__ = ["DriverQueue", "FakeDriver", "Packet", "PacketSink"]

REGION_SIZE = 16 << 20
USER_BASES = (0x7F00_0000_0000, 0x7E00_0000_0000)  # QEMU's addresses: not contiguous
BARRIER_PORT = 0xFFFF_FFF0  # guest and host port of barrier probes: no test uses it
SLOT = 72 * 1024  # one buffer per descriptor index: room for a 64 KiB payload and a header
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED = struct.Struct("<II")


class PacketSink(Protocol):
    """Where :meth:`FakeDriver.poll_rx` routes a connection's packets (a guest socket)."""

    def on_packet(self, packet: Packet) -> None: ...


@dataclass(frozen=True, slots=True)
class Packet:
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
    payload: bytes = b""

    @property
    def op_name(self) -> str:
        return Op(self.op).name if self.op in Op._value2member_map_ else str(self.op)


class DriverQueue:
    """The driver side of one split virtqueue in the fake guest's memory."""

    def __init__(self, driver: FakeDriver, index: int, size: int, event_idx: bool) -> None:
        self.driver = driver
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.desc = driver.alloc(16 * size, 16)
        self.avail = driver.alloc(6 + 2 * size, 2)
        self.used = driver.alloc(6 + 8 * size, 4)
        self.slots = driver.alloc(SLOT * size, 4096)
        self.tables = driver.alloc(16 * 4 * size, 16)  # an indirect table of 4 per head
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.free = list(range(size))
        self.avail_idx = 0
        self.kick_idx = 0  # avail_idx at the last notification decision
        self.last_used = 0
        self.chains: dict[int, list[int]] = {}  # head -> descriptor indices
        self.kicks = 0
        self.reclaimed: list[tuple[int, int]] = []

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def slot(self, index: int) -> int:
        return self.slots + SLOT * index

    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.driver.write(self.desc + 16 * index, _DESC.pack(addr, length, flags, nxt))

    def publish(self, head: int, kick: bool = True) -> None:
        """Put ``head`` in the available ring and, if ``kick``, notify the device if it wants.

        Like Linux's ``virtqueue_kick_prepare()``, the decision covers every entry added since
        the last notification decision, not just this one.
        """
        slot = self.avail_idx % self.size
        self.driver.write(self.avail + 4 + 2 * slot, _U16.pack(head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.driver.write(self.avail + 2, _U16.pack(self.avail_idx))
        if kick:
            old, self.kick_idx = self.kick_idx, self.avail_idx
            if self.wants_kick(old):
                self.kick()

    def wants_kick(self, old: int) -> bool:
        if not self.event_idx:
            flags = _U16.unpack(self.driver.read(self.used, 2))[0]
            return not flags & 1
        event = _U16.unpack(self.driver.read(self.used + 4 + 8 * self.size, 2))[0]
        new = self.avail_idx
        return bool(((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF))

    def kick(self) -> None:
        self.kicks += 1
        os.eventfd_write(self.kick_fd, 1)

    def add(
        self,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
        kick: bool = True,
    ) -> int:
        """Make a chain of readable buffers (with data) then writable ones (sizes) available."""
        parts = [(data, 0) for data in readable] + [(b"\0" * n, DESC_F_WRITE) for n in writable]
        self.reserve(1 if indirect else len(parts))
        if indirect:
            head = self.free.pop(0)
            table = self.tables + 16 * 4 * head
            addr = self.slot(head)
            for i, (data, flags) in enumerate(parts):
                self.driver.write(addr, data)
                nxt_flag = DESC_F_NEXT if i + 1 < len(parts) else 0
                self.driver.write(table + 16 * i, _DESC.pack(addr, len(data), flags | nxt_flag,
                                                             i + 1))  # fmt: skip
                addr += -(-len(data) // 8) * 8
            self.write_desc(head, table, 16 * len(parts), DESC_F_INDIRECT, 0)
            self.chains[head] = [head]
        else:
            ids = [self.free.pop(0) for _ in parts]
            for i, (index, (data, flags)) in enumerate(zip(ids, parts, strict=True)):
                self.driver.write(self.slot(index), data)
                more = i + 1 < len(ids)
                self.write_desc(index, self.slot(index), len(data),
                                flags | (DESC_F_NEXT if more else 0),
                                ids[i + 1] if more else 0)  # fmt: skip
            head = ids[0]
            self.chains[head] = ids
        self.publish(head, kick)
        return head

    def reserve(self, count: int, timeout: float = 5.0) -> None:
        """Wait until ``count`` descriptors are free, reclaiming used chains."""
        deadline = time.monotonic() + timeout
        while len(self.free) < count:
            if self.index == 0:
                raise RuntimeError("rx queue: no free descriptors (poll_rx() reposts them)")
            self.reclaimed += self.used_entries()
            if len(self.free) >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {self.index}: no free descriptors")
            self.wait_call(0.05)

    def used_entries(self) -> list[tuple[int, int]]:
        """Used (head, written length) pairs since the last call; frees their descriptors."""
        idx = _U16.unpack(self.driver.read(self.used + 2, 2))[0]
        out = []
        while self.last_used != idx:
            head, length = _USED.unpack(
                self.driver.read(self.used + 4 + 8 * (self.last_used % self.size), 8)
            )
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
            self.free.extend(self.chains.pop(head, []))
        if self.event_idx:  # interrupt me on the next used buffer
            self.driver.write(self.avail + 4 + 2 * self.size, _U16.pack(self.last_used))
        return out

    def wait_call(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.call_fd], [], [], timeout)
        if ready:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.call_fd)
        return bool(ready)


class FakeDriver:
    """QEMU and a guest vsock driver in one object, driving a device over ``sock``."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        guest_cid: int = 3,
        queue_size: int = 128,
        event_idx: bool = True,
        indirect: bool = False,
        rx_buf_size: int = 4096,
    ) -> None:
        self.sock = sock
        self.guest_cid = guest_cid
        self.queue_size = queue_size
        self.event_idx = event_idx
        self.indirect = indirect
        self.rx_buf_size = rx_buf_size
        self.memfd = os.memfd_create("fake-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, 2 * REGION_SIZE)
        self.mem = mmap.mmap(self.memfd, 2 * REGION_SIZE)
        self._brk = 0x1000
        self.rx = DriverQueue(self, 0, queue_size, event_idx)
        self.tx = DriverQueue(self, 1, queue_size, event_idx)
        self.inbox: list[Packet] = []
        self.features = 0
        self.conns: dict[tuple[int, int], PacketSink] = {}  # by (guest port, host port)

    def close(self) -> None:
        self.rx.close()
        self.tx.close()
        self.sock.close()
        self.mem.close()
        os.close(self.memfd)

    def __enter__(self) -> FakeDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- memory ----------------------------------------------------------------------------

    def alloc(self, size: int, align: int) -> int:
        addr = -(-self._brk // align) * align
        self._brk = addr + size
        if self._brk > 2 * REGION_SIZE:
            raise MemoryError("fake guest memory exhausted")
        return addr

    def write(self, gpa: int, data: bytes) -> None:
        self.mem[gpa : gpa + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        return self.mem[gpa : gpa + length]

    def user_addr(self, gpa: int) -> int:
        region = gpa // REGION_SIZE
        return USER_BASES[region] + gpa % REGION_SIZE

    # -- vhost-user ------------------------------------------------------------------------

    def send_msg(
        self, request: int, payload: bytes = b"", fds: Sequence[int] = (), flags: int = VERSION
    ) -> None:
        data = VU_HEADER.pack(request, flags, len(payload)) + payload
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def recv_reply(self, timeout: float = 5.0) -> tuple[int, int, bytes]:
        self.sock.settimeout(timeout)
        head = self._recv_exact(VU_HEADER.size)
        request, flags, size = VU_HEADER.unpack(head)
        return request, flags, self._recv_exact(size)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("device closed the vhost-user socket")
            buf += chunk
        return buf

    def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """A request that has a reply (GET_*); returns the reply payload."""
        self.send_msg(request, payload, fds)
        reply, flags, body = self.recv_reply()
        assert reply == request, (reply, request)
        assert flags & 0x4, flags
        return body

    def ack(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        """A request sent with NEED_REPLY (REPLY_ACK); returns the device's status."""
        self.send_msg(request, payload, fds, VERSION | FLAG_NEED_REPLY)
        reply, _, body = self.recv_reply()
        assert reply == request
        return int(struct.unpack("=Q", body)[0])

    def get_u64(self, request: int) -> int:
        return int(struct.unpack("=Q", self.call(request))[0])

    def config_cid(self) -> int:
        body = self.call(Request.GET_CONFIG, struct.pack("=III", 0, 8, 0) + b"\0" * 8)
        offset, size, _ = struct.unpack_from("=III", body)
        assert (offset, size) == (0, 8)
        return int(struct.unpack_from("<Q", body, 12)[0])

    def mem_table_payload(self) -> bytes:
        regions = [
            struct.pack("=QQQQ", i * REGION_SIZE, REGION_SIZE, USER_BASES[i], i * REGION_SIZE)
            for i in range(2)
        ]
        return struct.pack("=II", 2, 0) + b"".join(regions)

    def setup(self, features: int | None = None) -> None:
        """The message sequence QEMU 7.2 sends, from connect to rings enabled."""
        offered = self.get_u64(Request.GET_FEATURES)
        assert offered >> F_PROTOCOL_FEATURES & 1
        pf = self.get_u64(Request.GET_PROTOCOL_FEATURES)
        assert pf >> PF_CONFIG & 1
        self.send_msg(Request.SET_PROTOCOL_FEATURES, struct.pack("=Q", pf & ((1 << PF_CONFIG) | (
            1 << PF_REPLY_ACK))))  # fmt: skip
        self.send_msg(Request.SET_OWNER)
        assert self.config_cid() == self.guest_cid
        if features is None:
            features = (1 << 32) | (1 << F_PROTOCOL_FEATURES)
            if self.event_idx:
                features |= 1 << F_EVENT_IDX
            if self.indirect:
                features |= 1 << F_INDIRECT_DESC
        self.features = features
        self.send_msg(Request.SET_FEATURES, struct.pack("=Q", features))
        assert (
            self.ack(Request.SET_MEM_TABLE, self.mem_table_payload(), [self.memfd, self.memfd]) == 0
        )
        for q in (self.rx, self.tx):
            self.start_ring(q)
        for q in (self.rx, self.tx):
            self.send_msg(Request.SET_VRING_ENABLE, struct.pack("=II", q.index, 1))
        self.sync()

    def start_ring(self, q: DriverQueue, base: int = 0) -> None:
        self.send_msg(Request.SET_VRING_CALL, struct.pack("=Q", q.index), [q.call_fd])
        self.send_msg(Request.SET_VRING_NUM, struct.pack("=II", q.index, q.size))
        self.send_msg(Request.SET_VRING_BASE, struct.pack("=II", q.index, base))
        self.send_msg(Request.SET_VRING_ADDR, struct.pack(
            "=IIQQQQ", q.index, 0, self.user_addr(q.desc), self.user_addr(q.used),
            self.user_addr(q.avail), 0))  # fmt: skip
        self.send_msg(Request.SET_VRING_KICK, struct.pack("=Q", q.index), [q.kick_fd])

    def stop_ring(self, q: DriverQueue) -> int:
        body = self.call(Request.GET_VRING_BASE, struct.pack("=II", q.index, 0))
        index, base = struct.unpack("=II", body)
        assert index == q.index
        return int(base)

    def sync(self) -> None:
        """Round-trip a request so every earlier message has been processed."""
        self.get_u64(Request.GET_FEATURES)

    def settle(self) -> None:
        """Two vhost-user round trips: the device has had a reactor iteration to act on every
        event pending before this call (a kick, a host socket's data), even on a stopped ring
        where no packet can answer (:meth:`barrier` needs running rings)."""
        self.sync()
        self.sync()

    # -- vsock -----------------------------------------------------------------------------

    def post_rx(self, count: int | None = None, *, size: int | None = None) -> None:
        """Post rx buffers like Linux 6.1: a header descriptor and a data descriptor."""
        size = self.rx_buf_size if size is None else size
        count = len(self.rx.free) // (1 if self.indirect else 2) if count is None else count
        for i in range(count):
            self.rx.add(writable=[HEADER_SIZE, size], indirect=self.indirect, kick=i == count - 1)

    def send(
        self,
        op: Op | int,
        src_port: int,
        dst_port: int,
        payload: bytes = b"",
        *,
        flags: int = 0,
        buf_alloc: int = 256 * 1024,
        fwd_cnt: int = 0,
        src_cid: int | None = None,
        dst_cid: int = HOST_CID,
        type_: int = TYPE_STREAM,
        length: int | None = None,
        split: bool = True,
    ) -> int:
        """Queue one packet on the tx ring; return its head."""
        header = HEADER.pack(
            self.guest_cid if src_cid is None else src_cid, dst_cid, src_port, dst_port,
            len(payload) if length is None else length, type_, int(op), flags, buf_alloc, fwd_cnt,
        )  # fmt: skip
        parts = [header, payload] if payload and split else [header + payload]
        return self.tx.add(readable=parts, indirect=self.indirect)

    def wait_tx_done(self, timeout: float = 5.0) -> list[tuple[int, int]]:
        """Wait until the device has used every chain on the tx ring."""
        deadline = time.monotonic() + timeout
        done: list[tuple[int, int]] = []
        while True:
            done += self.tx.used_entries()
            if not self.tx.chains:
                return done
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(self.tx.chains)} tx chains not used")
            self.tx.wait_call(min(left, 0.05))

    def poll_rx(self) -> list[Packet]:
        """Packets the device has put on the rx ring so far (their buffers are reposted)."""
        packets = []
        entries = self.rx.used_entries()
        for head, length in entries:
            raw = self._chain_bytes(head, length)
            if length >= HEADER_SIZE:
                sc, dc, sp, dp, ln, ty, op, fl, ba, fc = HEADER.unpack_from(raw)
                packets.append(Packet(sc, dc, sp, dp, ln, ty, op, fl, ba, fc,
                                      raw[HEADER_SIZE:length]))  # fmt: skip
            else:
                packets.append(Packet(0, 0, 0, 0, 0, 0, -1, 0, 0, 0, raw))
        if entries:
            self.post_rx(len(entries))
        for packet in packets:
            conn = self.conns.get((packet.dst_port, packet.src_port))
            if conn is not None:
                conn.on_packet(packet)
            else:
                self.inbox.append(packet)
        return packets

    def _chain_bytes(self, head: int, length: int) -> bytes:
        if self.indirect:
            table = self.rx.tables + 16 * 4 * head
            descs = [_DESC.unpack(self.read(table + 16 * i, 16)) for i in range(2)]
        else:
            descs = []
            index = head
            while True:
                desc = _DESC.unpack(self.read(self.rx.desc + 16 * index, 16))
                descs.append(desc)
                if not desc[2] & DESC_F_NEXT:
                    break
                index = desc[3]
        data = b"".join(self.read(addr, n) for addr, n, _, _ in descs)
        return data[:length]

    def recv(
        self, count: int = 1, timeout: float = 5.0, *, ops: Iterable[int] | None = None
    ) -> list[Packet]:
        """Wait for ``count`` packets (of ``ops`` if given) and return them, oldest first."""
        wanted = None if ops is None else {int(op) for op in ops}
        deadline = time.monotonic() + timeout
        while True:
            self.poll_rx()
            matching = [p for p in self.inbox if wanted is None or p.op in wanted]
            if len(matching) >= count:
                chosen = matching[:count]
                for p in chosen:
                    self.inbox.remove(p)
                return chosen
            left = deadline - time.monotonic()
            if left <= 0:
                names = [p.op_name for p in self.inbox]
                raise TimeoutError(f"got {len(matching)} of {count} packets; inbox {names}")
            self.rx.wait_call(min(left, 0.05))

    def barrier(self, rounds: int = 2, timeout: float = 5.0) -> None:
        """Return once the device has answered a probe sent after everything before it.

        The probe is an ``RW`` packet for a connection that does not exist; the device
        answers every such packet with an ``RST`` on the rx ring, in order with what it sent
        before. Two rounds: the second probe's kick is seen in a later reactor iteration than
        anything already pending when the first one was sent (a host socket event, a timer).
        The answers to the probes are taken out of the inbox.
        """
        for _ in range(rounds):
            self.send(Op.RW, BARRIER_PORT, BARRIER_PORT, b"?")
            deadline = time.monotonic() + timeout
            while True:
                self.poll_rx()
                probe = [p for p in self.inbox if p.op == Op.RST and p.dst_port == BARRIER_PORT]
                if probe:
                    self.inbox.remove(probe[0])
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the device did not answer the barrier probe")
                self.rx.wait_call(min(left, 0.05))

    def expect_silence(self) -> list[Packet]:
        """What the device sent unasked so far, once it had the chance to act on everything
        sent before (:meth:`barrier`); tests assert it is nothing."""
        self.barrier()
        out, self.inbox = self.inbox, []
        return out
