"""The vz backend's half of a snapshot: what :class:`~.VzMachine`'s snapshot methods do with
the disks and what they report. The snapshot files themselves (temporary names, checksums,
the atomic commit, the metadata) are written by vzkit's one store
(:mod:`vzkit.snapshots`) for every backend; nothing here writes a catalogue.

VZ saves and loads the machine state itself (``_lifecycle.save_machine_state`` /
``restore_machine_state``) and attaches the config's disk itself, so a captured disk is
copied back over the config's disk before a restore (there is no copy-on-write overlay:
one snapshot cannot back several live VMs, ``Feature.SNAPSHOT_FANOUT`` is not declared).
A root disk's layer (the VM's own clone of the base, ``_rootclone``) is captured the same way
(role ``root``, a whole raw image) and copied back as the restored VM's layer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..._config import LinuxVMConfig
from ..._disk import DiskFormat
from ..._diskcopy import copy_disk
from ..._macconfig import MacVMConfig
from ...errors import UnsupportedError, VMError
from ...snapshots._record import ROOT_ROLE, MachineInfo
from .._protocol import CapturedDisk
from . import _build

__all__ = [
    "capture_disks",
    "copy_back_disks",
    "hardware_mismatches",
    "snapshot_info",
    "writable_disks",
]


def writable_disks(config: LinuxVMConfig | MacVMConfig) -> list[tuple[str, Path]]:
    """``(role, path)`` of every disk a snapshot captures: ``disk_path`` as ``disk0``, and
    each writable image file of ``disks`` as ``disk<N>`` (N: its index plus one)."""
    out = [] if config.disk_path is None else [("disk0", config.disk_path)]
    for index, disk in enumerate(config.disks):
        if disk.path is not None and not disk.read_only:
            out.append((f"disk{index + 1}", disk.path))
    return out


def _refuse_network_disks(config: LinuxVMConfig | MacVMConfig) -> None:
    """A writable network block device's content is the server's: a snapshot cannot keep it."""
    for disk in config.disks:
        if disk.url and not disk.read_only:
            raise UnsupportedError(
                f"a snapshot cannot capture the network block device {disk.url!r}, which the "
                "guest writes: attach it read-only (ro), or leave it out of VMs you snapshot",
                backend="vz",
                feature="snapshots:nbd",
            )


def snapshot_info(config: LinuxVMConfig | MacVMConfig) -> dict[str, str]:
    """The hardware description recorded with a snapshot (``backendInfo``)."""
    if isinstance(config, MacVMConfig):
        return {"arch": "aarch64", "machine": "macos"}
    return {"arch": config.arch.value, "machine": "linux"}


def hardware_mismatches(config: LinuxVMConfig | MacVMConfig, saved: Mapping[str, str]) -> list[str]:
    """How a VM of ``config`` (its :func:`snapshot_info`, which the config fixes) differs
    from a snapshot's record of the hardware, and what to do about it (empty: it fits)."""
    diff = MachineInfo.from_items(dict(saved)).mismatches(
        MachineInfo.from_items(snapshot_info(config))
    )
    return [*diff, "restore it into a VM configured like the one that saved it"] if diff else []


async def capture_disks(
    config: LinuxVMConfig | MacVMConfig, directory: Path, prefix: str, root_layer: Path | None
) -> list[CapturedDisk]:
    """A clone/sparse copy of each writable disk (the VM is paused, its writes are done),
    the root disk's layer ``root_layer`` first (its source: the base)."""
    _build.require_raw_disk(config)
    _refuse_network_disks(config)
    out = []
    root = getattr(config, "root_disk", None)
    if root is not None:
        if root_layer is None:
            raise VMError("the root disk's layer is missing (the VM was never started)")
        dst = directory / f"{prefix}{ROOT_ROLE}.{DiskFormat.RAW.value}"
        await copy_disk(root_layer, dst)
        source = Path(os.path.realpath(root.base))
        out.append(CapturedDisk(ROOT_ROLE, source, dst, DiskFormat.RAW))
    for role, disk in writable_disks(config):
        dst = directory / f"{prefix}{role}.{DiskFormat.RAW.value}"
        await copy_disk(disk, dst)
        out.append(CapturedDisk(role, Path(os.path.realpath(disk)), dst, DiskFormat.RAW))
    return out


async def copy_back_disks(
    config: LinuxVMConfig | MacVMConfig, disks: Sequence[CapturedDisk], root_layer: Path | None
) -> None:
    """Copy each captured disk back over the config's disk of its role (a new file renamed
    into place), the root disk's layer to ``root_layer`` (the machine's, in its state dir),
    so the machine's disks are the snapshot's again. Every disk is checked before any is
    written."""
    _build.require_raw_disk(config)
    targets = dict(writable_disks(config))
    if getattr(config, "root_disk", None) is not None and root_layer is not None:
        targets[ROOT_ROLE] = root_layer
    for disk in disks:
        if disk.role not in targets:
            raise VMError(f"this VM has no disk for the snapshot's {disk.role}")
        if disk.format is not DiskFormat.RAW:
            raise VMError(
                f"the snapshot's disk {str(disk.path)!r} is {disk.format.value}; the "
                "vz backend attaches raw disk images only"
            )
    for disk in disks:
        target = targets[disk.role]
        tmp = target.with_name(f".{target.name}.restore-{os.getpid()}")
        try:
            await copy_disk(disk.path, tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
