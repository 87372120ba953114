"""Published ports and the clock step through the guest agent, on a real QEMU guest.

Guests with network ``none`` (no NIC: QEMU publishes nothing, so the core forwards ``-p``
over the agent's vsock session). One boot: a TCP service and a UDP echo in the guest are
reached from the host's loopback; then the guest's clock, set an hour back, is stepped to the
host's by the resume after a pause. One boot and a restore: the restored VM serves the ports
the snapshot's VM published, and its first resume steps the clock the snapshot froze. And
``vzkit run --network none -p``: the CLI's own core forwards.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import vzkit
from tests.support.guest_programs import build_static

from .conftest import VMFactory

UDP_ECHO = Path(__file__).parent / "udp_echo.c"

GREETER = b"""#!/bin/sh
echo from guest
read -r line
echo "got $line"
"""


def build_udp_echo() -> Path:
    """udp_echo.c for x86_64 guests (cached by source hash)."""
    return build_static(UDP_ECHO, "udp-echo")


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _sh(vm: vzkit.VirtualMachine, script: str, timeout: float = 60) -> tuple[int, str]:
    done = vm.guest.run(["sh", "-c", script], timeout=timeout)
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


def _until(what: str, attempt: object, timeout: float = 60) -> bytes:
    """Retry ``attempt()`` until it returns bytes (the guest service may not listen yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = attempt()  # type: ignore[operator]
        except OSError:
            result = None
        if result:
            return bytes(result)
        assert time.monotonic() < deadline, f"{what}: no answer within {timeout} s"
        time.sleep(0.3)  # poll interval


def test_ports_and_clock_through_the_agent_without_a_network(vms: VMFactory) -> None:
    tcp, udp = _free_port(), _free_port(socket.SOCK_DGRAM)
    vm = vms.create(
        network=vzkit.NetworkConfig(vzkit.NetworkMode.NONE),
        publish=(vzkit.parse_port_spec(f"{tcp}:8000"), vzkit.parse_port_spec(f"{udp}:5353/udp")),
    )
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=180)
    assert "-netdev" not in vm._core.machine.argv  # type: ignore[attr-defined]

    # TCP: a guest service on its loopback port 8000, through the host's port.
    vm.guest.write_file("/tmp/greet", GREETER, mode=0o755)
    code, out = _sh(
        vm, "(while :; do nc -l -p 8000 -e /tmp/greet; done) </dev/null >/dev/null 2>&1 &"
    )
    assert code == 0, out

    def ping() -> bytes | None:
        with socket.create_connection(("127.0.0.1", tcp), timeout=20) as conn:
            conn.sendall(b"ping\n")
            reply = b""
            while chunk := conn.recv(100):
                reply += chunk
            return reply if b"got ping" in reply else None

    assert _until("TCP", ping) == b"from guest\ngot ping\n"

    # UDP: an echo on guest port 5353; the datagram comes back whole.
    vm.guest.write_file("/tmp/udp-echo", build_udp_echo().read_bytes(), mode=0o755)
    code, out = _sh(vm, "/tmp/udp-echo 5353 </dev/null >/dev/null 2>&1 &")
    assert code == 0, out

    def echo() -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.connect(("127.0.0.1", udp))
            s.send(b"datagram one\n")
            first = s.recv(65536)
            s.send(b"x" * 30000)
            return first + s.recv(65536)

    assert _until("UDP", echo) == b"datagram one\n" + b"x" * 30000  # each whole

    # The clock: set an hour back in the guest, then a pause and a resume step it back.
    code, out = _sh(vm, f"date -u -s @{int(time.time()) - 3600}")
    assert code == 0, out
    guest_now = int(_sh(vm, "date +%s")[1])
    assert abs(guest_now - (time.time() - 3600)) < 30
    vm.pause()
    vm.resume()
    code, out = _sh(vm, "date +%s")
    assert code == 0, out
    assert abs(int(out) - time.time()) < 5, out
    vm.stop(timeout=60)


def test_a_restored_vm_serves_its_ports_and_its_clock_is_stepped(
    vms: VMFactory, tmp_path: Path
) -> None:
    """A snapshot restore binds the forwarded ports before it loads and serves them in the
    restored run; the first resume steps the clock the snapshot froze (set back an hour in the
    guest before the save: the restored guest's clock comes back to the host's)."""
    tcp = _free_port()
    vzkit.create_disk_image(tmp_path / "disk.raw", 1)

    def settings(name: str) -> dict[str, object]:
        return {
            "network": vzkit.NetworkConfig(vzkit.NetworkMode.NONE),
            "publish": (vzkit.parse_port_spec(f"{tcp}:8000"),),
            "console": vzkit.ConsoleMode.LOG,
            "disk_path": tmp_path / "disk.raw",
            "state_dir": tmp_path / name,
        }

    manager = vzkit.SnapshotManager(tmp_path / "vm")
    origin = vms.create(**settings("origin"))
    origin.start(timeout=60)
    origin.guest.wait_ready(timeout=180)
    code, out = _sh(
        origin,
        "(while :; do echo hello-restored | nc -l -p 8000; done) </dev/null >/dev/null 2>&1 &",
    )
    assert code == 0, out

    def greeting() -> bytes | None:
        with socket.create_connection(("127.0.0.1", tcp), timeout=20) as conn:
            return conn.makefile("rb").readline() or None

    assert _until("TCP before the save", greeting) == b"hello-restored\n"
    assert _sh(origin, f"date -u -s @{int(time.time()) - 3600}")[0] == 0
    manager.save(origin, "ports", timeout=120)
    origin.stop(timeout=60)

    restored = vms.create(**settings("restored"))
    manager.restore(restored, "ports", timeout=120)
    assert restored.state is vzkit.VMState.PAUSED
    restored.resume(timeout=30)
    assert _until("TCP after the restore", greeting) == b"hello-restored\n"
    code, out = _sh(restored, "date +%s")
    assert abs(int(out) - time.time()) < 5, out
    restored.stop(timeout=60)


def test_run_publishes_a_port_without_a_network() -> None:
    """``vzkit run --network none -p``: the CLI's own core forwards the port through the agent
    (there is no NIC to forward it); the guest's service answers once, then the run ends."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "vzkit.cli", "run", "--network", "none", "-p",
            f"{port}:8000", "--", "sh", "-c", "echo hi-from-run | nc -l -p 8000"]  # fmt: skip
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        answer = b""
        deadline = time.monotonic() + 180
        while not answer and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                    answer = conn.makefile("rb").readline()
            except OSError:
                time.sleep(0.3)  # poll interval: the guest boots, then nc listens
        assert answer == b"hi-from-run\n"
        _, err = run.communicate(timeout=120)
        assert run.returncode == 0, err.decode()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
