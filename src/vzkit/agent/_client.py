"""The host side of the guest agent protocol: :class:`AgentClient` and :class:`AsyncAgentClient`.

A client owns one connected stream socket to ``vzkit-agent`` and multiplexes any number of
concurrent requests over it as channels. The core (:class:`._connection._Connection`) is
asyncio code on vzkit's shared loop; :class:`AgentClient` blocks on it through
:func:`vzkit._loop.run_sync` and :class:`AsyncAgentClient` awaits it from any event loop through
:func:`vzkit._loop.wrap`.
"""

from __future__ import annotations

import socket
import subprocess
import warnings
from collections.abc import Mapping
from typing import Any

from vzkit._loop import run_sync, wrap
from vzkit.errors import GuestError

from ._channel import Args, StrOrBytes
from ._connection import DEFAULT_MAX_OUTPUT, DEFAULT_WINDOW, _Connection
from ._process import AsyncGuestProcess, GuestProcess
from ._protocol import MsgType

__all__ = ["AgentClient", "AsyncAgentClient"]


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
        input: bytes | str | None = None,
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        shell: bool = False,
        text: bool = False,
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``args`` in the guest and collect its output, like :func:`subprocess.run`.

        ``env`` replaces the agent's environment; ``timeout`` (seconds) is enforced by the
        agent, which kills the process group and makes this raise
        :class:`subprocess.TimeoutExpired`. A missing command exits with 127 and the guest's
        message on stderr; ``check=True`` raises :class:`subprocess.CalledProcessError`.
        A string command needs ``shell=True`` (``/bin/sh -c``); ``text=True`` sends a ``str``
        input and returns ``str`` outputs (UTF-8), as :func:`subprocess.run` does.
        ``user="USER[:GROUP]"`` runs it as that guest user (names resolved in the guest, or
        numeric ids), with its groups and ``HOME``; an unknown name raises :class:`AgentError`.
        More than ``max_output`` bytes of output (stdout and stderr together; ``None``: no
        limit) kill the process group and raise :class:`GuestError`.
        """
        coro = self._c.run(
            args, input=input, timeout=timeout, check=check, env=env, cwd=cwd,
            max_output=max_output, shell=shell, text=text, user=user,
            tty=tty, term=term, size=size,
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
        shell: bool = False,
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> GuestProcess:
        """Start ``args`` and return a streaming :class:`GuestProcess`; ``tty=True`` runs it
        on a pseudo-terminal of ``size=(rows, cols)`` with ``TERM=term`` (see
        :mod:`vzkit.agent._command`)."""
        coro = self._c.exec(
            args, stdin=stdin, env=env, cwd=cwd, timeout=timeout, shell=shell, user=user,
            tty=tty, term=term, size=size,
        )  # fmt: skip
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
        input: bytes | str | None = None,
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        shell: bool = False,
        text: bool = False,
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> subprocess.CompletedProcess[Any]:
        coro = self._c.run(
            args, input=input, timeout=timeout, check=check, env=env, cwd=cwd,
            max_output=max_output, shell=shell, text=text, user=user,
            tty=tty, term=term, size=size,
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
        shell: bool = False,
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> AsyncGuestProcess:
        coro = self._c.exec(
            args, stdin=stdin, env=env, cwd=cwd, timeout=timeout, shell=shell, user=user,
            tty=tty, term=term, size=size,
        )  # fmt: skip
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
