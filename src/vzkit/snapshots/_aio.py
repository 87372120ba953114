"""``vzkit.aio.SnapshotManager``: the asyncio twin of :class:`vzkit.SnapshotManager`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._loop import wrap
from .._vmcore import _within
from ._facade import CatalogueView, core_of
from ._ops import restore, save
from ._record import SnapshotMeta

if TYPE_CHECKING:
    from ..aio import VirtualMachine
    from ..backends._protocol import ProgressFn

__all__ = ["SnapshotManager"]


class SnapshotManager(CatalogueView):
    """The asyncio twin of :class:`vzkit.SnapshotManager`: ``save``/``restore`` are awaitable;
    ``list``/``get``/``delete`` are plain file handling and stay synchronous.

    Both managers act on the VM through its core: a save records whether the guest agent was
    connected, and the first resume after a restore steps the guest clock and reseeds its RNG.
    """

    def __repr__(self) -> str:
        return f"vzkit.aio.SnapshotManager({str(self.vm_dir)!r})"

    async def save(
        self,
        vm: VirtualMachine,
        name: str,
        timeout: float | None = None,
        *,
        progress: ProgressFn | None = None,
    ) -> SnapshotMeta:
        """Save ``vm`` (running or paused) as snapshot ``name``; see
        :meth:`vzkit.SnapshotManager.save`."""
        core = core_of(vm)
        coro = save(self._store, core, name, progress, agent=core.agent.connected)
        return await wrap(_within(timeout, f"saving snapshot {name!r}", coro))

    async def restore(
        self, vm: VirtualMachine, name: str, timeout: float | None = None
    ) -> SnapshotMeta:
        """Restore snapshot ``name`` into the stopped ``vm`` (it ends PAUSED); see
        :meth:`vzkit.SnapshotManager.restore`."""
        coro = restore(self._store, core_of(vm), name)
        return await wrap(_within(timeout, f"restoring snapshot {name!r}", coro))
