"""The vzkit agent wire protocol (version 2.3), host side: frames and message payloads.

``docs/agent-protocol.md`` is the specification; ``c/agent.h`` is the guest's copy of the
constants. Every frame is a 12-byte little-endian header — ``u32`` payload length, ``u8``
message type, three zero bytes, ``u32`` channel — followed by at most :data:`MAX_PAYLOAD`
payload bytes. This module is pure data and bytes: no sockets, no asyncio.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from vzkit.errors import GuestError

__all__ = [
    "CONSOLE_PORT_NAME",
    "DEFAULT_VSOCK_PORT",
    "HEADER",
    "HEADER_SIZE",
    "KEY_SIZE",
    "MAGIC",
    "MAX_PAYLOAD",
    "NONCE_SIZE",
    "PROTOCOL_VERSION",
    "RESYNC_PREAMBLE",
    "SOCKET_MINOR",
    "TTY_MINOR",
    "TTY_SIZE_MAX",
    "USER_MINOR",
    "ClockFlag",
    "ClockStep",
    "ConnectRequest",
    "ErrorInfo",
    "ExecFlag",
    "ExecRequest",
    "ExitFlag",
    "ExitStatus",
    "Frame",
    "FrameDecoder",
    "Hello",
    "KillRequest",
    "MsgType",
    "ProtocolError",
    "ReadFileRequest",
    "ResizeRequest",
    "SetClockRequest",
    "SockProto",
    "Stream",
    "Window",
    "WriteFileRequest",
    "decode_file_end",
    "decode_header",
    "decode_hello_request",
    "encode_auth",
    "encode_file_end",
    "encode_frame",
    "encode_hello_request",
    "env_entries",
]

PROTOCOL_VERSION = (2, 3)
USER_MINOR = 1
"""The minor version from which an agent takes EXEC's user (protocol 2.1)."""
TTY_MINOR = 2
"""The minor version from which an agent runs EXEC on a pty and takes RESIZE (protocol 2.2)."""
SOCKET_MINOR = 3
"""The minor version from which an agent takes CONNECT and SET_CLOCK (protocol 2.3)."""
TTY_SIZE_MAX = 65535
"""The most rows or columns a pty has (the kernel's ``struct winsize`` holds shorts)."""
MAGIC = b"VZKAGENT"
HEADER = struct.Struct("<IB3sI")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 65536
NONCE_SIZE = 16
KEY_SIZE = 32
"""Bytes of the per-boot key a host sends in AUTH (the agent takes 1 to 64)."""
RESYNC_PREAMBLE = bytes(HEADER_SIZE * 5465)
"""Zero bytes a host sends before HELLO on a stream that may hold a previous host's partial
frame (the virtio console): they complete any frame (at most 65547 bytes) and then read as
RESET frames. 65580 is the smallest multiple of the header size that is large enough."""
DEFAULT_VSOCK_PORT = 1024
CONSOLE_PORT_NAME = "org.vzkit.agent.0"
_ZERO3 = b"\0\0\0"
_PathLike = str | bytes | os.PathLike[str] | os.PathLike[bytes]


class MsgType(enum.IntEnum):
    """Message types; the direction is host→agent (H), agent→host (A) or both."""

    RESET = 0x00  # H: (all-zero header) forget the current session, wait for HELLO
    HELLO = 0x01  # both: version exchange, first frame of a session
    ERROR = 0x02  # A: errno + message (channel 0: the session is over)
    PING = 0x03  # H
    PONG = 0x04  # A: agent version
    WINDOW = 0x05  # both: flow-control credit for one stream of a channel
    CANCEL = 0x06  # H: forget a channel (an exec'd process group is killed)
    OK = 0x07  # A: a request succeeded
    AUTH = 0x08  # H: the per-boot key, first frame of a connection that needs it
    EXEC = 0x10  # H
    STDIN = 0x11  # H
    STDIN_EOF = 0x12  # H
    STDOUT = 0x13  # A
    STDERR = 0x14  # A
    EXIT = 0x15  # A
    KILL = 0x16  # H
    RESIZE = 0x17  # H: a tty channel's window size (2.2)
    READ_FILE = 0x20  # H
    WRITE_FILE = 0x21  # H
    FILE_DATA = 0x22  # both
    FILE_END = 0x23  # both
    SYNC = 0x30  # H
    POWEROFF = 0x31  # H
    SET_CLOCK = 0x32  # H: the host's CLOCK_REALTIME; the agent steps the guest's (2.3)
    CLOCK = 0x33  # A: SET_CLOCK's answer, the step made (2.3)
    CONNECT = 0x40  # H: a channel that is a TCP connection or UDP socket in the guest (2.3)
    SOCK_DATA = 0x41  # both: bytes (TCP) or one datagram (UDP) (2.3)
    SOCK_EOF = 0x42  # both: no more data this way, TCP's half-close (2.3)
    SOCK_CLOSE = 0x43  # A: a socket channel is over, both ways done (2.3)


class ExecFlag(enum.IntFlag):
    NONE = 0
    STDIN = 1  # the process's stdin is a pipe fed by STDIN frames (else /dev/null)
    ENV_REPLACE = 2  # env replaces the agent's environment (else it is merged into it)
    MERGE_STDERR = 4  # stderr goes to the stdout stream
    TTY = 8  # 2.2: on a new pty (stdin, stdout and stderr; its size follows the user field)


class ExitFlag(enum.IntFlag):
    NONE = 0
    TIMED_OUT = 1  # the agent killed the process group at timeout_ms
    CORE_DUMPED = 2


class SockProto(enum.IntEnum):
    """CONNECT's protocol (the ``IPPROTO_`` numbers)."""

    TCP = 6
    UDP = 17


class ClockFlag(enum.IntFlag):
    NONE = 0
    DRY_RUN = 1  # the agent's test hook: the step was not applied


class Stream(enum.IntEnum):
    """The stream a WINDOW frame credits: stdout/file data/stdin, or stderr."""

    OUT = 0
    ERR = 1


class ProtocolError(GuestError):
    """The peer broke the agent protocol (bad frame, unexpected message, bad payload)."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame."""

    type: int
    channel: int
    payload: bytes = b""

    def encode(self) -> bytes:
        return encode_frame(self.type, self.channel, self.payload)


def encode_frame(type: int, channel: int, payload: bytes = b"") -> bytes:
    """A frame's bytes; raises ProtocolError when ``payload`` is larger than MAX_PAYLOAD."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), type, _ZERO3, channel) + payload


def decode_header(header: bytes) -> tuple[int, int, int]:
    """``(payload length, type, channel)`` of a 12-byte header, validated."""
    length, type_, reserved, channel = HEADER.unpack(header)
    if reserved != _ZERO3:
        raise ProtocolError("malformed frame header (reserved bytes set)")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame of {length} bytes exceeds the maximum of {MAX_PAYLOAD}")
    return length, type_, channel


class FrameDecoder:
    """Incremental decoder: :meth:`feed` bytes in any split, get whole frames out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames = []
        pos = 0
        while len(self._buf) - pos >= HEADER_SIZE:
            length, type_, channel = decode_header(bytes(self._buf[pos : pos + HEADER_SIZE]))
            end = pos + HEADER_SIZE + length
            if len(self._buf) < end:
                break
            frames.append(Frame(type_, channel, bytes(self._buf[pos + HEADER_SIZE : end])))
            pos = end
        del self._buf[:pos]
        return frames


class _Reader:
    """Sequential payload parser; truncation raises ProtocolError naming the message."""

    def __init__(self, payload: bytes, what: str) -> None:
        self._data, self._pos, self._what = payload, 0, what

    def u32(self) -> int:
        return int(self._unpack("<I"))

    def i32(self) -> int:
        return int(self._unpack("<i"))

    def u16(self) -> int:
        return int(self._unpack("<H"))

    def u64(self) -> int:
        return int(self._unpack("<Q"))

    def _unpack(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if self._pos + size > len(self._data):
            raise ProtocolError(f"truncated {self._what} payload")
        (value,) = struct.unpack_from(fmt, self._data, self._pos)
        self._pos += size
        return int(value)

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise ProtocolError(f"truncated {self._what} payload")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def string(self) -> bytes:
        return self.take(self.u32())

    def rest(self) -> bytes:
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out

    def more(self) -> bool:
        return self._pos < len(self._data)

    def end(self) -> None:
        if self._pos != len(self._data):
            raise ProtocolError(f"{len(self._data) - self._pos} trailing bytes in {self._what}")


def _string(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


# ---- messages -------------------------------------------------------------------------------


def encode_auth(key: bytes) -> bytes:
    """The AUTH frame that opens a vsock connection to the agent: the per-boot key.

    Never log it. ValueError for an empty key or one above 64 bytes (the agent's limit).
    """
    if not 0 < len(key) <= 64:
        raise ValueError("an agent key has 1 to 64 bytes")
    return encode_frame(MsgType.AUTH, 0, key)


def encode_hello_request(
    version: tuple[int, int] = PROTOCOL_VERSION, nonce: bytes = bytes(NONCE_SIZE)
) -> bytes:
    """The host's HELLO payload: magic, major, minor, a nonce the agent echoes back."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"the HELLO nonce has {NONCE_SIZE} bytes")
    return MAGIC + struct.pack("<HH", *version) + nonce


def decode_hello_request(payload: bytes) -> tuple[int, int, bytes]:
    """``(major, minor, nonce)`` of a host's HELLO."""
    r = _Reader(payload, "HELLO")
    if r.take(len(MAGIC)) != MAGIC:
        raise ProtocolError("HELLO without the VZKAGENT magic")
    return r.u16(), r.u16(), r.take(NONCE_SIZE)


@dataclass(frozen=True, slots=True)
class Hello:
    """The agent's HELLO: its protocol version, limits and version string."""

    major: int
    minor: int
    max_payload: int
    window: int  # host→agent credit per channel (stdin, file data)
    nonce: bytes  # the host's, echoed
    agent_version: str

    def encode(self) -> bytes:
        return (
            MAGIC
            + struct.pack("<HHII", self.major, self.minor, self.max_payload, self.window)
            + self.nonce
            + self.agent_version.encode()
        )

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        r = _Reader(payload, "HELLO")
        if r.take(len(MAGIC)) != MAGIC:
            raise ProtocolError("HELLO without the VZKAGENT magic")
        major, minor, max_payload, window = r.u16(), r.u16(), r.u32(), r.u32()
        nonce = r.take(NONCE_SIZE)
        version = r.rest().decode("utf-8", "replace")
        return cls(major, minor, max_payload, window, nonce, version)


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """EXEC: ``argv`` run with ``env`` (merged or replacing, see ExecFlag) in ``cwd``, as
    ``user`` (``b"USER[:GROUP]"``; empty: the agent's own, root).

    The user is a trailing field of protocol 2.1, sent only when set: a request without one is
    what a 2.0 agent reads. With :attr:`ExecFlag.TTY` (2.2) the user field is always there
    (empty: the agent's) and the pty's ``size`` (rows, columns) follows it."""

    argv: tuple[bytes, ...]
    env: tuple[bytes, ...] = ()  # b"KEY=VALUE"
    cwd: bytes = b""  # empty: the agent's (/)
    flags: ExecFlag = ExecFlag.NONE
    timeout_ms: int = 0  # 0: none
    window: int = 0  # initial credit for each of stdout and stderr
    user: bytes = b""  # 2.1; empty: the agent's
    size: tuple[int, int] = (0, 0)  # 2.2, with ExecFlag.TTY: rows, columns

    def encode(self) -> bytes:
        head = struct.pack(
            "<IIIII", self.flags, self.timeout_ms, self.window, len(self.argv), len(self.env)
        )
        tail = _string(self.user) if self.user else b""
        if self.flags & ExecFlag.TTY:
            tail = _string(self.user) + ResizeRequest(*self.size).encode()
        return head + b"".join(_string(s) for s in (*self.argv, *self.env, self.cwd)) + tail

    @classmethod
    def decode(cls, payload: bytes) -> ExecRequest:
        r = _Reader(payload, "EXEC")
        flags, timeout_ms, window, argc, envc = (r.u32() for _ in range(5))
        argv = tuple(r.string() for _ in range(argc))
        env = tuple(r.string() for _ in range(envc))
        cwd = r.string()
        user = r.string() if r.more() else b""
        size = (r.u32(), r.u32()) if flags & ExecFlag.TTY else (0, 0)
        r.end()
        return cls(argv, env, cwd, ExecFlag(flags), timeout_ms, window, user, size)


@dataclass(frozen=True, slots=True)
class ResizeRequest:
    """RESIZE (2.2): a tty channel's new window size; also the size field of a tty EXEC.

    ValueError for a size the kernel's ``struct winsize`` cannot hold."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        for name, value in (("rows", self.rows), ("cols", self.cols)):
            if not isinstance(value, int) or not 0 <= value <= TTY_SIZE_MAX:
                raise ValueError(f"a terminal's {name} are 0 to {TTY_SIZE_MAX}, not {value!r}")

    def encode(self) -> bytes:
        return struct.pack("<II", self.rows, self.cols)

    @classmethod
    def decode(cls, payload: bytes) -> ResizeRequest:
        r = _Reader(payload, "RESIZE")
        rows, cols = r.u32(), r.u32()
        r.end()
        try:
            return cls(rows, cols)
        except ValueError as err:
            raise ProtocolError(str(err)) from None


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """EXIT: how an exec'd process ended."""

    code: int | None  # exit status, None when killed by a signal
    signal: int = 0
    flags: ExitFlag = ExitFlag.NONE

    @property
    def returncode(self) -> int:
        """Like :attr:`subprocess.Popen.returncode`: the exit status, or ``-signal``."""
        return self.code if self.code is not None else -self.signal

    @property
    def timed_out(self) -> bool:
        return bool(self.flags & ExitFlag.TIMED_OUT)

    def encode(self) -> bytes:
        code = -1 if self.code is None else self.code
        return struct.pack("<iII", code, self.signal, self.flags)

    @classmethod
    def decode(cls, payload: bytes) -> ExitStatus:
        r = _Reader(payload, "EXIT")
        code, sig, flags = r.i32(), r.u32(), r.u32()
        r.end()
        return cls(None if sig else code, sig, ExitFlag(flags))


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """ERROR: a Linux errno (0 when none applies) and the agent's message."""

    errno: int
    message: str

    def encode(self) -> bytes:
        return struct.pack("<I", self.errno) + self.message.encode()

    @classmethod
    def decode(cls, payload: bytes) -> ErrorInfo:
        r = _Reader(payload, "ERROR")
        return cls(r.u32(), r.rest().decode("utf-8", "replace"))


@dataclass(frozen=True, slots=True)
class Window:
    """WINDOW: ``increment`` more bytes may be sent on ``stream`` of the channel."""

    increment: int
    stream: Stream = Stream.OUT

    def encode(self) -> bytes:
        return struct.pack("<II", self.increment, self.stream)

    @classmethod
    def decode(cls, payload: bytes) -> Window:
        r = _Reader(payload, "WINDOW")
        increment, stream = r.u32(), r.u32()
        r.end()
        if stream not in (Stream.OUT, Stream.ERR):
            raise ProtocolError(f"WINDOW for unknown stream {stream}")
        return cls(increment, Stream(stream))


@dataclass(frozen=True, slots=True)
class KillRequest:
    """KILL: send ``signal`` to the process (or its whole process group)."""

    signal: int
    group: bool = False

    def encode(self) -> bytes:
        return struct.pack("<II", self.signal, 1 if self.group else 0)

    @classmethod
    def decode(cls, payload: bytes) -> KillRequest:
        r = _Reader(payload, "KILL")
        sig, flags = r.u32(), r.u32()
        r.end()
        return cls(sig, bool(flags & 1))


@dataclass(frozen=True, slots=True)
class ReadFileRequest:
    path: bytes
    window: int

    def encode(self) -> bytes:
        return struct.pack("<I", self.window) + self.path

    @classmethod
    def decode(cls, payload: bytes) -> ReadFileRequest:
        r = _Reader(payload, "READ_FILE")
        window = r.u32()
        return cls(r.rest(), window)


@dataclass(frozen=True, slots=True)
class WriteFileRequest:
    path: bytes
    mode: int = 0o644

    def encode(self) -> bytes:
        return struct.pack("<II", self.mode, 0) + self.path

    @classmethod
    def decode(cls, payload: bytes) -> WriteFileRequest:
        r = _Reader(payload, "WRITE_FILE")
        mode, _flags = r.u32(), r.u32()
        return cls(r.rest(), mode)


def encode_file_end(total: int) -> bytes:
    """FILE_END from the agent carries the number of bytes sent (u64)."""
    return struct.pack("<Q", total)


def decode_file_end(payload: bytes) -> int:
    r = _Reader(payload, "FILE_END")
    total = r.u64()
    r.end()
    return total


def env_entries(env: Sequence[tuple[_PathLike, _PathLike]]) -> tuple[bytes, ...]:
    """``(key, value)`` pairs as ``b"KEY=VALUE"`` entries; a key with ``=`` is refused."""
    out = []
    for key, value in env:
        k, v = os.fsencode(key), os.fsencode(value)
        if not k or b"=" in k or b"\0" in k + v:
            raise ValueError(f"invalid environment variable name or value: {key!r}")
        out.append(k + b"=" + v)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """CONNECT (2.3): a channel that is a connection to ``port`` of ``address`` in the guest
    (empty: ``127.0.0.1``; the agent takes loopback and the guest's own addresses only);
    ``window``: the agent→host credit of its data."""

    protocol: SockProto
    port: int
    window: int
    address: bytes = b""

    def encode(self) -> bytes:
        return struct.pack("<III", self.protocol, self.port, self.window) + self.address

    @classmethod
    def decode(cls, payload: bytes) -> ConnectRequest:
        r = _Reader(payload, "CONNECT")
        protocol, port, window = r.u32(), r.u32(), r.u32()
        return cls(SockProto(protocol), port, window, r.rest())


@dataclass(frozen=True, slots=True)
class SetClockRequest:
    """SET_CLOCK (2.3): the host's ``CLOCK_REALTIME`` in ns; the agent steps the guest's
    clock when it differs by more than ``threshold_ms`` (0: the agent's default, 500 ms)."""

    realtime_ns: int
    threshold_ms: int = 0

    def encode(self) -> bytes:
        return struct.pack("<qI", self.realtime_ns, self.threshold_ms)


@dataclass(frozen=True, slots=True)
class ClockStep:
    """CLOCK (2.3): the step added to the guest's clock in ns (0: none was needed)."""

    step_ns: int
    flags: ClockFlag = ClockFlag.NONE

    @classmethod
    def decode(cls, payload: bytes) -> ClockStep:
        r = _Reader(payload, "CLOCK")
        step = r.u64()
        flags = r.u32()
        r.end()
        return cls(step - (1 << 64) if step >= 1 << 63 else step, ClockFlag(flags))
