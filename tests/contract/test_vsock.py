"""vsock: host → guest connects and guest → host listeners hand out real sockets.

The stand-in's ``VZVirtioSocketConnection`` owns a real socketpair descriptor and closes it
when the connection is closed or deallocated (as the framework does), so these tests pass
only if vzkit duplicates the descriptor before the framework lets go of it.
"""

from __future__ import annotations

import gc
import socket
from pathlib import Path
from typing import Any

import pytest

import vzkit
from vzkit.backends import vz as vzb

from ._support import ARM64_IMAGE, take_violations
from .fakeobjc import FakeRuntime, guest_connect

pytestmark = pytest.mark.contract


@pytest.fixture
def running(fake: FakeRuntime, tmp_path: Path) -> tuple[vzb.Queue, Any]:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(ARM64_IMAGE)
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, state_dir=tmp_path / "state")
    queue = vzb.Queue("test.vsock")
    vm = vzb.create_vm(vzb.build_linux_vm_config(cfg), queue)
    assert vzb.start_vm(queue, vm).wait(5)
    return queue, vm


def test_connect_returns_a_socket_over_a_duplicated_fd(
    fake: FakeRuntime, running: tuple[vzb.Queue, Any]
) -> None:
    queue, vm = running
    fake.guest_ports.add(1024)
    manager = vzb.VsockManager(vm, queue)
    with manager.connect(1024, timeout=5) as sock:
        assert isinstance(sock, socket.socket)
        gc.collect()  # the framework's connection object is gone (and closed) by now
        peer = fake.guest_peers[1024][0]
        sock.sendall(b"ping")
        assert peer.recv(4) == b"ping"
        peer.sendall(b"pong")
        assert sock.recv(4) == b"pong"
        sock.shutdown(socket.SHUT_WR)
        assert peer.recv(1) == b""
    assert fake.guest_peers[1024][0].recv(1) == b""


def test_connect_to_a_closed_port_is_refused(
    fake: FakeRuntime, running: tuple[vzb.Queue, Any]
) -> None:
    queue, vm = running
    manager = vzb.VsockManager(vm, queue)
    with pytest.raises(ConnectionRefusedError, match="vsock connect to port 9"):
        manager.connect(9, timeout=5)
    with pytest.raises(ValueError, match="vsock port"):
        manager.connect(-1)


def test_connect_on_a_stopped_vm_fails(fake: FakeRuntime, running: tuple[vzb.Queue, Any]) -> None:
    queue, vm = running
    fake.guest_ports.add(1024)
    manager = vzb.VsockManager(vm, queue)
    assert vzb.stop_vm(queue, vm).wait(5)
    with pytest.raises(vzkit.VMError, match="not connected"):
        manager.connect(1024, timeout=5)


def test_listener_accepts_guest_connections(
    fake: FakeRuntime, running: tuple[vzb.Queue, Any]
) -> None:
    queue, vm = running
    manager = vzb.VsockManager(vm, queue)
    with manager.listen(5000) as listener:
        gc.collect()  # delegate and listener must survive: the framework holds them weakly
        guest = guest_connect(fake, vm, 5000)
        assert guest is not None
        sock, peer_port = listener.accept(timeout=5)
        with sock:
            assert peer_port >= 1024
            guest.sendall(b"hello")
            assert sock.recv(5) == b"hello"
            sock.sendall(b"back")
            assert guest.recv(4) == b"back"
        with pytest.raises(vzkit.VMTimeoutError, match="no vsock connection on port 5000"):
            listener.accept(timeout=0.01)
        with pytest.raises(vzkit.StateError, match="already has a listener"):
            manager.listen(5000)
    assert guest_connect(fake, vm, 5000) is None  # removed from the device
    with pytest.raises(vzkit.StateError, match="is closed"):
        listener.accept(timeout=0)


def test_listener_backlog_and_close_drop_pending(
    fake: FakeRuntime, running: tuple[vzb.Queue, Any]
) -> None:
    queue, vm = running
    manager = vzb.VsockManager(vm, queue)
    manager.listen(6000, backlog=1)
    first = guest_connect(fake, vm, 6000)
    second = guest_connect(fake, vm, 6000)
    assert first is not None
    assert second is not None
    second.settimeout(5)
    assert second.recv(1) == b""  # refused: the backlog was full
    manager.close()  # closes the listener and the connection never accepted
    assert first.recv(1) == b""


def test_manager_dispatch_hook_and_missing_device(
    fake: FakeRuntime, tmp_path: Path, running: tuple[vzb.Queue, Any]
) -> None:
    queue, vm = running
    calls: list[int] = []

    def dispatch(work: Any) -> Any:
        calls.append(1)
        return queue.sync(work)

    fake.guest_ports.add(7)
    manager = vzb.VsockManager(vm, queue, dispatch=dispatch)
    manager.connect(7, timeout=5).close()
    assert len(calls) == 2  # socketDevices, connectToPort: both on the VM's queue
    kernel = tmp_path / "vmlinuz"
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, state_dir=tmp_path / "s2", vsock=False)
    queue2 = vzb.Queue("test.novsock")
    vm2 = vzb.create_vm(vzb.build_linux_vm_config(cfg), queue2)
    with pytest.raises(vzkit.UnsupportedError, match="no vsock device"):
        vzb.VsockManager(vm2, queue2)


def test_socket_from_a_closed_connection(fake: FakeRuntime) -> None:
    conn = fake.make("VZVirtioSocketConnection", destinationPort=1, sourcePort=2)
    conn._fk.extra["fd"] = -1
    with pytest.raises(vzkit.VMError, match="already closed"):
        vzb.socket_from_connection(conn)
    assert take_violations(fake) == []
