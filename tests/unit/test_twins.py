"""The blocking and the asyncio facades are twins: the same public names, the same parameters,
awaitable in ``vzkit.aio`` where the blocking side waits (httpx's ``Client``/``AsyncClient``).

A member added to one side only, a parameter renamed or defaulted differently on one side, or
a blocking method that is a plain function in ``vzkit.aio`` fails here.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import vzkit
import vzkit.aio
from vzkit._state import VMState
from vzkit._vsock import AsyncVsockListener, VsockListener
from vzkit.backends import AgentVsock, BalloonInfo, Feature
from vzkit.backends._protocol import StateListener

#: Methods that are plain functions on both sides (file handling, no VM involved).
PLAIN_ON_BOTH = {
    "SnapshotManager": {"list", "get", "delete", "state_path", "meta_path", "checked"},
    "GuestProcess": {"poll"},  # never waits: subprocess.Popen.poll, on both sides
}


class IdleMachine:
    """Just enough of a machine to build the facades (nothing here ever runs)."""

    pid = None
    console_log_path = None
    console_pty = None
    last_error = None
    state = VMState.STOPPED

    def __init__(self, config: vzkit.LinuxVMConfig) -> None:
        self.state_dir = config.state_dir

    async def close(self) -> None:
        pass

    def agent_console(self) -> socket.socket | None:
        return None

    def agent_vsock(self) -> AgentVsock | None:
        return None

    async def balloon_info(self) -> BalloonInfo:
        return BalloonInfo(False, 0.0, 0)


class IdleBackend:
    name = "idle"
    features = frozenset({Feature.LIFECYCLE})

    def check_available(self) -> None:
        pass

    def create_machine(self, config: vzkit.LinuxVMConfig, on_state: StateListener) -> IdleMachine:
        return IdleMachine(config)


def _public(obj: object) -> set[str]:
    return {name for name in dir(obj) if not name.startswith("_")}


def _kind(owner: type, name: str) -> str:
    attr = inspect.getattr_static(owner, name, None)
    if isinstance(attr, property):
        return "property"
    if inspect.isfunction(attr):
        return "coroutine" if inspect.iscoroutinefunction(attr) else "function"
    return "attribute"  # an instance attribute (a sub-facade, a path) or a class constant


def _params(fn: Any) -> list[tuple[str, Any, Any]]:
    """Names, kinds and defaults (the annotations differ on purpose: socket vs streams)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def twin_differences(sync: object, aio: object, label: str) -> list[str]:
    """Every way ``aio`` is not the asyncio twin of ``sync``; recurses into sub-facades."""
    problems: list[str] = []
    only_sync, only_aio = _public(sync) - _public(aio), _public(aio) - _public(sync)
    if only_sync:
        problems.append(f"{label}: only the blocking side has {sorted(only_sync)}")
    if only_aio:
        problems.append(f"{label}: only vzkit.aio has {sorted(only_aio)}")
    plain = PLAIN_ON_BOTH.get(type(sync).__name__, set())
    for name in sorted(_public(sync) & _public(aio)):
        where = f"{label}.{name}"
        ks, ka = _kind(type(sync), name), _kind(type(aio), name)
        if ks == "function" and name not in plain:
            if ka != "coroutine":
                problems.append(f"{where}: blocks on one side, is not awaitable in vzkit.aio")
        elif ks != ka:
            problems.append(f"{where}: a {ks} on the blocking side, a {ka} in vzkit.aio")
        if ks in ("function", "coroutine") and ka in ("function", "coroutine"):
            ps, pa = _params(getattr(type(sync), name)), _params(getattr(type(aio), name))
            if ps != pa:
                problems.append(f"{where}: parameters differ: {ps} vs {pa}")
        if ks == "attribute" and ka == "attribute":
            s, a = getattr(sync, name), getattr(aio, name)
            if type(s).__module__.startswith("vzkit.") and not isinstance(s, Path):
                problems.extend(twin_differences(s, a, where))
    return problems


@pytest.fixture
def pair(tmp_path: Path) -> Any:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, state_dir=tmp_path / "state")
    sync = vzkit.VirtualMachine(cfg, IdleBackend())
    aio = vzkit.aio.VirtualMachine(cfg, IdleBackend())
    yield sync, aio
    sync.close()
    asyncio.run(aio.close())


def test_virtual_machines_are_twins_down_to_guest_vsock_and_balloon(pair: Any) -> None:
    sync, aio = pair
    assert twin_differences(sync, aio, "VirtualMachine") == []
    for facet in ("guest", "vsock", "balloon"):  # the recursion above really covered these
        assert type(getattr(sync, facet)).__module__.startswith("vzkit.")
        assert _public(getattr(sync, facet)), facet
    assert inspect.iscoroutinefunction(vzkit.aio.VirtualMachine.__aenter__)
    assert inspect.iscoroutinefunction(vzkit.aio.VirtualMachine.__aexit__)
    assert not inspect.iscoroutinefunction(vzkit.VirtualMachine.__exit__)


def test_balloons_are_twins(pair: Any) -> None:
    sync, aio = pair
    assert isinstance(sync.balloon, vzkit.Balloon)
    assert isinstance(aio.balloon, vzkit.aio.Balloon)
    assert twin_differences(sync.balloon, aio.balloon, "Balloon") == []


def test_snapshot_managers_are_twins(tmp_path: Path) -> None:
    sync, aio = vzkit.SnapshotManager(tmp_path), vzkit.aio.SnapshotManager(tmp_path)
    assert twin_differences(sync, aio, "SnapshotManager") == []
    assert (aio.vm_dir, aio.snapshot_dir) == (sync.vm_dir, sync.snapshot_dir)
    assert inspect.iscoroutinefunction(vzkit.aio.SnapshotManager.restore)


class IdleListener:
    port = 5000

    def accept(self, timeout: float | None) -> tuple[socket.socket, int]:
        raise AssertionError("not used")

    def close(self) -> None:
        pass


def test_vsock_listeners_are_twins() -> None:
    sync, aio = VsockListener(IdleListener()), AsyncVsockListener(IdleListener())
    assert twin_differences(sync, aio, "VsockListener") == []
    assert _public(sync) == {"accept", "close", "port"}
    sync.close()
    asyncio.run(aio.close())


def test_the_check_catches_a_member_on_one_side_only(pair: Any) -> None:
    sync, aio = pair

    class Extra(vzkit.aio.VirtualMachine):
        async def snapshot(self) -> None: ...

    extra = Extra.__new__(Extra)
    extra.__dict__.update(aio.__dict__)
    assert twin_differences(sync, extra, "VirtualMachine") == [
        "VirtualMachine: only vzkit.aio has ['snapshot']"
    ]

    class Plain(vzkit.aio.VirtualMachine):
        def pause(self, timeout: float | None = None) -> None: ...  # type: ignore[override]

    plain = Plain.__new__(Plain)
    plain.__dict__.update(aio.__dict__)
    assert twin_differences(sync, plain, "VirtualMachine") == [
        "VirtualMachine.pause: blocks on one side, is not awaitable in vzkit.aio"
    ]

    class Renamed(vzkit.aio.VirtualMachine):
        async def stop(self, timeout_s: float | None = None) -> None: ...  # type: ignore[override]

    renamed = Renamed.__new__(Renamed)
    renamed.__dict__.update(aio.__dict__)
    (problem,) = twin_differences(sync, renamed, "VirtualMachine")
    assert problem.startswith("VirtualMachine.stop: parameters differ")

    aio.guest.extra = 1  # a member of a sub-facade on one side only
    assert twin_differences(sync, aio, "VirtualMachine") == [
        "VirtualMachine.guest: only vzkit.aio has ['extra']"
    ]


class RunningMachine(IdleMachine):
    pid = 4242  # a VMM process that a dropped facade would leave behind


class RunningBackend(IdleBackend):
    def create_machine(self, config: vzkit.LinuxVMConfig, on_state: StateListener) -> IdleMachine:
        return RunningMachine(config)


def test_both_facades_warn_when_dropped_unclosed(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, state_dir=tmp_path / "state")
    for cls in (vzkit.VirtualMachine, vzkit.aio.VirtualMachine):
        vm = cls(cfg, RunningBackend())
        with pytest.warns(ResourceWarning, match=f"unclosed VirtualMachine <.*{cls.__name__}"):
            vm.__del__()
        vm._core.closed = True  # nothing to release: the pid is made up


LAZY_AGENT = """
import asyncio, sys
import vzkit, vzkit.aio
from vzkit._state import VMState

class Machine:
    pid = None
    last_error = None
    state = VMState.RUNNING
    async def request_stop(self): self.state = VMState.STOPPED
    async def wait_stopped(self): return self.state
    async def close(self): pass

class Backend:
    name = "lazy"
    features = frozenset()
    def create_machine(self, config, on_state): return Machine()

cfg = vzkit.LinuxVMConfig(kernel_path=sys.executable)  # any file: nothing boots it
with vzkit.VirtualMachine(cfg, Backend()) as vm:
    vm.stop()
async def main():
    async with vzkit.aio.VirtualMachine(cfg, Backend()) as avm:
        await avm.stop()
asyncio.run(main())
print(sorted(m for m in sys.modules if m.startswith(("vzkit.image", "urllib.request"))))
"""


def test_a_vm_that_never_uses_its_agent_never_imports_the_agent_client() -> None:
    """The image builder (``vzkit.image``, urllib, ...) is not loaded by a VM's stop."""
    src = Path(vzkit.__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(src)}
    argv = [sys.executable, "-c", LAZY_AGENT]
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr


def test_the_one_line_api_has_twins() -> None:
    """``vzkit.run``/``vzkit.start`` and ``vzkit.aio.run``/``vzkit.aio.start``: the same
    parameters; the asyncio run is awaitable and its start an async context manager."""
    for name in ("run", "start"):
        sync, aio = getattr(vzkit, name), getattr(vzkit.aio, name)
        assert _params(sync) == _params(aio), name
        assert name in vzkit.__all__
        assert name in vzkit.aio.__all__
    assert inspect.iscoroutinefunction(vzkit.aio.run)
    assert not inspect.iscoroutinefunction(vzkit.run)
    for cm, enter in ((vzkit.start(), "__enter__"), (vzkit.aio.start(), "__aenter__")):
        assert hasattr(cm, enter), cm  # built lazily: nothing boots before the block
    assert _params(vzkit.run)[:1] == [("args", inspect.Parameter.POSITIONAL_OR_KEYWORD, _EMPTY)]


def test_the_named_vm_functions_have_twins() -> None:
    """``vzkit.create/connect/list_vms/remove_vm/exec_call`` and their ``vzkit.aio`` twins:
    the same parameters, coroutines on the asyncio side."""
    for name in ("create", "connect", "list_vms", "remove_vm", "exec_call"):
        sync, aio = getattr(vzkit, name), getattr(vzkit.aio, name)
        assert _params(sync) == _params(aio), name
        assert inspect.iscoroutinefunction(aio)
        assert not inspect.iscoroutinefunction(sync)
        assert name in vzkit.__all__
        assert name in vzkit.aio.__all__


_EMPTY = inspect.Parameter.empty


class IdleChannel:
    """Just enough of an exec's channel to build the process objects (nothing runs)."""

    args = ("true",)
    stdout = stderr = None
    status = None


def test_guest_processes_are_twins() -> None:
    from vzkit.agent import AsyncGuestProcess, GuestProcess

    channel: Any = IdleChannel()
    sync, aio = GuestProcess(channel, stdin=False), AsyncGuestProcess(channel, stdin=False)
    assert twin_differences(sync, aio, "GuestProcess") == []
    assert {"poll", "wait", "communicate", "terminate", "kill", "resize"} <= _public(aio)
    assert aio.poll() is None  # still running: poll never waits
