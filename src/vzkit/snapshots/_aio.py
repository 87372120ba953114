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

    This facade has no guest agent yet, so a save records none and a restore here steps no
    clock.
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
        coro = save(self._store, core_of(vm), name, progress)
        return await wrap(_within(timeout, f"saving snapshot {name!r}", coro))

    async def restore(
        self, vm: VirtualMachine, name: str, timeout: float | None = None
    ) -> SnapshotMeta:
        """Restore snapshot ``name`` into the stopped ``vm`` (it ends PAUSED); see
        :meth:`vzkit.SnapshotManager.restore`."""
        coro = restore(self._store, core_of(vm), name, clock_step=False)
        return await wrap(_within(timeout, f"restoring snapshot {name!r}", coro))
