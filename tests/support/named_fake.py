"""A stand-in for vzkit's named-VM API (``vzkit.create``, ``connect``, ``list_vms``,
``remove_vm``, ``exec_call``) in one process, for the CLI's unit tests: each VM is a real
:class:`vzkit.VirtualMachine` whose guest is the host-run agent (:class:`AgentBackend`), so
``vzkit exec``, ``cp`` and ``-t`` run real agent sessions; what a supervisor would keep on
disk is kept in memory. ``connect`` hands out a view whose ``close()`` only disconnects, as a
named VM's does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import vzkit
import vzkit.errors
from vzkit.named._exec import DEVNULL, _fd

from .agent_vm import AgentBackend, host_agent

__all__ = ["Named", "install"]


class View:
    """What ``connect`` returns: the VM, but ``close()`` only disconnects."""

    def __init__(self, vm: vzkit.VirtualMachine, named: Named) -> None:
        self._vm, self._named = vm, named

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vm, name)

    def close(self) -> None:
        self._named.disconnects += 1


@dataclasses.dataclass
class Entry:
    vm: vzkit.VirtualMachine
    created: float
    command: Any
    directory: Path
    backend_name: str
    exit_code: int | None = None  # the main command's, once it ended


class Named:
    """The fake registry; its methods have the public functions' signatures."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.backend = AgentBackend(host_agent())
        self.vms: dict[str, Entry] = {}
        self.calls: list[tuple[str, Any]] = []
        self.auto_remove: dict[str, bool] = {}
        self.disconnects = 0
        self.listings = 0  # list_vms calls: what 'vzkit logs -f' polls

    def _get(self, name: str) -> Entry:
        try:
            return self.vms[name]
        except KeyError:
            raise vzkit.VMNotFoundError(f"no VM named {name!r}: 'vzkit ls -a' lists them") from None

    def create(
        self, config: vzkit.LinuxVMConfig, name: str, *, backend: str = "auto",
        start: bool = True, command: Any = None, timeout: float | None = None,
        auto_remove: bool = False,
    ) -> View:  # fmt: skip
        self.calls.append(("create", (config, name, backend, start, command, timeout)))
        self.auto_remove[name] = auto_remove
        if name in self.vms:
            raise vzkit.VMExistsError(
                f"a VM named {name!r} exists: pick another name or 'vzkit rm {name}'"
            )
        directory = self.home / "vms" / name
        (directory / "run").mkdir(parents=True, exist_ok=True)
        (directory / "run" / "console.log").write_bytes(b"")
        config = config.replace(state_dir=directory / "run")
        vm = vzkit.VirtualMachine(config, backend=self.backend)  # type: ignore[arg-type]
        self.vms[name] = Entry(vm, time.time(), command, directory, backend)
        if start:
            vm.start(timeout=timeout)
        return View(vm, self)

    def connect(self, name: str, *, timeout: float | None = None) -> View:
        self.calls.append(("connect", name))
        return View(self._get(name).vm, self)

    def exec_call(
        self, name: str, args: Sequence[str], *, env: Sequence[str] = (), cwd: str | None = None,
        user: str | None = None, stdin: Any = DEVNULL, stdout: Any = None, stderr: Any = None,
        timeout: float | None = None,
    ) -> int:  # fmt: skip
        """What the supervisor does for an exec request, in this process."""
        self.calls.append(("exec_call", (name, list(args))))
        vm = self._get(name).vm
        state = vm.state
        if state is not vzkit.VMState.RUNNING:
            raise vzkit.errors.StateError(
                f"the VM {name!r} is {state.value}: 'vzkit start {name}' starts it"
            )
        with contextlib.ExitStack() as stack:
            out, err = _fd(stdout, 1, stack), _fd(stderr, 2, stack)
            forward = stdin != DEVNULL
            infd = _fd(stdin, 0, stack) if forward else None
            config = vm.config
            assert isinstance(config, vzkit.LinuxVMConfig)
            environment = config.process.command_environment(tuple(env), user)
            proc = vm.guest.popen(
                list(args), stdin=forward, env=environment, cwd=cwd, user=user, timeout=timeout
            )
            return proc.attach(infd, out, err)

    def info(self, name: str) -> vzkit.VMInfo:
        entry = self._get(name)
        command = entry.command
        return vzkit.VMInfo(
            name=name, state=entry.vm.state, backend="qemu", created=entry.created,
            started=None, supervisor_pid=None, vmm_pid=None, error=None, exit_code=entry.exit_code,
            image=None, command=tuple(command.argv) if command is not None else None,
            directory=entry.directory, console_log=entry.directory / "run" / "console.log",
            config=entry.vm.config,  # type: ignore[arg-type]
        )  # fmt: skip

    def list_vms(self) -> list[vzkit.VMInfo]:
        self.listings += 1
        return [self.info(name) for name in sorted(self.vms)]

    def remove_vm(self, name: str, *, force: bool = False, timeout: float | None = None) -> None:
        self.calls.append(("remove_vm", (name, force)))
        entry = self._get(name)
        if entry.vm.state is vzkit.VMState.RUNNING and not force:
            raise vzkit.errors.StateError(
                f"the VM {name!r} is running: 'vzkit stop {name}' first, or 'vzkit rm -f {name}'"
            )
        entry.vm.close()
        del self.vms[name]

    def close(self) -> None:
        for entry in self.vms.values():
            entry.vm.close()


def install(named: Named, monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    """Put ``named``'s functions in the ``vzkit`` namespace."""

    def put(obj: Any, name: str, value: Any) -> None:
        if monkeypatch is not None:
            monkeypatch.setattr(obj, name, value, raising=False)
        else:
            setattr(obj, name, value)

    for name in ("create", "connect", "list_vms", "remove_vm", "exec_call"):
        put(vzkit, name, getattr(named, name))
