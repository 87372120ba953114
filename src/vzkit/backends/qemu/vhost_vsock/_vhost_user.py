"""The back-end side of the vhost-user protocol (QEMU ``docs/interop/vhost-user.rst``).

Messages are ``u32 request, u32 flags, u32 size`` in native byte order, then ``size`` bytes of
payload; file descriptors travel as ``SCM_RIGHTS`` with the message. :class:`MessageReader`
reads them from a non-blocking socket exactly one message at a time (so descriptors are never
attributed to the wrong message). :class:`VhostUserBackend` keeps the negotiated state
(features, memory table, per-ring size, addresses, base, kick/call/err eventfds, enabled and
started flags) and tells its :class:`RingHooks` when a ring starts, stops, is enabled or the
memory table changes. Every received descriptor is either kept (and closed on replacement or
:meth:`VhostUserBackend.close`) or closed at once.
"""

from __future__ import annotations

import array
import contextlib
import enum
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ....errors import VMError
from ._memory import MAX_REGIONS, GuestMemory, GuestMemoryError, RegionSpec
from ._virtqueue import F_EVENT_IDX, F_INDIRECT_DESC, MAX_QUEUE_SIZE

__all__ = [
    "F_PROTOCOL_FEATURES",
    "F_VERSION_1",
    "PF_CONFIG",
    "PF_REPLY_ACK",
    "Message",
    "MessageReader",
    "Request",
    "RingHooks",
    "VhostUserBackend",
    "VhostUserProtocolError",
    "VringState",
    "encode",
]

log = logging.getLogger(__name__)

F_VERSION_1 = 32
F_PROTOCOL_FEATURES = 30
PF_MQ = 0
PF_REPLY_ACK = 3
PF_CONFIG = 9

VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
HEADER = struct.Struct("=III")
MAX_PAYLOAD = 4096
MAX_FDS = 32  # received per message (more than the 8 allowed, so excess is refused politely)
VRING_FD_MASK = 0xFF
VRING_NOFD = 0x100

_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")
_ADDR = struct.Struct("=IIQQQQ")
_MEM_HEAD = struct.Struct("=II")
_REGION = struct.Struct("=QQQQ")
_CONFIG_HEAD = struct.Struct("=III")


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24
    SET_CONFIG = 25
    RESET_DEVICE = 34
    GET_MAX_MEM_SLOTS = 36


class VhostUserProtocolError(VMError):
    """The front-end (QEMU) broke the vhost-user protocol badly enough that the connection must
    be dropped."""


class _Refused(Exception):
    """A request was understood but refused (a REPLY_ACK failure, or a log line)."""


@dataclass(slots=True)
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def close_fds(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def _request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


class MessageReader:
    """Reads whole messages from a non-blocking stream socket, keeping their descriptors."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._need = HEADER.size
        self._header: tuple[int, int, int] | None = None
        self._fds: list[int] = []

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def read(self) -> list[Message] | None:
        """Messages completed by what can be read now; None when the peer hung up."""
        out: list[Message] = []
        while True:
            want = self._need - len(self._buf)
            try:
                data, ancdata, msg_flags, _ = self._sock.recvmsg(
                    want, socket.CMSG_SPACE(MAX_FDS * 4)
                )
            except (BlockingIOError, InterruptedError):
                return out
            except OSError as err:
                log.debug("vhost-user socket error: %s", err)
                return out if out else None
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                    self._fds.extend(fds)
            if msg_flags & socket.MSG_CTRUNC:
                self.close()
                raise VhostUserProtocolError("too many file descriptors in one message")
            if not data:
                return out or None
            self._buf += data
            if len(self._buf) < self._need:
                continue
            if self._header is None:
                request, flags, size = HEADER.unpack(self._buf)
                if size > MAX_PAYLOAD:
                    self.close()
                    raise VhostUserProtocolError(
                        f"{_request_name(request)}: payload of {size} bytes"
                    )
                self._header = (request, flags, size)
                self._buf.clear()
                self._need = size
                if size:
                    continue
            request, flags, _ = self._header
            out.append(Message(request, flags, bytes(self._buf), self._fds))
            self._fds = []
            self._header = None
            self._buf.clear()
            self._need = HEADER.size


@dataclass(slots=True)
class VringState:
    index: int
    num: int = 0
    desc_addr: int = 0
    avail_addr: int = 0
    used_addr: int = 0
    addr_set: bool = False
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                with contextlib.suppress(OSError):
                    os.close(fd)


class RingHooks(Protocol):
    """What the device does when the front-end changes ring state."""

    def ring_started(self, index: int) -> None: ...

    def ring_stopped(self, index: int) -> int:
        """Stop processing ring ``index``; return its next available index (the base)."""
        ...

    def ring_enabled(self, index: int, enabled: bool) -> None: ...

    def memory_changing(self) -> None:
        """Drop every view into the current guest memory (it is about to be unmapped)."""
        ...

    def memory_changed(self) -> None: ...

    def device_reset(self) -> None: ...


class VhostUserBackend:
    """Protocol state of one vhost-user session, for a device with ``num_queues`` rings."""

    def __init__(
        self,
        hooks: RingHooks,
        *,
        num_queues: int,
        features: int,
        config: Callable[[], bytes],
        protocol_features: int = (1 << PF_CONFIG) | (1 << PF_REPLY_ACK),
    ) -> None:
        self._hooks = hooks
        self.num_queues = num_queues
        self.offered_features = features | (1 << F_PROTOCOL_FEATURES)
        self.offered_protocol_features = protocol_features
        self._config = config
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.owned = False
        self.memory: GuestMemory | None = None
        self.rings = [VringState(i) for i in range(num_queues)]
        self._handlers: dict[int, Callable[[Message], bytes | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_LOG_BASE: self._set_log_base,
            Request.SET_LOG_FD: self._set_log_fd,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_fd,
            Request.SET_VRING_CALL: self._set_vring_fd,
            Request.SET_VRING_ERR: self._set_vring_fd,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.RESET_DEVICE: self._reset_device,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
        }

    # -- queries ---------------------------------------------------------------------------

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    @property
    def event_idx(self) -> bool:
        return self.has_feature(F_EVENT_IDX)

    @property
    def indirect(self) -> bool:
        return self.has_feature(F_INDIRECT_DESC)

    def close(self) -> None:
        """Forget the session: stop rings, close every kept descriptor, unmap memory."""
        for ring in self.rings:
            ring.started = False
            ring.close_fds()
        self._drop_memory()

    def _drop_memory(self) -> None:
        memory, self.memory = self.memory, None
        if memory is not None:
            memory.close()

    # -- dispatch --------------------------------------------------------------------------

    def handle(self, msg: Message) -> bytes | None:
        """Process one message; return the reply to send, if any. Raises VhostUserProtocolError."""
        name = _request_name(msg.request)
        log.debug("vhost-user <- %s flags=%#x size=%d fds=%d", name, msg.flags, len(msg.payload),
                  len(msg.fds))  # fmt: skip
        handler = self._handlers.get(msg.request)
        try:
            if handler is None:
                raise _Refused(f"unsupported {name}")
            reply = handler(msg)
        except _Refused as err:
            msg.close_fds()
            log.warning("vhost-user %s refused: %s", name, err)
            if msg.request in (Request.GET_CONFIG,):
                return encode(msg.request, b"", VERSION | FLAG_REPLY)
            if self._reply_ack and msg.need_reply:
                return encode(msg.request, _U64.pack(1), VERSION | FLAG_REPLY)
            if msg.request in (
                Request.GET_FEATURES,
                Request.GET_PROTOCOL_FEATURES,
                Request.GET_VRING_BASE,
                Request.GET_QUEUE_NUM,
                Request.GET_MAX_MEM_SLOTS,
            ):
                raise VhostUserProtocolError(f"{name}: {err}") from err
            return None
        finally:
            msg.close_fds()  # handlers take the descriptors they keep
        if reply is not None:
            return encode(msg.request, reply, VERSION | FLAG_REPLY)
        if self._reply_ack and msg.need_reply:
            return encode(msg.request, _U64.pack(0), VERSION | FLAG_REPLY)
        return None

    @property
    def _reply_ack(self) -> bool:
        return bool(self.acked_protocol_features >> PF_REPLY_ACK & 1)

    @staticmethod
    def _payload(msg: Message, st: struct.Struct) -> tuple[int, ...]:
        if len(msg.payload) < st.size:
            raise _Refused(f"payload of {len(msg.payload)} bytes, expected {st.size}")
        return st.unpack_from(msg.payload)

    def _ring(self, index: int) -> VringState:
        if not 0 <= index < self.num_queues:
            raise _Refused(f"no ring {index} (this device has {self.num_queues})")
        return self.rings[index]

    # -- features --------------------------------------------------------------------------

    def _get_features(self, msg: Message) -> bytes:
        return _U64.pack(self.offered_features)

    def _set_features(self, msg: Message) -> None:
        (features,) = self._payload(msg, _U64)
        extra = features & ~self.offered_features
        if extra:
            raise _Refused(f"features {extra:#x} were not offered")
        self.acked_features = features
        log.debug("vhost-user features %#x", features)
        if not self.has_feature(F_PROTOCOL_FEATURES):
            for ring in self.rings:  # without protocol features rings start enabled
                if not ring.enabled:
                    ring.enabled = True
                    self._hooks.ring_enabled(ring.index, True)
        return

    def _get_protocol_features(self, msg: Message) -> bytes:
        return _U64.pack(self.offered_protocol_features)

    def _set_protocol_features(self, msg: Message) -> None:
        (features,) = self._payload(msg, _U64)
        extra = features & ~self.offered_protocol_features
        if extra:
            raise _Refused(f"protocol features {extra:#x} were not offered")
        self.acked_protocol_features = features
        return

    def _get_queue_num(self, msg: Message) -> bytes:
        return _U64.pack(self.num_queues)

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return _U64.pack(MAX_REGIONS)

    def _set_owner(self, msg: Message) -> None:
        self.owned = True
        return

    def _reset_owner(self, msg: Message) -> None:
        # Deprecated; the spec recommends treating it as "disable all rings".
        for ring in self.rings:
            self._stop(ring)
        return

    def _reset_device(self, msg: Message) -> None:
        for ring in self.rings:
            self._stop(ring)
            ring.enabled = False
        self.acked_features = 0
        self._hooks.device_reset()
        return

    # -- memory ----------------------------------------------------------------------------

    def _set_mem_table(self, msg: Message) -> None:
        count, _ = self._payload(msg, _MEM_HEAD)
        if not 0 < count <= MAX_REGIONS:
            raise _Refused(f"{count} memory regions")
        if len(msg.payload) < _MEM_HEAD.size + count * _REGION.size:
            raise _Refused(f"{count} regions in {len(msg.payload)} bytes")
        if len(msg.fds) != count:
            raise _Refused(f"{count} regions but {len(msg.fds)} file descriptors")
        specs = [
            RegionSpec(*_REGION.unpack_from(msg.payload, _MEM_HEAD.size + i * _REGION.size))
            for i in range(count)
        ]
        try:
            memory = GuestMemory(specs, msg.fds)
        except GuestMemoryError as err:
            raise _Refused(str(err)) from err
        self._hooks.memory_changing()
        self._drop_memory()
        self.memory = memory
        log.debug("vhost-user memory: %s", ", ".join(
            f"gpa {s.guest_addr:#x} size {s.size:#x} uva {s.user_addr:#x} off {s.mmap_offset:#x}"
            for s in specs))  # fmt: skip
        self._hooks.memory_changed()
        return

    def _set_log_base(self, msg: Message) -> None:
        raise _Refused("dirty logging is not supported")

    def _set_log_fd(self, msg: Message) -> None:
        return None  # the descriptor is closed; logging is never used

    # -- rings -----------------------------------------------------------------------------

    def _set_vring_num(self, msg: Message) -> None:
        index, num = self._payload(msg, _STATE)
        ring = self._ring(index)
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise _Refused(f"ring {index}: size {num} is not a power of two <= 32768")
        ring.num = num
        return

    def _set_vring_addr(self, msg: Message) -> None:
        index, _flags, desc, used, avail, _log = self._payload(msg, _ADDR)
        ring = self._ring(index)
        ring.desc_addr, ring.used_addr, ring.avail_addr = desc, used, avail
        ring.addr_set = True
        return

    def _set_vring_base(self, msg: Message) -> None:
        index, num = self._payload(msg, _STATE)
        ring = self._ring(index)
        if num > 0xFFFF:
            raise _Refused(f"ring {index}: base {num} does not fit a split ring index")
        ring.base = num
        return

    def _get_vring_base(self, msg: Message) -> bytes:
        index, _ = self._payload(msg, _STATE)
        ring = self._ring(index)
        self._stop(ring)
        # The kick descriptor is not needed until the ring is started again with a new one.
        if ring.kick_fd is not None:
            with contextlib.suppress(OSError):
                os.close(ring.kick_fd)
            ring.kick_fd = None
        return _STATE.pack(index, ring.base)

    def _stop(self, ring: VringState) -> None:
        if ring.started:
            ring.base = self._hooks.ring_stopped(ring.index) & 0xFFFF
            ring.started = False

    def _set_vring_fd(self, msg: Message) -> None:
        (value,) = self._payload(msg, _U64)
        ring = self._ring(value & VRING_FD_MASK)
        nofd = bool(value & VRING_NOFD)
        if nofd != (not msg.fds) or len(msg.fds) > 1:
            raise _Refused(f"ring {ring.index}: {len(msg.fds)} descriptors, flags {value:#x}")
        if msg.request == Request.SET_VRING_KICK and (
            self.memory is None or not ring.addr_set or not ring.num
        ):
            raise _Refused(f"ring {ring.index}: kick before memory, size and addresses are set")
        fd = None if nofd else msg.fds.pop()
        attr = {Request.SET_VRING_KICK: "kick_fd", Request.SET_VRING_CALL: "call_fd",
                Request.SET_VRING_ERR: "err_fd"}[Request(msg.request)]  # fmt: skip
        old = getattr(ring, attr)
        setattr(ring, attr, fd)
        if old is not None:
            with contextlib.suppress(OSError):
                os.close(old)
        if msg.request == Request.SET_VRING_KICK:
            if fd is None:
                log.warning("ring %d: no kick descriptor (polling is not supported)", ring.index)
            if ring.started:
                self._stop(ring)
            self._start(ring)
        return

    def _start(self, ring: VringState) -> None:
        if self.memory is None or not ring.addr_set or not ring.num:
            raise _Refused(f"ring {ring.index}: kick before memory, size and addresses are set")
        ring.started = True
        self._hooks.ring_started(ring.index)

    def _set_vring_enable(self, msg: Message) -> None:
        index, num = self._payload(msg, _STATE)
        ring = self._ring(index)
        if not self.has_feature(F_PROTOCOL_FEATURES):
            raise _Refused("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        ring.enabled = bool(num)
        self._hooks.ring_enabled(index, ring.enabled)
        return

    # -- config ----------------------------------------------------------------------------

    def _get_config(self, msg: Message) -> bytes:
        offset, size, _flags = self._payload(msg, _CONFIG_HEAD)
        config = self._config()
        if offset + size > len(config) or len(msg.payload) != _CONFIG_HEAD.size + size:
            raise _Refused(f"config read of {size} bytes at {offset} ({len(config)} available)")
        return _CONFIG_HEAD.pack(offset, size, 0) + config[offset : offset + size]

    def _set_config(self, msg: Message) -> None:
        raise _Refused("the vsock configuration space is read-only")
