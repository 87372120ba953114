"""``VirtualMachine(cfg, backend="vz")``: the facade over :class:`VzMachine` on the stand-in.

The same lifecycle guards, stop ladder and balloon API as the qemu backend; completion
handlers and delegate callbacks hop from the VM's queue onto vzkit's loop.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
from pathlib import Path

import pytest

import vzkit
from vzkit._loop import run_sync
from vzkit.backends import vz as vzb

from ._support import ARM64_IMAGE, take_violations
from .fakeobjc import FakeRuntime, guest_power_off, vm_crash

pytestmark = pytest.mark.contract


@pytest.fixture
def cfg(tmp_path: Path) -> vzkit.LinuxVMConfig:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(ARM64_IMAGE)
    return vzkit.LinuxVMConfig(kernel_path=kernel, memory_gb=1, state_dir=tmp_path / "state")


def test_backend_vz_by_name_on_a_simulated_mac(
    fake: FakeRuntime, cfg: vzkit.LinuxVMConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    with vzkit.VirtualMachine(cfg, backend="vz") as vm:
        assert vm.backend == "vz"
        assert vm.pid is None
        vm.start(timeout=5)
        assert vm.state is vzkit.VMState.RUNNING
        assert vm.console_log_path == cfg.state_dir / "console.log"  # type: ignore[operator]
        vm.stop(timeout=5)  # asks the guest; the stand-in guest powers off
        assert vm.state is vzkit.VMState.STOPPED
    assert fake.vms[0]._fk.extra["history"][-1] == "Stopped"


def test_full_lifecycle_through_the_facade(fake: FakeRuntime, cfg: vzkit.LinuxVMConfig) -> None:
    states: list[tuple[vzkit.VMState, vzkit.VMState]] = []
    vm = vzkit.VirtualMachine(cfg, backend=vzb.BACKEND)
    machine = vm._core.machine
    assert isinstance(machine, vzb.VzMachine)
    real = machine._on_state
    machine._on_state = lambda old, new: (states.append((old, new)), real(old, new))  # type: ignore[method-assign]
    try:
        vm.start(timeout=5)
        vm.pause(timeout=5)
        assert vm.can_resume
        vm.resume(timeout=5)
        vm.balloon.set_target_gb(0.5)
        info = vm.balloon.info()
        assert (info.has_balloon, info.target_gb, info.minimum_allowed_mb) == (True, 0.5, 128)
        fake.knobs.guest_honours_request_stop = False
        vm.stop(timeout=0.2)  # the guest ignores the request: forced off after half the time
        assert vm.state is vzkit.VMState.STOPPED
    finally:
        vm.close()
    S = vzkit.VMState
    assert states == [
        (S.STOPPED, S.STARTING),
        (S.STARTING, S.RUNNING),
        (S.RUNNING, S.PAUSING),
        (S.PAUSING, S.PAUSED),
        (S.PAUSED, S.RESUMING),
        (S.RESUMING, S.RUNNING),
        (S.RUNNING, S.STOPPING),
        (S.STOPPING, S.STOPPED),
    ]


def test_guest_power_off_and_crash_reach_the_machine(
    fake: FakeRuntime, cfg: vzkit.LinuxVMConfig
) -> None:
    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
        vm.start(timeout=5)
        gc.collect()  # the delegate must be kept alive by the machine
        guest_power_off(fake, fake.vms[-1])
        assert vm.wait(timeout=5) is vzkit.VMState.STOPPED
        vm.start(timeout=5)
        vm_crash(fake, fake.vms[-1], "The virtual machine encountered a fatal error.")
        assert vm.wait(timeout=5) is vzkit.VMState.ERROR
        machine = vm._core.machine
        assert isinstance(machine, vzb.VzMachine)
        assert "fatal error" in str(machine.last_error)
        assert vm.can_start  # ERROR -> start again
        vm.start(timeout=5)
        assert vm.state is vzkit.VMState.RUNNING


def test_failed_start_leaves_nothing_behind(fake: FakeRuntime, cfg: vzkit.LinuxVMConfig) -> None:
    fake.fail_next("startWithCompletionHandler:", code=6, description="Too many VMs.")
    vm = vzkit.VirtualMachine(cfg, backend=vzb.BACKEND)
    try:
        with pytest.raises(vzkit.VMError, match="start the VM: Too many VMs"):
            vm.start(timeout=5)
        assert vm.state is vzkit.VMState.STOPPED
        machine = vm._core.machine
        assert isinstance(machine, vzb.VzMachine)
        assert machine.vz_vm is None
        assert machine.queue is None
        vm.start(timeout=5)  # and it can start afterwards
        assert vm.state is vzkit.VMState.RUNNING
    finally:
        vm.close()


def test_invalid_config_fails_before_any_vm_exists(
    fake: FakeRuntime, cfg: vzkit.LinuxVMConfig
) -> None:
    fake.knobs.max_memory = 512 << 20
    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
        with pytest.raises(vzkit.ConfigError, match="outside what this Mac allows"):
            vm.start(timeout=5)
        assert vm.state is vzkit.VMState.STOPPED
    assert fake.vms == []


def test_a_qcow2_disk_is_refused_with_the_command_to_convert_it(
    fake: FakeRuntime, cfg: vzkit.LinuxVMConfig, tmp_path: Path
) -> None:
    """VZ attaches any image as raw bytes: a qcow2 file would be the guest's to rewrite."""
    disk = tmp_path / "my disk.qcow2"
    disk.write_bytes(b"QFI\xfb" + bytes(508))
    qcow2 = cfg.replace(disk_path=disk, disk_format="qcow2")
    with vzkit.VirtualMachine(qcow2, backend=vzb.BACKEND) as vm:
        with pytest.raises(vzkit.UnsupportedError) as info:
            vm.start(timeout=5)
        assert vm.state is vzkit.VMState.STOPPED
    assert (info.value.backend, info.value.feature) == ("vz", "disk:qcow2")
    assert str(info.value) == (
        f"the vz backend attaches raw disk images only; {str(disk)!r} is configured as qcow2. "
        "Convert it and use the copy (disk_format 'raw'): qemu-img convert -f qcow2 -O raw "
        f"'{disk}' '{tmp_path}/my disk.raw'"
    )
    assert fake.vms == []  # refused before any VZ object was made
    # The same bytes declared raw are attached (raw, as the guest sees them) and captured raw.
    machine = vzb.BACKEND.create_machine(cfg.replace(disk_path=disk), lambda old, new: None)

    async def scenario() -> None:
        await machine.start()
        await machine.pause()
        (captured,) = await machine.capture_disks(tmp_path, ".s.")
        assert captured.format is vzkit.DiskFormat.RAW
        assert captured.path.name == ".s.disk0.raw"
        await machine.force_stop()
        # a snapshot whose disk says qcow2 is not copied over this VM's disk
        foreign = dataclasses.replace(captured, format=vzkit.DiskFormat.QCOW2)
        before = disk.read_bytes()
        with pytest.raises(vzkit.VMError, match="vz backend attaches raw disk images only"):
            await machine.restore_state(tmp_path / "state.vzvm", [foreign])
        assert disk.read_bytes() == before
        await machine.close()

    run_sync(scenario())
    assert len(fake.vms) == 1


def test_start_timeout_stops_and_releases(fake: FakeRuntime, cfg: vzkit.LinuxVMConfig) -> None:
    fake.knobs.hang.add("startWithCompletionHandler:")
    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
        with pytest.raises(vzkit.VMTimeoutError, match="start did not finish"):
            vm.start(timeout=0.2)
        assert vm.state is vzkit.VMState.STOPPED
    history = fake.vms[0]._fk.extra["history"]
    assert history[-2:] == ["Stopping", "Stopped"]  # the half-started VM was forced off


def test_own_state_dir_is_temporary(fake: FakeRuntime, cfg: vzkit.LinuxVMConfig) -> None:
    vm = vzkit.VirtualMachine(cfg.replace(state_dir=None), backend=vzb.BACKEND)
    vm.start(timeout=5)
    state_dir = vm.state_dir
    assert (state_dir / "linux-machine.id").is_file()
    vm.close()
    assert not state_dir.exists()


def test_pty_console(fake: FakeRuntime, cfg: vzkit.LinuxVMConfig) -> None:
    with vzkit.VirtualMachine(cfg.replace(console="pty"), backend=vzb.BACKEND) as vm:
        vm.start(timeout=5)
        pty = vm.console_pty
        assert pty is not None
        assert os.path.exists(pty)
        assert vm.console_log_path is None
        vm.stop(timeout=5)
    assert vm.console_pty is None


def test_vsock_and_snapshots_on_the_machine(
    fake: FakeRuntime, cfg: vzkit.LinuxVMConfig, tmp_path: Path
) -> None:
    fake.guest_ports.add(52)
    machine = vzb.BACKEND.create_machine(cfg, lambda old, new: None)

    async def scenario() -> None:
        await machine.start()
        with machine.vsock.connect(52, timeout=5) as sock:
            fake.guest_peers[52][0].sendall(b"ok")
            assert sock.recv(2) == b"ok"
        await machine.pause()
        await machine.save_state(tmp_path / "state.vzvm")
        await machine.force_stop()
        await machine.restore_state(tmp_path / "state.vzvm")
        assert machine.state is vzkit.VMState.PAUSED
        await machine.resume()
        # The machine has no state guard of its own (the core's table refuses this first,
        # see tests/unit/test_guards.py): VZ refuses, and the machine keeps VZ's state.
        with pytest.raises(vzkit.StateError, match="Invalid virtual machine state transition"):
            await machine.save_state(tmp_path / "again.vzvm")
        assert machine.state is vzkit.VMState.RUNNING
        await machine.close()

    run_sync(scenario())
    assert machine.state is vzkit.VMState.STOPPED


def test_check_available_says_why_not(
    make_fake: object, monkeypatch: pytest.MonkeyPatch, cfg: vzkit.LinuxVMConfig
) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    with pytest.raises(vzkit.BackendUnavailableError, match="needs macOS"):
        vzb.BACKEND.check_available()
    monkeypatch.setattr(sys, "platform", "darwin")
    for name in ("Virtualization", "Foundation", "objc", "dispatch"):
        monkeypatch.setitem(sys.modules, name, None)  # type: ignore[arg-type]
    import platform

    monkeypatch.setattr(platform, "mac_ver", lambda *a: ("15.0", ("", "", ""), "arm64"))
    with pytest.raises(vzkit.BackendUnavailableError, match=r"pip install 'vzkit\[vz\]'"):
        vzb.BACKEND.check_available()
    monkeypatch.setattr(platform, "mac_ver", lambda *a: ("11.7", ("", "", ""), "arm64"))
    with pytest.raises(vzkit.BackendUnavailableError, match=r"macOS 12\.0 or later"):
        vzb.BACKEND.check_available()


def test_unsupported_hardware(
    fake: FakeRuntime, monkeypatch: pytest.MonkeyPatch, cfg: vzkit.LinuxVMConfig
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    fake.knobs.vm_supported = False
    with pytest.raises(vzkit.BackendUnavailableError, match="isSupported"):
        vzkit.VirtualMachine(cfg, backend="vz")
    assert take_violations(fake) == []
