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

**Peer checks** (``docs/vsock.md``): a listener accepts only its own guest — on the kernel path
the peer's CID must be the guest's (other VMs and host processes can connect to any host
port), on the user-space path the peer must be this VM's device helper (``SO_PEERCRED``), and
the socket files sit in a directory only we can enter. Each run also has its agent key
(:attr:`VsockTransport.agent_key`), which QEMU serves to the guest through ``fw_cfg``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import secrets
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..._config import LinuxVMConfig
from ..._config import check_vsock_port as check_port
from ..._process import OwnedProcess, spawn
from ...agent import KEY_SIZE
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


def private_dir(path: Path) -> None:
    """Make sure only we can enter ``path``, where the user-space device's sockets live:
    anyone who can connect to them reaches the guest's ports or poses as its device.
    A directory of ours is tightened to 0700; another user's is refused."""
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise VMError(
            f"{path} belongs to another user: vsock sockets need a directory of your own "
            "(set the VM's state_dir to one)"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        log.info("vsock: making %s private (0700)", path)
        os.chmod(path, 0o700)


def agent_key_fd(key: bytes) -> int:
    """A memfd holding ``key`` for QEMU to read (``-fw_cfg ...,file=/proc/self/fd/N``): the
    key never touches the disk nor an argv (``/proc/PID/cmdline`` is readable by all)."""
    fd = os.memfd_create("vzkit-agent-key", os.MFD_CLOEXEC)
    try:
        os.write(fd, key)  # 32 bytes into a fresh memfd: one write
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _peer_pid(conn: socket.socket) -> int:
    """The pid that connected a unix stream (``SO_PEERCRED``: pid, uid, gid)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


def _vsock_socket() -> socket.socket:
    """A kernel ``AF_VSOCK`` stream socket (replaced in tests: this host has no vsock)."""
    return socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)


class VsockListener:
    """Guest connections to one host port: ``accept()`` gives ``(socket, guest_port)``.

    ``peer_ok(conn, address)`` decides whether a connection comes from this VM's guest; others
    are closed and ``accept`` waits on. Blocking ``accept`` may run in one thread while another
    calls :meth:`close`, which wakes it.
    """

    def __init__(
        self,
        sock: socket.socket,
        port: int,
        path: Path | None,
        peer_ok: Callable[[socket.socket, Any], bool],
    ) -> None:
        self.port = port
        self._sock = sock
        self._path = path
        self._peer_ok = peer_ok
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<VsockListener port={self.port}{' closed' if self._closed else ''}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def accept(self, timeout: float | None = None) -> tuple[socket.socket, int]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            conn, address = self._accept_one(left, timeout)
            if self._peer_ok(conn, address):
                break
            log.warning("vsock port %d: refused a connection from %r (not this VM's guest)",
                        self.port, address)  # fmt: skip
            conn.close()
        conn.setblocking(True)
        if self._sock.family == socket.AF_UNIX:
            peer = peer_port_from_address(address)
        else:
            peer = int(address[1])
        return conn, -1 if peer is None else peer

    def _accept_one(self, left: float | None, timeout: float | None) -> tuple[socket.socket, Any]:
        while True:
            if self._closed:
                raise StateError(f"vsock listener on port {self.port} is closed")
            try:
                ready, _, _ = select.select([self._sock.fileno(), self._wake_r], [], [], left)
                if self._closed or self._wake_r in ready:
                    raise StateError(f"vsock listener on port {self.port} is closed")
                if not ready:
                    raise VMTimeoutError(
                        f"no guest connection to vsock port {self.port} within {timeout} s"
                    )
                return self._sock.accept()
            except BlockingIOError:  # another thread took it: wait again
                continue
            except (OSError, ValueError) as err:  # closed under us by another thread
                if self._closed:
                    raise StateError(f"vsock listener on port {self.port} is closed") from err
                raise

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
        #: This run's agent key: the guest reads it from fw_cfg (:func:`agent_key_fd`), the
        #: host sends it in AUTH. A new transport per start or restore: a restored guest gets
        #: a key of its own and the snapshot's stops working. Never logged.
        self.agent_key = secrets.token_bytes(KEY_SIZE)

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
        if self.config.vsock_device != "user":
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
        private_dir(self.uds.parent)
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
        sock = _vsock_socket()
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
            sock = _vsock_socket()
            address: tuple[int, int] | str = (socket.VMADDR_CID_ANY, port)
        else:
            private_dir(self.uds.parent)
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
        listener = VsockListener(sock, port, path, self._from_guest)
        self._listeners[port] = listener
        return listener

    def _from_guest(self, conn: socket.socket, address: Any) -> bool:
        """Whether an accepted connection comes from this VM's guest (see the module doc).
        Read at each accept: the CID and the helper change when the device is re-plugged."""
        if self.kernel:
            return isinstance(address, tuple) and address[0] == self.guest_cid
        return self.device_pid is not None and _peer_pid(conn) == self.device_pid

    @property
    def device_pid(self) -> int | None:
        """The user-space device's helper process, the one peer a unix listener accepts."""
        helper = self._helper
        return helper.pid if helper is not None else None

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
