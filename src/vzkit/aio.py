"""The asyncio twin of :class:`vzkit.VirtualMachine`: the same names, awaitable.

Both facades drive one core (:class:`vzkit._vmcore.VMCore`) on vzkit's shared loop, so a VM
behaves the same whichever surface controls it.
"""

from __future__ import annotations

import os
from types import TracebackType

from ._config import LinuxVMConfig
from ._loop import wrap
from ._macconfig import MacVMConfig
from ._state import VMState
from ._vmcore import VMCore, VMView, _within
from ._vsock import AsyncVsock
from .backends import Backend, BalloonInfo
from .backends._protocol import ProgressFn
from .snapshots._record import SnapshotManager as _Catalogue
from .snapshots._record import SnapshotMeta

__all__ = ["Balloon", "SnapshotManager", "VirtualMachine"]


class Balloon:
    def __init__(self, core: VMCore) -> None:
        self._core = core

    async def set_target_gb(self, gb: float) -> None:
        await wrap(self._core.set_balloon_target_gb(gb))

    async def info(self) -> BalloonInfo:
        return await wrap(self._core.balloon_info())


class VirtualMachine(VMView):
    """``async with vzkit.aio.VirtualMachine(cfg) as vm: await vm.start()``."""

    def __init__(
        self, config: LinuxVMConfig | MacVMConfig, backend: str | Backend = "auto"
    ) -> None:
        self._core = VMCore(config, backend)
        self.balloon = Balloon(self._core)
        self.vsock = AsyncVsock(self._core)

    async def start(self, timeout: float | None = None) -> None:
        await wrap(self._core.start(timeout))

    async def pause(self, timeout: float | None = None) -> None:
        await wrap(self._core.pause(timeout))

    async def resume(self, timeout: float | None = None) -> None:
        await wrap(self._core.resume(timeout))

    async def request_stop(self) -> None:
        await wrap(self._core.request_stop())

    async def stop(self, timeout: float | None = None) -> None:
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


class SnapshotManager:
    """The asyncio twin of :class:`vzkit.SnapshotManager`: ``save``/``restore`` are awaitable;
    ``list``/``get``/``delete`` are plain file handling and stay synchronous.

    This facade has no guest agent, so a restore here records no clock step.
    """

    def __init__(self, vm_dir: str | os.PathLike[str]) -> None:
        self._catalogue = _Catalogue(vm_dir)
        self.vm_dir = self._catalogue.vm_dir
        self.snapshot_dir = self._catalogue.snapshot_dir

    def __repr__(self) -> str:
        return f"vzkit.aio.SnapshotManager({str(self.vm_dir)!r})"

    def list(self) -> list[SnapshotMeta]:
        return self._catalogue.list()

    def get(self, name: str) -> SnapshotMeta:
        return self._catalogue.get(name)

    def delete(self, name: str) -> None:
        self._catalogue.delete(name)

    async def save(
        self,
        vm: VirtualMachine,
        name: str,
        timeout: float | None = None,
        *,
        progress: ProgressFn | None = None,
    ) -> SnapshotMeta:
        from .snapshots._ops import save

        coro = save(self._catalogue, vm._core, name, progress)
        return await wrap(_within(timeout, f"saving snapshot {name!r}", coro))

    async def restore(
        self, vm: VirtualMachine, name: str, timeout: float | None = None
    ) -> SnapshotMeta:
        from .snapshots._ops import restore

        coro = restore(self._catalogue, vm._core, name)
        meta = await wrap(_within(timeout, f"restoring snapshot {name!r}", coro))
        vm._core.clock_step_pending = False
        return meta
