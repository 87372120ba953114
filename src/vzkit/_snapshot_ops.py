"""Saving and restoring snapshots: the backend-independent half.

The backend writes machine state and captures disks (:class:`~vzkit.backends.Machine`'s
``save_state``/``capture_disks``/``restore_state``); this module makes the result atomic and
checkable:

* everything is written under temporary names (a leading dot: the catalogue ignores them),
  fsynced, then renamed; the metadata JSON is renamed last, and the directory fsynced;
* captured disks get names unique to one save (``<name>.<token>.disk0.raw``), so a new save
  never overwrites the disks an older snapshot of the same name still points to; the older
  state file is kept as a hard link until the new metadata is in place, so a failure at any
  step leaves the older snapshot whole;
* any failure or cancellation removes the partial files and resumes a VM that was running;
* a restore compares the VM's config with the one recorded at save time (canonical paths)
  and refuses with a :class:`~vzkit.errors.SnapshotError` naming every difference before any
  process starts;
* snapshot files are untrusted: a restore checks the metadata's schema
  (:func:`~vzkit._snapshot.parse_metadata`), opens every file as a regular file inside the
  snapshot dir (no symlink) and compares its size and SHA-256 with the ones recorded at
  save time, all before the backend sees a file. The state file is handed to the backend as
  ``/proc/self/fd/N`` of the descriptor that was checksummed (on Linux), so swapping the file
  after the check changes nothing;
* the snapshot dir is 0700 and every file a save writes is owner-only (0400 or 0600).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ._config import ConsoleMode, LinuxVMConfig
from ._disk import DiskFormat, standalone_qcow2_size
from ._diskcopy import fsync_dir, nonzero_digest_fd, sha256_fd
from ._macconfig import MacVMConfig
from ._snapshot import (
    DISK_DIGEST_PREFIX,
    FORMAT,
    META_SUFFIX,
    STATE_SUFFIX,
    TOKEN_HEX,
    SnapshotManager,
    SnapshotMeta,
    SnapshotRecord,
    check_snapshot_name,
    disk_file_re,
    format_rfc3339,
    make_private_dir,
)
from ._state import VMState
from ._volume import assign_volume_tags
from .backends import Feature
from .backends._protocol import CapturedDisk, Machine, ProgressFn
from .errors import ConfigError, SnapshotError, StateError, UnsupportedError, VzkitError

if TYPE_CHECKING:
    from ._vmcore import VMCore

__all__ = ["FORMAT", "config_diff", "machine_fields", "restore", "save"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: VMs restored in this process, to refuse a second live restore on backends that cannot.
_restored: weakref.WeakSet[VMCore] = weakref.WeakSet()


def _canon(path: Path | None) -> str | None:
    return None if path is None else os.path.realpath(path)


def machine_fields(cfg: LinuxVMConfig | MacVMConfig) -> dict[str, Any]:
    """What a restore must match: the guest-visible hardware and every file it refers to
    (canonical paths). The state dir, console log and console kind are per VM and free.
    ``disk_format`` is recorded when it is not raw (the default), so snapshots from before
    the field existed still fit a raw disk."""
    volumes = [
        {"host_path": _canon(v.host_path), "tag": v.tag, "read_only": v.read_only}
        for v in assign_volume_tags(cfg.volumes)
    ]
    if isinstance(cfg, MacVMConfig):
        return {
            "guest": "macos",
            "vm_dir": _canon(cfg.vm_dir),
            "cpus": cfg.cpus,
            "memory_mb": cfg.memory_mb,
            "disk_path": _canon(cfg.disk_path),
            "volumes": volumes,
            "network": cfg.network.mode.value,
            "displays": [] if cfg.headless else [str(d) for d in cfg.displays],
            "vsock": cfg.vsock,
            "balloon": cfg.balloon,
            "entropy": cfg.entropy,
        }
    out: dict[str, Any] = {
        "arch": cfg.arch.value,
        "cpus": cfg.cpus,
        "memory_mb": cfg.memory_mb,
        "kernel_path": _canon(cfg.kernel_path),
        "initrd_path": _canon(cfg.initrd_path),
        "cmdline": cfg.cmdline,
        "disk_path": _canon(cfg.disk_path),
        "iso_path": _canon(cfg.iso_path),
        "volumes": volumes,
        "network": cfg.network.mode.value,
        # only when set, so snapshots written before the option existed still match
        **({"host_loopback": True} if cfg.network.host_loopback else {}),
        "displays": [] if cfg.headless else [str(d) for d in cfg.displays] or ["default"],
        "vsock": cfg.vsock,
        "vsock_cid": cfg.vsock_cid,
        "balloon": cfg.balloon,
        "entropy": cfg.entropy,
        "serial_console": cfg.console is not ConsoleMode.NONE,
        "nested_virtualization": cfg.nested_virtualization,
        "accelerator": cfg.accelerator,
    }
    if cfg.disk_format is not DiskFormat.RAW:
        out["disk_format"] = cfg.disk_format.value
    return out


def fingerprint(fields: dict[str, Any]) -> str:
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def config_diff(saved: dict[str, Any], cfg: LinuxVMConfig | MacVMConfig) -> list[str]:
    """One ``"field: snapshot X, this VM Y"`` line per difference (empty: compatible)."""
    now = machine_fields(cfg)
    return [
        f"{key}: snapshot {saved.get(key)!r}, this VM {now.get(key)!r}"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    ]


def disk_files(manager: SnapshotManager, name: str) -> list[Path]:
    """Every captured-disk file of snapshot ``name``, referenced or left over."""
    pattern = disk_file_re(name)
    try:
        return [p for p in manager.snapshot_dir.iterdir() if pattern.fullmatch(p.name)]
    except FileNotFoundError:
        return []


def _unlink(*paths: Path | None) -> None:
    for path in paths:
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()


def _write_new(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        data = text.encode()
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(
    manager: SnapshotManager,
    name: str,
    tmp_state: Path,
    captured: list[CapturedDisk],
    meta: dict[str, Any],
) -> None:
    """Rename the new files into place, metadata last, and fsync the directory.

    Synchronous, so no cancellation can split it. The older snapshot's state and metadata are
    kept as hard links until the end: on any failure they are put back and the new files
    removed, so the older snapshot of the name stays whole.
    """
    sdir = manager.snapshot_dir
    state, meta_path = manager.state_path(name), manager.meta_path(name)
    token = meta["id"]
    meta_tmp = sdir / f".{name}.{token}{META_SUFFIX}.tmp"
    backups: dict[Path, Path | None] = {}
    for path in (state, meta_path):
        link = sdir / f".{path.name}.{token}.old"
        try:
            os.link(path, link)
            backups[path] = link
        except FileNotFoundError:
            backups[path] = None
    finals: list[Path] = []
    try:
        for disk in captured:
            final = sdir / disk.path.name.lstrip(".")
            os.replace(disk.path, final)
            finals.append(final)
        _write_new(meta_tmp, json.dumps(meta, indent=2) + "\n")
        os.replace(tmp_state, state)
        os.replace(meta_tmp, meta_path)
        fsync_dir(sdir)
    except BaseException:
        for path, saved in backups.items():  # back to the older snapshot (or none)
            with contextlib.suppress(OSError):
                if saved is not None:
                    os.replace(saved, path)
                else:
                    path.unlink(missing_ok=True)
        _unlink(meta_tmp, *finals)
        raise
    finally:
        _unlink(*(b for b in backups.values() if b is not None))
    keep = {d["file"] for d in meta["disks"]}
    for old in disk_files(manager, name):  # the disks of the snapshot this one replaced
        if old.name not in keep:
            _unlink(old)


def _as_snapshot_error(what: str, err: BaseException, machine_state: VMState) -> SnapshotError:
    if isinstance(err, OSError):
        detail = f"{err.strerror or err}" + (f": {err.filename!r}" if err.filename else "")
    else:
        detail = str(err)
    if machine_state is VMState.ERROR:
        detail += " (the VMM exited during the operation)"
    return SnapshotError(f"{what} failed: {detail}")


async def save(
    manager: SnapshotManager,
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
    core.require_feature(Feature.SNAPSHOTS)
    state = core.state
    if core.closed or state not in (VMState.RUNNING, VMState.PAUSED):
        what = "closed" if core.closed else state.value
        raise StateError(f"cannot save a VM that is {what} (it must be running or paused)")
    machine = core.machine
    blockers = machine.snapshot_blockers()
    if blockers:
        raise SnapshotError(
            f"cannot save snapshot {name!r}: the state of {', '.join(blockers)} cannot be saved "
            "(remove the device from the config, or stop the VM and save without it)"
        )
    sdir = manager.snapshot_dir
    try:
        make_private_dir(sdir)
    except OSError as err:
        raise _as_snapshot_error(f"saving snapshot {name!r}", err, state) from err
    token = secrets.token_hex(TOKEN_HEX // 2)
    tmp_state = sdir / f".{name}.{token}{STATE_SUFFIX}.tmp"
    was_running = state is VMState.RUNNING
    try:
        await machine.prepare_save()
        if was_running:
            await core.pause(None)
        await machine.save_state(tmp_state, progress)
        captured: list[CapturedDisk] = await machine.capture_disks(sdir, f".{name}.{token}.")
        (state_sum, state_size), *disk_sums = await _in_thread(
            _checksum_sync, tmp_state, [d.path for d in captured]
        )
        meta: dict[str, Any] = {
            "name": name,
            "created": format_rfc3339(datetime.now(UTC)),
            "size": state_size,
            "vmState": state.value,
            "filePath": str(manager.state_path(name)),
            "format": FORMAT,
            "id": token,
            "backend": core.backend.name,
            "backendInfo": machine.snapshot_info(),
            "configFingerprint": "",
            "machine": machine_fields(core.config),
            "disks": [
                {
                    "role": d.role,
                    "source": str(d.source),
                    "file": d.path.name.lstrip("."),
                    "format": d.format.value,
                    "size": disk_size,
                    "digest": DISK_DIGEST_PREFIX + disk_sum,
                }
                for d, (disk_sum, disk_size) in zip(captured, disk_sums, strict=True)
            ],
            "stateSha256": state_sum,
            "agent": agent,
        }
        meta["configFingerprint"] = fingerprint(meta["machine"])
        _commit(manager, name, tmp_state, captured, meta)
    except BaseException as err:
        # Everything this save made carries its token, including what a backend left over.
        mine = f".{name}.{token}."
        _unlink(tmp_state, *(p for p in sdir.iterdir() if p.name.startswith(mine)))
        if was_running:
            await _resume_after_failure(core)
        await _finish_save(machine)
        if isinstance(err, SnapshotError) or not isinstance(err, VzkitError | OSError):
            raise
        raise _as_snapshot_error(f"saving snapshot {name!r}", err, machine.state) from err
    if was_running:
        await core.resume(None)
    await machine.finish_save()
    log.info("snapshot %r saved (%d bytes of machine state)", name, meta["size"])
    return manager.get(name)


async def _finish_save(machine: Machine) -> None:
    try:
        await machine.finish_save()
    except VzkitError as err:
        log.warning("could not restore the devices set aside for the failed save: %s", err)


async def _resume_after_failure(core: VMCore) -> None:
    """Run the VM again after a failed save; a VMM that died stays as it is."""
    if core.state is not VMState.PAUSED:
        return
    try:
        await core.resume(None)
    except VzkitError as err:
        log.warning("could not resume the VM after the failed save: %s", err)


def _check_fanout(core: VMCore, state_file: Path) -> None:
    if Feature.SNAPSHOT_FANOUT in core.backend.features:
        return
    for other in list(_restored):
        if other is core or other.closed or other.restored_from != state_file:
            continue
        if other.state not in (VMState.STOPPED, VMState.ERROR):
            raise UnsupportedError(
                f"the {core.backend.name} backend cannot restore one snapshot into several "
                "running VMs at once (its saved state is tied to one machine identity)",
                backend=core.backend.name,
                feature=Feature.SNAPSHOT_FANOUT.value,
            )


async def restore(manager: SnapshotManager, core: VMCore, name: str) -> SnapshotMeta:
    """The seed's ``Restore``: a stopped VM with a compatible config ends PAUSED."""
    check_snapshot_name(name)
    core.require_feature(Feature.SNAPSHOTS)
    if core.closed or core.state not in (VMState.STOPPED, VMState.ERROR):
        what = "closed" if core.closed else core.state.value
        raise StateError(f"restoring a snapshot needs a stopped VM (it is {what})")
    meta, record = manager.checked(name)
    record = _check_record(name, record, meta, core)
    diff = config_diff(record.machine, core.config)
    if diff:
        raise SnapshotError(f"snapshot {name!r} does not fit this VM's config: " + "; ".join(diff))
    _check_fanout(core, meta.file_path)
    try:
        checked = await _in_thread(_verify_sync, manager.snapshot_dir, record)
    except OSError as err:  # an I/O error while reading; what is wrong is a SnapshotError
        raise _as_snapshot_error(f"checking snapshot {name!r}", err, VMState.STOPPED) from err
    expect = getattr(core.machine, "expect_snapshot_info", None)
    if expect is not None:  # the qemu machine refuses a CPU/machine type other than the saved
        expect(record.backend_info)
    try:
        await core.machine.restore_state(checked.state_path, checked.disks)
    except BaseException as err:
        if isinstance(err, SnapshotError | StateError) or not isinstance(err, VzkitError | OSError):
            raise
        raise _as_snapshot_error(f"restoring snapshot {name!r}", err, VMState.STOPPED) from err
    finally:
        os.close(checked.state_fd)
    core.restored(meta.file_path, clock_step=record.agent)
    _restored.add(core)
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
    if fmt < FORMAT:
        raise SnapshotError(
            f"snapshot {name!r} was saved by an older vzkit (metadata format {fmt}) that "
            "recorded no checksums of its files, so it cannot be checked before a restore: "
            "boot the VM, bring it back to that point and save it again"
        )
    if fmt > FORMAT:
        raise SnapshotError(
            f"snapshot {name!r} was saved by a newer vzkit (metadata format {fmt}; this one "
            f"reads {FORMAT}): upgrade vzkit to restore it"
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


# -- files: permissions, checksums, checked opens ------------------------------------------


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
            if isinstance(result, _Checked):  # it finished anyway: let go of its descriptor
                os.close(result.state_fd)
        raise


def _checksum_sync(
    state: Path, disks: Sequence[Path], abort: threading.Event
) -> list[tuple[str, int]]:
    """At save, after the fsyncs: make the new files owner-only and read-only (0400) and
    checksum them (SHA-256 of the state file, :func:`nonzero_digest_fd` of each disk)."""
    out = []
    for path, digest in [(state, sha256_fd), *((d, nonzero_digest_fd) for d in disks)]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, 0o400)
            t0 = time.perf_counter()
            out.append(digest(fd, abort))
            _log_rate("checksummed", path, out[-1][1], time.perf_counter() - t0)
        finally:
            os.close(fd)
    return out


def _log_rate(what: str, path: Path, size: int, seconds: float) -> None:
    rate = size / max(seconds, 1e-9) / 1e6
    log.info("%s %s: %d bytes in %.3f s (%.0f MB/s)", what, path.name, size, seconds, rate)


@dataclass(frozen=True, slots=True)
class _Checked:
    """A snapshot's files, checked: the state file's descriptor (kept open until the backend
    has read it), the path the backend opens it by, and the captured disks."""

    state_fd: int
    state_path: Path
    disks: list[CapturedDisk]


def _verify_sync(sdir: Path, record: SnapshotRecord, abort: threading.Event) -> _Checked:
    """Open each file the metadata names inside ``sdir`` (no symlink, a regular file of the
    recorded size) and compare its checksum with the recorded one."""
    name = record.name
    dir_fd = os.open(sdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        disks = []
        for disk in record.disks:
            fd = _open_member(dir_fd, sdir, name, disk.file, disk.size, "disk image")
            try:
                if disk.format is DiskFormat.QCOW2:
                    _check_qcow2(fd, name, sdir / disk.file)
                t0 = time.perf_counter()
                digest, _ = nonzero_digest_fd(fd, abort)
                _log_rate("verified", sdir / disk.file, disk.size, time.perf_counter() - t0)
            finally:
                os.close(fd)
            if DISK_DIGEST_PREFIX + digest != disk.digest:
                raise _altered(name, sdir / disk.file)
            disks.append(CapturedDisk(disk.role, Path(disk.source), sdir / disk.file, disk.format))
        state = sdir / (name + STATE_SUFFIX)
        fd = _open_member(dir_fd, sdir, name, state.name, record.size or 0, "state file")
        try:
            t0 = time.perf_counter()
            digest, _ = sha256_fd(fd, abort)
            _log_rate("verified", state, record.size or 0, time.perf_counter() - t0)
            if digest != record.state_sha256:
                raise _altered(name, state)
        except BaseException:
            os.close(fd)
            raise
    finally:
        os.close(dir_fd)
    return _Checked(fd, _fd_path(fd, state), disks)


def _altered(name: str, path: Path) -> SnapshotError:
    return SnapshotError(
        f"snapshot {name!r} is damaged: the checksum of {str(path)!r} does not match the one "
        "recorded when it was saved (the file was altered or corrupted); delete the snapshot "
        "and save it again"
    )


def _open_member(dir_fd: int, sdir: Path, name: str, file: str, size: int, what: str) -> int:
    """``file`` (a plain name) opened read-only inside the directory ``dir_fd``: a regular
    file of ``size`` bytes, never through a symlink, never blocking on a FIFO."""
    path = sdir / file
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(file, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {name!r} is missing its {what} {str(path)!r}") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise SnapshotError(
                f"snapshot {name!r}: its {what} {str(path)!r} is a symlink, refused (a "
                "snapshot's files are its own, never links to other files)"
            ) from None
        raise SnapshotError(f"cannot open {str(path)!r}: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(
                f"snapshot {name!r}: its {what} {str(path)!r} is not a regular file"
            )
        if st.st_size != size:
            raise SnapshotError(
                f"snapshot {name!r} is damaged: its {what} {str(path)!r} has {st.st_size} bytes, "
                f"its metadata says {size} (truncated or altered); delete the snapshot and save "
                "it again"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_qcow2(fd: int, name: str, path: Path) -> None:
    """A captured qcow2 is standalone: no backing file, no external data file (else its
    header could make QEMU open any host file behind the restored guest's disk). The header
    is read from the descriptor that is checksummed (``_disk.standalone_qcow2_size``)."""
    try:
        standalone_qcow2_size(path, fd=fd)
    except ConfigError as err:
        raise SnapshotError(f"snapshot {name!r}: {err}") from err


def _fd_path(fd: int, real: Path) -> Path:
    """A path that opens the very file behind ``fd`` (Linux: ``/proc/self/fd/N``), so what
    the backend reads is what was checksummed even if ``real`` is replaced meanwhile."""
    proc = Path(f"/proc/self/fd/{fd}")
    return proc if sys.platform == "linux" and proc.exists() else real
