"""The VirtualMachine facade's guards, errors and clean-up, with no guest booted.

A stand-in QEMU (a shell script that answers ``-accel help`` and otherwise never speaks QMP)
exercises the start timeout; the real backend is used for everything else.
"""

from __future__ import annotations

import asyncio
import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest

import vzkit
import vzkit.aio
from vzkit._process import live_children, pid_alive
from vzkit.backends.qemu import _run


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"not really a kernel")
    return path


@pytest.fixture
def hanging_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "qemu-system-x86_64"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-accel" ]; then\n'
        '  printf "Accelerators supported in QEMU binary:\\ntcg\\n"; exit 0\n'
        "fi\n"
        'echo "$$" > "$(dirname "$0")/pid"\n'
        "exec sleep 600\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("VZKIT_QEMU_X86_64", str(script))
    return script


# A stand-in QEMU that speaks QMP (the greeting, capabilities negotiation, replies with the
# caller's id, events) on the socket vzkit hands it (-chardev socket,id=qmp0,fd=N), then
# misbehaves as $FAKE_QEMU_MODE says: "wedge" never answers "stop"; "panic" reports a guest
# panic, once running ("cont") and the test created the file "panic-now" beside the script,
# the way QEMU with -action panic=exit-failure does (GUEST_PANICKED, STOP, SHUTDOWN, exit
# status 1). The trigger is the test's, not a delay: a start still under way on a loaded
# machine must not see the panic.
FAKE_QEMU = textwrap.dedent(
    """\
    import json, os, socket, sys, threading, time
    if sys.argv[1:2] == ["-accel"]:
        print("Accelerators supported in QEMU binary:\\ntcg")
        sys.exit(0)
    with open(os.path.join(os.path.dirname(sys.argv[0]), "pid"), "w") as fh:
        fh.write(str(os.getpid()))
    fd = int(next(a for a in sys.argv if a.startswith("socket,id=qmp0,fd=")).split("=")[-1])
    sock = socket.socket(fileno=fd)
    mode = os.environ["FAKE_QEMU_MODE"]

    def send(message):
        sock.sendall(json.dumps(message).encode() + b"\\r\\n")

    def requests():  # QMP requests are JSON objects, not lines
        decoder, text = json.JSONDecoder(), ""
        while data := sock.recv(65536):
            text += data.decode()
            while text.strip():
                try:
                    message, end = decoder.raw_decode(text.lstrip())
                except ValueError:
                    break
                text = text.lstrip()[end:]
                yield message

    def event(name, **data):
        send({"event": name, "data": data, "timestamp": {"seconds": 0, "microseconds": 0}})

    def panic_when_told():
        trigger = os.path.join(os.path.dirname(sys.argv[0]), "panic-now")
        while not os.path.exists(trigger):
            time.sleep(0.01)  # poll interval
        os.unlink(trigger)
        event("GUEST_PANICKED", action="poweroff")
        event("STOP")
        event("SHUTDOWN", guest=True, reason="guest-panic")
        os._exit(1)

    send({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                  "capabilities": []}})
    balloon = [256 << 20]  # what the guest holds ("actual", bytes), after the last "balloon"
    for request in requests():
        command = request["execute"]
        if mode == "wedge" and command == "stop":
            continue
        if command == "balloon":  # a guest that gives back exactly what it is asked for
            balloon[0] = request["arguments"]["value"]
        reply = [] if command.startswith("query-") else {}
        if command == "query-balloon":
            reply = {"actual": balloon[0]}
        send({"return": reply, "id": request.get("id")})
        if command == "quit":
            sys.exit(0)
        if command == "system_powerdown":  # the guest powers off, as ACPI asks it
            event("POWERDOWN")
            event("SHUTDOWN", guest=True, reason="guest-shutdown")
            sys.exit(0)
        if mode == "panic" and command == "cont":
            threading.Thread(target=panic_when_told).start()
    """
)


@pytest.fixture
def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "qemu-system-x86_64"
    script.write_text(f"#!{sys.executable}\n{FAKE_QEMU}")
    script.chmod(0o755)
    monkeypatch.setenv("VZKIT_QEMU_X86_64", str(script))
    return script


def _config(kernel: Path, **kw: object) -> vzkit.LinuxVMConfig:
    return vzkit.LinuxVMConfig(arch="x86_64", kernel_path=kernel, memory_gb=0.25, **kw)  # type: ignore[arg-type]


def test_new_vm_is_stopped_and_guards_say_why(kernel: Path) -> None:
    with vzkit.VirtualMachine(_config(kernel), backend="qemu") as vm:
        assert vm.state is vzkit.VMState.STOPPED
        assert vm.backend == "qemu"
        assert (vm.can_start, vm.can_pause, vm.can_resume, vm.can_stop) == (
            True,
            False,
            False,
            False,
        )
        assert not vm.can_request_stop
        assert vm.pid is None
        with pytest.raises(vzkit.StateError, match="cannot pause a VM that is stopped"):
            vm.pause()
        with pytest.raises(vzkit.StateError, match="cannot resume a VM that is stopped"):
            vm.resume()
        with pytest.raises(vzkit.StateError, match="must be running"):
            vm.request_stop()
        with pytest.raises(vzkit.StateError, match="balloon needs a running VM"):
            vm.balloon.set_target_gb(0.1)
        vm.stop()  # stopping a stopped VM is a no-op
    with pytest.raises(vzkit.StateError, match="has been closed"):
        vm.start()
    assert not vm.can_start


def test_unknown_backend_lists_known_ones(kernel: Path) -> None:
    with pytest.raises(vzkit.BackendUnavailableError, match="known backends: vz, qemu"):
        vzkit.VirtualMachine(_config(kernel), backend="bhyve")


def test_no_qemu_installed_says_what_to_install(
    kernel: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("VZKIT_QEMU_X86_64", raising=False)
    with pytest.raises(vzkit.BackendUnavailableError, match="apt-get install qemu-system-x86"):
        vzkit.VirtualMachine(_config(kernel), backend="qemu")


def test_missing_kernel_at_start_names_the_path_and_starts_nothing(kernel: Path) -> None:
    vm = vzkit.VirtualMachine(_config(kernel), backend="qemu")
    kernel.unlink()
    before = live_children()
    with pytest.raises(vzkit.ConfigError, match=f"kernel_path: '{kernel}' does not exist"):
        vm.start(timeout=10)
    assert vm.state is vzkit.VMState.STOPPED
    assert live_children() == before
    vm.close()


def test_start_timeout_kills_and_reaps_a_vmm_that_never_answers(
    kernel: Path, hanging_qemu: Path, tmp_path: Path
) -> None:
    state_dir = tmp_path / ("long-" * 30)  # longer than any Unix socket path may be
    vm = vzkit.VirtualMachine(_config(kernel, state_dir=state_dir), backend="qemu")
    t0 = time.monotonic()
    with pytest.raises(vzkit.VMTimeoutError, match=r"start did not finish within 1\.5 s"):
        vm.start(timeout=1.5)
    assert time.monotonic() - t0 < 300  # not waited for: the stand-in sleeps 600 s
    pid = int((hanging_qemu.parent / "pid").read_text())
    assert not pid_alive(pid)
    assert pid not in live_children()
    assert vm.state is vzkit.VMState.STOPPED
    assert vm.can_start
    vm.close()
    assert state_dir.is_dir()  # a caller's state dir is kept


def test_a_qemu_that_never_greets_on_qmp_fails_start_within_the_qmp_bound(
    kernel: Path, hanging_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_run, "QMP_TIMEOUT_S", 0.5)
    with vzkit.VirtualMachine(_config(kernel, vsock=False), backend="qemu") as vm:
        with pytest.raises(vzkit.VMTimeoutError, match=r"did not answer on QMP within 0\.5 s"):
            vm.start(timeout=60)  # no start bound of the caller's would have ended it sooner
        pid = int((hanging_qemu.parent / "pid").read_text())
        assert not pid_alive(pid)
        assert vm.state is vzkit.VMState.STOPPED


def test_temporary_state_dir_is_removed_on_close(kernel: Path, hanging_qemu: Path) -> None:
    vm = vzkit.VirtualMachine(_config(kernel), backend="qemu")
    with pytest.raises(vzkit.VMTimeoutError):
        vm.start(timeout=0.5)
    state_dir = vm.state_dir
    assert state_dir.is_dir()
    vm.close()
    assert not state_dir.exists()


def test_aio_twin_has_the_same_guards(kernel: Path, hanging_qemu: Path) -> None:
    async def main() -> None:
        async with vzkit.aio.VirtualMachine(_config(kernel), backend="qemu") as vm:
            assert vm.state is vzkit.VMState.STOPPED
            with pytest.raises(vzkit.StateError):
                await vm.pause()
            with pytest.raises(vzkit.VMTimeoutError):
                await vm.start(timeout=0.5)
            assert vm.can_start

    asyncio.run(main())
    assert not [p for p in live_children() if pid_alive(p)]


def test_invalid_timeout_is_rejected(kernel: Path) -> None:
    vm = vzkit.VirtualMachine(_config(kernel), backend="qemu")
    with pytest.raises(ValueError, match="timeout must be >= 0"):
        vm.start(timeout=-1)
    vm.close()


def test_last_error_is_none_until_the_vm_fails(kernel: Path, hanging_qemu: Path) -> None:
    with vzkit.VirtualMachine(_config(kernel), backend="qemu") as vm:
        assert vm.last_error is None
        with pytest.raises(vzkit.VMTimeoutError):
            vm.start(timeout=0.5)
        assert vm.last_error is None, "a start that failed and was cleaned up is no VM error"


def test_a_qemu_that_stops_answering_fails_the_call_within_the_qmp_bound(
    kernel: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "wedge")
    monkeypatch.setattr(_run, "QMP_TIMEOUT_S", 0.5)
    with vzkit.VirtualMachine(_config(kernel, vsock=False), backend="qemu") as vm:
        vm.start(timeout=30)
        pid = vm.pid
        with pytest.raises(vzkit.VMTimeoutError) as info:
            vm.pause(timeout=30)
        assert str(info.value) == (
            f"QEMU (pid {pid}) did not answer the QMP command 'stop' within 0.5 s: it is wedged "
            f"or overloaded. Stop the VM (vm.stop() or vm.close() kills it) and see its log "
            f"{str(vm.state_dir / 'qemu.log')!r}"
        )
        assert vm.state is vzkit.VMState.RUNNING
        vm.stop(timeout=2)
        assert vm.state is vzkit.VMState.STOPPED
    assert pid is not None
    assert not pid_alive(pid)


def test_a_guest_panic_ends_in_error_with_the_reason_on_both_facades(
    kernel: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "panic")
    reason = "the guest kernel panicked (reported by the pvpanic device; QEMU exits)"
    with vzkit.VirtualMachine(_config(kernel, vsock=False), backend="qemu") as vm:
        vm.start(timeout=30)
        (fake_qemu.parent / "panic-now").touch()
        assert vm.wait(timeout=30) is vzkit.VMState.ERROR
        assert isinstance(vm.last_error, vzkit.VMError)
        assert str(vm.last_error) == reason

    async def main() -> None:
        cfg = _config(kernel, vsock=False)
        async with vzkit.aio.VirtualMachine(cfg, backend="qemu") as avm:
            await avm.start(timeout=30)
            (fake_qemu.parent / "panic-now").touch()
            assert await avm.wait(timeout=30) is vzkit.VMState.ERROR
            assert str(avm.last_error) == reason
            assert avm.can_start

    asyncio.run(main())
    assert not [p for p in live_children() if pid_alive(p)]


def test_aio_request_stop_then_wait_and_the_balloon(
    kernel: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``vzkit.aio``: the balloon's target and what the guest holds, then a stop the guest is
    asked for (ACPI power button) and ``wait`` for it, over QMP to a stand-in QEMU."""
    monkeypatch.setenv("FAKE_QEMU_MODE", "obedient")

    async def main() -> None:
        async with vzkit.aio.VirtualMachine(_config(kernel, vsock=False), backend="qemu") as vm:
            assert isinstance(vm.balloon, vzkit.aio.Balloon)
            await vm.start(timeout=30)
            before = await vm.balloon.info()
            assert (before.has_balloon, before.target_gb, before.actual_gb) == (True, 0.25, 0.25)
            await vm.balloon.set_target_gb(0.125)
            after = await vm.balloon.info()
            assert (after.target_gb, after.actual_gb) == (0.125, 0.125)
            with pytest.raises(vzkit.ConfigError, match=r"outside 64 MiB\.\.256 MiB"):
                await vm.balloon.set_target_gb(1)
            with pytest.raises(vzkit.VMTimeoutError):
                await vm.wait(timeout=0.2)  # running, and nobody asked it to stop
            assert vm.state is vzkit.VMState.RUNNING
            await vm.request_stop()
            assert await vm.wait(timeout=30) is vzkit.VMState.STOPPED
            assert vm.last_error is None
            with pytest.raises(vzkit.StateError, match="balloon needs a running VM"):
                await vm.balloon.set_target_gb(0.125)

    asyncio.run(main())
    assert not [p for p in live_children() if pid_alive(p)]
