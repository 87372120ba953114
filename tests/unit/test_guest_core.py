"""The guest agent owned by the VM core, on both facades, with the real agent binary.

The "VM" here is a fake machine whose guest is ``vzkit-agent serve --stdio`` running on the
host over a socketpair (test mode: POWEROFF makes it exit, as a guest powering off ends the
VM) and whose power button does nothing, like aarch64 ``virt`` without firmware. So the stop
ladder can only end gracefully through the agent: a facade that does not ask the agent waits
half its timeout and forces the VM off.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import vzkit
import vzkit.aio
from vzkit import _guestcore
from vzkit._loop import run_sync
from vzkit._state import VMState
from vzkit._vmcore import VMCore, core_of

from ..support.agent_vm import AgentBackend, AgentMachine, host_agent
from ..support.polling import wait_until

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="runs the x86_64 Linux agent binary on the host",
)


@pytest.fixture(scope="module")
def agent() -> Path:
    return host_agent()


def _config(tmp_path: Path) -> vzkit.LinuxVMConfig:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    return vzkit.LinuxVMConfig(kernel_path=kernel, state_dir=tmp_path / "state")


def _machine(core: VMCore) -> AgentMachine:
    assert isinstance(core.machine, AgentMachine)
    return core.machine


STOP_TIMEOUT = 20.0  # the graceful half is 10 s: a forced stop would take at least that


def test_sync_stop_powers_off_through_the_agent(agent: Path, tmp_path: Path) -> None:
    with vzkit.VirtualMachine(_config(tmp_path), backend=AgentBackend(agent)) as vm:
        vm.start()
        assert vm.guest.wait_ready(10)
        assert vm.guest.run(["echo", "hi"]).stdout == b"hi\n"
        t0 = time.monotonic()
        vm.stop(timeout=STOP_TIMEOUT)
        elapsed = time.monotonic() - t0
        machine = _machine(core_of(vm))
        assert vm.state is VMState.STOPPED
        assert machine.forced == 0, "the guest powered off on its own, nothing was forced"
        assert elapsed < 3, f"stop took {elapsed:.1f} s"
        assert not vm.guest.connected


def test_async_stop_powers_off_through_the_agent_as_fast(agent: Path, tmp_path: Path) -> None:
    async def main() -> float:
        cfg = _config(tmp_path)
        async with vzkit.aio.VirtualMachine(cfg, backend=AgentBackend(agent)) as vm:
            await vm.start()
            assert await vm.guest.wait_ready(10)
            assert (await vm.guest.run(["echo", "hi"])).stdout == b"hi\n"
            assert vm.guest.connected
            t0 = time.monotonic()
            await vm.stop(timeout=STOP_TIMEOUT)
            elapsed = time.monotonic() - t0
            assert vm.state is VMState.STOPPED
            assert _machine(core_of(vm)).forced == 0
            assert not vm.guest.connected
            return elapsed

    elapsed = asyncio.run(main())
    assert elapsed < 3, f"async stop took {elapsed:.1f} s: it did not ask the agent"


def test_without_the_agent_the_power_button_does_nothing_and_stop_forces(
    agent: Path, tmp_path: Path
) -> None:
    """The control for the two tests above: the fake's power button really does nothing."""

    async def main() -> None:
        cfg = _config(tmp_path)
        async with vzkit.aio.VirtualMachine(cfg, backend=AgentBackend(agent)) as vm:
            await vm.start()
            assert not vm.guest.connected  # nobody talked to the agent
            t0 = time.monotonic()
            await vm.stop(timeout=1.0)
            assert time.monotonic() - t0 >= 0.5  # the graceful half, then force
            machine = _machine(core_of(vm))
            assert (machine.power_button_presses, machine.forced) == (1, 1)
            assert vm.state is VMState.STOPPED

    asyncio.run(main())


def test_async_request_stop_asks_the_agent_too(agent: Path, tmp_path: Path) -> None:
    async def main() -> None:
        cfg = _config(tmp_path)
        async with vzkit.aio.VirtualMachine(cfg, backend=AgentBackend(agent)) as vm:
            await vm.start()
            await vm.guest.wait_ready(10)
            await vm.request_stop()
            assert await vm.wait(timeout=5) is VMState.STOPPED
            assert _machine(core_of(vm)).forced == 0

    asyncio.run(main())


HOUR_NS = 3600 * 10**9


def _clock_steps(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "stepped the guest clock" in r.getMessage()]


@pytest.mark.parametrize("facade", ["sync", "aio"])
def test_resumes_step_the_clock_and_the_first_after_a_restore_reseeds(
    agent: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    facade: str,
) -> None:
    """Every resume sends SET_CLOCK (the host's clock, an hour ahead here: the host-run agent
    reports the step it would make); only the first after a restore reseeds the RNG."""
    pool = tmp_path / "urandom"  # stands in for the guest's /dev/urandom
    pool.write_bytes(b"")
    monkeypatch.setattr(_guestcore, "GUEST_URANDOM", str(pool))
    monkeypatch.setattr(_guestcore, "host_realtime_ns", lambda: time.time_ns() + HOUR_NS)
    backend = AgentBackend(agent)

    def restore(core: VMCore) -> None:
        run_sync(_machine(core).fake_restore())
        core.restored(tmp_path / "snap.vmstate", clock_step=True)

    caplog.set_level(logging.INFO, logger="vzkit.guest")
    if facade == "sync":
        with vzkit.VirtualMachine(_config(tmp_path), backend=backend) as vm:
            restore(core_of(vm))
            vm.resume()
            written_first = pool.read_bytes()
            pool.write_bytes(b"")
            vm.pause()
            vm.resume()  # the clock again, the RNG only after a restore
            assert pool.read_bytes() == b""
            assert vm.guest.connected
            vm.stop(timeout=STOP_TIMEOUT)
    else:

        async def main() -> bytes:
            cfg = _config(tmp_path)
            async with vzkit.aio.VirtualMachine(cfg, backend=backend) as vm:
                restore(core_of(vm))
                await vm.resume()
                written = pool.read_bytes()
                pool.write_bytes(b"")
                await vm.pause()
                await vm.resume()
                assert pool.read_bytes() == b""
                await vm.stop(timeout=STOP_TIMEOUT)
                return written

        written_first = asyncio.run(main())
    steps = _clock_steps(caplog)
    assert len(steps) == 2, steps
    for step in steps:  # the host's clock was read a moment before the agent's
        assert abs(float(step.split()[5]) - 3600) < 5, step
    assert steps[0].endswith("after the restore (the agent's dry run: not applied)")
    assert steps[1].endswith("after a resume (the agent's dry run: not applied)")
    assert len(written_first) == _guestcore.RESEED_BYTES
    assert written_first != bytes(len(written_first))


def test_a_resume_without_an_agent_session_does_not_connect(
    agent: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain resume steps the clock through an open session only (a guest that may have no
    agent is not waited for)."""
    monkeypatch.setattr(_guestcore, "host_realtime_ns", lambda: time.time_ns() + HOUR_NS)
    caplog.set_level(logging.INFO, logger="vzkit.guest")
    with vzkit.VirtualMachine(_config(tmp_path), backend=AgentBackend(agent)) as vm:
        vm.start()
        vm.pause()
        vm.resume()
        assert not vm.guest.connected
        assert _clock_steps(caplog) == []
        vm.stop(timeout=STOP_TIMEOUT)


def test_a_host_sleep_steps_the_clock(
    agent: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The sleep watch sees the clock that counts sleep run ahead and calls the core's
    ``host_woke``, which steps a running guest's clock."""
    from vzkit._hostsleep import SleepWatch

    monkeypatch.setattr(_guestcore, "host_realtime_ns", lambda: time.time_ns() + HOUR_NS)
    caplog.set_level(logging.INFO, logger="vzkit.guest")
    with vzkit.VirtualMachine(_config(tmp_path), backend=AgentBackend(agent)) as vm:
        vm.start()
        vm.guest.wait_ready(timeout=30)
        core = core_of(vm)
        ticks = iter(range(1000))

        def clocks() -> tuple[int, int]:  # 30 s of sleep between the first two checks
            n = next(ticks)
            return (n * 10**9 + (30 * 10**9 if n >= 2 else 0), n * 10**9)

        watch = SleepWatch(core.host_woke, clocks=clocks, interval_s=0.01)
        run_sync(_start(watch))
        wait_until(lambda: bool(_clock_steps(caplog)), timeout=10, what="a clock step")
        run_sync(_stop(watch))
        assert _clock_steps(caplog)[0].endswith(
            "after a host sleep of 30 s (the agent's dry run: not applied)"
        )
        vm.stop(timeout=STOP_TIMEOUT)


async def _start(watch: object) -> None:
    watch.start()  # type: ignore[attr-defined]


async def _stop(watch: object) -> None:
    watch.stop()  # type: ignore[attr-defined]


def test_after_restore_failures_are_logged_not_raised(
    agent: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A guest without ``sh`` still resumes; the log says what was not done."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with vzkit.VirtualMachine(_config(tmp_path), backend=AgentBackend(agent, str(empty))) as vm:
        core = core_of(vm)
        run_sync(_machine(core).fake_restore())
        core.restored(tmp_path / "snap.vmstate", clock_step=True)
        with caplog.at_level(logging.WARNING, logger="vzkit.guest"):
            vm.resume()
        assert vm.state is VMState.RUNNING
        messages = sorted(r.getMessage() for r in caplog.records)
        assert [m.split(":")[0] for m in messages] == [
            "could not reseed the guest RNG after the restore (exit 127)",
        ]  # the clock needs no guest program (SET_CLOCK)
        vm.stop(timeout=STOP_TIMEOUT)
        assert _machine(core).forced == 0


def test_agent_calls_need_a_running_vm_on_both_facades(agent: Path, tmp_path: Path) -> None:
    vm = vzkit.VirtualMachine(_config(tmp_path), backend=AgentBackend(agent))
    with vm, pytest.raises(vzkit.StateError, match="the guest agent needs a running VM"):
        vm.guest.run(["true"])

    async def main() -> None:
        cfg = _config(tmp_path)
        async with vzkit.aio.VirtualMachine(cfg, backend=AgentBackend(agent)) as avm:
            with pytest.raises(vzkit.StateError, match=r"needs a running VM \(it is stopped\)"):
                await avm.guest.wait_ready(1)

    asyncio.run(main())


def test_async_guest_streams_a_process_and_moves_files(agent: Path, tmp_path: Path) -> None:
    async def main() -> None:
        cfg = _config(tmp_path)
        async with vzkit.aio.VirtualMachine(cfg, backend=AgentBackend(agent)) as vm:
            await vm.start()
            async with await vm.guest.popen(["cat"]) as proc:
                assert proc.stdin is not None
                await proc.stdin.write(b"through the core")
                await proc.stdin.aclose()
                assert await proc.stdout.read() == b"through the core"
            assert proc.returncode == 0
            target = tmp_path / "moved"
            await vm.guest.write_file(str(target), b"data", 0o600)
            assert await vm.guest.read_file(str(target)) == b"data"
            assert target.stat().st_mode & 0o777 == 0o600
            await vm.guest.sync()
            await vm.guest.close()
            assert not vm.guest.connected

    asyncio.run(main())


def test_agent_link_is_never_left_open_after_close(agent: Path, tmp_path: Path) -> None:
    vm = vzkit.VirtualMachine(_config(tmp_path), backend=AgentBackend(agent))
    vm.start()
    vm.guest.wait_ready(10)
    conn = core_of(vm).agent._conn
    assert conn is not None
    vm.close()
    assert conn.writer.is_closing()
    assert not vm.guest.connected
    with pytest.raises(vzkit.StateError, match=r"needs a running VM \(it is closed\)"):
        vm.guest.run(["true"])


def test_a_stream_gone_with_a_stopping_vm_is_a_state_error_not_a_raw_oserror(
    agent: Path, tmp_path: Path
) -> None:
    """A VM that stops while its agent is reached: its vsock socket file may be gone (or the
    console reset) before its state says STOPPED. The caller gets vzkit's StateError, not a
    raw FileNotFoundError."""
    with vzkit.VirtualMachine(_config(tmp_path), backend=AgentBackend(agent)) as vm:
        vm.start()
        machine = _machine(core_of(vm))
        taken, machine._ours = machine._ours, None
        assert taken is not None

        def gone() -> socket.socket | None:
            taken.close()  # the guest ends: the VM stops
            raise FileNotFoundError(2, "No such file or directory", "vsock.sock")

        machine.agent_console = gone  # type: ignore[method-assign]
        with pytest.raises(vzkit.StateError, match="the VM stopped before its agent answered"):
            vm.guest.wait_ready(30)
        assert vm.state is VMState.STOPPED


def test_calls_from_many_threads_share_one_connection(agent: Path, tmp_path: Path) -> None:
    with vzkit.VirtualMachine(_config(tmp_path), backend=AgentBackend(agent)) as vm:
        vm.start()
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda i: vm.guest.run(["echo", str(i)]).stdout, range(16)))
        assert outs == [f"{i}\n".encode() for i in range(16)]
        assert _machine(core_of(vm)).connections == 1
        vm.stop(timeout=STOP_TIMEOUT)


def test_an_agent_that_never_listens_times_out_or_ends_with_the_vm(
    agent: Path, tmp_path: Path
) -> None:
    with vzkit.VirtualMachine(_config(tmp_path), backend=AgentBackend(agent)) as vm:
        vm.start()
        machine = _machine(core_of(vm))
        taken, machine._ours = machine._ours, None  # every connection is refused now
        assert taken is not None
        t0 = time.monotonic()
        with pytest.raises(vzkit.VMTimeoutError, match=r"did not answer within 0\.3 s"):
            vm.guest.wait_ready(0.3)
        assert time.monotonic() - t0 < 2
        with ThreadPoolExecutor(1) as pool:
            refused = machine.refusals
            waiting = pool.submit(vm.guest.wait_ready, 30)
            wait_until(lambda: machine.refusals > refused, "the call retrying a refused agent")
            taken.close()  # the guest ends: the VM stops while the call retries
            with pytest.raises(vzkit.StateError, match="the VM stopped before its agent answered"):
                waiting.result(10)
        assert vm.state is VMState.STOPPED
