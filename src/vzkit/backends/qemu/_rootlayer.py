"""A root disk's per-VM copy-on-write layer on the qemu backend.

The layer is an empty qcow2 file in the machine's private state dir whose header names no
backing file: QEMU is given the base on the command line, in its stated format and read-only
(``_argv.root_disk_args``), so neither QEMU nor qemu-img ever probes the base's format or
follows a name in a header. The machine makes the layer at its first start (a stale one left
in a named state dir by a crashed process is replaced) and deletes it at close; a VM started
again keeps what it wrote. Made with ``qemu-img create``: 15 ms here (``docs/images.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

from ..._disk import DiskFormat, RootDisk, standalone_qcow2_size
from ..._process import spawn
from ...errors import BackendUnavailableError, ConfigError, VMError

__all__ = ["LAYER_NAME", "create_layer", "remove_layer"]

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
    """A fresh, empty 0600 layer over ``root``'s base in ``state_dir`` (qemu-img's messages go
    to ``log_path``)."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise BackendUnavailableError(
            "a root disk needs qemu-img for its copy-on-write layer (Debian/Ubuntu: apt-get "
            "install qemu-utils; macOS: brew install qemu)"
        )
    size = await asyncio.to_thread(_base_size, root)
    layer = state_dir / LAYER_NAME
    tmp = state_dir / f".{LAYER_NAME}.tmp-{os.getpid()}"
    argv = [qemu_img, "create", "-q", "-f", "qcow2", str(tmp), str(size)]
    with open(log_path, "ab") as err:
        proc = await spawn(argv, name="qemu-img", stderr=err)
    try:
        rc = await proc.wait()
        if rc != 0:
            raise VMError(
                f"cannot create the root disk's layer {str(tmp)!r} (qemu-img exit {rc}; see "
                f"{str(log_path)!r})"
            )
        os.chmod(tmp, 0o600)  # the guest's writes land here: qemu-img honours the umask
        os.replace(tmp, layer)
    except BaseException:
        await proc.kill()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return layer


def remove_layer(layer: Path | None) -> None:
    if layer is not None:
        with contextlib.suppress(OSError):
            layer.unlink()
