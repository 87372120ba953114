"""A root disk's per-VM layer on the vz backend: a writable copy of the raw base.

Virtualization attaches raw images only, so the layer is a whole image: an APFS clone
(``clonefile(2)``: instant, and copy-on-write at the block level, so it takes no space until
the guest writes) on macOS, else a reflink or a sparse copy (``_diskcopy``). The machine makes
it at its first start in its private state dir and deletes it at close (``docs/images.md``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from pathlib import Path

from ..._diskcopy import copy_disk_sync
from ...errors import VMError

__all__ = ["LAYER_NAME", "clone_base", "remove_layer"]

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


def clone_base(base: Path, dest: Path) -> str:
    """A writable 0600 copy of ``base`` at ``dest`` (replaced if it exists); returns how:
    ``clonefile``, ``reflink`` or ``sparse``."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        method = "clonefile" if _clonefile(base, tmp) else copy_disk_sync(base, tmp)
        os.chmod(tmp, 0o600)  # the guest writes here (a copy is 0400, a clone the base's mode)
        os.replace(tmp, dest)
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


def remove_layer(layer: Path | None) -> None:
    if layer is not None:
        with contextlib.suppress(OSError):
            layer.unlink()
