"""Named VMs, the public side: ``vzkit.create``, ``connect``, ``list_vms``, ``remove_vm`` and
their asyncio twins (``vzkit.aio.create``, ...), ``VMInfo`` and ``GuestCommand``.

A named VM outlives the process that made it: its supervisor (:mod:`._supervisor`) owns it,
and any process of the same user reaches it by name. ``vzkit.connect(name)`` returns the usual
:class:`vzkit.VirtualMachine` (``guest``, ``vsock``, ``balloon``, ``stop``...); its
``close()`` only disconnects. ``docs/named-vms.md`` tells the whole story.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from .._config import LinuxVMConfig
from .._loop import run_sync, wrap
from .._state import VMState
from .._vm import VirtualMachine
from .._vmcore import VMCore
from ..aio import VirtualMachine as AsyncVirtualMachine
from ..backends import Backend
from ..errors import SpecError, StateError, VMError, VzkitError
from ._home import VMDir, check_name, vms_dir, wait_supervisor_gone
from ._remote import RemoteMachine, named_core, new_named_core

__all__ = [
    "GuestCommand",
    "VMInfo",
    "connect",
    "connect_async",
    "create",
    "create_async",
    "list_vms",
    "list_vms_async",
    "remove_vm",
    "remove_vm_async",
]


@dataclass(frozen=True, slots=True)
class GuestCommand:
    """The main command of a named VM (``vzkit run -d -- CMD``): its supervisor runs it once
    the agent answers, writes its output to the VM's ``command.log``, records its exit code
    and stops the VM when it ends. ``env`` items are ``NAME=VALUE``."""

    argv: tuple[str, ...]
    env: tuple[str, ...] = ()
    cwd: str | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "argv", tuple(self.argv))
        object.__setattr__(self, "env", tuple(self.env))
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise SpecError("a main command is a non-empty sequence of strings")
        for item in self.env:
            if not isinstance(item, str) or "=" not in item or item.startswith("="):
                raise SpecError(f"env items are NAME=VALUE, got {item!r}")

    def to_json(self) -> dict[str, Any]:
        return {"argv": list(self.argv), "env": list(self.env), "cwd": self.cwd,
                "user": self.user}  # fmt: skip


@dataclass(frozen=True, slots=True)
class VMInfo:
    """What ``vzkit ls`` shows of a named VM: the record on disk, corrected by whether its
    supervisor lives (a record that says running without one is ERROR, with the reason)."""

    name: str
    state: VMState
    backend: str
    created: float
    started: float | None
    supervisor_pid: int | None
    vmm_pid: int | None
    error: str | None
    exit_code: int | None
    image: str | None
    command: tuple[str, ...] | None
    directory: Path
    console_log: Path | None
    config: LinuxVMConfig
    #: The main command's output (``None`` without a main command).
    command_log: Path | None = None
    #: Removed by its supervisor once it has stopped (``run -d --rm``).
    auto_remove: bool = False
    #: Where the running VM's display is shown (``vnc+unix:///PATH`` on qemu), else ``None``.
    display: str | None = None

    @classmethod
    def read(cls, vmdir: VMDir) -> VMInfo:
        record = vmdir.read_vm()
        state = vmdir.read_state()
        config = LinuxVMConfig.from_dict(record["config"])
        command = record.get("command")
        root = config.root_disk
        return cls(
            name=vmdir.name,
            state=VMState(state.get("state", "stopped")),
            backend=str(record.get("backend")),
            created=float(record.get("created", 0.0)),
            started=state.get("started"),
            supervisor_pid=state.get("supervisor_pid"),
            vmm_pid=state.get("vmm_pid"),
            error=state.get("error"),
            exit_code=state.get("exit_code"),
            image=record.get("image") or (str(root.base) if root is not None else None),
            command=tuple(command["argv"]) if command else None,
            directory=vmdir.path,
            console_log=config.console_log_path or (vmdir.run_dir / "console.log"),
            config=config,
            command_log=vmdir.command_log if command else None,
            auto_remove=bool(record.get("auto_remove")),
            display=state.get("display"),
        )

    def to_json(self) -> dict[str, Any]:
        """The stable JSON form (``vzkit ls --json``, ``vzkit inspect --json``)."""
        return {
            "name": self.name,
            "state": self.state.value,
            "backend": self.backend,
            "arch": self.config.arch.value,
            "cpus": self.config.cpus,
            "memory_mb": self.config.memory_mb,
            "created": self.created,
            "started": self.started,
            "pid": self.supervisor_pid,
            "vmm_pid": self.vmm_pid,
            "display": self.display,
            "error": self.error,
            "exit_code": self.exit_code,
            "image": self.image,
            "command": None if self.command is None else list(self.command),
            "console_log": None if self.console_log is None else str(self.console_log),
            "command_log": None if self.command_log is None else str(self.command_log),
            "auto_remove": self.auto_remove,
            "directory": str(self.directory),
        }


def _machine(core: VMCore) -> RemoteMachine:
    return cast(RemoteMachine, core.machine)


def _command(command: GuestCommand | Sequence[str] | None) -> dict[str, Any] | None:
    if command is None:
        return None
    if not isinstance(command, GuestCommand):
        command = GuestCommand(tuple(command))
    return command.to_json()


# -- create ---------------------------------------------------------------------------------


async def _create(
    config: LinuxVMConfig,
    name: str,
    backend: str | Backend,
    start: bool,
    command: GuestCommand | Sequence[str] | None,
    timeout: float | None,
    auto_remove: bool,
) -> VMCore:
    core = await asyncio.to_thread(
        new_named_core, config, name, backend, _command(command), auto_remove
    )
    if start:
        await core.start(timeout)
    return core


def create(
    config: LinuxVMConfig,
    name: str,
    *,
    backend: str | Backend = "auto",
    start: bool = True,
    command: GuestCommand | Sequence[str] | None = None,
    timeout: float | None = None,
    auto_remove: bool = False,
) -> VirtualMachine:
    """Make the named VM ``name`` from ``config`` (refused with :class:`~vzkit.VMExistsError`
    if the name is taken) and, unless ``start=False``, start it; it runs on after this
    process ends, until ``stop`` (``vzkit stop NAME``). Returns it connected.
    ``auto_remove``: its supervisor removes it once it has stopped (``run -d --rm``)."""
    created = _create(config, name, backend, start, command, timeout, auto_remove)
    return VirtualMachine._of(run_sync(created))


async def create_async(
    config: LinuxVMConfig,
    name: str,
    *,
    backend: str | Backend = "auto",
    start: bool = True,
    command: GuestCommand | Sequence[str] | None = None,
    timeout: float | None = None,
    auto_remove: bool = False,
) -> AsyncVirtualMachine:
    """The asyncio twin of :func:`create`."""
    core = await wrap(_create(config, name, backend, start, command, timeout, auto_remove))
    return AsyncVirtualMachine._of(core)


# -- connect --------------------------------------------------------------------------------


async def _connect(name: str, timeout: float | None) -> VMCore:
    vmdir = VMDir.of(name)
    record = await asyncio.to_thread(vmdir.read_vm)
    core = named_core(vmdir, record)
    try:
        async with asyncio.timeout(timeout):
            await _machine(core).attach()
    except TimeoutError:
        await core.close()
        raise VMError(f"VM {name!r}: its supervisor did not answer within {timeout:g} s") from None
    return core


def connect(name: str, *, timeout: float | None = 30.0) -> VirtualMachine:
    """The named VM ``name``, from any process of its user: running (its guest, vsock,
    balloon, stop) or stopped (``start()`` boots it again). ``close()`` disconnects only."""
    return VirtualMachine._of(run_sync(_connect(name, timeout)))


async def connect_async(name: str, *, timeout: float | None = 30.0) -> AsyncVirtualMachine:
    """The asyncio twin of :func:`connect`."""
    return AsyncVirtualMachine._of(await wrap(_connect(name, timeout)))


# -- list -----------------------------------------------------------------------------------


def list_vms() -> list[VMInfo]:
    """Every named VM of this user, by name (stopped ones too)."""
    root = vms_dir()
    try:
        names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        try:
            vmdir = VMDir.of(check_name(name))
        except SpecError:
            continue  # not ours
        if vmdir.exists():
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                out.append(VMInfo.read(vmdir))
    return out


async def list_vms_async() -> list[VMInfo]:
    """The asyncio twin of :func:`list_vms`."""
    return await asyncio.to_thread(list_vms)


# -- remove ---------------------------------------------------------------------------------


async def _remove(name: str, force: bool, timeout: float | None) -> None:
    vmdir = VMDir.of(name).require()
    if vmdir.supervisor_alive():
        if not force:
            raise StateError(
                f"VM {name!r} is running: 'vzkit stop {name}' first, or 'vzkit rm -f {name}'"
            )
        await _kill(vmdir, 10.0 if timeout is None else timeout)

    def remove() -> None:
        with vmdir.locked("remove"):
            if vmdir.supervisor_alive():
                raise StateError(f"VM {name!r} was started again meanwhile: stop it first")
            shutil.rmtree(vmdir.path)

    await asyncio.to_thread(remove)


async def _kill(vmdir: VMDir, timeout: float) -> None:
    """Force the VM off through its supervisor; if it does not go, kill the supervisor (its
    children die with it)."""
    core = named_core(vmdir, vmdir.read_vm())
    try:
        await _machine(core).attach()
        async with asyncio.timeout(timeout):
            await _machine(core).force_stop()
    except (TimeoutError, VzkitError):
        pass
    finally:
        await core.close()
    if await asyncio.to_thread(wait_supervisor_gone, vmdir, 1.0):
        return
    pid = vmdir.read_state().get("supervisor_pid")
    if isinstance(pid, int) and vmdir.supervisor_alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if not await asyncio.to_thread(wait_supervisor_gone, vmdir, 10.0):
        raise VMError(f"VM {vmdir.name!r}: its supervisor (pid {pid}) would not end")


def remove_vm(name: str, *, force: bool = False, timeout: float | None = None) -> None:
    """Delete the named VM ``name`` and everything in its directory. A running one is refused
    (:class:`~vzkit.StateError`) unless ``force``: then it is forced off first."""
    run_sync(_remove(name, force, timeout))


async def remove_vm_async(name: str, *, force: bool = False, timeout: float | None = None) -> None:
    """The asyncio twin of :func:`remove_vm`."""
    await wrap(_remove(name, force, timeout))
