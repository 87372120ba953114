"""The qemu backend's vsock host side, without a VM: kernel CID claiming, listeners."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import vzkit
from vzkit.backends.qemu import _vsock
from vzkit.backends.qemu._vsock import VsockTransport, open_kernel_vhost
from vzkit.backends.qemu.vhost_vsock._hybrid import peer_address

from ..support.polling import blocked_in_poll, wait_until


def test_no_vhost_device_means_the_user_space_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_vsock, "VHOST_DEVICE", "/nonexistent/vhost-vsock")
    assert open_kernel_vhost(3) is None


def test_a_taken_cid_is_retried_with_another(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    def ioctl(fd: int, request: int, arg: bytes) -> bytes:
        (cid,) = struct.unpack("=Q", arg)
        calls.append((request, cid))
        if len(calls) <= 2:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        return arg

    monkeypatch.setattr(_vsock, "VHOST_DEVICE", os.devnull)
    monkeypatch.setattr(fcntl, "ioctl", ioctl)
    claimed = open_kernel_vhost(42)
    assert claimed is not None
    fd, cid = claimed
    os.close(fd)
    assert [r for r, _ in calls] == [_vsock.VHOST_VSOCK_SET_GUEST_CID] * 3
    assert calls[0][1] == 42  # the configured CID first
    assert cid == calls[2][1] != 42
    assert 3 <= cid < 0xFFFFFFFF


def test_other_ioctl_errors_close_the_fd_and_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    def ioctl(fd: int, request: int, arg: bytes) -> bytes:
        raise OSError(errno.EPERM, "Operation not permitted")

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(_vsock, "VHOST_DEVICE", os.devnull)
    monkeypatch.setattr(fcntl, "ioctl", ioctl)
    with pytest.raises(PermissionError):
        open_kernel_vhost(3)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.fixture
def transport(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> VsockTransport:
    """A user-space transport whose device helper is this test process."""
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel)
    t = VsockTransport(cfg, tmp_path, tmp_path / "vsock.log")
    t.attached = True
    monkeypatch.setattr(VsockTransport, "device_pid", property(lambda self: os.getpid()))
    return t


def test_listener_gives_the_guest_port_and_times_out(transport: VsockTransport) -> None:
    listener = transport.listen(6000)
    path = str(transport.uds) + "_6000"
    assert Path(path).exists()
    with pytest.raises(vzkit.VMTimeoutError):
        listener.accept(timeout=0.05)
    client = socket.socket(socket.AF_UNIX)
    client.bind(peer_address(3, 4321, 1))  # what the device does before connecting
    client.connect(path)
    conn, peer = listener.accept(timeout=5)
    assert peer == 4321
    client.sendall(b"x")
    assert conn.recv(1) == b"x"
    conn.close()
    client.close()
    plain = socket.socket(socket.AF_UNIX)  # a client that is not the device: port unknown
    plain.connect(path)
    conn, peer = listener.accept(timeout=5)
    assert peer == -1
    conn.close()
    plain.close()
    listener.close()
    assert not Path(path).exists()


def test_close_from_another_thread_wakes_accept(transport: VsockTransport) -> None:
    listener = transport.listen(6001)
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            listener.accept()
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_until(lambda: blocked_in_poll(thread), "the waiter to block in accept()")
    listener.close()
    thread.join(5)
    assert not thread.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], vzkit.StateError)
    with pytest.raises(vzkit.StateError, match="closed"):
        listener.accept(timeout=0)


def test_one_listener_per_port_and_stale_files_replaced(transport: VsockTransport) -> None:
    stale = Path(str(transport.uds) + "_7000")
    stale.write_text("left over from an earlier run")
    listener = transport.listen(7000)
    with pytest.raises(vzkit.StateError, match="already has a listener"):
        transport.listen(7000)
    transport.close_listeners()
    assert listener.closed
    assert not stale.exists()
    transport.listen(7000).close()  # free again


def test_connect_while_the_device_is_unplugged_says_so(transport: VsockTransport) -> None:
    import asyncio

    transport.attached = False
    with pytest.raises(vzkit.VMError, match="unplugged"):
        asyncio.run(transport.connect(5000, 1))
    with pytest.raises(vzkit.ConfigError, match="vsock port"):
        asyncio.run(transport.connect(-5, 1))


def test_the_kernel_device_needs_no_shared_ram(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With /dev/vhost-vsock the guest RAM stays private (vhost-user alone needs a memfd,
    which snapshots pay for); QEMU gets the claimed fd and CID."""
    import asyncio

    from vzkit.backends.qemu import _discover, _machine, _run

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    devnull = os.open(os.devnull, os.O_RDWR)
    monkeypatch.setattr(_vsock, "open_kernel_vhost", lambda cid: (devnull, 77))
    monkeypatch.setattr(_discover, "find_qemu", lambda arch: Path("/usr/bin/qemu-fake"))
    monkeypatch.setattr(_discover, "select_accelerator", lambda *a: "tcg")
    seen: list[list[str]] = []

    async def spawn(argv: list[str], **kwargs: object) -> None:
        seen.append(list(argv))
        raise OSError("not really starting QEMU")

    monkeypatch.setattr(_run, "spawn", spawn)
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, state_dir=tmp_path / "vm", console="none")
    machine = _machine.QemuMachine(cfg, lambda old, new: None)
    with pytest.raises(OSError, match="not really"):
        asyncio.run(machine.start())
    (argv,) = seen
    assert not any("memory-backend" in a for a in argv)
    assert any(a.startswith("vhost-vsock-pci,id=vsock0,guest-cid=77,vhostfd=") for a in argv)
    asyncio.run(machine.close())


# ---- peer checks ------------------------------------------------------------------------------


class FakeKernelVsock(socket.socket):
    """An ``AF_VSOCK`` listener stand-in: a unix socket whose ``accept`` reports the next CID
    of ``cids`` as the peer, as the kernel would for guests and host processes."""

    def __init__(self, root: Path, cids: list[int]) -> None:
        super().__init__(socket.AF_UNIX, socket.SOCK_STREAM)
        self.root, self.cids = root, cids

    @property  # type: ignore[override]
    def family(self) -> socket.AddressFamily:
        return socket.AF_VSOCK

    def bind(self, address: object) -> None:
        cid, port = address  # type: ignore[misc]
        assert cid == socket.VMADDR_CID_ANY
        super().bind(str(self.root / f"vsock-{port}"))

    def accept(self) -> tuple[socket.socket, tuple[int, int]]:
        conn, _ = super().accept()
        return conn, (self.cids.pop(0), 1000 + len(self.cids))


def test_kernel_listener_accepts_only_its_own_guest(
    transport: VsockTransport, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Any VM (CID 4) and any host process (CID 1, loopback) can connect to a host vsock
    port: the listener drops them and waits for its guest (CID 7)."""
    cids = [1, 4, 7]
    monkeypatch.setattr(_vsock, "_vsock_socket", lambda: FakeKernelVsock(tmp_path, cids))
    transport.kernel, transport.guest_cid = True, 7
    listener = transport.listen(6100)
    clients = []
    for _ in range(3):
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(tmp_path / "vsock-6100"))
        clients.append(client)
    conn, port = listener.accept(timeout=5)
    assert port == 1000  # the third peer: the guest
    clients[2].sendall(b"guest")
    assert conn.recv(5) == b"guest"
    for stranger in clients[:2]:  # closed unread
        stranger.settimeout(5)
        assert stranger.recv(1) == b""
    with pytest.raises(vzkit.VMTimeoutError):  # nothing else is waiting
        listener.accept(timeout=0.05)
    conn.close()
    for client in clients:
        client.close()
    listener.close()


def test_kernel_listener_follows_a_new_guest_cid(
    transport: VsockTransport, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A re-plugged device may claim another CID (another VM took ours): the check follows."""
    cids = [7, 9]
    monkeypatch.setattr(_vsock, "_vsock_socket", lambda: FakeKernelVsock(tmp_path, cids))
    transport.kernel, transport.guest_cid = True, 9
    listener = transport.listen(6101)
    with socket.socket(socket.AF_UNIX) as old, socket.socket(socket.AF_UNIX) as new:
        old.connect(str(tmp_path / "vsock-6101"))
        new.connect(str(tmp_path / "vsock-6101"))
        conn, _ = listener.accept(timeout=5)
        new.sendall(b"n")
        assert conn.recv(1) == b"n"
        conn.close()
    listener.close()


class FakeKernelVsockClient(socket.socket):
    """An ``AF_VSOCK`` client stand-in (this host has no ``vsock_loopback``): ``connect((cid,
    port))`` reaches the unix socket ``guest-CID-PORT`` under ``root``, where a test plays that
    guest; no listener there is refused the way the kernel refuses it (``ECONNRESET``: the
    guest answered with a reset)."""

    def __init__(self, root: Path) -> None:
        super().__init__(socket.AF_UNIX, socket.SOCK_STREAM)
        self.root = root

    @property  # type: ignore[override]
    def family(self) -> socket.AddressFamily:
        return socket.AF_VSOCK

    def connect(self, address: object) -> None:
        cid, port = address  # type: ignore[misc]
        try:
            super().connect(str(self.root / f"guest-{cid}-{port}"))
        except FileNotFoundError:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer") from None


def test_kernel_connect_reaches_the_guests_cid_and_port(
    transport: VsockTransport, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    made: list[FakeKernelVsockClient] = []

    def vsock_socket() -> socket.socket:
        made.append(FakeKernelVsockClient(tmp_path))
        return made[-1]

    monkeypatch.setattr(_vsock, "_vsock_socket", vsock_socket)
    transport.kernel, transport.guest_cid = True, 7
    with socket.socket(socket.AF_UNIX) as guest, socket.socket(socket.AF_UNIX) as other_vm:
        guest.bind(str(tmp_path / "guest-7-5000"))
        guest.listen()
        other_vm.bind(str(tmp_path / "guest-8-5000"))  # the same port on another VM
        other_vm.listen()
        sock = asyncio.run(transport.connect(5000, timeout=5))
        conn, _ = guest.accept()
        sock.sendall(b"to the guest")
        assert conn.recv(100) == b"to the guest"
        conn.sendall(b"from the guest")
        assert sock.recv(100) == b"from the guest"
        assert sock.gettimeout() is None  # blocking again after the connect timeout
        other_vm.setblocking(False)
        with pytest.raises(BlockingIOError):
            other_vm.accept()  # nothing reached CID 8
        conn.close()
        sock.close()

        with pytest.raises(ConnectionRefusedError, match="vsock port 5001 refused"):
            asyncio.run(transport.connect(5001, timeout=5))
    assert len(made) == 2
    assert made[1].fileno() == -1  # the refused socket was closed
    transport.attached = False  # unplugged around a snapshot save: no connect at all
    with pytest.raises(vzkit.VMError, match="the vsock device is unplugged"):
        asyncio.run(transport.connect(5000, timeout=5))
    assert len(made) == 2


def test_unix_listener_accepts_only_the_device_helper(
    transport: VsockTransport, tmp_path: Path
) -> None:
    """On the user-space path only this VM's device connects to ``vsock.sock_PORT``; another
    process that reaches the file is dropped (``SO_PEERCRED``)."""
    listener = transport.listen(6200)
    path = str(transport.uds) + "_6200"
    stranger = subprocess.Popen(
        [sys.executable, "-c", STRANGER, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert stranger.stdout is not None
    assert stranger.stdout.read(9) == b"connected"
    device = socket.socket(socket.AF_UNIX)  # this process: the device (fixture)
    device.bind(peer_address(3, 4321, 1))
    device.connect(path)
    conn, peer = listener.accept(timeout=5)
    assert peer == 4321
    out, err = stranger.communicate(timeout=30)
    assert (out, stranger.returncode) == (b"EOF", 0), err  # connected first, hung up on
    conn.close()
    device.close()
    listener.close()


STRANGER = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(b"\\0vzkit-vsock:3:999:1:1")  # even posing as the device's address
s.connect(sys.argv[1])
sys.stdout.write("connected")
sys.stdout.flush()
s.settimeout(20)
sys.stdout.write("EOF" if s.recv(1) == b"" else "DATA")
"""


def test_no_device_helper_means_no_unix_peer(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    t = VsockTransport(vzkit.LinuxVMConfig(kernel_path=kernel), tmp_path, tmp_path / "log")
    assert t.device_pid is None
    listener = t.listen(6300)
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(t.uds) + "_6300")
        with pytest.raises(vzkit.VMTimeoutError):
            listener.accept(timeout=0.2)
        client.settimeout(5)
        assert client.recv(1) == b""
    listener.close()


def test_the_socket_directory_is_private(transport: VsockTransport, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    transport.listen(6400).close()
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
    if os.geteuid() == 0:  # root can hand the directory to another user
        os.chown(tmp_path, 65534, -1)
        try:
            with pytest.raises(vzkit.VMError, match="belongs to another user"):
                transport.listen(6401)
        finally:
            os.chown(tmp_path, 0, -1)


def test_each_run_has_its_own_agent_key_in_fw_cfg_and_never_on_argv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """QEMU reads the key from an inherited memfd (fw_cfg), the kernel command line only says
    where it is; every start (and restore: both launch a new QEMU) has a new key."""
    import asyncio

    from vzkit.backends.qemu import _discover, _machine, _run

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    monkeypatch.setattr(_discover, "find_qemu", lambda arch: Path("/usr/bin/qemu-fake"))
    monkeypatch.setattr(_discover, "select_accelerator", lambda *a: "tcg")
    monkeypatch.setenv("VZKIT_VSOCK", "user")
    seen: list[tuple[list[str], bytes, bytes]] = []

    async def spawn(argv: list[str], **kwargs: object) -> None:
        if argv[0] != "/usr/bin/qemu-fake":  # the vsock device's helper
            raise OSError("not really starting the helper")
        (fw_cfg,) = (argv[i + 1] for i, a in enumerate(argv) if a == "-fw_cfg")
        name, file = fw_cfg.split(",")
        assert name == "name=opt/org.vzkit/agent-key"
        fd = int(file.removeprefix("file=/proc/self/fd/"))
        assert fd in kwargs["pass_fds"]  # type: ignore[operator]
        assert machine._vsock is not None
        seen.append((list(argv), os.pread(fd, 100, 0), machine._vsock.agent_key))
        raise OSError("not really starting QEMU")

    monkeypatch.setattr(_run, "spawn", spawn)
    monkeypatch.setattr(VsockTransport, "prepare", _no_device)
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, state_dir=tmp_path / "vm", console="none")
    machine = _machine.QemuMachine(cfg, lambda old, new: None)
    for _ in range(2):
        with pytest.raises(OSError, match="not really starting QEMU"):
            asyncio.run(machine.start())
    asyncio.run(machine.close())
    (argv1, served1, key1), (argv2, served2, key2) = seen
    assert (served1, served2) == (key1, key2)
    assert len(key1) == 32
    assert key1 != key2
    for argv, key in ((argv1, key1), (argv2, key2)):
        assert argv[argv.index("-append") + 1].endswith(" vzkit.agent_key=fw_cfg")
        assert not any(key.hex() in a or os.fsencode(a).find(key) >= 0 for a in argv)


async def _no_device(self: VsockTransport) -> None:
    """``prepare`` without a device: the argv is what is checked."""
