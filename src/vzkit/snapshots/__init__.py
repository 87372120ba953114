"""Snapshots: one package, four layers, imports only going down.

* record (:mod:`._record`, :mod:`._match`): a snapshot's metadata as a typed, checked value
  (:class:`SnapshotRecord`, ``from_json``/``to_json``) and the config fields a restore
  must match. No file, no VM.
* store (:mod:`._store`, :mod:`._files`): one snapshot directory, written atomically and
  read strictly (confinement, checksums, permissions). Every backend's snapshots go through
  it.
* operations (:mod:`._ops`): save, restore and the many-from-one rule, acting on a VM
  through its core (the backend's ``Machine`` snapshot methods).
* facades (:mod:`._facade`, :mod:`._aio`): ``vzkit.SnapshotManager`` and
  ``vzkit.aio.SnapshotManager``.

The names below are imported on first use (PEP 562), so a backend importing the record layer
does not import the facades and the core above them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._facade import SnapshotManager
    from ._record import MachineInfo, SnapshotDisk, SnapshotMeta, SnapshotRecord, SnapshotRoot
    from ._store import SnapshotStore

__all__ = [
    "MachineInfo",
    "SnapshotDisk",
    "SnapshotManager",
    "SnapshotMeta",
    "SnapshotRecord",
    "SnapshotRoot",
    "SnapshotStore",
]

_WHERE = {
    "MachineInfo": "._record",
    "SnapshotDisk": "._record",
    "SnapshotMeta": "._record",
    "SnapshotRecord": "._record",
    "SnapshotRoot": "._record",
    "SnapshotStore": "._store",
    "SnapshotManager": "._facade",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
