"""``vm.vsock``: stream sockets between the host and the guest, on every backend.

``connect(port)`` returns a connected :class:`socket.socket` (``sendall``, ``recv``,
``makefile``, ``settimeout``, ``shutdown`` all work); ``listen(port)`` returns a
:class:`VsockListener` whose ``accept()`` gives ``(socket, guest_port)``. The asyncio facade
(:mod:`vzkit.aio`) offers the same names returning asyncio streams.

Connecting to a guest port nobody listens on raises :class:`ConnectionRefusedError`.
Connections die with EOF or a reset when the VM stops; listeners are closed then too.
"""

from __future__ import annotations

import asyncio
import socket
import warnings
from types import TracebackType
from typing import TYPE_CHECKING

from ._config import check_vsock_port
from ._loop import run_sync, wrap

if TYPE_CHECKING:
    from ._vmcore import VMCore
    from .backends import VsockListenerLike

__all__ = ["AsyncVsock", "AsyncVsockListener", "Vsock", "VsockListener"]


class VsockListener:
    """Guest connections to one host port. A context manager; :meth:`close` is idempotent
    and wakes a thread blocked in :meth:`accept`."""

    def __init__(self, inner: VsockListenerLike) -> None:
        self._inner = inner
        self.port = inner.port
        self._closed = False

    def __repr__(self) -> str:
        return f"<VsockListener port={self.port}{' closed' if self._closed else ''}>"

    def accept(self, timeout: float | None = None) -> tuple[socket.socket, int]:
        """Wait for a guest connection: ``(socket, guest_port)`` (``-1`` if unknown).

        ``VMTimeoutError`` after ``timeout`` seconds, ``StateError`` once closed.
        """
        return self._inner.accept(timeout)

    def close(self) -> None:
        self._closed = True
        self._inner.close()

    def __enter__(self) -> VsockListener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self._inner.close()


class Vsock:
    """``vm.vsock`` of the blocking facade."""

    def __init__(self, core: VMCore) -> None:
        self._core = core

    def connect(self, port: int, timeout: float | None = None) -> socket.socket:
        """A stream to guest ``port``; the caller owns (and closes) the socket."""
        check_vsock_port(port)
        return run_sync(self._core.vsock_connect(port, timeout))

    def connect_socket(self, port: int, timeout: float | None = None) -> socket.socket:
        """The same as :meth:`connect` here (the twin of the asyncio facade's
        ``connect_socket``, where ``connect`` gives streams)."""
        return self.connect(port, timeout)

    def listen(self, port: int) -> VsockListener:
        """Accept guest connections to host ``port`` (the guest connects to CID 2)."""
        check_vsock_port(port)
        return VsockListener(run_sync(self._core.vsock_listen(port)))


class AsyncVsockListener:
    """The asyncio twin of :class:`VsockListener`: ``accept()`` gives streams and the port."""

    def __init__(self, inner: VsockListenerLike) -> None:
        self._sync = VsockListener(inner)
        self.port = inner.port

    def __repr__(self) -> str:
        return repr(self._sync).replace("<VsockListener", "<AsyncVsockListener")

    async def accept(
        self, timeout: float | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
        sock, peer = await asyncio.to_thread(self._sync.accept, timeout)
        reader, writer = await asyncio.open_connection(sock=sock)
        return reader, writer, peer

    async def close(self) -> None:
        self._sync.close()

    async def __aenter__(self) -> AsyncVsockListener:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncVsock:
    """``vm.vsock`` of :class:`vzkit.aio.VirtualMachine`: asyncio streams."""

    def __init__(self, core: VMCore) -> None:
        self._core = core

    async def connect(
        self, port: int, timeout: float | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = await self.connect_socket(port, timeout)
        return await asyncio.open_connection(sock=sock)

    async def connect_socket(self, port: int, timeout: float | None = None) -> socket.socket:
        """A connected :class:`socket.socket` (for ``loop.sock_*`` or your own transport)."""
        check_vsock_port(port)
        return await wrap(self._core.vsock_connect(port, timeout))

    async def listen(self, port: int) -> AsyncVsockListener:
        check_vsock_port(port)
        return AsyncVsockListener(await wrap(self._core.vsock_listen(port)))
