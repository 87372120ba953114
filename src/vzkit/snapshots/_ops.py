"""The operations layer: save, restore and the many-from-one rule, through the core's seam.

The backend writes machine state and captures disks (its ``SnapshotCapable`` methods:
``snapshot_blockers``, ``snapshot_info``, ``prepare_save``, ``finish_save``, ``save_state``,
``capture_disks``, ``restore_state``); the store (:mod:`._store`) makes the result atomic and
checks it:

* any failure or cancellation of a save removes its partial files and resumes a VM that was
  running (the commit itself is atomic and leaves an older snapshot of the name whole);
* a restore compares the VM's config with the one recorded at save time (canonical paths)
  and refuses with a :class:`~vzkit.errors.SnapshotError` naming every difference before any
  process starts; so does the machine when the hardware a restore would build (what
  ``snapshot_info()`` then reports: machine type, CPU model...) differs from the recorded one
  (``hardware_mismatches``, asked while the checksums already run); every file is checked
  (schema, confinement, size, checksum) before the backend reads it.

Only these names of the core are used: ``snapshot_machine`` (the feature check), ``require``
(its state guards ``snapshot_save``/``snapshot_restore``), ``state``, ``config``, ``backend``,
``generation``, ``agent`` and ``restored``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .._state import VMState
from ..backends import Feature
from ..backends._protocol import Machine, ProgressFn, SnapshotCapable
from ..errors import SnapshotError, StateError, UnsupportedError, VzkitError
from ._files import Opened, base_changed, base_digest, check_digests
from ._match import config_diff, machine_fields
from ._record import (
    DISK_DIGEST_PREFIX,
    FORMAT,
    READABLE_FORMATS,
    ROOT_DISK_FORMAT,
    ROOT_ROLE,
    MachineInfo,
    SnapshotDisk,
    SnapshotMeta,
    SnapshotRecord,
    SnapshotRoot,
    check_snapshot_name,
    fingerprint,
)
from ._store import SnapshotStore

if TYPE_CHECKING:
    from .._vmcore import VMCore

__all__ = ["restore", "save"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Cores restored in this process → (the state file, the core's generation right after the
#: restore), to refuse a second live restore on backends that cannot fan out.
_restored: weakref.WeakKeyDictionary[VMCore, tuple[Path, int]] = weakref.WeakKeyDictionary()


def _as_snapshot_error(what: str, err: BaseException, machine_state: VMState) -> SnapshotError:
    if isinstance(err, OSError):
        detail = f"{err.strerror or err}" + (f": {err.filename!r}" if err.filename else "")
    else:
        detail = str(err)
    if machine_state is VMState.ERROR:
        detail += " (the VMM exited during the operation)"
    return SnapshotError(f"{what} failed: {detail}")


async def save(
    store: SnapshotStore,
    core: VMCore,
    name: str,
    progress: ProgressFn | None = None,
    *,
    agent: bool = False,
) -> SnapshotMeta:
    """The seed's ``Save``: a running VM is paused, saved and resumed; a paused one stays
    paused. ``agent`` records that the guest agent was reachable (the clock is stepped
    through it after a restore)."""
    check_snapshot_name(name)
    snap = core.snapshot_machine()  # the same object as core.machine, its snapshot side
    core.require("snapshot_save")
    machine, state = core.machine, core.state
    blockers = snap.snapshot_blockers()
    if blockers:
        raise SnapshotError(
            f"cannot save snapshot {name!r}: the state of {', '.join(blockers)} cannot be saved "
            "(remove the device from the config, or stop the VM and save without it)"
        )
    root = await _root_of(core)
    try:
        token = store.begin(name)
    except OSError as err:
        raise _as_snapshot_error(f"saving snapshot {name!r}", err, state) from err
    tmp_state = store.temp_state(name, token)
    was_running = state is VMState.RUNNING
    try:
        await snap.prepare_save()
        if was_running:
            await machine.pause()
        await snap.save_state(tmp_state, progress)
        captured = await snap.capture_disks(store.snapshot_dir, store.temp_prefix(name, token))
        if (root is not None) != any(d.role == ROOT_ROLE for d in captured):
            raise SnapshotError(
                f"saving snapshot {name!r} failed: the backend captured "
                + (
                    "no root disk layer"
                    if root is not None
                    else "a root disk layer, but the VM has no root disk"
                )
            )
        (state_sum, state_size), *disk_sums = await _in_thread(
            store.seal, tmp_state, [d.path for d in captured]
        )
        fields = machine_fields(core.config)
        record = SnapshotRecord(
            name=name,
            format=FORMAT if root is None else ROOT_DISK_FORMAT,
            created=datetime.now(UTC),
            size=state_size,
            vm_state=state.value,
            file_path=str(store.state_path(name)),
            token=token,
            backend=core.backend.name,
            info=MachineInfo.from_items(snap.snapshot_info()),
            machine=fields,
            config_fingerprint=fingerprint(fields),
            disks=tuple(
                SnapshotDisk(
                    role=d.role,
                    source=str(d.source),
                    file=d.path.name.lstrip("."),
                    format=d.format,
                    size=disk_size,
                    digest=DISK_DIGEST_PREFIX + disk_sum,
                )
                for d, (disk_sum, disk_size) in zip(captured, disk_sums, strict=True)
            ),
            state_sha256=state_sum,
            agent=agent,
            root=root,
        )
        store.commit(record, tmp_state, captured)
    except BaseException as err:
        # Everything this save made carries its token, including what a backend left over.
        store.discard(name, token)
        if was_running:
            await _resume_after_failure(machine)
        await _finish_save(snap)
        if isinstance(err, SnapshotError) or not isinstance(err, VzkitError | OSError):
            raise
        raise _as_snapshot_error(f"saving snapshot {name!r}", err, machine.state) from err
    if was_running:
        await machine.resume()
    await snap.finish_save()
    log.info("snapshot %r saved (%d bytes of machine state)", name, state_size)
    return store.get(name)


async def _root_of(core: VMCore) -> SnapshotRoot | None:
    """What a save records of the VM's root disk base: its path, format and digest (the
    config's, i.e. the root-disk cache's; else the content checksum of the file, hashed here
    while the VM still runs: the base is never written)."""
    root_disk = getattr(core.config, "root_disk", None)
    if root_disk is None:
        return None
    digest = root_disk.digest
    if not digest:
        try:
            digest = await _in_thread(base_digest, root_disk.base)
        except OSError as err:
            raise _as_snapshot_error("hashing the root disk base", err, core.state) from err
    return SnapshotRoot(os.path.realpath(root_disk.base), root_disk.format, digest)


def _check_root(name: str, record: SnapshotRecord, core: VMCore) -> Path | None:
    """The restoring VM's root disk base, once it fits the snapshot's: the snapshot has a root
    layer exactly when the VM has a root disk, and the cache's digest (when recorded) is the
    base's. A recorded content checksum is compared by the checksum thread (the base is
    returned so it opens it); the base is always the config's, never a path from the record."""
    root, root_disk = record.root, getattr(core.config, "root_disk", None)
    if root is None and root_disk is None:
        return None
    if root is None or root_disk is None:
        has = "has no root disk" if root is None else f"has one over {root.base!r}"
        this = "this VM has one" if root_disk is not None else "this VM has none"
        raise SnapshotError(
            f"snapshot {name!r} does not fit this VM's config: the snapshot {has}, {this} "
            "(restore it into a VM with the same root disk setting)"
        )
    if not root.digest.startswith(DISK_DIGEST_PREFIX) and root_disk.digest != root.digest:
        raise base_changed(name, root, root_disk.base, root_disk.digest)
    return Path(root_disk.base)


async def _finish_save(machine: SnapshotCapable) -> None:
    try:
        await machine.finish_save()
    except VzkitError as err:
        log.warning("could not restore the devices set aside for the failed save: %s", err)


async def _resume_after_failure(machine: Machine) -> None:
    """Run the VM again after a failed save; a VMM that died stays as it is."""
    if machine.state is not VMState.PAUSED:
        return
    try:
        await machine.resume()
    except VzkitError as err:
        log.warning("could not resume the VM after the failed save: %s", err)


def _check_fanout(core: VMCore, state_file: Path) -> None:
    """Refuse a second live VM from one snapshot where the backend cannot fan out."""
    if Feature.SNAPSHOT_FANOUT in core.backend.features:
        return
    for other, (restored_from, generation) in list(_restored.items()):
        if other is core or restored_from != state_file or other.generation != generation:
            continue  # itself, another snapshot, or started/restored anew since
        if other.state not in (VMState.STOPPED, VMState.ERROR):
            raise UnsupportedError(
                f"the {core.backend.name} backend cannot restore one snapshot into several "
                "running VMs at once (its saved state is tied to one machine identity)",
                backend=core.backend.name,
                feature=Feature.SNAPSHOT_FANOUT.value,
            )


async def restore(
    store: SnapshotStore, core: VMCore, name: str, *, clock_step: bool = True
) -> SnapshotMeta:
    """The seed's ``Restore``: a stopped VM with a compatible config ends PAUSED.
    ``clock_step=False``: do not ask the core to step the guest clock at the next resume
    (otherwise it does so when the agent was connected at save time)."""
    check_snapshot_name(name)
    snap = core.snapshot_machine()
    core.require("snapshot_restore")
    meta, record = store.checked(name)
    record = _check_record(name, record, meta, core)
    diff = config_diff(record.machine, core.config)
    if diff:
        raise SnapshotError(f"snapshot {name!r} does not fit this VM's config: " + "; ".join(diff))
    base = _check_root(name, record, core)
    _check_fanout(core, meta.file_path)
    try:
        opened = await _in_thread(store.open_members, record, base)
    except OSError as err:  # an I/O error while opening; what is wrong is a SnapshotError
        raise _as_snapshot_error(f"checking snapshot {name!r}", err, VMState.STOPPED) from err
    await core.agent.close()  # the last run's agent connection, if one is left
    try:
        core.open_ports()  # the ports the core forwards: one in use fails before the load
        await _load_while_checking(snap, opened, record)
    except BaseException as err:
        await core.ports.aclose()
        if isinstance(err, SnapshotError | StateError) or not isinstance(err, VzkitError | OSError):
            raise
        raise _as_snapshot_error(f"restoring snapshot {name!r}", err, VMState.STOPPED) from err
    finally:
        opened.close()
    core.restored(meta.file_path, clock_step=record.agent and clock_step)
    await core.run_began()
    _restored[core] = (meta.file_path, core.generation)
    return meta


def _check_record(
    name: str, record: SnapshotRecord | None, meta: SnapshotMeta, core: VMCore
) -> SnapshotRecord:
    """The cheap refusals, before any file is read: format, backend, size, fingerprint."""
    fmt = None if record is None else record.format
    if record is None or fmt is None:
        raise SnapshotError(
            f"snapshot {name!r} has no machine description vzkit can check (format {fmt!r}); "
            "it cannot be restored safely"
        )
    if fmt < min(READABLE_FORMATS):
        raise SnapshotError(
            f"snapshot {name!r} was saved by an older vzkit (metadata format {fmt}) that "
            "recorded no checksums of its files, so it cannot be checked before a restore: "
            "boot the VM, bring it back to that point and save it again"
        )
    if fmt not in READABLE_FORMATS:
        raise SnapshotError(
            f"snapshot {name!r} was saved by a newer vzkit (metadata format {fmt}; this one "
            f"reads {', '.join(map(str, sorted(READABLE_FORMATS)))}): upgrade vzkit to restore it"
        )
    if record.backend != core.backend.name:
        raise SnapshotError(
            f"snapshot {name!r} was saved by the {record.backend} backend; this VM uses "
            f"{core.backend.name}"
        )
    if record.size != meta.size:
        raise SnapshotError(
            f"snapshot {name!r} is incomplete: its state file has {meta.size} bytes, its "
            f"metadata says {record.size} (an interrupted save?)"
        )
    if record.config_fingerprint != fingerprint(record.machine):
        raise SnapshotError(
            f"snapshot {name!r} has invalid metadata: field 'configFingerprint' does not match "
            "field 'machine' (the file was altered: delete the snapshot and save it again)"
        )
    return record


async def _load_while_checking(
    snap: SnapshotCapable, opened: Opened, record: SnapshotRecord
) -> None:
    """A worker thread checksums the snapshot's files while the machine checks the hardware a
    restore would build against the recorded one (a state saved on one machine type or CPU
    model must never load on another: refused before anything starts) and then builds the VM
    (QEMU starts); the backend reads the saved state and the captured disks only once the
    checksums match (``restore_state(..., verified=)``), so the check costs the restore little
    and a damaged file is never loaded: the backend cleans up and the ``SnapshotError`` is
    raised."""
    check = asyncio.ensure_future(_in_thread(check_digests, opened, record.name))
    gate = asyncio.shield(check)
    try:
        diff = await snap.hardware_mismatches(record.info.items())
        if diff:
            raise SnapshotError(
                f"snapshot {record.name!r} does not fit this VM's hardware: " + "; ".join(diff)
            )
        checked = opened.checked
        await snap.restore_state(checked.state_path, checked.disks, gate)
        await check  # a backend that did not await it
    finally:
        if not check.done():
            check.cancel()
        await asyncio.gather(check, gate, return_exceptions=True)


async def _in_thread(fn: Callable[..., _T], *args: object) -> _T:
    """``fn(*args, abort)`` in a worker thread. Cancelling the caller sets ``abort`` and waits
    for the thread to stop (it owns descriptors), so nothing runs on behind its back."""
    abort = threading.Event()
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args, abort))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        abort.set()
        with contextlib.suppress(Exception):
            result = await work
            if isinstance(result, Opened):  # it finished anyway: let go of its descriptors
                result.close()
        raise
