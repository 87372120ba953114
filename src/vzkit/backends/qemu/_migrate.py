"""Snapshots on the qemu backend: machine state through QMP migration to a file we opened.

Save (the VM is paused): the state file is opened here and its descriptor handed to QEMU with
``getfd`` (``SCM_RIGHTS`` on the QMP socket), then ``migrate`` writes to ``fd:NAME`` — no path
and no shell in the URI. ``query-migrate`` reports progress. When the migration completes QEMU
has flushed every disk and stops writing to them (run state ``postmigrate``; ``cont`` takes
them back), so the disks captured right after agree with the saved memory.

Restore: QEMU starts with ``-incoming defer``; ``migrate-incoming`` reads ``fd:NAME`` (the
state file, opened read-only here) and the VM stays paused. The guest's writable disk is a
qcow2 overlay in the VM's state dir backed by the snapshot's captured image, so any number of
VMs can run from one snapshot at once, each with its own copy-on-write disk. The overlay's
header names no backing file: QEMU and qemu-img are given the backing image and its format
on their command lines, and a qcow2 backing gets no backing of its own (see
:func:`~._argv.image_node`), so no file named in an image header is ever opened.

Devices QEMU cannot migrate (vhost-user-vsock, vhost-user-fs) are reported by
:func:`blockers`; the vsock device is unplugged around a save where the machine can do that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..._config import LinuxVMConfig
from ..._disk import DiskFormat, DiskImage, standalone_qcow2_size
from ..._diskcopy import copy_disk
from ..._fsutil import fsync_file
from ..._process import spawn
from ..._state import VMState
from ...errors import ConfigError, SnapshotError, VMError
from ...snapshots._record import ROOT_ROLE
from .._protocol import CapturedDisk, ProgressFn
from . import _argv, _devices, _discover, _rootlayer
from ._virtiofs import ShareDevice

if TYPE_CHECKING:
    from ._machine import QemuMachine

__all__ = [
    "blockers",
    "capture_disks",
    "drop_restored_root",
    "keep_restored_root",
    "load_state",
    "prepare_disks",
    "prepare_root",
    "save_state",
]

log = logging.getLogger(__name__)

FD_NAME = "vzkit-migrate"
#: No throttle: the VM is paused, the stream goes to a local file.
_MAX_BANDWIDTH = 1 << 40
_POLL_FIRST_S = 0.002
_POLL_MAX_S = 0.05
_CANCEL_WAIT_S = 10.0
OVERLAY_NAME = "restored-disk0.qcow2"


def blockers(m: QemuMachine) -> list[str]:
    """The devices of ``m`` whose state QEMU cannot save, named for an error message: the
    device table's verdicts (``_devices``) for the config, every share counted as VirtioFS
    (a mounted 9p export cannot be migrated either)."""
    cfg = m.config
    shares = tuple(ShareDevice(v.tag, v.host_path, v.read_only) for v in cfg.tagged_volumes())
    plan = _argv.Plan(
        config=cfg, binary=Path("qemu"), accel=m.accel or "tcg", qmp_fd=-1, shares=shares
    )
    return _devices.migration_blockers(plan)


def hardware_diff(saved: Mapping[str, Any], *, cpu: str, machine: str) -> list[str]:
    """How a run's resolved CPU model and machine type differ from a snapshot's
    ``backendInfo`` (:meth:`~._machine.QemuMachine.snapshot_info`), one sentence each.

    Snapshots from before the CPU model was recorded ran ``host`` under KVM/HVF and ``max``
    otherwise; one without a machine type is left to QEMU (its migration stream names the
    machine, and a load into another is refused)."""
    accel = str(saved.get("accel", ""))
    saved_cpu = saved.get("cpu") or ("host" if accel in ("kvm", "hvf") else "max")
    out = []
    if saved_cpu != cpu:
        out.append(
            f"it was saved with CPU model {saved_cpu!r}, this VM would run {cpu!r} "
            f"(set cpu_model={saved_cpu!r} in its config to restore it)"
        )
    saved_machine = saved.get("machine")
    if saved_machine and saved_machine != machine:
        out.append(
            f"it was saved on machine type {saved_machine!r}, this VM would run {machine!r} "
            f"(set machine_type={saved_machine!r} in its config to restore it)"
        )
    return out


def hardware_info(config: LinuxVMConfig, accel: str, cpu: str, machine: str) -> dict[str, str]:
    """A run's ``backendInfo`` (:meth:`~._machine.QemuMachine.snapshot_info`): how it ran
    (``accel``) and the hardware its guest sees."""
    return {"accel": accel, "arch": config.arch.value, "cpu": cpu, "machine": machine}


async def planned_info(config: LinuxVMConfig) -> dict[str, str]:
    """The :func:`hardware_info` of the run a start (or restore) of ``config`` would make,
    resolved without starting it: the accelerator it would pick (a cached probe: the start
    asks again at once), and the CPU model and machine type the plan would lower."""
    binary = _discover.find_qemu(config.arch)
    select = _discover.select_accelerator
    accel = await asyncio.to_thread(
        select, binary, config.arch, config.accelerator, config.kernel_path
    )
    cpu, machine = _argv.cpu_model(config, accel), _argv.machine_type(config)
    return hardware_info(config, accel, cpu, machine)


async def unplug_vsock_for_save(m: QemuMachine) -> None:
    """Unplug the vsock device (QEMU cannot migrate it) while the guest runs: it must
    acknowledge the unplug, so a paused VM runs for that moment and is paused again. The next
    device's helper starts while the state saves."""
    if not m.vsock_attached:
        return
    paused = m.state is VMState.PAUSED
    if paused:
        await m.resume()
    try:
        await m.detach_vsock()
    finally:
        if paused:
            await m.pause()
    vsock = m.vsock_transport
    if vsock is not None:
        await vsock.prepare()


async def _pass_fd(m: QemuMachine, fd: int) -> None:
    qmp = m.qmp
    if qmp is None:
        raise VMError(f"QEMU is not running (state {m.state.value})")
    with contextlib.suppress(VMError):  # a descriptor left over from an interrupted call
        await m.execute("closefd", {"fdname": FD_NAME})
    qmp.send_fd_scm(fd)
    await m.execute("getfd", {"fdname": FD_NAME})


async def _wait(m: QemuMachine, progress: ProgressFn | None, what: str) -> dict[str, Any]:
    """Poll ``query-migrate`` until the migration ends; raise unless it completed."""
    delay = _POLL_FIRST_S
    while True:
        info: dict[str, Any] = await m.execute("query-migrate")
        status = info.get("status", "")
        ram = info.get("ram")
        if progress is not None and isinstance(ram, dict):
            done, total = int(ram.get("transferred", 0)), int(ram.get("total", 0))
            progress(done, max(done, total))
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            reason = info.get("error-desc") or status
            raise SnapshotError(f"{what} failed: {reason}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, _POLL_MAX_S)


async def _vmm_gone(m: QemuMachine, what: str, err: VMError) -> SnapshotError | None:
    """After a failed QMP call: a :class:`SnapshotError` saying so if QEMU has exited."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2.0):
            await m.wait_stopped()
    if m.state in (VMState.ERROR, VMState.STOPPED):
        return SnapshotError(f"{what} failed: the VMM exited during the operation ({err})")
    return None


async def _cancel(m: QemuMachine) -> None:
    """Stop an outgoing migration and wait until QEMU let go of the file."""
    with contextlib.suppress(VMError):
        await m.execute("migrate_cancel")
        async with asyncio.timeout(_CANCEL_WAIT_S):
            while True:
                info = await m.execute("query-migrate")
                if info.get("status") not in ("active", "setup", "cancelling", "device"):
                    break
                await asyncio.sleep(0.01)
    with contextlib.suppress(VMError, TimeoutError):
        await m.execute("closefd", {"fdname": FD_NAME})


async def save_state(m: QemuMachine, path: Path, progress: ProgressFn | None) -> None:
    """Migrate the paused machine into the new file ``path`` and fsync it."""
    if m.vsock_attached:
        raise VMError("the vsock device must be unplugged before a save (prepare_save)")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        await _pass_fd(m, fd)
    finally:
        os.close(fd)  # QEMU has its own copy now
    await m.execute("migrate-set-parameters", {"max-bandwidth": _MAX_BANDWIDTH})
    await m.execute("migrate", {"uri": f"fd:{FD_NAME}"})
    try:
        info = await _wait(m, progress, "saving the machine state")
    except VMError as err:
        gone = await _vmm_gone(m, "saving the machine state", err)
        if gone is not None:
            raise gone from err
        await _cancel(m)
        raise
    except BaseException:
        await _cancel(m)
        raise
    await asyncio.to_thread(fsync_file, path)
    log.info("machine state saved: %d bytes in %s ms", path.stat().st_size, info.get("total-time"))


def _writable_disk(m: QemuMachine) -> DiskImage | None:
    """The image the guest's disk runs on now (a restored run's overlay, or the config's in
    its configured format: a disk the guest writes is never probed)."""
    if m.config.disk_path is None:
        return None
    if m.disk_override is not None:
        return DiskImage(m.disk_override, DiskFormat.QCOW2)
    return DiskImage(m.config.disk_path, m.config.disk_format)


async def _flatten(src: Path, backing: DiskImage, dst: Path) -> None:
    """Write the overlay ``src`` over ``backing`` as one standalone qcow2 (``qemu-img
    convert``), the chain spelled out in a ``json:`` source (nothing read from headers)."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise SnapshotError("saving a restored VM's disk needs qemu-img (package qemu-utils)")
    node = _argv.image_node(DiskImage(src, DiskFormat.QCOW2))
    node["backing"] = _argv.image_node(backing, read_only=True)
    source = "json:" + json.dumps(node, separators=(",", ":"), ensure_ascii=False)
    argv = [qemu_img, "convert", "-U", "-q", "-f", "qcow2", source, "-O", "qcow2", str(dst)]
    with open(dst.with_name(dst.name + ".log"), "wb") as err:
        proc = await spawn(argv, name="qemu-img", stderr=err)
    try:
        rc = await proc.wait()
    except BaseException:
        await proc.kill()
        with contextlib.suppress(OSError):
            dst.unlink()
        raise
    log_path = dst.with_name(dst.name + ".log")
    message = log_path.read_text(errors="replace").strip()
    log_path.unlink(missing_ok=True)
    if rc != 0:
        with contextlib.suppress(OSError):
            dst.unlink()
        raise SnapshotError(f"qemu-img convert failed for {str(src)!r}: {message or rc}")
    await asyncio.to_thread(fsync_file, dst)
    os.chmod(dst, 0o400)  # guest data, owner-only; never written again


async def _capture_root(m: QemuMachine, directory: Path, prefix: str) -> list[CapturedDisk]:
    """The root disk's layer (role ``root``): what the guest wrote over the base, as one
    standalone qcow2 (the base itself is referenced by the snapshot's record, not copied)."""
    root = m.config.root_disk
    if root is None:
        return []
    if m.root_layer is None:
        raise SnapshotError("the root disk's layer is missing (the VM was never started)")
    dst = directory / f"{prefix}{ROOT_ROLE}.{DiskFormat.QCOW2.value}"
    base = DiskImage(root.base, root.format)
    method = await _rootlayer.capture(m.root_layer, base, m.root_backing, dst, m.stderr_path)
    log.info("root disk layer %s captured (%s) as %s", m.root_layer, method, dst.name)
    source = Path(os.path.realpath(root.base))
    return [CapturedDisk(role=ROOT_ROLE, source=source, path=dst, format=DiskFormat.QCOW2)]


async def capture_disks(m: QemuMachine, directory: Path, prefix: str) -> list[CapturedDisk]:
    """Capture the writable disks: the root disk's layer, and the config's disk: a
    reflink/sparse copy of a standalone image, or a flattened copy of a restored run's overlay
    chain. The ISO is read-only: referenced, not copied."""
    captured = await _capture_root(m, directory, prefix)
    disk = _writable_disk(m)
    if disk is None:
        return captured
    source = Path(os.path.realpath(m.config.disk_path or disk.path))
    dst = directory / f"{prefix}disk0.{disk.format.value}"
    if m.disk_override is not None:
        if m.disk_backing is None:
            raise SnapshotError("the restored disk overlay has lost its backing image")
        await _flatten(disk.path, m.disk_backing, dst)
        method = "flattened"
    else:
        method = await copy_disk(disk.path, dst)
    log.info("disk %s captured (%s) as %s", disk.path, method, dst.name)
    return [*captured, CapturedDisk(role="disk0", source=source, path=dst, format=disk.format)]


def _virtual_size(image: DiskImage) -> int:
    """The guest-visible size of a snapshot's disk image, read without opening anything its
    header names (a qcow2 naming a backing or data file is refused)."""
    try:
        if image.format is DiskFormat.QCOW2:
            size = standalone_qcow2_size(image.path)
        else:
            size = image.path.stat().st_size
    except ConfigError as err:
        raise SnapshotError(f"cannot restore the snapshot's disk: {err}") from err
    except OSError as err:
        raise SnapshotError(
            f"cannot read the snapshot's disk image {str(image.path)!r}: {err.strerror}"
        ) from err
    return -(-size // 512) * 512  # whole sectors, as QEMU sizes a raw image


async def prepare_disks(m: QemuMachine, disks: Sequence[CapturedDisk]) -> Path | None:
    """A fresh copy-on-write overlay in the state dir over the snapshot's disk image (which
    becomes ``m.disk_backing``). The overlay's header names no backing file."""
    m.disk_backing = None
    disks = [d for d in disks if d.role != ROOT_ROLE]  # see prepare_root
    if not disks:
        return None
    if len(disks) != 1 or disks[0].role != "disk0":
        raise SnapshotError(f"unexpected disks in the snapshot: {[d.role for d in disks]}")
    (disk,) = disks
    m.state_dir.mkdir(parents=True, exist_ok=True)
    overlay = m.state_dir / OVERLAY_NAME
    backing = DiskImage(disk.path.absolute(), disk.format)
    size = await asyncio.to_thread(_virtual_size, backing)
    await _rootlayer.create_qcow2(overlay, size, m.stderr_path, "the disk overlay", SnapshotError)
    m.disk_backing = backing
    return overlay


async def prepare_root(m: QemuMachine, disks: Sequence[CapturedDisk]) -> None:
    """A restore's root disk: the machine's layer is replaced by a fresh one over the
    snapshot's captured layer (``m.root_backing``, opened read-only, so any number of VMs run
    from one snapshot), which lies over the config's base: never a path from the snapshot.
    The snapshot has a root layer exactly when the config has a root disk. A config with a
    kept layer runs on a copy of the captured layer instead, which takes the kept layer's
    place once the state has loaded (:func:`keep_restored_root`): what the VM writes after
    the restore is kept, over the snapshot's disk."""
    root = m.config.root_disk
    layers = [d for d in disks if d.role == ROOT_ROLE]
    if (root is None) != (not layers) or len(layers) > 1:
        raise SnapshotError(
            "the snapshot's root disk layers do not fit this VM "
            f"({len(layers)} in the snapshot, {'no' if root is None else 'a'} root disk here)"
        )
    if layers and layers[0].format is not DiskFormat.QCOW2:
        raise SnapshotError(
            f"the snapshot's root disk layer is {layers[0].format.value}; the qemu backend "
            "saves it as qcow2 (the snapshot was not saved by this backend)"
        )
    _rootlayer.remove_layer(m.root_layer, root)  # a restore replaces what a run wrote
    m.root_layer = m.root_backing = None
    if root is None:
        return
    captured = DiskImage(layers[0].path.absolute(), DiskFormat.QCOW2)
    base_size = await asyncio.to_thread(_virtual_size, DiskImage(root.base, root.format))
    if await asyncio.to_thread(_virtual_size, captured) != base_size:
        raise SnapshotError(
            f"the snapshot's root disk layer does not have the size of the base "
            f"{str(root.base)!r} ({base_size} bytes): it was saved on another base"
        )
    if root.layer is not None:
        m.root_layer = await _rootlayer.restore_copy(root, captured)
        return
    m.root_layer = await _rootlayer.create_layer(m.state_dir, root, m.stderr_path)
    m.root_backing = captured


def keep_restored_root(m: QemuMachine) -> None:
    """After a restore's state has loaded: a kept layer's copy becomes the kept layer."""
    m.root_layer = _rootlayer.keep_restored(m.config.root_disk, m.root_layer)


def drop_restored_root(m: QemuMachine) -> None:
    """After a failed restore: the layer :func:`prepare_root` made goes (none is left); a
    kept layer stays as it was before the restore."""
    root = m.config.root_disk
    if m.root_backing is not None or (root is not None and root.layer is not None):
        _rootlayer.remove_layer(m.root_layer, root)
        m.root_layer = m.root_backing = None


async def load_state(m: QemuMachine, path: Path) -> None:
    """Feed the state file to a QEMU started with ``-incoming defer``; it stays paused.

    ``path`` comes from a restore that checksummed the file first: on Linux it is
    ``/proc/self/fd/N`` of the checksummed descriptor, so the descriptor QEMU gets reads the
    very file that was checked (see :mod:`vzkit.snapshots._ops`)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        await _pass_fd(m, fd)
    finally:
        os.close(fd)
    await m.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})
    await _wait(m, None, "loading the machine state")
