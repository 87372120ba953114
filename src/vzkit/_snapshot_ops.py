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
  process starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._config import ConsoleMode, LinuxVMConfig
from ._disk import DiskFormat
from ._diskcopy import fsync_dir
from ._macconfig import MacVMConfig
from ._snapshot import (
    META_SUFFIX,
    STATE_SUFFIX,
    SnapshotManager,
    SnapshotMeta,
    check_snapshot_name,
    format_rfc3339,
)
from ._state import VMState
from ._volume import assign_volume_tags
from .backends import Feature
from .backends._protocol import CapturedDisk, Machine, ProgressFn
from .errors import SnapshotError, StateError, UnsupportedError, VzkitError

if TYPE_CHECKING:
    from ._vmcore import VMCore

__all__ = ["FORMAT", "config_diff", "machine_fields", "restore", "save"]

log = logging.getLogger(__name__)

#: Version of the keys vzkit adds to the seed's JSON.
FORMAT = 1
_TOKEN_HEX = 12
#: VMs restored in this process, to refuse a second live restore on backends that cannot.
_restored: weakref.WeakSet[VMCore] = weakref.WeakSet()


def _canon(path: Path | None) -> str | None:
    return None if path is None else os.path.realpath(path)


def machine_fields(cfg: LinuxVMConfig | MacVMConfig) -> dict[str, Any]:
    """What a restore must match: the guest-visible hardware and every file it refers to
    (canonical paths). The state dir, console log and console kind are per VM and free."""
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
    return {
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


def _disk_file_re(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(name) + rf"\.[0-9a-f]{{{_TOKEN_HEX}}}\.disk\d+\.[a-z0-9]+")


def disk_files(manager: SnapshotManager, name: str) -> list[Path]:
    """Every captured-disk file of snapshot ``name``, referenced or left over."""
    pattern = _disk_file_re(name)
    try:
        return [p for p in manager.snapshot_dir.iterdir() if pattern.fullmatch(p.name)]
    except FileNotFoundError:
        return []


def read_json(manager: SnapshotManager, name: str) -> dict[str, Any]:
    path = manager.meta_path(name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {name!r} has no metadata ({str(path)!r})") from None
    except (OSError, ValueError) as err:
        raise SnapshotError(f"cannot read the metadata of snapshot {name!r}: {err}") from err
    if not isinstance(data, dict):
        raise SnapshotError(f"the metadata of snapshot {name!r} is not a JSON object")
    return data


def _unlink(*paths: Path | None) -> None:
    for path in paths:
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()


def _write_new(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
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
        sdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _as_snapshot_error(f"saving snapshot {name!r}", err, state) from err
    token = secrets.token_hex(_TOKEN_HEX // 2)
    tmp_state = sdir / f".{name}.{token}{STATE_SUFFIX}.tmp"
    was_running = state is VMState.RUNNING
    try:
        await machine.prepare_save()
        if was_running:
            await core.pause(None)
        await machine.save_state(tmp_state, progress)
        captured: list[CapturedDisk] = await machine.capture_disks(sdir, f".{name}.{token}.")
        meta: dict[str, Any] = {
            "name": name,
            "created": format_rfc3339(datetime.now(UTC)),
            "size": tmp_state.stat().st_size,
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
                    "size": d.path.stat().st_size,
                }
                for d in captured
            ],
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
    meta = manager.get(name)
    data = read_json(manager, name)
    saved_fields = data.get("machine")
    if data.get("format") != FORMAT or not isinstance(saved_fields, dict):
        raise SnapshotError(
            f"snapshot {name!r} has no machine description vzkit can check (format "
            f"{data.get('format')!r}); it cannot be restored safely"
        )
    backend = data.get("backend")
    if backend != core.backend.name:
        raise SnapshotError(
            f"snapshot {name!r} was saved by the {backend} backend; this VM uses "
            f"{core.backend.name}"
        )
    if data.get("size") != meta.size:
        raise SnapshotError(
            f"snapshot {name!r} is incomplete: its state file has {meta.size} bytes, its "
            f"metadata says {data.get('size')} (an interrupted save?)"
        )
    diff = config_diff(saved_fields, core.config)
    if diff:
        raise SnapshotError(f"snapshot {name!r} does not fit this VM's config: " + "; ".join(diff))
    disks = []
    for entry in data.get("disks", []):
        path = manager.snapshot_dir / str(entry["file"])
        if not path.is_file():
            raise SnapshotError(f"snapshot {name!r} is missing its disk image {str(path)!r}")
        disks.append(
            CapturedDisk(
                role=str(entry["role"]),
                source=Path(entry["source"]),
                path=path,
                format=DiskFormat(entry["format"]),
            )
        )
    _check_fanout(core, meta.file_path)
    try:
        await core.machine.restore_state(meta.file_path, disks)
    except BaseException as err:
        if isinstance(err, SnapshotError | StateError) or not isinstance(err, VzkitError | OSError):
            raise
        raise _as_snapshot_error(f"restoring snapshot {name!r}", err, VMState.STOPPED) from err
    core.restored(meta.file_path, clock_step=bool(data.get("agent")))
    _restored.add(core)
    return meta
