"""The qemu e2e suite's ground, on a real Mac, over every backend: lifecycle, ``vzkit run``,
balloon, vsock both ways, shares and snapshots (the last three where a backend declares them)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import vzkit
from vzkit._loop import run_sync
from vzkit.backends import KNOWN_BACKENDS, Feature

from .conftest import MacVMs, backends_with

ALL = list(KNOWN_BACKENDS)
VZKIT = [sys.executable, "-m", "vzkit.cli"]


def _machine(vm: vzkit.VirtualMachine) -> Any:
    return vm._core.machine


def _mem_total_kb(vm: vzkit.VirtualMachine) -> int:
    out = vm.guest.run(["grep", "MemTotal", "/proc/meminfo"]).stdout.decode()
    match = re.search(r"MemTotal:\s+(\d+) kB", out)
    assert match, out
    return int(match[1])


@pytest.mark.parametrize("backend", ALL)
def test_lifecycle(macvms: MacVMs, backend: str) -> None:
    vm = macvms.boot(backend)
    assert vm.state is vzkit.VMState.RUNNING
    assert vm.guest.run(["uname", "-m"]).stdout.decode().strip() == vzkit.host_arch().value
    with pytest.raises(vzkit.StateError, match="already running"):
        vm.start()
    vm.pause(timeout=30)
    assert vm.state is vzkit.VMState.PAUSED
    assert (vm.can_pause, vm.can_resume, vm.can_stop) == (False, True, True)
    vm.resume(timeout=30)
    assert vm.guest.run(["echo", "back"]).stdout == b"back\n"
    vm.stop(timeout=30)
    assert vm.state is vzkit.VMState.STOPPED
    assert vm.can_start


@pytest.mark.parametrize("backend", ALL)
def test_request_stop_powers_the_guest_off(macvms: MacVMs, backend: str) -> None:
    vm = macvms.boot(backend)
    vm.request_stop()
    assert vm.wait(timeout=60) is vzkit.VMState.STOPPED


@pytest.mark.parametrize("backend", ALL)
def test_vzkit_run(backend: str) -> None:
    proc = subprocess.run(
        [*VZKIT, "run", "--backend", backend, "--", "sh", "-c", "echo hi; uname -m; exit 3"],
        capture_output=True,
        timeout=600,
    )
    assert proc.returncode == 3, proc.stderr.decode()
    assert proc.stdout.decode().split() == ["hi", vzkit.host_arch().value]


@pytest.mark.parametrize("backend", backends_with(Feature.BALLOON))
def test_balloon_shrinks_guest_memory(macvms: MacVMs, backend: str) -> None:
    vm = macvms.boot(backend, memory_gb=0.5)
    info = vm.balloon.info()
    assert info.has_balloon
    before = _mem_total_kb(vm)
    vm.balloon.set_target_gb(0.25)
    assert vm.balloon.info().target_gb == 0.25
    deadline = time.monotonic() + 60
    after = before
    while time.monotonic() < deadline and after > before - 200 * 1024:
        time.sleep(0.5)  # poll interval
        after = _mem_total_kb(vm)
    assert after <= before - 200 * 1024, f"MemTotal {before} kB -> {after} kB"


@pytest.mark.parametrize("backend", backends_with(Feature.VSOCK))
def test_vsock_host_to_guest_and_refused_port(macvms: MacVMs, backend: str) -> None:
    vm = macvms.boot(backend)
    vsock = _machine(vm).vsock
    vm.guest.run(
        [
            "sh",
            "-c",
            "vzkit-agent relay --listen-vsock 5000 --exec cat </dev/null >/dev/null 2>&1 &",
        ]
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            sock = vsock.connect(5000, timeout=10)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # poll interval
    with sock:
        payload = bytes(range(256)) * 4096  # 1 MiB
        sock.sendall(payload)
        sock.shutdown(1)  # half-close: cat sees EOF and ends
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    assert bytes(received) == payload
    with pytest.raises(ConnectionRefusedError):
        vsock.connect(4999, timeout=10)


@pytest.mark.parametrize("backend", backends_with(Feature.VSOCK))
def test_vsock_guest_to_host_listener(macvms: MacVMs, backend: str) -> None:
    vm = macvms.boot(backend)
    with _machine(vm).vsock.listen(6000) as listener:
        done = vm.guest.run(
            ["vzkit-agent", "relay", "--connect-vsock", "2:6000", "--exec", "echo from-guest"]
        )
        assert done.returncode == 0, done.stderr
        sock, guest_port = listener.accept(timeout=30)
        with sock:
            assert sock.recv(100) == b"from-guest\n"
        assert guest_port > 0


@pytest.mark.parametrize("backend", backends_with(Feature.SHARES))
def test_shares_both_ways_and_read_only(macvms: MacVMs, backend: str, tmp_path: Path) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (rw / "from-host.txt").write_text("hello guest\n")
    (ro / "locked.txt").write_text("read only\n")
    vm = macvms.boot(
        backend, volumes=(vzkit.VolumeMount(rw, "rw"), vzkit.VolumeMount(ro, "ro", True))
    )
    script = (
        "mkdir -p /mnt/rw /mnt/ro && mount -t virtiofs rw /mnt/rw && mount -t virtiofs ro /mnt/ro"
        " && cat /mnt/rw/from-host.txt && echo written > /mnt/rw/from-guest.txt"
        " && ! touch /mnt/ro/nope 2>/dev/null && cat /mnt/ro/locked.txt"
    )
    done = vm.guest.run(["sh", "-c", script])
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"hello guest\nread only\n"
    assert (rw / "from-guest.txt").read_text() == "written\n"
    assert not (ro / "nope").exists()


@pytest.mark.parametrize("backend", backends_with(Feature.SNAPSHOTS))
def test_snapshot_save_and_restore(macvms: MacVMs, backend: str, tmp_path: Path) -> None:
    vm = macvms.boot(backend)
    cfg = vm.config
    assert vm.guest.run(["sh", "-c", "echo 4242 > /tmp/marker"]).returncode == 0
    vm.pause(timeout=30)
    state = tmp_path / "saved.vmstate"
    run_sync(_machine(vm).save_state(state))
    assert state.stat().st_size > 0
    vm.stop(timeout=30)
    vm.close()
    again = macvms.adopt(vzkit.VirtualMachine(cfg, backend=backend))
    run_sync(_machine(again).restore_state(state))
    assert again.state is vzkit.VMState.PAUSED
    again.resume(timeout=30)
    assert again.guest.wait_ready(timeout=60)
    assert again.guest.run(["cat", "/tmp/marker"]).stdout == b"4242\n"
