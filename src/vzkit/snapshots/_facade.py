"""The facades layer: ``vzkit.SnapshotManager`` and what both managers share.

The sync manager and its asyncio twin (:mod:`._aio`) derive from :class:`CatalogueView`, so
their file-handling members are the same objects; ``save``/``restore`` are the only methods
each defines, with the same names and parameters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .._loop import run_sync
from .._progress import Progress
from .._vmcore import _within
from ._ops import restore, save
from ._record import SnapshotMeta
from ._store import SnapshotStore

if TYPE_CHECKING:
    from .._vm import VirtualMachine
    from .._vmcore import VMCore
    from ..aio import VirtualMachine as AsyncVirtualMachine
    from ..backends._protocol import ProgressFn

__all__ = ["CatalogueView", "SnapshotManager", "core_of"]


def core_of(vm: VirtualMachine | AsyncVirtualMachine) -> VMCore:
    """The core behind a facade VM (through the core's seam, :func:`vzkit._vmcore.core_of`).

    A closed VM is refused by the core's guard table (``snapshot_save``/``snapshot_restore``),
    before any snapshot file is touched.
    """
    from .._vmcore import core_of as facade_core

    return facade_core(vm)


class CatalogueView:
    """The snapshots of one VM directory (``<vm_dir>/snapshots``): listing and deleting."""

    def __init__(self, vm_dir: str | os.PathLike[str]) -> None:
        self.vm_dir = Path(vm_dir).expanduser().absolute()
        self.snapshot_dir = self.vm_dir / "snapshots"
        self._store = SnapshotStore(self.snapshot_dir)

    def state_path(self, name: str) -> Path:
        """``<snapshot_dir>/<name>.vmstate`` (:class:`~vzkit.SnapshotError` for a bad name)."""
        return self._store.state_path(name)

    def meta_path(self, name: str) -> Path:
        """``<snapshot_dir>/<name>.json`` (:class:`~vzkit.SnapshotError` for a bad name)."""
        return self._store.meta_path(name)

    def list(self) -> list[SnapshotMeta]:
        """Every snapshot with a state file, newest first.

        Forgiving, so a damaged snapshot can still be seen and deleted: one whose metadata
        is invalid is listed from its state file alone (file time, no extras) with a warning;
        :meth:`get` and ``restore`` refuse it with the :class:`~vzkit.SnapshotError` naming
        the field. Files that cannot be snapshots (bad names, symlinks, directories) are
        skipped.
        """
        return self._store.list()

    def get(self, name: str) -> SnapshotMeta:
        """The entry for ``name``; :class:`~vzkit.SnapshotError` when there is none or when
        its metadata is invalid (naming the field)."""
        return self._store.get(name)

    def delete(self, name: str) -> None:
        """Remove a snapshot's state, metadata and captured disks;
        :class:`~vzkit.SnapshotError` if it does not exist. VMs running from it keep their
        open files."""
        self._store.delete(name)


class SnapshotManager(CatalogueView):
    """Manages the snapshots of one VM directory (``<vm_dir>/snapshots``)."""

    def __repr__(self) -> str:
        return f"SnapshotManager({str(self.vm_dir)!r})"

    def save(
        self,
        vm: VirtualMachine,
        name: str,
        timeout: float | None = None,
        *,
        progress: ProgressFn | None = None,
    ) -> SnapshotMeta:
        """Save ``vm`` (running or paused) as snapshot ``name``, replacing an older one only
        once the new one is complete. A running VM is paused for the save and resumed; a
        paused one stays paused. ``progress(done, total)`` gets the bytes written (default:
        a progress bar on a terminal)."""
        core = core_of(vm)
        agent = core.agent.connected
        with Progress(f"saving snapshot {name}") as bar:
            coro = save(self._store, core, name, progress or bar.update, agent=agent)
            return run_sync(_within(timeout, f"saving snapshot {name!r}", coro))

    def restore(self, vm: VirtualMachine, name: str, timeout: float | None = None) -> SnapshotMeta:
        """Restore snapshot ``name`` into the stopped ``vm``, whose config must match the one
        saved (else :class:`~vzkit.SnapshotError`, before anything starts). The VM ends
        PAUSED; ``vm.resume()`` runs it and steps the guest clock through the agent."""
        core = core_of(vm)
        coro = restore(self._store, core, name)
        return run_sync(_within(timeout, f"restoring snapshot {name!r}", coro))
