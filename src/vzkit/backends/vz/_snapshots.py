"""The seed's ``SnapshotManager.Save``/``Restore`` for VZ: machine state in the catalogue.

The catalogue (``<vm_dir>/snapshots/<name>.vmstate`` + ``<name>.json``) is vzkit's
:class:`~vzkit.SnapshotManager`; this module writes into it. The state file is written under
a temporary name, fsynced and renamed, then the metadata; a failure leaves an older snapshot
of the same name intact. A running VM is paused for the save and resumed afterwards. The
snapshot dir is 0700 and the files are owner-only (0600), whatever the umask.

These write the seed's metadata (no ``format``, no checksums): :meth:`SnapshotManager.restore`
refuses such snapshots, and :func:`restore_snapshot` hands VZ the state file only (VZ checks
its own format; no disk is involved).
"""

from __future__ import annotations

import contextlib
import json
import os
from datetime import UTC, datetime
from typing import Any

from ..._state import VMState
from ...errors import SnapshotError, StateError, VzkitError
from ...snapshots._record import (
    SnapshotManager,
    SnapshotMeta,
    check_snapshot_name,
    format_rfc3339,
    make_private_dir,
)
from ._lifecycle import (
    pause_vm,
    restore_machine_state,
    resume_vm,
    save_machine_state,
    validate_save_restore_support,
    vm_state,
    wait_handler,
)
from ._objc import Queue

__all__ = ["restore_snapshot", "save_snapshot"]


def _fsync_dir(path: os.PathLike[str] | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_snapshot(
    manager: SnapshotManager,
    queue: Queue,
    vm: Any,
    config: Any,
    name: str,
    *,
    timeout: float | None = 300.0,
) -> SnapshotMeta:
    """Save the VM's state as snapshot ``name`` (running: paused, saved, resumed)."""
    check_snapshot_name(name)
    state = vm_state(queue, vm)
    if state not in (VMState.RUNNING, VMState.PAUSED):
        raise StateError(f"cannot save a VM that is {state.value} (running or paused needed)")
    validate_save_restore_support(config)
    make_private_dir(manager.snapshot_dir)
    target = manager.state_path(name)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    was_running = state is VMState.RUNNING
    if was_running:
        wait_handler(pause_vm(queue, vm), timeout)
    try:
        try:
            wait_handler(save_machine_state(queue, vm, tmp), timeout)
        except VzkitError as err:
            raise SnapshotError(f"saving snapshot {name!r} failed: {err}") from err
        with open(tmp, "rb") as fh:
            os.fchmod(fh.fileno(), 0o600)  # VZ created it with the umask's mode
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        meta = {
            "name": name,
            "created": format_rfc3339(datetime.now(UTC)),
            "size": target.stat().st_size,
            "vmState": state.value,
            "filePath": str(target),
            "backend": "vz",
        }
        meta_tmp = tmp.with_suffix(".json-tmp")
        fd = os.open(meta_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(meta, indent=2) + "\n")
        os.replace(meta_tmp, manager.meta_path(name))
        _fsync_dir(manager.snapshot_dir)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if was_running:
            wait_handler(resume_vm(queue, vm), timeout)
    return manager.get(name)


def restore_snapshot(
    manager: SnapshotManager, queue: Queue, vm: Any, name: str, *, timeout: float | None = 300.0
) -> None:
    """Restore snapshot ``name`` into a stopped VM built from the identical configuration
    (share paths included); the VM ends paused."""
    state = vm_state(queue, vm)
    if state is not VMState.STOPPED:
        raise StateError(f"restore needs a stopped VM (it is {state.value})")
    meta = manager.get(name)
    try:
        wait_handler(restore_machine_state(queue, vm, meta.file_path), timeout)
    except SnapshotError:
        raise
    except VzkitError as err:
        raise SnapshotError(f"restoring snapshot {name!r} failed: {err}") from err
