"""A root disk's per-VM copy-on-write layer on the qemu backend.

The layer is an empty qcow2 file in the machine's private state dir whose header names no
backing file: QEMU is given the base on the command line, in its stated format and read-only
(``_argv.root_disk_args``), so neither QEMU nor qemu-img ever probes the base's format or
follows a name in a header. The machine makes the layer at its first start (a stale one left
in a named state dir by a crashed process is replaced) and deletes it at close; a VM started
again keeps what it wrote. Made with ``qemu-img create``: 15 ms here (``docs/images.md``).

A kept layer (``RootDisk.layer``) is the same kind of file at the config's path: made there
at the first start if missing (never over a file another start made meanwhile), reused by
later starts once its header says it is a standalone qcow2 of the base's size (read as
qcow2, the format vzkit made it in: never probed), and never deleted here.

Snapshots (``_migrate``): a save captures the layer (:func:`capture`: a copy, a standalone
qcow2 that holds what the guest wrote over the base); a restore runs on a fresh layer
over the captured one, read-only, over the base. Saving a restored VM
commits its layer into a copy of the captured one (``qemu-img commit``, the chain spelled out
node by node), so every snapshot's layer lies over the base alone. A restore into a config
with a kept layer runs on a copy of the captured layer beside it, which replaces the kept
layer once the state has loaded (:func:`restore_copy`, :func:`keep_restored`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..._disk import (
    DiskFormat,
    DiskImage,
    RootDisk,
    kept_layer_exists,
    standalone_qcow2_size,
    wrong_layer,
)
from ..._diskcopy import copy_disk
from ..._fsutil import fsync_file, link_new
from ..._process import spawn
from ...errors import BackendUnavailableError, ConfigError, SnapshotError, VMError, VzkitError
from ._argv import image_node

__all__ = [
    "LAYER_NAME",
    "capture",
    "create_layer",
    "keep_restored",
    "open_layer",
    "remove_layer",
    "restore_copy",
]

LAYER_NAME = "root-layer.qcow2"


def _base_size(root: RootDisk) -> int:
    """The base's guest-visible size (a qcow2 base naming another file is refused)."""
    if root.format is DiskFormat.QCOW2:
        size = standalone_qcow2_size(root.base)
    else:
        try:
            size = root.base.stat().st_size
        except OSError as err:
            raise ConfigError(
                f"cannot read the root disk {str(root.base)!r}: {err.strerror}"
            ) from err
    if size <= 0:
        raise ConfigError(f"the root disk {str(root.base)!r} is empty")
    return -(-size // 512) * 512


async def create_layer(state_dir: Path, root: RootDisk, log_path: Path) -> Path:
    """A fresh, empty 0600 layer over ``root``'s base (of its size) in ``state_dir``
    (qemu-img's messages go to ``log_path``)."""
    size = await asyncio.to_thread(_base_size, root)
    layer = state_dir / LAYER_NAME
    await create_qcow2(layer, size, log_path, "the root disk's layer")
    return layer


async def open_layer(state_dir: Path, root: RootDisk, log_path: Path) -> Path:
    """The layer a start runs on: ``root``'s kept layer (checked when it is there, made when
    it is not), else a fresh layer of the run in ``state_dir`` (:func:`create_layer`)."""
    if root.layer is None:
        return await create_layer(state_dir, root, log_path)
    size = await asyncio.to_thread(_base_size, root)
    if not await asyncio.to_thread(kept_layer_exists, root):
        try:
            await create_qcow2(root.layer, size, log_path, "the root disk's layer", exclusive=True)
            return root.layer
        except FileExistsError:
            pass  # another start made it meanwhile: check that one
    await asyncio.to_thread(_check_kept, root.layer, size)
    return root.layer


def _check_kept(layer: Path, size: int) -> None:
    """A kept layer is reused only as what vzkit made: a standalone qcow2 of ``size``."""
    try:
        got = standalone_qcow2_size(layer)
    except ConfigError as err:  # its own advice is for a disk's format: the cause says why
        what = "is not a standalone qcow2 image (a raw file, or its header names another file)"
        raise wrong_layer(layer, what) from err
    if got != size:
        raise wrong_layer(layer, f"has a virtual size of {got} bytes, the base {size}")


async def create_qcow2(
    dest: Path,
    size: int,
    log_path: Path,
    what: str,
    error: type[VzkitError] = VMError,
    *,
    exclusive: bool = False,
) -> None:
    """An empty 0600 qcow2 of ``size`` bytes at ``dest`` whose header names no backing file
    (QEMU is given the backing on its command line): made beside ``dest`` and renamed into
    place, so a failure or a kill leaves no half file under that name. ``what`` names it in
    errors (``error``, or BackendUnavailableError without qemu-img); qemu-img's messages go to
    ``log_path``. ``exclusive``: a file at ``dest`` is left alone (``FileExistsError``)."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise BackendUnavailableError(
            f"{what} needs qemu-img (Debian/Ubuntu: apt-get install qemu-utils; macOS: "
            "brew install qemu)"
        )
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    argv = [qemu_img, "create", "-q", "-f", "qcow2", str(tmp), str(size)]
    with open(log_path, "ab") as err:
        proc = await spawn(argv, name="qemu-img", stderr=err)
    try:
        rc = await proc.wait()
        if rc != 0:
            raise error(
                f"cannot create {what} {str(tmp)!r} (qemu-img exit {rc}; see {str(log_path)!r})"
            )
        os.chmod(tmp, 0o600)  # the guest's writes land here: qemu-img honours the umask
        if exclusive:
            link_new(tmp, dest)
        else:
            os.replace(tmp, dest)
    except BaseException:
        await proc.kill()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove_layer(layer: Path | None, root: RootDisk | None = None) -> None:
    """Delete a layer of the run; ``root``'s kept layer is never deleted."""
    if layer is not None and (root is None or layer != root.layer):
        with contextlib.suppress(OSError):
            layer.unlink()


async def restore_copy(root: RootDisk, captured: DiskImage) -> Path:
    """A restore into a config with a kept layer: a 0600 copy of the snapshot's captured
    layer (checked to be a standalone qcow2 by the caller) beside the kept layer, which the
    restored VM runs on; :func:`keep_restored` puts it in the kept layer's place."""
    layer = root.layer
    if layer is None:
        raise ValueError("the root disk keeps no layer")
    if await asyncio.to_thread(kept_layer_exists, root):  # a file, in a directory that is there
        await _check_unused(layer)
    tmp = layer.with_name(f".{layer.name}.restore-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        await copy_disk(captured.path, tmp)
        os.chmod(tmp, 0o600)  # the restored VM writes here
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


async def _check_unused(layer: Path) -> None:
    """A :class:`SnapshotError` when a running VM writes ``layer``: the restore would put
    another file in its place under it, and what that VM wrote next would be lost. QEMU locks
    the images it writes, and ``qemu-img info`` of a qcow2 fails on a held lock (a raw
    open shares the file with writers). Only a standalone qcow2, the one kind of kept layer a
    QEMU runs on, is opened, its backing and format spelled out. No qemu-img: no check."""
    qemu_img = shutil.which("qemu-img")
    try:
        await asyncio.to_thread(standalone_qcow2_size, layer)
    except ConfigError:
        return  # not a layer any VM runs on: the restore replaces it
    if qemu_img is None:
        return
    node = image_node(DiskImage(layer, DiskFormat.QCOW2), read_only=True)
    spec = "json:" + json.dumps(node, separators=(",", ":"), ensure_ascii=False)
    with tempfile.TemporaryFile() as err:
        proc = await spawn([qemu_img, "info", spec], name="qemu-img", stderr=err)
        try:
            rc = await proc.wait()
        except BaseException:
            await proc.kill()
            raise
        err.seek(0)
        message = err.read(4096).decode(errors="replace").strip()
    if rc != 0:
        why = (
            "a VM is running on it (QEMU holds its lock)"
            if "lock" in message
            else f"qemu-img cannot open it ({message.splitlines()[-1] if message else rc})"
        )
        raise SnapshotError(
            f"cannot restore into the root disk's layer {str(layer)!r}: {why}. Stop the VM "
            "that runs on it first, or restore into a config whose root disk keeps its "
            "layer in another file"
        )


def keep_restored(root: RootDisk | None, layer: Path | None) -> Path | None:
    """After a restore's state has loaded: the copy :func:`restore_copy` made replaces the
    kept layer (QEMU keeps its open file); returns the layer the VM now runs on."""
    if root is None or root.layer is None or layer is None or layer == root.layer:
        return layer
    os.replace(layer, root.layer)
    return root.layer


async def capture(
    layer: Path, base: DiskImage, middle: DiskImage | None, dst: Path, log_path: Path
) -> str:
    """Capture a paused VM's root layer into the new file ``dst`` (0400, fsynced): one
    standalone qcow2 holding everything the guest wrote over ``base``. A copy of ``layer``
    (reflink or sparse); for a restored run (``middle``: the snapshot's captured layer its own
    lies over), a copy of ``middle`` with a copy of ``layer`` committed into it. Returns how."""
    if middle is None:
        return await copy_disk(layer, dst)
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise SnapshotError("saving a restored VM's root disk needs qemu-img (package qemu-utils)")
    top = dst.with_name(dst.name + ".top")  # the layer, copied: QEMU holds the live one's lock
    try:
        await copy_disk(middle.path, dst)
        os.chmod(dst, 0o600)
        await copy_disk(layer, top)
        node = image_node(DiskImage(top, DiskFormat.QCOW2))
        into = image_node(DiskImage(dst, DiskFormat.QCOW2))
        into["backing"] = image_node(base, read_only=True)
        node["backing"] = into
        spec = "json:" + json.dumps(node, separators=(",", ":"), ensure_ascii=False)
        with open(log_path, "ab") as err:
            proc = await spawn([qemu_img, "commit", "-q", "-d", spec], name="qemu-img", stderr=err)
        try:
            rc = await proc.wait()
        except BaseException:
            await proc.kill()
            raise
        if rc != 0:
            raise SnapshotError(
                f"qemu-img commit failed for the root disk's layer (exit {rc}; see "
                f"{str(log_path)!r})"
            )
        standalone_qcow2_size(dst)  # the commit wrote no file name into its header
        await asyncio.to_thread(fsync_file, dst)
        os.chmod(dst, 0o400)  # guest data, owner-only; never written again
    except BaseException:
        with contextlib.suppress(OSError):
            dst.unlink()
        raise
    finally:
        with contextlib.suppress(OSError):
            top.unlink()
    return "committed"
