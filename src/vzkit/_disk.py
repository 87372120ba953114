"""Disk images: sparse raw files (always) and qcow2 (through ``qemu-img`` when installed)."""

from __future__ import annotations

import enum
import os
import shutil
import subprocess
from pathlib import Path

from .errors import BackendUnavailableError, ConfigError, VzkitError

__all__ = ["DiskFormat", "create_disk_image", "detect_disk_format"]

_GIB = 1 << 30
_QCOW2_MAGIC = b"QFI\xfb"


class DiskFormat(enum.StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


def create_disk_image(
    path: str | os.PathLike[str], size_gb: int, *, format: DiskFormat | str = DiskFormat.RAW
) -> Path:
    """Create a disk image of exactly ``size_gb`` GiB at ``path`` and return its path.

    Raw images are sparse (no blocks allocated). An existing file is left untouched, as the
    seed does, whatever its size. ``qcow2`` needs ``qemu-img``.
    """
    if not isinstance(size_gb, int) or isinstance(size_gb, bool) or size_gb <= 0:
        raise ConfigError(f"size_gb must be a positive integer, got {size_gb!r}")
    try:
        fmt = DiskFormat(format)
    except ValueError:
        raise ConfigError(
            f"unknown disk format {format!r}; expected one of: "
            + ", ".join(f.value for f in DiskFormat)
        ) from None
    target = Path(path).expanduser().absolute()
    if target.exists():
        if target.is_dir():
            raise ConfigError(f"cannot create disk image: {str(target)!r} is a directory")
        return target
    if not target.parent.is_dir():
        raise ConfigError(
            f"cannot create disk image: directory {str(target.parent)!r} does not exist"
        )
    if fmt is DiskFormat.QCOW2:
        _create_qcow2(target, size_gb)
        return target
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return target  # lost a race with another creator: leave theirs alone
    except OSError as err:
        raise VzkitError(f"cannot create disk image {str(target)!r}: {err.strerror}") from err
    try:
        os.ftruncate(fd, size_gb * _GIB)
    except OSError as err:
        os.close(fd)
        target.unlink(missing_ok=True)
        raise VzkitError(f"cannot size disk image {str(target)!r}: {err.strerror}") from err
    os.close(fd)
    return target


def _create_qcow2(target: Path, size_gb: int) -> None:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise BackendUnavailableError(
            "creating a qcow2 image needs qemu-img (Debian/Ubuntu: apt-get install qemu-utils; "
            "macOS: brew install qemu)"
        )
    argv = [qemu_img, "create", "-q", "-f", "qcow2", str(target), f"{size_gb}G"]
    proc = subprocess.run(
        argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        target.unlink(missing_ok=True)
        raise VzkitError(f"qemu-img create failed for {str(target)!r}: {proc.stderr.strip()}")


def detect_disk_format(path: str | os.PathLike[str]) -> DiskFormat:
    """``qcow2`` when the file starts with the qcow2 magic, else ``raw``."""
    with open(path, "rb") as fh:
        return DiskFormat.QCOW2 if fh.read(4) == _QCOW2_MAGIC else DiskFormat.RAW
