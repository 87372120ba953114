"""A root disk's per-VM layer on the vz backend: a writable copy of the raw base.

Virtualization attaches raw images only, so the layer is a whole image: an APFS clone
(``clonefile(2)``: instant, and copy-on-write at the block level, so it takes no space until
the guest writes) on macOS, else a reflink or a sparse copy (``_diskcopy``). The machine makes
it at its first start in its private state dir and deletes it at close (``docs/images.md``).

A kept layer (``RootDisk.layer``) is such a copy at the config's path: made there at the
first start if missing (never over a file another start made meanwhile), reused by later
starts once it is a regular file of the base's size, never deleted here. A restore copies
the snapshot's layer over it, as it copies a snapshot's disk over the config's.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from pathlib import Path

from ..._disk import RootDisk, kept_layer_exists, wrong_layer
from ..._diskcopy import copy_disk_sync
from ..._fsutil import link_new
from ...errors import ConfigError, VMError

__all__ = ["LAYER_NAME", "clone_base", "open_layer", "remove_layer", "restore_target"]

LAYER_NAME = "root-layer.img"
_CLONE_NOFOLLOW = 0x0001  # <sys/clonefile.h>: do not follow a symlink at the source


def _clonefile(src: Path, dst: Path) -> bool:
    """``clonefile(src, dst, CLONE_NOFOLLOW)`` (macOS 10.12+, APFS); False where it cannot."""
    if sys.platform != "darwin":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        clonefile = libc.clonefile
    except (OSError, AttributeError):
        return False
    clonefile.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint32]
    clonefile.restype = ctypes.c_int
    return int(clonefile(os.fsencode(src), os.fsencode(dst), _CLONE_NOFOLLOW)) == 0


def open_layer(root: RootDisk, state_dir: Path) -> Path:
    """The layer a start runs on: ``root``'s kept layer (checked when it is there, made when
    it is not), else a fresh copy of the run in ``state_dir``."""
    if root.layer is None:
        dest = state_dir / LAYER_NAME
        clone_base(root.base, dest)
        return dest
    if not kept_layer_exists(root):
        try:
            clone_base(root.base, root.layer, exclusive=True)
            return root.layer
        except FileExistsError:
            pass  # another start made it meanwhile: check that one
    try:
        base_size, size = root.base.stat().st_size, root.layer.stat().st_size
    except OSError as err:
        raise ConfigError(f"cannot read the root disk or its layer: {err}") from err
    if size != base_size:  # a raw copy of the base has its size (a qcow2 from qemu has not)
        raise wrong_layer(root.layer, f"is {size} bytes and the base {base_size}")
    return root.layer


def restore_target(root: RootDisk, state_dir: Path) -> Path:
    """Where a restore copies the snapshot's root layer: the kept layer (checked to be a
    file whose directory is there), else the run's layer in ``state_dir``."""
    if root.layer is None:
        state_dir.mkdir(parents=True, exist_ok=True)
        return state_dir / LAYER_NAME
    kept_layer_exists(root)
    return root.layer


def clone_base(base: Path, dest: Path, *, exclusive: bool = False) -> str:
    """A writable 0600 copy of ``base`` at ``dest`` (replaced if it exists; ``exclusive``:
    left alone, ``FileExistsError``); returns how: ``clonefile``, ``reflink`` or ``sparse``."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        method = "clonefile" if _clonefile(base, tmp) else copy_disk_sync(base, tmp)
        os.chmod(tmp, 0o600)  # the guest writes here (a copy is 0400, a clone the base's mode)
        if exclusive:
            link_new(tmp, dest)
        else:
            os.replace(tmp, dest)
    except FileExistsError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise VMError(
            f"cannot make the root disk's layer {str(dest)!r} from {str(base)!r}: {err}"
        ) from err
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return method


def remove_layer(layer: Path | None, root: RootDisk | None = None) -> None:
    """Delete a layer of the run; ``root``'s kept layer is never deleted."""
    if layer is not None and (root is None or layer != root.layer):
        with contextlib.suppress(OSError):
            layer.unlink()
