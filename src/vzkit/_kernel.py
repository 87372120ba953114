"""The kernel ``VZLinuxBootLoader`` can boot, from what distributions ship.

On Apple silicon the framework boots only an uncompressed arm64 Linux ``Image`` (the magic
``ARM\\x64`` at offset 0x38, Documentation/arch/arm64/booting.rst); anything else fails the
start with an opaque error. Distributions ship it compressed: Debian's ``vmlinuz`` is a
gzip stream, Fedora's and Ubuntu's newer ones are EFI zboot images (a PE/COFF stub, ``MZ``,
with ``zimg`` at offset 4, the payload's offset and size at 8 and 12, the compression's name
at 24, drivers/firmware/efi/libstub/zboot-header.S). The format is read from the magic
numbers, never guessed; a compressed kernel is unpacked once into the VM's state directory
(a private directory; reused while the source is unchanged) and its result checked.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import logging
import lzma
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import ConfigError

__all__ = ["ARM64_MAGIC", "kernel_for_vz", "write_arm64_image"]

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
#: The arm64 Image header's magic, at :data:`ARM64_MAGIC_OFFSET`.
ARM64_MAGIC = b"ARM\x64"
ARM64_MAGIC_OFFSET = 0x38
_ZBOOT = struct.Struct("<2s2x4sII8x32s")  # MZ, zimg, payload offset, size, compression
_CHUNK = 1 << 20

Opener = Callable[[BinaryIO], BinaryIO]


def _gunzip(raw: BinaryIO) -> BinaryIO:
    return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]


def _zboot_opener(compression: str) -> Opener | None:
    if compression == "gzip":
        return _gunzip
    if compression in ("lzma", "xzkern"):  # LZMA alone / xz, as the kernel's build writes
        return lambda raw: lzma.LZMAFile(raw)  # type: ignore[return-value]
    if compression == "bzip2":
        return lambda raw: bz2.BZ2File(raw)  # type: ignore[return-value]
    return None


class _Slice:
    """``size`` bytes of ``fh`` from its current position, as a file object."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self._fh, self._left = fh, size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._fh.read(n)
        self._left -= len(data)
        return data

    def readable(self) -> bool:
        return True


def _describe(head: bytes) -> str:
    if head[:4] == b"\x7fELF":
        return "an ELF file (vmlinux?)"
    if head[0x202:0x206] == b"HdrS":
        return "an x86 bzImage"
    if head[:2] == b"MZ":
        return "a PE/COFF file that is not an EFI zboot kernel"
    return "of a format vzkit does not know"


def _check_arm64(head: bytes, shown: str) -> None:
    if head[ARM64_MAGIC_OFFSET : ARM64_MAGIC_OFFSET + 4] != ARM64_MAGIC:
        raise ConfigError(
            f"kernel {shown} is {_describe(head)}, not an arm64 Linux Image: the "
            "Virtualization framework on Apple silicon boots only those (plain, "
            "gzip-compressed or EFI zboot); use the arm64 kernel of your distribution "
            "(e.g. linux-image-arm64's vmlinuz)"
        )


def _unpack(kernel: Path, target: Path, opener: Opener, offset: int, size: int | None) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(kernel, "rb") as raw:
            raw.seek(offset)
            source: BinaryIO = raw if size is None else _Slice(raw, size)  # type: ignore[assignment]
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with opener(source) as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _packing(kernel: Path) -> tuple[bytes, tuple[Opener, int, int | None, str] | None]:
    """The kernel's first bytes, and how it is packed: ``(opener, offset, size, what)``, or
    ``None`` for a plain file. Raises :class:`~vzkit.ConfigError` for an EFI zboot image
    whose compression vzkit cannot read."""
    with open(kernel, "rb") as fh:
        head = fh.read(max(_ZBOOT.size, 0x210))
    if head[:2] == GZIP_MAGIC:
        return head, (_gunzip, 0, None, "gzip-compressed")
    if head[:2] == b"MZ" and head[4:8] == b"zimg" and len(head) >= _ZBOOT.size:
        _, _, offset, size, name = _ZBOOT.unpack_from(head)
        compression = name.split(b"\0", 1)[0].decode("ascii", "replace")
        opener = _zboot_opener(compression)
        if opener is None:
            raise ConfigError(
                f"kernel {str(kernel)!r} is an EFI zboot image compressed with {compression!r} "
                f"(a {compression!r} payload vzkit cannot unpack: it reads gzip, lzma, xz and "
                "bzip2): unpack its payload yourself, or boot the VM with EFI (--efi) from a disk"
            )
        return head, (opener, offset, size, f"an EFI zboot image ({compression})")
    return head, None


def _unpacked(kernel: Path, target: Path, packing: tuple[Opener, int, int | None, str]) -> None:
    """Unpack ``kernel`` into ``target`` (0600, atomic) and check it is an arm64 Image."""
    opener, offset, size, what = packing
    try:
        _unpack(kernel, target, opener, offset, size)
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as err:
        corrupt = what.split()[0] if what.startswith("gzip") else what
        raise ConfigError(
            f"kernel {str(kernel)!r} is {what} but cannot be decompressed "
            f"(corrupt {corrupt} data: {err})"
        ) from err
    log.info("unpacked %s (%s) into %s", kernel, what, target)


def _checked(target: Path, shown: str) -> None:
    with open(target, "rb") as fh:
        try:
            _check_arm64(fh.read(0x210), shown)
        except ConfigError:
            target.unlink(missing_ok=True)
            raise


def write_arm64_image(kernel: Path, target: Path) -> None:
    """Write the raw arm64 ``Image`` of ``kernel`` (plain, gzip or EFI zboot) to ``target``
    (0600, atomic); :class:`~vzkit.ConfigError`, and no ``target``, when it is none."""
    head, packing = _packing(kernel)
    if packing is None:
        _check_arm64(head, repr(str(kernel)))
        packing = (lambda raw: raw, 0, None, "a plain Image")
    _unpacked(kernel, target, packing)
    _checked(target, f"{str(kernel)!r} (unpacked from {packing[3]})")


def kernel_for_vz(kernel: Path, state_dir: Path, *, arm64: bool) -> Path:
    """The kernel to hand ``VZLinuxBootLoader``: ``kernel`` itself when it is an uncompressed
    Image, else its unpacked copy in ``state_dir`` (reused while the source is unchanged). On
    an ``arm64`` host the result must be an arm64 Image (:class:`~vzkit.ConfigError`
    otherwise, naming what the file is)."""
    head, packing = _packing(kernel)
    if packing is None:
        if arm64:
            _check_arm64(head, repr(str(kernel)))
        return kernel
    st = kernel.stat()
    key = f"{kernel}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    target = state_dir / f"kernel-{hashlib.sha256(key).hexdigest()[:16]}.img"
    if not target.is_file():
        _unpacked(kernel, target, packing)
    if arm64:
        _checked(target, f"{str(kernel)!r} (unpacked from {packing[3]})")
    return target
