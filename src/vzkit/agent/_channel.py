"""The channels of an agent connection: one request in flight each, with flow control.

A channel is a request multiplexed over one agent connection (``docs/agent-protocol.md``): its
result frame, its agent→host streams (each buffered up to a window the host grants back as the
consumer reads) and its host→agent credit (stdin, file data). A channel talks to its connection
only through the small :class:`_Link` protocol, so this module does not import the connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno as _errno
import os
from collections.abc import Awaitable, Sequence
from typing import Protocol, TypeAlias

from vzkit.errors import ArgumentError, GuestError

from ._protocol import (
    MAX_PAYLOAD,
    ErrorInfo,
    ExitStatus,
    Frame,
    Hello,
    KillRequest,
    MsgType,
    ProtocolError,
    ResizeRequest,
    Stream,
    Window,
)

__all__ = ["AgentError", "Args", "GuestFileNotFoundError", "StrOrBytes"]

StrOrBytes: TypeAlias = str | bytes | os.PathLike[str] | os.PathLike[bytes]
Args: TypeAlias = StrOrBytes | Sequence[StrOrBytes]


class AgentError(GuestError):
    """The agent refused or failed a request; ``errno`` is the guest's (Linux) errno or 0."""

    def __init__(self, message: str, *, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class GuestFileNotFoundError(AgentError, FileNotFoundError):
    """The agent answered ENOENT: the guest has no such file or directory (e.g. ``read_file``
    of a missing path). Also a :class:`FileNotFoundError`, so ``except FileNotFoundError``
    works as for a host file; ``errno`` is ``errno.ENOENT``."""

    errno: int

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def agent_error(message: str, errno: int) -> AgentError:
    """The error for the agent's ERROR frame: :class:`GuestFileNotFoundError` for ENOENT."""
    if errno == _errno.ENOENT:  # Linux's 2, the guest's; the same number on macOS hosts
        return GuestFileNotFoundError(message, errno=errno)
    return AgentError(message, errno=errno)


class _ChannelClosed(Exception):
    """Internal: the channel ended while a writer waited for credit."""


class _Link(Protocol):
    """What a channel needs from its connection (:class:`vzkit.agent._connection._Connection`)."""

    @property
    def hello(self) -> Hello: ...

    @property
    def window(self) -> int: ...

    def send_nowait(self, kind: int, channel: int, payload: bytes = b"") -> None: ...

    def send(self, kind: MsgType, channel: int, payload: bytes = b"") -> Awaitable[None]: ...

    def forget(self, channel: _Channel) -> None: ...


class _InStream:
    """One agent→host stream of a channel, buffered up to ``window`` bytes."""

    def __init__(self, conn: _Link, channel: int, stream: Stream, window: int) -> None:
        self._conn, self._channel, self._stream, self._window = conn, channel, stream, window
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._outstanding = 0  # received and not granted back
        self._ungranted = 0  # consumed and not granted back
        self._eof = False
        self._exc: BaseException | None = None
        self._discard = False
        self._waiter: asyncio.Future[None] | None = None
        self.max_buffered = 0  # for tests and diagnostics

    def feed(self, data: bytes) -> None:
        self._outstanding += len(data)
        if self._outstanding > self._window:
            raise ProtocolError(f"the agent overran the window of channel {self._channel}")
        if self._discard:
            self._consumed(len(data))
            return
        self._chunks.append(data)
        self._size += len(data)
        self.max_buffered = max(self.max_buffered, self._size)
        self._wake()

    def feed_eof(self, exc: BaseException | None = None) -> None:
        self._eof = True
        if exc is not None and self._exc is None:
            self._exc = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _consumed(self, n: int) -> None:
        self._ungranted += n
        if self._eof or self._ungranted < self._window // 2:
            return
        grant, self._ungranted = self._ungranted, 0
        self._outstanding -= grant
        with contextlib.suppress(GuestError):  # a dead connection sends nothing more anyway
            payload = Window(grant, self._stream).encode()
            self._conn.send_nowait(MsgType.WINDOW, self._channel, payload)

    def discard(self) -> None:
        """Drop what is buffered and everything that comes later (the reader was closed)."""
        self._discard = True
        self._chunks.clear()
        dropped, self._size = self._size, 0
        if not self._eof:
            self._consumed(dropped)

    async def _has_data(self) -> bool:
        """Wait for data or the end; ``False`` at the end (the channel's error raised)."""
        while not self._chunks and not self._eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if not self._chunks and self._exc is not None:
            raise self._exc
        return bool(self._chunks)

    async def read_frame(self) -> bytes | None:
        """The next frame's payload whole (a UDP channel's datagram), ``None`` at EOF."""
        if not await self._has_data():
            return None
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        self._consumed(len(chunk))
        return chunk

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all until EOF when ``n < 0``); ``b""`` at EOF."""
        if n == 0:
            return b""
        if n < 0:
            parts = []
            while chunk := await self.read(MAX_PAYLOAD):
                parts.append(chunk)
            return b"".join(parts)
        if not await self._has_data():
            return b""
        out = bytearray()
        while self._chunks and len(out) < n:
            chunk = self._chunks.popleft()
            take = n - len(out)
            if len(chunk) > take:
                self._chunks.appendleft(chunk[take:])
                chunk = chunk[:take]
            out += chunk
        self._size -= len(out)
        self._consumed(len(out))
        return bytes(out)


class _Channel:
    """A request in flight: its result frame, its inbound streams and its outbound credit."""

    def __init__(self, conn: _Link, channel: int) -> None:
        self.conn, self.id = conn, channel
        self.result: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.streams: dict[int, _InStream] = {}
        self._credit = conn.hello.window
        self._credit_waiter: asyncio.Future[None] | None = None

    def add_stream(self, msg: MsgType, stream: Stream, window: int) -> _InStream:
        self.streams[msg] = _InStream(self.conn, self.id, stream, window)
        return self.streams[msg]

    @property
    def done(self) -> bool:
        return self.result.done()

    def on_frame(self, frame: Frame) -> None:
        kind = frame.type
        if kind in self.streams:
            self.streams[kind].feed(frame.payload)
        elif kind == MsgType.WINDOW:
            self._credit += Window.decode(frame.payload).increment
            self._wake_writer()
        elif kind == MsgType.ERROR:
            info = ErrorInfo.decode(frame.payload)
            self.finish(exc=agent_error(info.message, info.errno))
        elif kind in (MsgType.OK, MsgType.PONG, MsgType.EXIT, MsgType.FILE_END, MsgType.CLOCK):
            self.finish(frame)
        else:
            raise ProtocolError(f"unexpected message type 0x{kind:02x} on channel {self.id}")

    def finish(self, frame: Frame | None = None, *, exc: BaseException | None = None) -> None:
        """The channel is over: settle the result, end the streams, wake a writer."""
        self.conn.forget(self)
        for stream in self.streams.values():
            stream.feed_eof(exc)
        if not self.result.done():
            if frame is not None:
                self.result.set_result(frame)
            else:
                self.result.set_exception(exc or GuestError("channel closed"))
                self.result.exception()  # retrieved: nobody may be waiting any more
        self._wake_writer()

    def cancel(self, exc: BaseException | None = None) -> None:
        """Abandon the channel (the agent kills an exec'd process group); what is buffered
        is dropped, and whoever waits on it gets ``exc`` (default: "cancelled")."""
        if not self.done:
            with contextlib.suppress(GuestError):
                self.conn.send_nowait(MsgType.CANCEL, self.id)
            self.finish(exc=exc or GuestError("cancelled"))
        for stream in self.streams.values():
            stream.discard()

    def _wake_writer(self) -> None:
        if self._credit_waiter is not None and not self._credit_waiter.done():
            self._credit_waiter.set_result(None)

    async def _await_credit(self, need: int) -> None:
        """Wait until the agent's credit covers ``need`` bytes, or the channel is done."""
        while self._credit < need and not self.done:
            self._credit_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._credit_waiter
            finally:
                self._credit_waiter = None

    async def send_data(self, kind: MsgType, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as ``kind`` frames, waiting for the agent's credit."""
        view = memoryview(data).cast("B")
        while view:
            await self._await_credit(1)
            if self.done:
                raise _ChannelClosed
            take = min(self._credit, MAX_PAYLOAD, len(view))
            self._credit -= take
            await self.conn.send(kind, self.id, bytes(view[:take]))
            view = view[take:]


class _ExecChannel(_Channel):
    """An exec'd process: stdout/stderr streams, stdin, exit status."""

    def __init__(
        self, conn: _Link, channel: int, args: Args, timeout: float | None, *, tty: bool = False
    ) -> None:
        super().__init__(conn, channel)
        self.args, self.timeout, self.tty = args, timeout, tty
        self.stdout = self.add_stream(MsgType.STDOUT, Stream.OUT, conn.window)
        self.stderr = self.add_stream(MsgType.STDERR, Stream.ERR, conn.window)
        self.stdin_closed = False
        self.status: ExitStatus | None = None

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.stdin_closed:
            raise ValueError("write to closed stdin")
        try:
            await self.send_data(MsgType.STDIN, data)
        except _ChannelClosed:
            raise BrokenPipeError("the guest process has exited") from None

    def close_stdin(self) -> None:
        if not self.stdin_closed:
            self.stdin_closed = True
            if not self.done:
                self.conn.send_nowait(MsgType.STDIN_EOF, self.id)

    async def wait(self) -> ExitStatus:
        if self.status is None:
            frame = await asyncio.shield(self.result)
            self.status = ExitStatus.decode(frame.payload)
        return self.status

    async def communicate(
        self, input: bytes | None, out: bytearray, err: bytearray, limit: int | None = None
    ) -> ExitStatus:
        """Feed ``input``, collect both outputs and wait. Past ``limit`` bytes of output
        (both streams together) the process group is killed and this raises GuestError,
        having kept no more than ``limit`` bytes."""

        async def feed() -> None:
            if input is not None and not self.stdin_closed:
                try:
                    await self.write(input)
                except BrokenPipeError:
                    return  # like subprocess: a child that stops reading is not an error
            self.close_stdin()

        async def drain(stream: _InStream, into: bytearray) -> None:
            while chunk := await stream.read(MAX_PAYLOAD):
                if limit is not None and len(out) + len(err) + len(chunk) > limit:
                    error = GuestError(
                        f"the output of {self.args!r} passed max_output={limit} bytes; "
                        "the process was killed (pass a larger max_output, or stream "
                        "the output with popen())"
                    )
                    self.cancel(error)  # the agent kills the process group
                    raise error
                into += chunk

        await asyncio.gather(feed(), drain(self.stdout, out), drain(self.stderr, err))
        return await self.wait()

    def signal(self, sig: int, *, group: bool) -> None:
        if not self.done:
            self.conn.send_nowait(MsgType.KILL, self.id, KillRequest(sig, group).encode())

    def resize(self, rows: int, cols: int) -> None:
        """Set the window size of the process's pty (the guest's kernel sends SIGWINCH)."""
        if not self.tty:
            raise ArgumentError(
                f"{self.args!r} runs without a terminal: only a process started with tty=True "
                "has a window size"
            )
        try:
            request = ResizeRequest(rows, cols)
        except ValueError as err:
            raise ArgumentError(str(err)) from None
        if not self.done:
            self.conn.send_nowait(MsgType.RESIZE, self.id, request.encode())


class _SocketChannel(_Channel):
    """A CONNECT channel (2.3): a TCP connection or a UDP socket in the guest.

    ``connected`` settles with the agent's OK (or its ERROR: refused, no such address); then
    ``data`` is what the guest sends (UDP: one frame per datagram, read with
    :meth:`_InStream.read_frame`), ended by SOCK_EOF (TCP's half-close); the channel's
    result is the agent's SOCK_CLOSE (both ways done) or its ERROR."""

    def __init__(self, conn: _Link, channel: int, window: int) -> None:
        super().__init__(conn, channel)
        self.data = self.add_stream(MsgType.SOCK_DATA, Stream.OUT, window)
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.eof_sent = False

    def on_frame(self, frame: Frame) -> None:
        kind = frame.type
        if kind == MsgType.OK and not self.connected.done():
            self.connected.set_result(None)
        elif kind == MsgType.SOCK_EOF:
            self.data.feed_eof()
        elif kind == MsgType.SOCK_CLOSE:
            self.finish(frame)
        else:
            super().on_frame(frame)

    def finish(self, frame: Frame | None = None, *, exc: BaseException | None = None) -> None:
        super().finish(frame, exc=exc)
        if not self.connected.done():
            closed = GuestError("the channel closed before it connected")
            self.connected.set_exception(exc or closed)
            self.connected.exception()  # retrieved: nobody may be waiting any more

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes to the guest (TCP), as the agent's credit allows."""
        try:
            await self.send_data(MsgType.SOCK_DATA, data)
        except _ChannelClosed:
            raise BrokenPipeError("the guest connection is closed") from None

    async def send_datagram(self, data: bytes) -> None:
        """One datagram to the guest (UDP): one frame, sent whole once the credit allows."""
        if len(data) > MAX_PAYLOAD:
            raise ValueError(f"a datagram of {len(data)} bytes exceeds {MAX_PAYLOAD}")
        await self._await_credit(len(data))
        if self.done:
            raise BrokenPipeError("the guest socket is closed")
        self._credit -= len(data)
        await self.conn.send(MsgType.SOCK_DATA, self.id, data)

    def write_eof(self) -> None:
        """No more bytes to the guest: the agent shuts its socket's writing (TCP)."""
        if not self.eof_sent and not self.done:
            self.eof_sent = True
            self.conn.send_nowait(MsgType.SOCK_EOF, self.id)
