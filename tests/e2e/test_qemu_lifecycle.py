"""Boot real x86_64 and aarch64 guests under QEMU and walk the lifecycle and its faults."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

import vzkit
import vzkit.aio
from vzkit._process import live_children, pid_alive
from vzkit.backends.qemu import _run

from .conftest import ARCHES, GuestShell, VMFactory, wait_for_console


def _mem_total_kb(shell: GuestShell) -> int:
    rc, out = shell.run("grep MemTotal /proc/meminfo")
    assert rc == 0, out
    match = re.search(r"MemTotal:\s+(\d+) kB", out)
    assert match, out
    return int(match[1])


def _wait_state(vm: vzkit.VirtualMachine, state: vzkit.VMState, timeout: float) -> float:
    t0 = time.monotonic()
    while vm.state is not state:
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"VM is {vm.state}, expected {state} within {timeout} s")
        time.sleep(0.02)  # poll interval
    return time.monotonic() - t0


@pytest.mark.parametrize("arch", ARCHES)
def test_lifecycle(vms: VMFactory, arch: str) -> None:
    vm, shell = vms.boot(arch)
    assert vm.state is vzkit.VMState.RUNNING
    pid = vm.pid
    assert pid is not None
    assert pid_alive(pid)
    rc, out = shell.run("uname -m")
    assert (rc, out.strip()) == (0, arch)
    with pytest.raises(vzkit.StateError, match="already running"):
        vm.start()

    vm.pause()
    assert vm.state is vzkit.VMState.PAUSED
    assert (vm.can_pause, vm.can_resume, vm.can_stop) == (False, True, True)
    shell.send("echo tick-$((6*7))\n")
    with pytest.raises(TimeoutError):  # a paused guest runs nothing
        shell.read_until(b"tick-42", timeout=1.5)
    vm.resume()
    assert vm.state is vzkit.VMState.RUNNING
    shell.read_until(b"tick-42", timeout=30)

    vm.stop(timeout=20)
    assert vm.state is vzkit.VMState.STOPPED
    assert vm.pid is None
    assert not pid_alive(pid)
    assert vm.wait(timeout=1) is vzkit.VMState.STOPPED
    assert vm.can_start


def test_request_stop_powers_the_guest_off(vms: VMFactory) -> None:
    vm, _ = vms.boot("x86_64")  # the ACPI power button; no agent connection involved
    assert vm.can_request_stop
    assert not vm.guest.connected
    vm.request_stop()
    assert vm.wait(timeout=30) is vzkit.VMState.STOPPED


def test_request_stop_through_the_agent_on_aarch64(vms: VMFactory) -> None:
    # virt without firmware has no power button this kernel knows; the agent carries it.
    vm = vms.create("aarch64", console=vzkit.ConsoleMode.LOG)
    vm.start(timeout=60)
    assert vm.guest.wait_ready(timeout=120)
    assert vm.guest.run(["uname", "-m"]).stdout == b"aarch64\n"
    vm.request_stop()
    assert vm.wait(timeout=60) is vzkit.VMState.STOPPED


@pytest.mark.parametrize("facade", ["sync", "aio"])
def test_stop_powers_off_through_the_agent_on_aarch64(vms: VMFactory, facade: str) -> None:
    """virt without firmware ignores the power button: both facades' stop() asks the agent,
    so neither waits out the graceful half of its timeout (30 s here) and forces."""
    cfg = vms.config("aarch64", console=vzkit.ConsoleMode.LOG)
    if facade == "sync":
        vm = vzkit.VirtualMachine(cfg, backend="qemu")
        vms.vms.append(vm)
        vm.start(timeout=60)
        assert vm.guest.wait_ready(timeout=120)
        t0 = time.monotonic()
        vm.stop(timeout=60)
        elapsed, state = time.monotonic() - t0, vm.state
    else:

        async def main() -> tuple[float, vzkit.VMState]:
            async with vzkit.aio.VirtualMachine(cfg, backend="qemu") as avm:
                await avm.start(timeout=60)
                assert await avm.guest.wait_ready(timeout=120)
                assert (await avm.guest.run(["uname", "-m"])).stdout == b"aarch64\n"
                t0 = time.monotonic()
                await avm.stop(timeout=60)
                return time.monotonic() - t0, avm.state

        elapsed, state = asyncio.run(main())
    print(f"{facade} stop of an aarch64 guest through the agent: {elapsed:.2f} s")
    assert state is vzkit.VMState.STOPPED
    assert elapsed < 20, f"{facade} stop took {elapsed:.1f} s: the VM was forced off"


def test_stop_forces_a_guest_that_ignores_the_power_button(vms: VMFactory) -> None:
    vm, shell = vms.boot("x86_64")
    rc, out = shell.run("kill $(cat /run/vzkit-powerbtn.pids)")
    assert rc == 0, out
    t0 = time.monotonic()
    vm.stop(timeout=6)
    assert vm.state is vzkit.VMState.STOPPED
    assert time.monotonic() - t0 < 12


def test_guest_poweroff_ends_stopped_not_error(vms: VMFactory) -> None:
    vm, shell = vms.boot("x86_64")
    shell.send("poweroff -f\n")
    assert vm.wait(timeout=30) is vzkit.VMState.STOPPED
    assert vm.last_error is None


def test_balloon_shrinks_guest_memory(vms: VMFactory) -> None:
    vm, shell = vms.boot("x86_64", memory_gb=0.5)
    info = vm.balloon.info()
    assert info.has_balloon
    assert info.target_gb == 0.5
    before = _mem_total_kb(shell)
    vm.balloon.set_target_gb(0.25)
    deadline = time.monotonic() + 30
    after = before
    while time.monotonic() < deadline:
        after = _mem_total_kb(shell)
        if after <= before - 200 * 1024:
            break
        time.sleep(0.5)  # poll interval
    assert after <= before - 200 * 1024, f"MemTotal {before} kB -> {after} kB"
    info = vm.balloon.info()
    assert info.target_gb == 0.25
    while info.actual_gb is not None and info.actual_gb > 0.26 and time.monotonic() < deadline:
        time.sleep(0.2)  # poll interval
        info = vm.balloon.info()
    assert info.actual_gb is not None
    assert info.actual_gb <= 0.26
    with pytest.raises(vzkit.ConfigError, match="outside"):
        vm.balloon.set_target_gb(4)


def test_vmm_killed_moves_to_error_and_close_reaps_everything(vms: VMFactory) -> None:
    vm, _ = vms.boot("x86_64")
    pid = vm.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    took = _wait_state(vm, vzkit.VMState.ERROR, timeout=2)
    assert took < 2
    assert vm.wait(timeout=1) is vzkit.VMState.ERROR
    assert str(vm.last_error).startswith(f"QEMU (pid {pid}) exited with -9: ")
    state_dir = vm.state_dir
    vm.close()
    assert not pid_alive(pid)
    assert pid not in live_children()
    assert not state_dir.exists()


def test_two_vms_at_once_do_not_collide(vms: VMFactory) -> None:
    a = vms.create("x86_64")
    b = vms.create("x86_64")
    a.start(timeout=60)
    b.start(timeout=60)
    assert a.pid != b.pid
    assert a.state_dir != b.state_dir
    wait_for_console(a)
    wait_for_console(b)
    sa, sb = GuestShell(a), GuestShell(b)
    vms.shells += [sa, sb]
    sa.run("echo a > /tmp/who")
    sb.run("echo b > /tmp/who")
    assert sa.run("cat /tmp/who")[1].strip() == "a"
    assert sb.run("cat /tmp/who")[1].strip() == "b"


def test_odd_paths_and_a_very_long_state_dir(vms: VMFactory, tmp_path: Path) -> None:
    odd = tmp_path / "a dir, with commas and ünïcødé"
    odd.mkdir()
    image = vms.images["x86_64"]
    kernel = shutil.copy(image.kernel, odd / "vmlinuz, x")
    initrd = shutil.copy(image.initrd, odd / "initrd ü.img")
    state_dir = tmp_path / ("state-dir-" * 12) / "nested, dir"
    assert len(str(state_dir)) > 108
    vm, shell = vms.boot("x86_64", kernel_path=kernel, initrd_path=initrd, state_dir=state_dir)
    assert shell.run("true")[0] == 0
    assert vm.console_log_path == state_dir / "console.log"
    vm.close()
    assert (state_dir / "console.log").exists()  # the caller's state dir is kept


def test_aio_twin_boots_and_stops(vms: VMFactory) -> None:
    cfg = vms.config("x86_64", console=vzkit.ConsoleMode.LOG)

    async def main() -> vzkit.VMState:
        async with vzkit.aio.VirtualMachine(cfg, backend="qemu") as vm:
            await vm.start(timeout=60)
            assert vm.state is vzkit.VMState.RUNNING
            await vm.pause()
            assert vm.state is vzkit.VMState.PAUSED
            await vm.resume()
            await vm.stop(timeout=10)
            return vm.state

    assert asyncio.run(main()) is vzkit.VMState.STOPPED


def test_a_wedged_qemu_fails_qmp_calls_instead_of_hanging(
    vms: VMFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A QEMU that stops answering (here: SIGSTOP) makes each QMP call fail within the
    per-command bound, and stop() still gets rid of it."""
    monkeypatch.setattr(_run, "QMP_TIMEOUT_S", 1.0)
    vm = vms.create("x86_64", console=vzkit.ConsoleMode.LOG)
    vm.start(timeout=60)
    pid = vm.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        wedged = rf"^QEMU \(pid {pid}\) did not answer the QMP command '%s' within 1 s: it is"
        with pytest.raises(vzkit.VMTimeoutError, match=wedged % "stop"):
            vm.pause(timeout=60)  # the caller's bound is far: the QMP one answers first
        assert vm.state is vzkit.VMState.RUNNING, "a failed pause leaves the VM as it was"
        with pytest.raises(vzkit.VMTimeoutError, match=wedged % "query-balloon"):
            vm.balloon.info()
        vm.stop(timeout=10)  # asking the guest fails within the bound; then QEMU is killed
        assert vm.state is vzkit.VMState.STOPPED
        assert not pid_alive(pid)
        assert pid not in live_children()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_guest_panic_ends_in_error_with_the_reason(vms: VMFactory) -> None:
    """The pvpanic device reports the panic, QEMU exits (``-action panic=exit-failure``),
    and the VM says why it failed, on both facades' ``last_error``."""
    vm, shell = vms.boot("x86_64")
    pid = vm.pid
    assert pid is not None
    assert vm.last_error is None
    rc, out = shell.run("cat /sys/bus/platform/drivers/pvpanic-mmio/*/uevent 2>/dev/null | head -1")
    assert rc == 0
    assert out.strip(), "the guest's pvpanic driver is bound to the device"
    proc = vm.guest.popen(["sh", "-c", "echo c > /proc/sysrq-trigger"], stdin=False)
    assert vm.wait(timeout=60) is vzkit.VMState.ERROR
    proc.stdout.close()
    proc.stderr.close()
    error = vm.last_error
    assert isinstance(error, vzkit.VMError)
    assert str(error).startswith(
        "the guest kernel panicked: Kernel panic - not syncing: sysrq triggered crash "
        "(reported by the pvpanic device; QEMU exits); its console log"
    ), error
    assert not pid_alive(pid), "QEMU exited on the panic"
    assert pid not in live_children()
    assert vm.can_start


def test_confined_under_umask_0(vms: VMFactory, tmp_path: Path) -> None:
    """QEMU runs under its seccomp filter; under umask 0 the state dir vzkit makes is 0700
    and every file in it (console log, QEMU's log, the MAC, vsock, passt and virtiofsd logs)
    is 0600."""
    share = tmp_path / "share"
    share.mkdir()
    state_dir = tmp_path / "made" / "by vzkit"
    old = os.umask(0)
    try:
        vm, shell = vms.boot(
            "x86_64",
            state_dir=state_dir,
            network=vzkit.NetworkConfig(vzkit.NetworkMode.NAT),
            volumes=(vzkit.parse_volume_spec(f"{share}:data"),),
        )
        rc, out = shell.run("echo guest output > /dev/console; ls /mnt/data")
        assert rc == 0, out
    finally:
        os.umask(old)
    pid = vm.pid
    assert pid is not None
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(r"^Seccomp:\s+2$", status, re.M), status  # a filter is loaded
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny" in argv
    vm.stop(timeout=20)
    modes = {
        str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777)
        for p in [tmp_path / "made", *(tmp_path / "made").rglob("*")]
    }
    assert modes == {
        "made": "0o700",
        "made/by vzkit": "0o700",
        "made/by vzkit/console.log": "0o600",
        "made/by vzkit/qemu.log": "0o600",
        "made/by vzkit/mac-address": "0o600",
        "made/by vzkit/vsock.log": "0o600",
        "made/by vzkit/passt.log": "0o600",
        "made/by vzkit/virtiofsd-0.log": "0o600",
    }
