"""The host side of the guest agent protocol: :class:`AgentClient` and :class:`AsyncAgentClient`.

A client owns one connected stream socket to ``vzkit-agent`` (a vsock connection, the unix
socket behind the virtio console port, or a socketpair in tests) and multiplexes any number of
concurrent requests over it as channels. The core (:class:`_Connection`) is asyncio code on
vzkit's shared loop; :class:`AgentClient` blocks on it through :func:`vzkit._loop.run_sync` and
:class:`AsyncAgentClient` awaits it from any event loop through :func:`vzkit._loop.wrap`.

Flow control keeps memory bounded on both sides: the agent sends at most ``window`` bytes of a
stream that the consumer has not read yet, and the client sends at most the agent's window of
stdin or file data that the agent has not consumed yet.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import itertools
import logging
import os
import signal
import socket
import subprocess
import warnings
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeAlias

from vzkit._loop import get_loop, in_loop_thread, run_sync, wrap
from vzkit.errors import GuestError, VMTimeoutError

from ._protocol import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    RESYNC_PREAMBLE,
    ErrorInfo,
    ExecFlag,
    ExecRequest,
    ExitStatus,
    Frame,
    Hello,
    KillRequest,
    MsgType,
    ProtocolError,
    ReadFileRequest,
    Stream,
    Window,
    WriteFileRequest,
    decode_header,
    encode_auth,
    encode_frame,
    encode_hello_request,
    env_entries,
)

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_WINDOW",
    "AgentClient",
    "AgentError",
    "AsyncAgentClient",
    "AsyncGuestProcess",
    "GuestProcess",
    "authenticate",
]

_log = logging.getLogger(__name__)

DEFAULT_WINDOW = 1024 * 1024
"""Bytes of one output stream the agent may send ahead of the consumer."""

DEFAULT_MAX_OUTPUT = 256 * 1024 * 1024
"""What ``run()`` collects of a command's output (stdout and stderr together) and what
``read_file()`` reads, unless the caller says otherwise: past it the call fails rather than
let a guest fill the host's memory."""

_TIMEOUT_GRACE_S = 10.0  # how long past its timeout a command may take to be reported killed

StrOrBytes: TypeAlias = str | bytes | os.PathLike[str] | os.PathLike[bytes]
Args: TypeAlias = StrOrBytes | Sequence[StrOrBytes]


class AgentError(GuestError):
    """The agent refused or failed a request; ``errno`` is the guest's (Linux) errno or 0."""

    def __init__(self, message: str, *, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class _ChannelClosed(Exception):
    """Internal: the channel ended while a writer waited for credit."""


# ---- channels --------------------------------------------------------------------------------


class _InStream:
    """One agent→host stream of a channel, buffered up to ``window`` bytes."""

    def __init__(self, conn: _Connection, channel: int, stream: Stream, window: int) -> None:
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

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all until EOF when ``n < 0``); ``b""`` at EOF."""
        if n == 0:
            return b""
        if n < 0:
            parts = []
            while chunk := await self.read(MAX_PAYLOAD):
                parts.append(chunk)
            return b"".join(parts)
        while not self._chunks and not self._eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if not self._chunks:
            if self._exc is not None:
                raise self._exc
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

    def __init__(self, conn: _Connection, channel: int) -> None:
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
            self.finish(exc=AgentError(info.message, errno=info.errno))
        elif kind in (MsgType.OK, MsgType.PONG, MsgType.EXIT, MsgType.FILE_END):
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

    async def send_data(self, kind: MsgType, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as ``kind`` frames, waiting for the agent's credit."""
        view = memoryview(data).cast("B")
        while view:
            while self._credit <= 0 and not self.done:
                self._credit_waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._credit_waiter
                finally:
                    self._credit_waiter = None
            if self.done:
                raise _ChannelClosed
            take = min(self._credit, MAX_PAYLOAD, len(view))
            self._credit -= take
            await self.conn.send(kind, self.id, bytes(view[:take]))
            view = view[take:]


# ---- authentication ------------------------------------------------------------------------------


def authenticate(sock: socket.socket, key: bytes, timeout: float | None = 10.0) -> None:
    """Open a vsock connection to the agent with the VM run's key: send AUTH, wait for its OK.

    The agent serves vsock connections only after this (``docs/agent-protocol.md``); the
    machine does it in ``open_agent_socket``, before a client says HELLO. Raises
    :class:`AgentError` when the agent refuses (a wrong key: it then hangs up), GuestError when
    the connection ends, VMTimeoutError after ``timeout`` seconds.
    """
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        sock.sendall(encode_auth(key))
        length, kind, channel = decode_header(_recv_exactly(sock, HEADER_SIZE))
        payload = _recv_exactly(sock, length)
    except TimeoutError:
        raise VMTimeoutError(f"the guest agent did not answer AUTH within {timeout} s") from None
    except OSError as err:
        raise GuestError(f"the guest agent connection failed during AUTH: {err}") from err
    finally:
        sock.settimeout(previous)
    if (kind, channel, payload) == (MsgType.OK, 0, b""):
        return
    if (kind, channel) == (MsgType.ERROR, 0):
        info = ErrorInfo.decode(payload)
        raise AgentError(f"the agent refused the connection: {info.message}", errno=info.errno)
    raise ProtocolError(f"expected OK to AUTH from the agent, got type 0x{kind:02x}")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise GuestError("the guest agent closed the connection during AUTH")
        data += chunk
    return bytes(data)


# ---- the connection ------------------------------------------------------------------------------


class _Connection:
    """One agent session over one stream socket; lives on vzkit's shared loop."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        hello: Hello,
        window: int,
    ) -> None:
        self.reader, self.writer, self.hello, self.window = reader, writer, hello, window
        self._channels: dict[int, _Channel] = {}
        self._ids = itertools.count(1)
        self._error: GuestError | None = None
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def open(
        cls, sock: socket.socket, *, timeout: float | None, window: int, resync: bool
    ) -> _Connection:
        if not 0 < window <= 0xFFFFFFFF:
            raise ValueError(f"window must be between 1 and 2**32-1 bytes, not {window}")
        reader, writer = await asyncio.open_connection(sock=sock, limit=4 * MAX_PAYLOAD)
        nonce = os.urandom(NONCE_SIZE)
        try:
            async with asyncio.timeout(timeout):
                if resync:
                    writer.write(RESYNC_PREAMBLE)
                writer.write(encode_frame(MsgType.HELLO, 0, encode_hello_request(nonce=nonce)))
                frame = await (_find_hello(reader, nonce) if resync else _read_frame(reader))
        except TimeoutError:
            writer.close()
            raise VMTimeoutError(f"the guest agent did not answer within {timeout} s") from None
        except BaseException:
            writer.close()
            raise
        if frame.type == MsgType.ERROR:
            writer.close()
            info = ErrorInfo.decode(frame.payload)
            raise AgentError(f"the agent refused the session: {info.message}", errno=info.errno)
        if frame.type != MsgType.HELLO or frame.channel != 0:
            writer.close()
            raise ProtocolError(f"expected HELLO from the agent, got type 0x{frame.type:02x}")
        hello = Hello.decode(frame.payload)
        if hello.nonce != nonce:
            writer.close()
            raise ProtocolError("the agent's HELLO does not answer ours (wrong nonce)")
        if hello.major != PROTOCOL_VERSION[0]:
            writer.close()
            raise ProtocolError(
                f"the agent speaks protocol {hello.major}.{hello.minor}, "
                f"not {PROTOCOL_VERSION[0]}.x"
            )
        _log.debug("agent %s, protocol %d.%d", hello.agent_version, hello.major, hello.minor)
        return cls(reader, writer, hello, window)

    async def _read_loop(self) -> None:
        error: GuestError
        try:
            while True:
                self._dispatch(await _read_frame(self.reader))
        except asyncio.IncompleteReadError:
            error = GuestError("the guest agent closed the connection")
        except GuestError as err:
            error = err
        except OSError as err:
            error = GuestError(f"the guest agent connection failed: {err}")
        except asyncio.CancelledError:
            error = GuestError("the agent client is closed")
        self._fail(error)

    def _dispatch(self, frame: Frame) -> None:
        if frame.channel == 0:
            if frame.type != MsgType.ERROR:
                raise ProtocolError(f"unexpected message type 0x{frame.type:02x} on channel 0")
            info = ErrorInfo.decode(frame.payload)
            raise AgentError(f"the agent ended the session: {info.message}", errno=info.errno)
        channel = self._channels.get(frame.channel)
        if channel is not None:  # else: a cancelled channel's last frames
            channel.on_frame(frame)

    def _fail(self, error: GuestError) -> None:
        if self._error is None:
            self._error = error
            _log.debug("agent connection ended: %s", error)
        for channel in list(self._channels.values()):
            channel.finish(exc=error)
        self.writer.close()

    def forget(self, channel: _Channel) -> None:
        self._channels.pop(channel.id, None)

    def channel(self) -> _Channel:
        if self._error is not None:
            raise self._error
        channel = _Channel(self, next(self._ids))
        self._channels[channel.id] = channel
        return channel

    def send_nowait(self, kind: int, channel: int, payload: bytes = b"") -> None:
        if self._error is not None:
            raise self._error
        self.writer.write(encode_frame(kind, channel, payload))

    async def send(self, kind: MsgType, channel: int, payload: bytes = b"") -> None:
        self.send_nowait(kind, channel, payload)
        try:
            await self.writer.drain()
        except OSError as err:
            # the reader may be about to report why (the agent's ERROR before it hung up)
            await asyncio.wait([self._task], timeout=1.0)
            raise (self._error or GuestError(f"the agent connection failed: {err}")) from err

    async def aclose(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._fail(GuestError("the agent client is closed"))
        try:
            await self.writer.wait_closed()
        except OSError:
            pass

    # ---- requests ----

    async def request(self, kind: MsgType, timeout: float | None = None) -> Frame:
        channel = self.channel()
        try:
            async with asyncio.timeout(timeout):
                await self.send(kind, channel.id)
                return await channel.result
        except TimeoutError:
            raise VMTimeoutError(
                f"the guest agent did not answer {kind.name} in {timeout} s"
            ) from None
        finally:
            channel.cancel()

    async def exec(
        self,
        args: Args,
        *,
        stdin: bool,
        env: Mapping[StrOrBytes, StrOrBytes] | None,
        cwd: StrOrBytes | None,
        timeout: float | None,
    ) -> _ExecChannel:
        argv = _argv(args)
        entries = env_entries(list((env or {}).items()))
        flags = ExecFlag.STDIN if stdin else ExecFlag.NONE
        if env is not None:
            flags |= ExecFlag.ENV_REPLACE
        timeout_ms = 0 if timeout is None else max(1, int(timeout * 1000))
        request = ExecRequest(
            argv,
            entries,
            os.fsencode(cwd) if cwd is not None else b"",
            flags,
            timeout_ms,
            self.window,
        )
        channel = _ExecChannel(self, next(self._ids), args, timeout)
        if self._error is not None:
            raise self._error
        self._channels[channel.id] = channel
        try:
            await self.send(MsgType.EXEC, channel.id, request.encode())
        except BaseException:
            channel.cancel()
            raise
        return channel

    async def run(
        self,
        args: Args,
        *,
        input: bytes | None,
        timeout: float | None,
        check: bool,
        env: Mapping[StrOrBytes, StrOrBytes] | None,
        cwd: StrOrBytes | None,
        max_output: int | None,
    ) -> subprocess.CompletedProcess[bytes]:
        _check_limit("max_output", max_output)
        channel = await self.exec(args, stdin=input is not None, env=env, cwd=cwd, timeout=timeout)
        out, err = bytearray(), bytearray()
        try:
            async with asyncio.timeout(None if timeout is None else timeout + _TIMEOUT_GRACE_S):
                status = await channel.communicate(input, out, err, max_output)
        except TimeoutError:
            channel.cancel()
            raise subprocess.TimeoutExpired(args, timeout or 0, bytes(out), bytes(err)) from None
        except BaseException:
            channel.cancel()
            raise
        if status.timed_out:
            raise subprocess.TimeoutExpired(args, timeout or 0, bytes(out), bytes(err))
        result = subprocess.CompletedProcess(args, status.returncode, bytes(out), bytes(err))
        if check:
            result.check_returncode()
        return result

    async def read_file(self, path: StrOrBytes, max_size: int | None) -> bytes:
        _check_limit("max_size", max_size)
        channel = self.channel()
        data = channel.add_stream(MsgType.FILE_DATA, Stream.OUT, self.window)
        try:
            await self.send(
                MsgType.READ_FILE,
                channel.id,
                ReadFileRequest(os.fsencode(path), self.window).encode(),
            )
            content = bytearray()
            while chunk := await data.read(MAX_PAYLOAD):
                if max_size is not None and len(content) + len(chunk) > max_size:
                    raise GuestError(
                        f"the guest file {os.fsdecode(path)!r} is larger than "
                        f"max_size={max_size} bytes; nothing was returned (pass a larger "
                        "max_size, or stream it, e.g. with popen(['cat', path]))"
                    )
                content += chunk
            await channel.result
            return bytes(content)
        finally:
            channel.cancel()

    async def write_file(self, path: StrOrBytes, data: bytes, mode: int) -> None:
        channel = self.channel()
        try:
            request = WriteFileRequest(os.fsencode(path), mode)
            await self.send(MsgType.WRITE_FILE, channel.id, request.encode())
            try:
                await channel.send_data(MsgType.FILE_DATA, data)
                await self.send(MsgType.FILE_END, channel.id)
            except _ChannelClosed:
                pass  # the agent answered early: the result says why
            await channel.result
        finally:
            channel.cancel()


def _check_limit(name: str, limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"{name} must be a number of bytes >= 0 or None, not {limit!r}")


async def _read_frame(reader: asyncio.StreamReader) -> Frame:
    length, kind, channel = decode_header(await reader.readexactly(HEADER_SIZE))
    return Frame(kind, channel, await reader.readexactly(length) if length else b"")


_RESYNC_LIMIT = 64 * 1024 * 1024
_HELLO_FIXED = 2 + 2 + 4 + 4 + NONCE_SIZE  # after the magic: versions, limits, nonce


async def _find_hello(reader: asyncio.StreamReader, nonce: bytes) -> Frame:
    """Skip what a previous session left in the stream, up to the HELLO that echoes ``nonce``."""
    skipped = 0
    while skipped < _RESYNC_LIMIT:
        try:
            data = await reader.readuntil(MAGIC)
        except asyncio.LimitOverrunError as err:
            skipped += len(await reader.readexactly(err.consumed))
            continue
        skipped += len(data)
        if len(data) < HEADER_SIZE + len(MAGIC):
            continue
        length, kind, reserved, channel = HEADER.unpack(
            data[-HEADER_SIZE - len(MAGIC) : -len(MAGIC)]
        )
        if (kind, reserved, channel) != (MsgType.HELLO, b"\0\0\0", 0) or not (
            len(MAGIC) + _HELLO_FIXED <= length <= MAX_PAYLOAD
        ):
            continue
        fixed = await reader.readexactly(_HELLO_FIXED)
        if fixed[-NONCE_SIZE:] != nonce:
            skipped += len(fixed)
            continue
        rest = await reader.readexactly(length - len(MAGIC) - _HELLO_FIXED)
        if skipped > len(data):
            _log.debug("skipped %d bytes of a previous session", skipped - len(data))
        return Frame(MsgType.HELLO, 0, MAGIC + fixed + rest)
    raise ProtocolError(f"no HELLO from the agent in the first {_RESYNC_LIMIT} bytes")


def _argv(args: Args) -> tuple[bytes, ...]:
    if isinstance(args, str | bytes | os.PathLike):
        return (os.fsencode(args),)
    argv = tuple(os.fsencode(a) for a in args)
    if not argv:
        raise ValueError("args must not be empty")
    return argv


class _ExecChannel(_Channel):
    """An exec'd process: stdout/stderr streams, stdin, exit status."""

    def __init__(self, conn: _Connection, channel: int, args: Args, timeout: float | None) -> None:
        super().__init__(conn, channel)
        self.args, self.timeout = args, timeout
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


# ---- streaming processes -------------------------------------------------------------------


class _RawReader(io.RawIOBase):
    def __init__(self, stream: _InStream) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any, /) -> int:
        data = run_sync(self._stream.read(len(buffer)))
        buffer[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return run_sync(self._stream.read())

    def close(self) -> None:
        if not self.closed:
            _on_loop(self._stream.discard)
        super().close()


class _RawWriter(io.RawIOBase):
    def __init__(self, channel: _ExecChannel) -> None:
        self._channel = channel

    def writable(self) -> bool:
        return True

    def write(self, data: Any, /) -> int:
        run_sync(self._channel.write(bytes(data)))
        return len(data)

    def close(self) -> None:
        if not self.closed:
            super().close()
            _on_loop(self._channel.close_stdin)


async def _call(fn: Callable[[], None]) -> None:
    """Run a plain function on the shared loop (channels are not thread-safe)."""
    fn()


def _on_loop(fn: Callable[[], None]) -> None:
    """Schedule ``fn()`` on the shared loop without waiting for it (channels are not
    thread-safe); a closed connection is no error here.

    Never blocks: ``close()`` also runs from finalizers, at any point of any thread and under
    whatever locks it holds (e.g. ``concurrent.futures``' global lock inside
    ``ThreadPoolExecutor.submit``, which the loop thread needs too: waiting here deadlocked).
    Later calls from the same thread are queued behind it, so their order holds.
    """

    def guarded() -> None:
        with contextlib.suppress(GuestError):
            fn()

    if in_loop_thread():
        guarded()
        return
    with contextlib.suppress(RuntimeError):  # the loop is gone (interpreter shutdown)
        get_loop().call_soon_threadsafe(guarded)


class _ProcessBase:
    def __init__(self, channel: _ExecChannel) -> None:
        self._channel = channel
        self.args = channel.args
        self.returncode: int | None = None

    def _set_status(self, status: ExitStatus) -> int:
        self.returncode = status.returncode
        return status.returncode

    @property
    def timed_out(self) -> bool:
        """Whether the agent killed the process because it outlived its ``timeout``."""
        return self._channel.status is not None and self._channel.status.timed_out


class GuestProcess(_ProcessBase):
    """A process running in the guest, like :class:`subprocess.Popen` with pipes.

    ``stdin`` (unless ``stdin=False``), ``stdout`` and ``stderr`` are binary buffered file
    objects. Read the outputs while the process runs: as with pipes, a stream nobody reads
    stops the process once its window is full. Closing a reader discards the rest of it.
    """

    def __init__(self, channel: _ExecChannel, *, stdin: bool) -> None:
        super().__init__(channel)
        self.stdin: io.BufferedWriter | None = (
            io.BufferedWriter(_RawWriter(channel), MAX_PAYLOAD) if stdin else None
        )
        self.stdout = io.BufferedReader(_RawReader(channel.stdout), MAX_PAYLOAD)
        self.stderr = io.BufferedReader(_RawReader(channel.stderr), MAX_PAYLOAD)

    def poll(self) -> int | None:
        if self.returncode is None and self._channel.result.done():
            return self.wait()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit status; ``subprocess.TimeoutExpired`` after ``timeout`` s."""
        if self.returncode is not None:
            return self.returncode
        try:
            return self._set_status(run_sync(_wait_for(self._channel.wait(), timeout)))
        except TimeoutError:
            raise subprocess.TimeoutExpired(self.args, timeout or 0) from None

    def communicate(
        self, input: bytes | None = None, timeout: float | None = None
    ) -> tuple[bytes, bytes]:
        """Send ``input``, close stdin, read both outputs to the end and wait."""
        if self.stdin is not None:
            self.stdin.flush()
        out, err = bytearray(), bytearray()
        coro = self._channel.communicate(input if self.stdin is not None else None, out, err)
        try:
            self._set_status(run_sync(_wait_for(coro, timeout)))
        except TimeoutError:
            raise subprocess.TimeoutExpired(
                self.args, timeout or 0, bytes(out), bytes(err)
            ) from None
        return bytes(out), bytes(err)

    def send_signal(self, sig: int) -> None:
        run_sync(_call(lambda: self._channel.signal(sig, group=False)))

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the process and its whole process group."""
        run_sync(_call(lambda: self._channel.signal(signal.SIGKILL, group=True)))

    def __enter__(self) -> GuestProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        """Close stdin and the outputs (discarding the rest) and wait, like Popen."""
        try:
            if self.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    self.stdin.close()
            self.stdout.close()
            self.stderr.close()
            self.wait()
        except GuestError:
            if exc[0] is None:
                raise


async def _wait_for(coro: Any, timeout: float | None) -> Any:
    async with asyncio.timeout(timeout):
        return await coro


class AsyncStreamReader:
    """An output stream of an :class:`AsyncGuestProcess`: ``await read(n)`` or ``async for``."""

    def __init__(self, stream: _InStream) -> None:
        self._stream = stream

    async def read(self, n: int = -1) -> bytes:
        return await wrap(self._stream.read(n))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.read(MAX_PAYLOAD):
            yield chunk

    async def aclose(self) -> None:
        await wrap(_call(self._stream.discard))


class AsyncStreamWriter:
    """The stdin of an :class:`AsyncGuestProcess`."""

    def __init__(self, channel: _ExecChannel) -> None:
        self._channel = channel

    async def write(self, data: bytes) -> None:
        """Send ``data``, waiting while the agent's window is full."""
        await wrap(self._channel.write(data))

    async def aclose(self) -> None:
        await wrap(_call(self._channel.close_stdin))


class AsyncGuestProcess(_ProcessBase):
    """The asyncio twin of :class:`GuestProcess`."""

    def __init__(self, channel: _ExecChannel, *, stdin: bool) -> None:
        super().__init__(channel)
        self.stdin = AsyncStreamWriter(channel) if stdin else None
        self.stdout = AsyncStreamReader(channel.stdout)
        self.stderr = AsyncStreamReader(channel.stderr)

    async def wait(self) -> int:
        return self._set_status(await wrap(self._channel.wait()))

    async def communicate(self, input: bytes | None = None) -> tuple[bytes, bytes]:
        out, err = bytearray(), bytearray()
        coro = self._channel.communicate(input if self.stdin is not None else None, out, err)
        self._set_status(await wrap(coro))
        return bytes(out), bytes(err)

    async def send_signal(self, sig: int) -> None:
        await wrap(_call(lambda: self._channel.signal(sig, group=False)))

    async def kill(self) -> None:
        await wrap(_call(lambda: self._channel.signal(signal.SIGKILL, group=True)))

    async def __aenter__(self) -> AsyncGuestProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for closer in (self.stdin, self.stdout, self.stderr):
            if closer is not None:
                await closer.aclose()
        await self.wait()


# ---- public clients ------------------------------------------------------------------------------


class AgentClient:
    """A blocking client of the guest agent over a connected stream socket (which it owns).

    Safe to use from several threads at once: each call is a channel of the one connection.
    ``timeout`` bounds the handshake (:class:`VMTimeoutError`); ``window`` is how many bytes of
    each output stream may wait unread. Pass ``resync=True`` on a stream that may still hold
    a previous host's session (the virtio console port: its guest end never sees a hang-up
    that is followed at once by a new connection, e.g. after restoring a snapshot).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float | None = 30.0,
        window: int = DEFAULT_WINDOW,
        resync: bool = False,
    ) -> None:
        self._conn: _Connection | None = None
        try:
            opening = _Connection.open(sock, timeout=timeout, window=window, resync=resync)
            self._conn = run_sync(opening)
        except BaseException:
            sock.close()
            raise

    @property
    def agent_version(self) -> str:
        return self._c.hello.agent_version

    @property
    def protocol_version(self) -> tuple[int, int]:
        return (self._c.hello.major, self._c.hello.minor)

    @property
    def _c(self) -> _Connection:
        if self._conn is None:
            raise GuestError("the agent client is closed")
        return self._conn

    def ping(self, timeout: float | None = None) -> str:
        """Round-trip to the agent; returns its version."""
        return run_sync(self._c.request(MsgType.PING, timeout)).payload.decode()

    def run(
        self,
        args: Args,
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``args`` in the guest and collect its output, like :func:`subprocess.run`.

        ``env`` replaces the agent's environment; ``timeout`` (seconds) is enforced by the
        agent, which kills the process group and makes this raise
        :class:`subprocess.TimeoutExpired`. A missing command exits with 127 and the guest's
        message on stderr; ``check=True`` raises :class:`subprocess.CalledProcessError`.
        More than ``max_output`` bytes of output (stdout and stderr together; ``None``: no
        limit) kill the process group and raise :class:`GuestError`.
        """
        coro = self._c.run(
            args, input=input, timeout=timeout, check=check, env=env, cwd=cwd,
            max_output=max_output,
        )  # fmt: skip
        return run_sync(coro)

    def popen(
        self,
        args: Args,
        *,
        stdin: bool = True,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        timeout: float | None = None,
    ) -> GuestProcess:
        """Start ``args`` and return a streaming :class:`GuestProcess`."""
        coro = self._c.exec(args, stdin=stdin, env=env, cwd=cwd, timeout=timeout)
        return GuestProcess(run_sync(coro), stdin=stdin)

    def read_file(self, path: StrOrBytes, *, max_size: int | None = DEFAULT_MAX_OUTPUT) -> bytes:
        """The content of ``path`` in the guest; :class:`GuestError` if it is larger than
        ``max_size`` bytes (``None``: no limit)."""
        return run_sync(self._c.read_file(path, max_size))

    def write_file(self, path: StrOrBytes, data: bytes, mode: int = 0o644) -> None:
        """Write ``data`` to a temporary file next to ``path`` and rename it over ``path``."""
        run_sync(self._c.write_file(path, data, mode))

    def sync(self) -> None:
        run_sync(self._c.request(MsgType.SYNC))

    def poweroff(self) -> None:
        """Ask the guest to sync and power off; returns once the agent acknowledged."""
        run_sync(self._c.request(MsgType.POWEROFF))

    @property
    def broken(self) -> bool:
        """The connection is closed or failed (e.g. its vsock device was unplugged)."""
        conn = self._conn
        return conn is None or conn._error is not None

    def close(self) -> None:
        """Close the connection; processes still running in the guest are killed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            run_sync(conn.aclose())

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_conn", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1)


class AsyncAgentClient:
    """The asyncio twin of :class:`AgentClient`; create it with :meth:`connect`."""

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn

    @classmethod
    async def connect(
        cls,
        sock: socket.socket,
        *,
        timeout: float | None = 30.0,
        window: int = DEFAULT_WINDOW,
        resync: bool = False,
    ) -> AsyncAgentClient:
        opening = _Connection.open(sock, timeout=timeout, window=window, resync=resync)
        try:
            return cls(await wrap(opening))
        except BaseException:
            sock.close()
            raise

    @property
    def agent_version(self) -> str:
        return self._c.hello.agent_version

    @property
    def _c(self) -> _Connection:
        if self._conn is None:
            raise GuestError("the agent client is closed")
        return self._conn

    async def ping(self, timeout: float | None = None) -> str:
        return (await wrap(self._c.request(MsgType.PING, timeout))).payload.decode()

    async def run(
        self,
        args: Args,
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
    ) -> subprocess.CompletedProcess[bytes]:
        coro = self._c.run(
            args, input=input, timeout=timeout, check=check, env=env, cwd=cwd,
            max_output=max_output,
        )  # fmt: skip
        return await wrap(coro)

    async def popen(
        self,
        args: Args,
        *,
        stdin: bool = True,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        timeout: float | None = None,
    ) -> AsyncGuestProcess:
        coro = self._c.exec(args, stdin=stdin, env=env, cwd=cwd, timeout=timeout)
        return AsyncGuestProcess(await wrap(coro), stdin=stdin)

    async def read_file(
        self, path: StrOrBytes, *, max_size: int | None = DEFAULT_MAX_OUTPUT
    ) -> bytes:
        return await wrap(self._c.read_file(path, max_size))

    async def write_file(self, path: StrOrBytes, data: bytes, mode: int = 0o644) -> None:
        await wrap(self._c.write_file(path, data, mode))

    async def sync(self) -> None:
        await wrap(self._c.request(MsgType.SYNC))

    async def poweroff(self) -> None:
        await wrap(self._c.request(MsgType.POWEROFF))

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await wrap(conn.aclose())

    async def __aenter__(self) -> AsyncAgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if getattr(self, "_conn", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1)
