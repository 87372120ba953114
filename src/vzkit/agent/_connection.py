"""The core of the agent client: one session over one stream socket, on vzkit's shared loop.

:class:`_Connection` owns one connected stream socket to ``vzkit-agent`` (a vsock connection,
the unix socket behind the virtio console port, or a socketpair in tests): the HELLO exchange
(with a resync past a previous host's bytes on the console), the read loop that hands frames to
their channels (:mod:`._channel`), and the requests (exec, run, read_file, write_file, the
one-frame ones). :func:`authenticate` is the AUTH step a machine does on a vsock connection
before a client says HELLO. The public clients (:mod:`._client`) are thin layers over this.

Flow control keeps memory bounded on both sides: the agent sends at most ``window`` bytes of a
stream that the consumer has not read yet, and the client sends at most the agent's window of
stdin or file data that the agent has not consumed yet.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import subprocess
from collections.abc import Mapping
from typing import Any

from vzkit.errors import GuestError, VMTimeoutError

from ._channel import (
    AgentError,
    Args,
    StrOrBytes,
    _Channel,
    _ChannelClosed,
    _ExecChannel,
    _SocketChannel,
)
from ._command import (
    command_argv,
    completed,
    decode_output,
    encode_input,
    tty_options,
    user_spec,
)
from ._protocol import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    RESYNC_PREAMBLE,
    SOCKET_MINOR,
    TTY_MINOR,
    USER_MINOR,
    ClockStep,
    ConnectRequest,
    ErrorInfo,
    ExecFlag,
    ExecRequest,
    Frame,
    Hello,
    MsgType,
    ProtocolError,
    ReadFileRequest,
    SetClockRequest,
    SockProto,
    Stream,
    WriteFileRequest,
    decode_header,
    encode_auth,
    encode_frame,
    encode_hello_request,
    env_entries,
)

__all__ = ["DEFAULT_MAX_OUTPUT", "DEFAULT_WINDOW", "authenticate"]

_log = logging.getLogger(__name__)
DEFAULT_WINDOW = 1024 * 1024
"""Bytes of one output stream the agent may send ahead of the consumer."""

DEFAULT_MAX_OUTPUT = 256 * 1024 * 1024
"""What ``run()`` collects of a command's output (stdout and stderr together) and what
``read_file()`` reads, unless the caller says otherwise: past it the call fails rather than
let a guest fill the host's memory."""

_TIMEOUT_GRACE_S = 10.0  # how long past its timeout a command may take to be reported killed


# ---- authentication ------------------------------------------------------------------------------


def authenticate(sock: socket.socket, key: bytes, timeout: float | None = 10.0) -> None:
    """Open a vsock connection to the agent with the VM run's key: send AUTH, wait for its OK.

    The agent serves vsock connections only after this (``docs/agent-protocol.md``); the
    core does it (``vzkit._guestcore``) before a client says HELLO. Raises
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
        shell: bool = False,
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> _ExecChannel:
        argv = command_argv(args, shell)
        spec = user_spec(user)
        pty = tty_options(tty, term, size)
        if spec and self.hello.minor < USER_MINOR:
            raise self._too_old(f"cannot run commands as another user (user={user!r})", USER_MINOR,
                                "user=")  # fmt: skip
        if pty is not None and self.hello.minor < TTY_MINOR:
            raise self._too_old("cannot run commands on a terminal (tty=True)", TTY_MINOR, "tty=")
        entries = env_entries(list((env or {}).items()))
        flags = ExecFlag.STDIN if stdin else ExecFlag.NONE
        if env is not None:
            flags |= ExecFlag.ENV_REPLACE
        tty_size = (0, 0)
        if pty is not None:
            flags |= ExecFlag.TTY
            term_entry, tty_size = pty
            if not any(entry.startswith(b"TERM=") for entry in entries):  # env's TERM wins
                entries = (term_entry, *entries)
        timeout_ms = 0 if timeout is None else max(1, int(timeout * 1000))
        request = ExecRequest(
            argv,
            entries,
            os.fsencode(cwd) if cwd is not None else b"",
            flags,
            timeout_ms,
            self.window,
            spec,
            tty_size,
        )
        channel = _ExecChannel(self, next(self._ids), args, timeout, tty=pty is not None)
        if self._error is not None:
            raise self._error
        self._channels[channel.id] = channel
        try:
            await self.send(MsgType.EXEC, channel.id, request.encode())
        except BaseException:
            channel.cancel()
            raise
        return channel

    def _too_old(self, what: str, minor: int, option: str) -> AgentError:
        """The error for a request an agent of an older protocol minor cannot read."""
        hello = self.hello
        return AgentError(
            f"the guest's agent (vzkit-agent {hello.agent_version}, protocol {hello.major}."
            f"{hello.minor}) {what}: that needs protocol {PROTOCOL_VERSION[0]}.{minor}; boot a "
            "guest whose agent is this vzkit's (a snapshot keeps the agent it was saved with), "
            f"or run the command without {option}"
        )

    async def run(
        self,
        args: Args,
        *,
        input: bytes | str | None,
        timeout: float | None,
        check: bool,
        env: Mapping[StrOrBytes, StrOrBytes] | None,
        cwd: StrOrBytes | None,
        max_output: int | None,
        shell: bool = False,
        text: bool = False,
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> subprocess.CompletedProcess[Any]:
        """Run a command to its end (:mod:`._command` says what ``shell``, ``text`` and
        ``user`` do)."""
        _check_limit("max_output", max_output)
        data = encode_input(input, text)
        channel = await self.exec(
            args, stdin=data is not None, env=env, cwd=cwd, timeout=timeout, shell=shell,
            user=user, tty=tty, term=term, size=size,
        )  # fmt: skip
        out, err = bytearray(), bytearray()

        def expired() -> subprocess.TimeoutExpired:
            outputs = decode_output(bytes(out), text), decode_output(bytes(err), text)
            return subprocess.TimeoutExpired(args, timeout or 0, *outputs)

        try:
            async with asyncio.timeout(None if timeout is None else timeout + _TIMEOUT_GRACE_S):
                status = await channel.communicate(data, out, err, max_output)
        except TimeoutError:
            channel.cancel()
            raise expired() from None
        except BaseException:
            channel.cancel()
            raise
        if status.timed_out:
            raise expired()
        result = completed(args, status.returncode, bytes(out), bytes(err), text)
        if check:
            result.check_returncode()
        return result

    def _needs_sockets(self, what: str) -> None:
        hello = self.hello
        if hello.minor < SOCKET_MINOR:
            raise AgentError(
                f"the guest's agent (vzkit-agent {hello.agent_version}, protocol {hello.major}."
                f"{hello.minor}) cannot {what}: that needs protocol {PROTOCOL_VERSION[0]}."
                f"{SOCKET_MINOR}; boot a guest whose agent is this vzkit's (a snapshot keeps "
                "the agent it was saved with)"
            )

    async def connect_socket(
        self,
        protocol: SockProto,
        port: int,
        address: str = "",
        timeout: float | None = None,
        *,
        wait: bool = True,
    ) -> _SocketChannel:
        """A channel connected to ``port`` in the guest (TCP) or a UDP socket connected to it;
        :class:`AgentError` with the guest's errno when it cannot be (e.g. ECONNREFUSED).

        ``wait=False`` returns once CONNECT is sent: data written meanwhile waits in the agent
        until the connection is made (a round trip saved), and ``channel.connected`` (or the
        data stream) says whether it was."""
        self._needs_sockets("forward ports")
        if self._error is not None:
            raise self._error
        channel = _SocketChannel(self, next(self._ids), self.window)
        self._channels[channel.id] = channel
        request = ConnectRequest(protocol, port, self.window, address.encode())
        try:
            async with asyncio.timeout(timeout):
                await self.send(MsgType.CONNECT, channel.id, request.encode())
                if wait:
                    await asyncio.shield(channel.connected)
        except TimeoutError:
            channel.cancel()
            raise VMTimeoutError(
                f"the guest agent did not connect to guest port {port} within {timeout} s"
            ) from None
        except BaseException:
            channel.cancel()
            raise
        return channel

    async def set_clock(
        self, realtime_ns: int, threshold_ms: int = 0, timeout: float | None = None
    ) -> ClockStep:
        """Step the guest's clock to ``realtime_ns`` (the host's ``CLOCK_REALTIME``) where it
        is off by more than ``threshold_ms`` (0: the agent's 500 ms); the step made."""
        self._needs_sockets("set the guest clock")
        channel = self.channel()
        payload = SetClockRequest(realtime_ns, threshold_ms).encode()
        try:
            async with asyncio.timeout(timeout):
                await self.send(MsgType.SET_CLOCK, channel.id, payload)
                frame = await channel.result
        except TimeoutError:
            raise VMTimeoutError(
                f"the guest agent did not answer SET_CLOCK in {timeout} s"
            ) from None
        finally:
            channel.cancel()
        return ClockStep.decode(frame.payload)

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
