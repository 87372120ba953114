"""Lifecycle of the vhost-user-vsock device: thread, helper process, listen mode, cleanup."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vzkit.backends.qemu.vhost_vsock import VhostUserVsockDevice, helper_argv
from vzkit.backends.qemu.vhost_vsock._packet import Op

from ..support.polling import wait_until
from ..support.vhost_vsock.fakedriver import FakeDriver
from ..support.vhost_vsock.fakeguest import GuestConn, attached


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def vsock_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vzkit-vsock"]


def exchange(fake: FakeDriver, uds: Path, port: int = 7000, guest_port: int = 1024) -> None:
    """One guest-initiated connection carrying a few bytes each way."""
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(f"{uds}_{port}")
    lst.listen()
    lst.settimeout(5)
    try:
        conn = GuestConn(fake, guest_port, port)
        conn.control(Op.REQUEST)
        conn.wait(lambda: any(p.op == Op.RESPONSE for p in conn.packets))
        host, _ = lst.accept()
        with host:
            host.settimeout(5)
            conn.send(b"ping")
            assert host.recv(4) == b"ping"
            host.sendall(b"pong")
            assert conn.recv_exactly(4) == b"pong"
    finally:
        lst.close()
        os.unlink(f"{uds}_{port}")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guest_cid": 2}, "guest CID"),
        ({"guest_cid": 2**32 - 1}, "guest CID"),
        ({"buf_alloc": 100}, "buf_alloc"),
        ({"vhost_path": "/tmp/x"}, "exactly one"),
    ],
)
def test_constructor_validates(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs, pytest.raises(ValueError, match=message):
        VhostUserVsockDevice(tmp_path / "v.sock", vhost_socket=ours, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly one"):
        VhostUserVsockDevice(tmp_path / "v.sock")


def test_close_leaves_nothing_behind(tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    fds = open_fds()
    with attached(uds) as (dev, fake):
        exchange(fake, uds)
        assert len(vsock_threads()) == 1
        assert uds.exists()
    assert vsock_threads() == []
    assert not uds.exists()
    assert open_fds() == fds
    dev.close()  # idempotent


def test_close_with_live_connections(tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    fds = open_fds()
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(f"{uds}_7000")
    lst.listen()
    with attached(uds) as (dev, fake):
        conn = GuestConn(fake, 1024, 7000)
        conn.control(Op.REQUEST)
        conn.wait(lambda: any(p.op == Op.RESPONSE for p in conn.packets))
        host, _ = lst.accept()
        dev.close()
        host.settimeout(5)
        assert host.recv(1) == b""  # the connection died cleanly with the device
        host.close()
    lst.close()
    assert open_fds() == fds


def test_start_twice_is_an_error(tmp_path: Path) -> None:
    with attached(tmp_path / "v.sock", setup=False) as (dev, _fake), pytest.raises(RuntimeError):
        dev.start()


def test_listen_mode_accepts_one_front_end_at_a_time(tmp_path: Path) -> None:
    uds, vhost = tmp_path / "v.sock", tmp_path / "vhost.sock"
    with VhostUserVsockDevice(uds, vhost_path=vhost) as dev:
        dev.start()
        first = socket.socket(socket.AF_UNIX)
        first.connect(str(vhost))
        with FakeDriver(first) as fake:
            fake.setup()
            fake.post_rx()
            second = socket.socket(socket.AF_UNIX)
            second.connect(str(vhost))
            second.settimeout(5)
            assert second.recv(1) == b""  # turned away while the first is attached
            second.close()
            exchange(fake, uds)
        wait_until(lambda: not dev.attached, "the device to see the first front-end leave")
        third = socket.socket(socket.AF_UNIX)
        third.connect(str(vhost))  # after the first left, a new front-end attaches
        with FakeDriver(third) as fake:
            fake.setup()
            fake.post_rx()
            exchange(fake, uds)
        assert dev.sessions == 2
    assert not vhost.exists()
    assert not uds.exists()


def start_helper(uds: Path) -> tuple[subprocess.Popen[bytes], FakeDriver]:
    ours, theirs = socket.socketpair()
    ready_r, ready_w = os.pipe()
    proc = subprocess.Popen(
        helper_argv(uds, fd=theirs.fileno(), ready_fd=ready_w),
        pass_fds=(theirs.fileno(), ready_w),
        stderr=subprocess.PIPE,
    )
    theirs.close()
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        assert ready.read() == b"READY\n"
    assert uds.exists()
    fake = FakeDriver(ours)
    fake.setup()
    fake.post_rx()
    return proc, fake


def test_helper_process_serves_and_exits_on_sigterm(tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    proc, fake = start_helper(uds)
    try:
        exchange(fake, uds)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not uds.exists()
    finally:
        fake.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_helper_process_exits_when_the_front_end_disconnects(tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    proc, fake = start_helper(uds)
    try:
        fake.close()
        assert proc.wait(10) == 0
        assert not uds.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_helper_print_capabilities() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vzkit.backends.qemu.vhost_vsock", "--print-capabilities"],
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert b'"type": "vsock"' in out.stdout


def test_helper_tuning_from_the_environment() -> None:
    """VZKIT_VSOCK_TUNE overrides the tuning options (bench/vsock.py compares them)."""
    from vzkit.backends.qemu.vhost_vsock._helper import _apply_tune, _parser

    args = _parser().parse_args(["--uds-path=x", "--fd=3", "--buf-alloc=4096"])
    _apply_tune(args, "buf_alloc=1048576, credit_step=262144,update_delay_ms=1.5")
    assert (args.buf_alloc, args.credit_step, args.update_delay_ms) == (1 << 20, 1 << 18, 1.5)
    _apply_tune(args, "")
    assert args.buf_alloc == 1 << 20
    for bad in ("buf_alloc", "nope=1", "credit_step=big"):
        with pytest.raises(SystemExit, match="VZKIT_VSOCK_TUNE"):
            _apply_tune(args, bad)


def test_the_device_package_imports_only_errors_from_vzkit() -> None:
    """The helper process QEMU waits for at boot stays light: ``vzkit.errors`` and itself."""
    import ast

    package = "vzkit.backends.qemu.vhost_vsock"
    src = Path(__file__).resolve().parents[2] / "src" / package.replace(".", "/")
    outside = set()
    for path in sorted(src.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    names = [f"{base}.{node.module}" if node.module else base]
                else:
                    names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "vzkit" and not name.startswith(package):
                    outside.add((path.name, name))
    assert outside  # the walk sees the package's imports of vzkit.errors
    assert {name for _, name in outside} == {"vzkit.errors"}, sorted(outside)
