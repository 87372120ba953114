"""vsock on the qemu backend: the guest's device and the host side of ``vm.vsock``.

Two transports, chosen per start:

* **kernel** ``vhost-vsock-pci`` when ``/dev/vhost-vsock`` can be opened. We open it, claim
  the guest CID with ``VHOST_VSOCK_SET_GUEST_CID`` (trying other CIDs if another VM holds the
  configured one) and hand QEMU the fd (``vhostfd=``), so allocation cannot race. The host
  side is ``AF_VSOCK``.
* **user space** otherwise: our vhost-user-vsock device (:mod:`.vhost_vsock`) in a helper
  process per VM (measured against a thread in ``bench/vsock_thread_vs_process.py``: a
  process keeps its throughput while the vzkit process is busy). QEMU gets one end of a
  socketpair (``vhost-user-vsock-pci,chardev=...``); the host side is Firecracker's hybrid
  Unix socket ``<runtime dir>/vsock.sock`` (``CONNECT <port>``), and guest connections to host
  port P arrive at ``vsock.sock_<P>``.

Either way the transport's lifetime is the VM run's: :meth:`VsockTransport.close` kills the
helper, closes every listener and removes every socket file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import select
import socket
import struct
import threading
from pathlib import Path

from ..._config import LinuxVMConfig
from ..._process import OwnedProcess, spawn
from ..._vsock import check_vsock_port as check_port
from ...errors import StateError, VMError, VMTimeoutError
from .vhost_vsock import connect_hybrid, guest_port_path, helper_argv, peer_port_from_address

__all__ = ["VsockListener", "VsockTransport"]

log = logging.getLogger(__name__)

VHOST_DEVICE = "/dev/vhost-vsock"
#: ``_IOW(VHOST_VIRTIO, 0x60, __u64)``: claim a guest CID on a vhost-vsock fd.
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60
_CID_ATTEMPTS = 16
_READY_TIMEOUT_S = 30.0


def open_kernel_vhost(cid: int) -> tuple[int, int] | None:
    """An fd of ``/dev/vhost-vsock`` holding a guest CID, and the CID; None without the device.

    Tries ``cid`` first, then random CIDs while another VM holds the one tried.
    """
    try:
        fd = os.open(VHOST_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    rng = random.Random()
    try:
        for _ in range(_CID_ATTEMPTS):
            try:
                fcntl.ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("=Q", cid))
                return fd, cid
            except OSError as err:
                if err.errno != 98:  # EADDRINUSE: another VM has it
                    raise
                log.info("vsock CID %d is taken; trying another", cid)
                cid = rng.randrange(3, 0xFFFFFFFF)
        raise VMError(f"could not find a free vsock CID in {_CID_ATTEMPTS} attempts")
    except BaseException:
        os.close(fd)
        raise


class VsockListener:
    """Guest connections to one host port: ``accept()`` gives ``(socket, guest_port)``.

    Blocking ``accept`` may run in one thread while another calls :meth:`close`, which wakes it.
    """

    def __init__(self, sock: socket.socket, port: int, path: Path | None) -> None:
        self.port = port
        self._sock = sock
        self._path = path
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<VsockListener port={self.port}{' closed' if self._closed else ''}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def accept(self, timeout: float | None = None) -> tuple[socket.socket, int]:
        if self._closed:
            raise StateError(f"vsock listener on port {self.port} is closed")
        try:
            ready, _, _ = select.select([self._sock.fileno(), self._wake_r], [], [], timeout)
            if self._closed or self._wake_r in ready:
                raise StateError(f"vsock listener on port {self.port} is closed")
            if not ready:
                raise VMTimeoutError(
                    f"no guest connection to vsock port {self.port} within {timeout} s"
                )
            conn, address = self._sock.accept()
        except BlockingIOError:  # another thread took it: wait again
            return self.accept(timeout)
        except (OSError, ValueError) as err:  # closed under us by another thread
            if self._closed:
                raise StateError(f"vsock listener on port {self.port} is closed") from err
            raise
        conn.setblocking(True)
        if self._sock.family == socket.AF_UNIX:
            peer = peer_port_from_address(address)
        else:
            peer = int(address[1])
        return conn, -1 if peer is None else peer

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        os.write(self._wake_w, b"x")
        self._sock.close()
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()
        os.close(self._wake_r)
        os.close(self._wake_w)


class VsockTransport:
    """The vsock device of one VM run and its host side (see the module docstring)."""

    def __init__(self, config: LinuxVMConfig, runtime_dir: Path, log_path: Path) -> None:
        self.config = config
        self.uds = runtime_dir / "vsock.sock"
        self.log_path = log_path
        self.guest_cid = config.vsock_cid
        self.kernel_fd: int | None = None  # /dev/vhost-vsock, handed to QEMU
        self.qemu_fd: int | None = None  # QEMU's end of the vhost-user socketpair
        self._theirs: socket.socket | None = None
        self._helper: OwnedProcess | None = None
        self._ready: int | None = None
        self._listeners: dict[int, VsockListener] = {}
        self.kernel = False  # kernel vhost-vsock (else the helper); decided by prepare()
        self.attached = False  # QEMU has the device (unplugged around a snapshot save)

    @property
    def prepared(self) -> bool:
        """A device is ready for QEMU (its fd not handed over yet)."""
        return self.kernel_fd is not None or self.qemu_fd is not None

    @property
    def helper(self) -> OwnedProcess | None:
        return self._helper

    def pass_fds(self) -> tuple[int, ...]:
        """The fds QEMU must inherit."""
        return tuple(fd for fd in (self.kernel_fd, self.qemu_fd) if fd is not None)

    async def prepare(self) -> None:
        """Claim a kernel CID, or start the user-space device; QEMU gets it after this
        (on its command line, or hot-plugged)."""
        if os.environ.get("VZKIT_VSOCK", "") != "user":
            claimed = await asyncio.to_thread(open_kernel_vhost, self.guest_cid)
            if claimed is not None:
                self.kernel_fd, self.guest_cid = claimed
                self.kernel = True
                log.info("vsock: kernel vhost-vsock, guest CID %d", self.guest_cid)
                return
        self.kernel = False
        await self._start_helper()

    async def stop_device(self) -> None:
        """The device is unplugged: stop its helper (listeners stay for the next device)."""
        self.attached = False
        self.after_spawn()
        if self._ready is not None:
            os.close(self._ready)
            self._ready = None
        helper, self._helper = self._helper, None
        if helper is not None:
            await helper.kill(grace=2.0)  # it leaves by itself once QEMU hung up
        with contextlib.suppress(FileNotFoundError):
            self.uds.unlink()

    async def _start_helper(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.uds.unlink()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ready_r, ready_w = os.pipe()
        try:
            argv = helper_argv(
                self.uds, fd=ours.fileno(), guest_cid=self.guest_cid, ready_fd=ready_w
            )
            with open(self.log_path, "ab") as stderr:
                self._helper = await spawn(
                    argv, name="vzkit-vsock", pass_fds=(ours.fileno(), ready_w), stderr=stderr
                )
        except BaseException:
            theirs.close()
            os.close(ready_r)
            raise
        finally:
            ours.close()
            os.close(ready_w)
        self._theirs, self.qemu_fd, self._ready = theirs, theirs.fileno(), ready_r

    def after_spawn(self) -> None:
        """QEMU has its copies: close ours."""
        if self._theirs is not None:
            self._theirs.close()
            self._theirs = None
        self.qemu_fd = None
        if self.kernel_fd is not None:
            os.close(self.kernel_fd)
            self.kernel_fd = None

    async def wait_ready(self) -> None:
        """Wait until the helper's hybrid socket accepts connections."""
        fd, self._ready = self._ready, None
        if fd is None:
            return
        try:
            data = await asyncio.wait_for(asyncio.to_thread(_read_all, fd), _READY_TIMEOUT_S)
        except TimeoutError as err:
            raise VMError("the vsock device did not start in time") from err
        finally:
            os.close(fd)
        if b"READY" not in data:
            raise VMError(f"the vsock device failed to start (see {self.log_path})")

    # -- host side ---------------------------------------------------------------------------

    async def connect(self, port: int, timeout: float | None) -> socket.socket:
        check_port(port)
        if not self.attached:
            raise VMError("the vsock device is unplugged (a snapshot is being saved)")
        if self.kernel:
            return await asyncio.to_thread(self._connect_kernel, port, timeout)
        sock, _ = await asyncio.to_thread(connect_hybrid, self.uds, port, timeout)
        return sock

    def _connect_kernel(self, port: int, timeout: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((self.guest_cid, port))
            sock.settimeout(None)
        except (ConnectionResetError, ConnectionRefusedError) as err:
            sock.close()
            raise ConnectionRefusedError(f"vsock port {port} refused the connection") from err
        except BaseException:
            sock.close()
            raise
        return sock

    def listen(self, port: int, backlog: int = 128) -> VsockListener:
        check_port(port)
        old = self._listeners.get(port)
        if old is not None and not old.closed:
            raise StateError(f"vsock port {port} already has a listener")
        path: Path | None = None
        if self.kernel:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            address: tuple[int, int] | str = (socket.VMADDR_CID_ANY, port)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            path = Path(guest_port_path(self.uds, port))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a stale file from an earlier run
            address = os.fspath(path)
        try:
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        listener = VsockListener(sock, port, path)
        self._listeners[port] = listener
        return listener

    # -- teardown ----------------------------------------------------------------------------

    def close_listeners(self) -> None:
        listeners, self._listeners = self._listeners, {}
        for listener in listeners.values():
            listener.close()

    async def close(self) -> None:
        """Stop the device and release every fd, listener and socket file. Idempotent."""
        self.close_listeners()
        await self.stop_device()


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 64):
        data += chunk
    return data
