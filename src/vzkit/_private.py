"""Files and directories that hold guest data: 0600 files in 0700 directories, whatever the umask.

A guest's console output, its NVRAM, its disk overlay and the logs of the processes serving it
are the guest's data: other local users must not read them. Modes are set explicitly (a
permissive umask such as 0 must not widen them), and files are opened with ``O_NOFOLLOW`` so a
symlink planted in a shared directory does not redirect a write.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import BinaryIO

__all__ = ["open_private", "private_dir", "private_file"]

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """Create ``path`` and any missing parents as 0700 directories; return it.

    A directory that already exists is left as it is (it is the caller's), but one that other
    users can write to is logged: they could replace the files vzkit writes there.
    """
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            continue  # created meanwhile by someone else: it is theirs
        os.chmod(directory, DIR_MODE)  # mkdir's mode is masked by the umask; 0700 only narrows
    if not missing:
        mode = path.stat().st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
            log.warning(
                "%s is writable by other users: they can replace the VM's files there "
                "(use a directory only you can write to)",
                path,
            )
    return path


def _open_fd(path: Path, flags: int, follow_links: bool = False) -> int:
    flags |= os.O_CREAT | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    fd = os.open(path, flags, FILE_MODE)
    try:
        st = os.fstat(fd)
        regular = stat.S_ISREG(st.st_mode)  # never a device such as /dev/null
        if regular and stat.S_IMODE(st.st_mode) != FILE_MODE and st.st_uid == os.geteuid():
            os.fchmod(fd, FILE_MODE)  # a file left by an older vzkit, or made under a umask
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_file(path: Path, *, follow_links: bool = False) -> Path:
    """Make sure ``path`` exists as a 0600 file (others, e.g. QEMU, append to it); return it.

    ``follow_links=True`` is for a path the user named (a console log that is a link on
    purpose); a device or pipe there is used as it is, without a mode change.
    """
    os.close(_open_fd(path, os.O_WRONLY | os.O_APPEND, follow_links))
    return path


def open_private(path: Path, *, append: bool = True) -> BinaryIO:
    """Open ``path`` for binary writing as a 0600 file (appending unless ``append=False``,
    which truncates)."""
    flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
    return os.fdopen(_open_fd(path, flags), "ab" if append else "wb")
