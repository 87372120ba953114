"""vsock over ``VZVirtioSocketDevice``: host → guest connections and guest → host listeners.

A ``VZVirtioSocketConnection`` owns its file descriptor and closes it when it is closed or
deallocated, so vzkit duplicates the descriptor at once (inside the completion handler or
delegate call, on the VM's queue), closes the framework's connection, and hands out an
ordinary ``socket.socket`` over the duplicate (the seed's ``NewVsockConn``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue as _queue
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from ...errors import StateError, UnsupportedError, VMError, VMTimeoutError
from ._nserror import nserror_to_exception
from ._objc import Queue, listener_delegate, vz

__all__ = ["VsockListener", "VsockManager", "socket_from_connection"]

log = logging.getLogger(__name__)
MAX_PORT = 0xFFFFFFFF


def socket_from_connection(connection: Any) -> socket.socket:
    """A ``socket.socket`` over a duplicate of the connection's descriptor; the framework's
    connection is closed (the duplicate keeps the stream open)."""
    fd = int(connection.fileDescriptor())
    if fd < 0:
        raise VMError("the vsock connection is already closed")
    dup = os.dup(fd)
    try:
        connection.close()
        try:
            return socket.socket(fileno=dup)
        except OSError:
            return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, dup)
    except BaseException:
        os.close(dup)
        raise


def _check_port(port: int) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= MAX_PORT:
        raise ValueError(f"vsock port must be an integer 0..{MAX_PORT}, got {port!r}")
    return port


class VsockManager:
    """The first ``VZVirtioSocketDevice`` of a VM (the seed's ``VsockManager``).

    Every framework call runs on the VM's queue (``dispatch``, default ``queue.sync``).
    """

    def __init__(
        self, vm: Any, queue: Queue, *, dispatch: Callable[[Callable[[], Any]], Any] | None = None
    ) -> None:
        self._queue = queue
        self.dispatch = dispatch if dispatch is not None else queue.sync
        cls = vz().VZVirtioSocketDevice
        device = self.dispatch(
            lambda: next((d for d in vm.socketDevices() or () if d.isKindOfClass_(cls)), None)
        )
        if device is None:
            raise UnsupportedError("this VM has no vsock device", backend="vz", feature="vsock")
        self._device = device
        self._listeners: dict[int, VsockListener] = {}
        self._lock = threading.Lock()

    def connect(self, port: int, timeout: float | None = 10.0) -> socket.socket:
        """Connect to the guest's ``port``; ``ConnectionRefusedError`` if nobody listens."""
        _check_port(port)
        done = threading.Event()
        box: dict[str, Any] = {}

        def block(connection: Any, error: Any) -> None:
            try:
                if connection is not None and error is None:
                    box["socket"] = socket_from_connection(connection)
                else:
                    box["error"] = error
            except BaseException as err:  # never into Objective-C
                box["exception"] = err
            finally:
                done.set()

        self.dispatch(lambda: self._device.connectToPort_completionHandler_(port, block))
        if not done.wait(timeout):
            # The handler may still fire: make sure its socket is not leaked.
            def late() -> None:
                done.wait()
                sock = box.get("socket")
                if sock is not None:
                    sock.close()

            threading.Thread(target=late, name="vzkit-vsock-late", daemon=True).start()
            raise VMTimeoutError(f"vsock connect to port {port} timed out after {timeout} s")
        if "exception" in box:
            raise VMError(f"vsock connect to port {port} failed") from box["exception"]
        if "socket" in box:
            result: socket.socket = box["socket"]
            return result
        raise nserror_to_exception(box.get("error"), f"vsock connect to port {port}")

    def listen(self, port: int, *, backlog: int = 128) -> VsockListener:
        """Accept guest connections to host ``port`` (``VZVirtioSocketListener``)."""
        _check_port(port)
        with self._lock:
            if port in self._listeners:
                raise StateError(f"vsock port {port} already has a listener")
            listener = VsockListener(self, port, backlog)
            self._listeners[port] = listener
        try:
            listener._install()
        except BaseException:
            with self._lock:
                self._listeners.pop(port, None)
            raise
        return listener

    def _forget(self, port: int) -> None:
        with self._lock:
            self._listeners.pop(port, None)

    def close(self) -> None:
        """Close every listener this manager opened."""
        with self._lock:
            listeners = list(self._listeners.values())
        for listener in listeners:
            listener.close()


class VsockListener:
    """Guest → host connections to one port: ``accept()`` returns ``(socket, guest_port)``."""

    def __init__(self, manager: VsockManager, port: int, backlog: int) -> None:
        self.port = port
        self._manager = manager
        self._backlog = backlog
        self._pending: _queue.Queue[tuple[socket.socket, int] | None] = _queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        # Both are held weakly or not at all by the framework: keep them for our lifetime.
        self._delegate = listener_delegate(self._on_connection)
        self._listener: Any = vz().VZVirtioSocketListener.alloc().init()
        self._listener.setDelegate_(self._delegate)

    def __repr__(self) -> str:
        return f"<VsockListener port={self.port}{' closed' if self._closed else ''}>"

    def _install(self) -> None:
        device, listener, port = self._manager._device, self._listener, self.port
        self._manager.dispatch(lambda: device.setSocketListener_forPort_(listener, port))

    def _on_connection(self, connection: Any) -> bool:
        """Runs on the VM's queue, from the delegate; never raises (the delegate guards)."""
        with self._lock:
            if self._closed or self._pending.qsize() >= self._backlog:
                return False
            peer_port = int(connection.sourcePort())
            self._pending.put((socket_from_connection(connection), peer_port))
        return True

    def accept(self, timeout: float | None = None) -> tuple[socket.socket, int]:
        """The next guest connection and the guest's source port."""
        if self._closed:
            raise StateError(f"vsock listener on port {self.port} is closed")
        try:
            item = self._pending.get(timeout=timeout)
        except _queue.Empty:
            raise VMTimeoutError(
                f"no vsock connection on port {self.port} within {timeout} s"
            ) from None
        if item is None:
            raise StateError(f"vsock listener on port {self.port} is closed")
        return item

    def close(self) -> None:
        """Stop listening; connections not yet accepted are closed. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        device, port = self._manager._device, self.port
        with contextlib.suppress(Exception):
            self._manager.dispatch(lambda: device.removeSocketListenerForPort_(port))
        self._manager._forget(port)
        while True:
            try:
                item = self._pending.get_nowait()
            except _queue.Empty:
                break
            if item is not None:
                item[0].close()
        self._pending.put(None)

    def __enter__(self) -> VsockListener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
