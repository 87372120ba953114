"""Durable file updates, written once for the whole package.

:func:`write_atomic` replaces a file so that a reader (or a crash) sees the old content or the
new, never a mix: a fresh temporary file beside the target (created exclusively, never through
a symlink), written, fsynced, then renamed over the target. :func:`fsync_dir` makes renames and
creations in a directory durable (call it after the renames that must survive a power cut),
:func:`fsync_file` a file another process wrote.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

__all__ = ["fsync_dir", "fsync_file", "link_new", "write_atomic"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make renames and creations in directory ``path`` durable.

    A file system that cannot fsync a directory (``EINVAL``: some network and FUSE file
    systems) is left as it is; any other error is raised.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Make the content of the file ``path`` durable (written by someone else: a child
    process, QEMU)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600, fsync: bool = True
) -> None:
    """Replace ``path`` with ``data`` atomically: a new file of ``mode`` (minus the umask;
    0600 by default: owner-only), fsynced unless ``fsync`` is false, then renamed into place.

    On any failure the temporary file is removed and the old ``path`` is untouched.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def link_new(tmp: Path, dest: Path) -> None:
    """``tmp`` (a finished file) becomes ``dest`` unless a file is there already: then
    ``FileExistsError`` and ``tmp`` stays for the caller to delete; else ``tmp`` goes. On a
    file system without hard links: a rename after a look (a narrow race, no worse)."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(dest):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dest)) from None
        os.replace(tmp, dest)
        return
    tmp.unlink()
