"""Copying disk images fast and sparsely: a reflink where the file system has them, else
only the allocated ranges (``SEEK_DATA``/``SEEK_HOLE``), skipping all-zero blocks.

Used by snapshots to capture a writable disk at the instant its machine state was saved.
The copy runs in a worker thread; cancelling the awaiting coroutine stops the copy at the
next block and removes the partial file before the cancellation propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sys
import threading
from pathlib import Path

__all__ = ["CopyAborted", "copy_disk", "copy_disk_sync", "fsync_dir"]

#: ``FICLONE`` (Linux ``_IOW(0x94, 9, int)``): share all extents of another file (btrfs, xfs).
_FICLONE = 0x40049409
_CHUNK = 1 << 20
_ZERO = bytes(_CHUNK)


class CopyAborted(Exception):
    """The copy was stopped from outside (its coroutine was cancelled)."""


def fsync_dir(path: Path) -> None:
    """Make renames and creations in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """Copy ``src`` to the new file ``dst`` (fsynced, mode 0444); returns ``"reflink"`` or
    ``"sparse"``. On any failure ``dst`` is removed."""
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
            os.fchmod(dst_fd, 0o444)  # a captured disk is never written again
        except BaseException:
            os.close(dst_fd)
            with contextlib.suppress(OSError):
                os.unlink(dst)
            raise
        os.close(dst_fd)
    finally:
        os.close(src_fd)
    return method


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
