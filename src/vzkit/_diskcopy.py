"""Copying disk images fast and sparsely: a reflink where the file system has them, else
only the allocated ranges (``SEEK_DATA``/``SEEK_HOLE``), skipping all-zero blocks.

Used by snapshots to capture a writable disk at the instant its machine state was saved.
The copy runs in a worker thread; cancelling the awaiting coroutine stops the copy at the
next block and removes the partial file before the cancellation propagates. Copies are
owner-only (0400): they hold guest data.

Also the checksums snapshots record: :func:`sha256_fd` (plain SHA-256 of a file) and
:func:`nonzero_digest_fd` (SHA-256 over a file's non-zero 1 MiB blocks, so the holes of a
sparse disk cost nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import sys
import threading
from pathlib import Path

from ._fsutil import fsync_dir  # re-exported: the snapshot commit imports it from here
from .errors import SnapshotError

__all__ = [
    "CopyAborted",
    "copy_disk",
    "copy_disk_sync",
    "fsync_dir",
    "nonzero_digest_fd",
    "sha256_fd",
]

#: ``FICLONE`` (Linux ``_IOW(0x94, 9, int)``): share all extents of another file (btrfs, xfs).
_FICLONE = 0x40049409
_CHUNK = 1 << 20
_ZERO = bytes(_CHUNK)


class CopyAborted(SnapshotError):
    """The copy (or checksum) was stopped from outside (its coroutine was cancelled)."""


def _reflink(src: int, dst: int) -> bool:
    if sys.platform != "linux":
        return False
    import fcntl

    try:
        fcntl.ioctl(dst, _FICLONE, src)
    except OSError:
        return False
    return True


def _ranges(src: int, size: int) -> list[tuple[int, int]]:
    """The allocated ``(start, end)`` ranges of ``src``; everything when holes are unknown."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # no data after pos
                break
            return [(0, size)]  # SEEK_DATA unsupported here
        end = os.lseek(src, start, os.SEEK_HOLE)
        out.append((start, min(end, size)))
        pos = end
    return out


def _copy_range(src: int, dst: int, start: int, end: int, abort: threading.Event | None) -> int:
    """Copy ``[start, end)``, leaving all-zero blocks as holes; returns the bytes written."""
    written = 0
    pos = start
    while pos < end:
        if abort is not None and abort.is_set():
            raise CopyAborted
        n = min(_CHUNK, end - pos)
        data = os.pread(src, n, pos)
        if not data:
            break
        if data != _ZERO[: len(data)]:
            view = memoryview(data)
            off = 0
            while off < len(view):
                off += os.pwrite(dst, view[off:], pos + off)
            written += len(data)
        pos += len(data)
    return written


def copy_disk_sync(src: Path, dst: Path, abort: threading.Event | None = None) -> str:
    """Copy ``src`` to the new file ``dst`` (fsynced, mode 0400: owner-only, never written
    again); returns ``"reflink"`` or ``"sparse"``. On any failure ``dst`` is removed."""
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(src_fd).st_size
            if _reflink(src_fd, dst_fd):
                method = "reflink"
            else:
                method = "sparse"
                for start, end in _ranges(src_fd, size):
                    _copy_range(src_fd, dst_fd, start, end, abort)
                os.ftruncate(dst_fd, size)
            os.fsync(dst_fd)
            os.fchmod(dst_fd, 0o400)  # guest data, never written again
        except BaseException:
            os.close(dst_fd)
            with contextlib.suppress(OSError):
                os.unlink(dst)
            raise
        os.close(dst_fd)
    finally:
        os.close(src_fd)
    return method


def sha256_fd(fd: int, abort: threading.Event | None = None) -> tuple[str, int]:
    """SHA-256 (hex) of everything ``fd`` holds, read from offset 0 in 1 MiB blocks without
    moving its offset, and the number of bytes hashed."""
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    pos = 0
    while True:
        if abort is not None and abort.is_set():
            raise CopyAborted
        n = os.preadv(fd, [buf], pos)
        if n == 0:
            return digest.hexdigest(), pos
        digest.update(view[:n])
        pos += n


def nonzero_digest_fd(fd: int, abort: threading.Event | None = None) -> tuple[str, int]:
    """A checksum of a disk image that skips its holes: SHA-256 over
    ``b"vzkit-nonzero-1m\\n"``, the size (8 bytes, big-endian), then for each 1 MiB block
    (from offset 0; the last one may be short) that holds a non-zero byte, its index (8 bytes,
    big-endian) and its bytes. The value depends on the content only (a hole and written
    zeros are the same), not on how the file system stores it. Returns the hex digest and
    the size."""
    size = os.fstat(fd).st_size
    digest = hashlib.sha256(b"vzkit-nonzero-1m\n" + size.to_bytes(8, "big"))
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    done = 0  # blocks before this one are hashed or known to be holes
    for start, end in _ranges(fd, size):
        for index in range(max(done, start // _CHUNK), (end + _CHUNK - 1) // _CHUNK):
            if abort is not None and abort.is_set():
                raise CopyAborted
            n = os.preadv(fd, [buf], index * _CHUNK)
            if n != min(_CHUNK, size - index * _CHUNK):
                raise OSError(errno.EIO, "the file changed while it was checksummed")
            # bytearray against bytes is a memcmp (a memoryview compares byte by byte)
            if (buf if n == _CHUNK else buf[:n]) != _ZERO[:n]:
                digest.update(index.to_bytes(8, "big"))
                digest.update(view[:n])
            done = index + 1
    return digest.hexdigest(), size


async def copy_disk(src: Path, dst: Path) -> str:
    """:func:`copy_disk_sync` in a worker thread; cancellation stops it and removes ``dst``."""
    abort = threading.Event()
    work = asyncio.ensure_future(asyncio.to_thread(copy_disk_sync, src, dst, abort))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        abort.set()
        with contextlib.suppress(CopyAborted, OSError):
            await work
        with contextlib.suppress(OSError):
            os.unlink(dst)
        raise
