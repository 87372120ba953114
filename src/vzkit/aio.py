"""The asyncio twin of :class:`vzkit.VirtualMachine`: the same names, awaitable.

Both facades drive one core (:class:`vzkit._vmcore.VMCore`) on vzkit's shared loop, so a VM
behaves the same whichever surface controls it: ``guest``, ``vsock`` and ``balloon`` exist on
both, the stop ladder asks the guest agent to power off, and the first resume after a restore
steps the guest clock and reseeds its RNG. ``tests/unit/test_twins.py`` holds the two surfaces
to the same names and parameters, and ``vzkit.aio.run``/``vzkit.aio.start`` to those of
:func:`vzkit.run`/:func:`vzkit.start` (all four live in :mod:`vzkit._oneshot`, loaded on first
use: it builds on this module).
"""

from __future__ import annotations

import importlib
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from ._config import LinuxVMConfig
from ._guest import AsyncGuest
from ._loop import wrap
from ._macconfig import MacVMConfig
from ._state import VMState
from ._vmcore import VMCore, VMView
from ._vsock import AsyncVsock
from .backends import Backend, BalloonInfo

if TYPE_CHECKING:  # imported on first use (see __getattr__)
    from ._oneshot import run_async as run
    from ._oneshot import start_async as start
    from .named._api import connect_async as connect
    from .named._api import create_async as create
    from .named._api import list_vms_async as list_vms
    from .named._api import remove_vm_async as remove_vm
    from .named._exec import exec_call_async as exec_call
    from .snapshots._aio import SnapshotManager

__all__ = [
    "AsyncGuest",
    "Balloon",
    "SnapshotManager",
    "VirtualMachine",
    "connect",
    "create",
    "exec_call",
    "list_vms",
    "remove_vm",
    "run",
    "start",
]


class Balloon:
    """``vm.balloon``: the memory balloon of a running VM (the twin of
    :class:`vzkit.Balloon`)."""

    def __init__(self, core: VMCore) -> None:
        self._core = core

    async def set_target_gb(self, gb: float) -> None:
        """Ask the guest to shrink (or regrow) to ``gb`` GB, rounded down to a whole MiB."""
        await wrap(self._core.set_balloon_target_gb(gb))

    async def info(self) -> BalloonInfo:
        return await wrap(self._core.balloon_info())


class VirtualMachine(VMView):
    """``async with vzkit.aio.VirtualMachine(cfg) as vm: await vm.start()``."""

    def __init__(
        self,
        config: LinuxVMConfig | MacVMConfig,
        backend: str | Backend = "auto",
        *,
        name: str | None = None,
    ) -> None:
        if name is None:
            self._attach(VMCore(config, backend))
        else:  # a named VM: recorded now (stopped), started by start(), lives on after close()
            from .named._remote import new_named_core

            if not isinstance(config, LinuxVMConfig):
                raise TypeError("a named VM takes a LinuxVMConfig")
            self._attach(new_named_core(config, name, backend))

    def _attach(self, core: VMCore) -> None:
        self._core = core
        self.balloon = Balloon(core)
        self.guest = AsyncGuest(core)
        self.vsock = AsyncVsock(core)

    @classmethod
    def _of(cls, core: VMCore) -> Self:
        """A facade over an existing core (a named VM made or reached by :mod:`vzkit.named`)."""
        vm = cls.__new__(cls)
        vm._attach(core)
        return vm

    def __repr__(self) -> str:
        return f"<vzkit.aio.VirtualMachine {self.backend} {self.state.value} pid={self.pid}>"

    async def start(self, timeout: float | None = None) -> None:
        await wrap(self._core.start(timeout))

    async def pause(self, timeout: float | None = None) -> None:
        await wrap(self._core.pause(timeout))

    async def resume(self, timeout: float | None = None) -> None:
        """Run a paused VM; the first resume after a restore also steps the guest clock and
        reseeds its RNG through the agent (see :meth:`vzkit.VirtualMachine.resume`)."""
        await wrap(self._core.resume(timeout))

    async def request_stop(self) -> None:
        """Ask the guest to power off (power button, and the agent when connected)."""
        await wrap(self._core.request_stop())

    async def stop(self, timeout: float | None = None) -> None:
        """Ask the guest (agent, power button), wait up to half of ``timeout``, then force."""
        await wrap(self._core.stop(timeout))

    async def wait(self, timeout: float | None = None) -> VMState:
        return await wrap(self._core.wait(timeout))

    async def close(self) -> None:
        await wrap(self._core.close())

    async def __aenter__(self) -> VirtualMachine:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


#: The asyncio twins of the one-line API (:mod:`vzkit._oneshot`), of the named VMs'
#: functions (:mod:`vzkit.named._api`) and of ``SnapshotManager``, imported on first use.
_LAZY = {
    "SnapshotManager": (".snapshots._aio", "SnapshotManager"),
    "run": ("._oneshot", "run_async"),
    "start": ("._oneshot", "start_async"),
    "connect": (".named._api", "connect_async"),
    "create": (".named._api", "create_async"),
    "list_vms": (".named._api", "list_vms_async"),
    "exec_call": (".named._exec", "exec_call_async"),
    "remove_vm": (".named._api", "remove_vm_async"),
}


def __getattr__(name: str) -> Any:
    found = _LAZY.get(name)
    if found is None:
        raise AttributeError(f"module 'vzkit.aio' has no attribute {name!r}")
    module, target = found
    value = getattr(importlib.import_module(module, "vzkit"), target)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
