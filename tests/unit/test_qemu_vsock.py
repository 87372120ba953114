"""The qemu backend's vsock host side, without a VM: kernel CID claiming, listeners."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

import vzkit
from vzkit.backends.qemu import _vsock
from vzkit.backends.qemu._vsock import VsockTransport, open_kernel_vhost
from vzkit.backends.qemu.vhost_vsock._hybrid import peer_address


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
def transport(tmp_path: Path) -> VsockTransport:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel)
    t = VsockTransport(cfg, tmp_path, tmp_path / "vsock.log")
    t.attached = True
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
    time.sleep(0.1)
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

    from vzkit.backends.qemu import _discover, _machine

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

    monkeypatch.setattr(_machine, "spawn", spawn)
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, state_dir=tmp_path / "vm", console="none")
    machine = _machine.QemuMachine(cfg, lambda old, new: None)
    with pytest.raises(OSError, match="not really"):
        asyncio.run(machine.start())
    (argv,) = seen
    assert not any("memory-backend" in a for a in argv)
    assert any(a.startswith("vhost-vsock-pci,id=vsock0,guest-cid=77,vhostfd=") for a in argv)
    asyncio.run(machine.close())
