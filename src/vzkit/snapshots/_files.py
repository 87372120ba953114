"""The store's file checks: sealing a new snapshot's files and verifying an existing one's.

At save, after the fsyncs, :func:`seal` makes the new files owner-only and read-only (0400)
and checksums them. At restore, :func:`open_members` opens every file the metadata names
relative to the snapshot dir's descriptor (``O_NOFOLLOW``: no symlink; a regular file of the
recorded size; never blocking on a FIFO) and refuses a captured qcow2 whose header names a
backing or data file; :func:`check_digests` then compares the checksums recorded at save (a
restore runs it while the backend builds the VM, which reads nothing saved until they match).
The state file is handed on as ``/proc/self/fd/N`` of the descriptor that was checksummed (on
Linux), so swapping the file after the check changes nothing. Both run in a worker thread
and stop when ``abort`` is set.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .._disk import DiskFormat, standalone_qcow2_size
from .._diskcopy import nonzero_digest_fd, sha256_fd
from ..backends._protocol import CapturedDisk
from ..errors import ConfigError, SnapshotError
from ._record import DISK_DIGEST_PREFIX, STATE_SUFFIX, SnapshotRecord, SnapshotRoot

__all__ = ["Checked", "Opened", "base_digest", "check_digests", "open_members", "seal"]

log = logging.getLogger(__name__)


def seal(state: Path, disks: Sequence[Path], abort: threading.Event) -> list[tuple[str, int]]:
    """At save, after the fsyncs: make the new files owner-only and read-only (0400) and
    checksum them (SHA-256 of the state file, :func:`nonzero_digest_fd` of each disk)."""
    out = []
    for path, digest in [(state, sha256_fd), *((d, nonzero_digest_fd) for d in disks)]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, 0o400)
            t0 = time.perf_counter()
            out.append(digest(fd, abort))
            _log_rate("checksummed", path, out[-1][1], time.perf_counter() - t0)
        finally:
            os.close(fd)
    return out


def _log_rate(what: str, path: Path, size: int, seconds: float) -> None:
    rate = size / max(seconds, 1e-9) / 1e6
    log.info("%s %s: %d bytes in %.3f s (%.0f MB/s)", what, path.name, size, seconds, rate)


@dataclass(frozen=True, slots=True)
class Checked:
    """A snapshot's files, checked: the state file's descriptor (kept open until the backend
    has read it), the path the backend opens it by, and the captured disks."""

    state_fd: int
    state_path: Path
    disks: list[CapturedDisk]


@dataclass(frozen=True, slots=True)
class Opened:
    """A snapshot's files opened and checked for everything but their checksums
    (:func:`open_members`); :func:`check_digests` reads them through the same descriptors.
    ``checked`` is what the backend gets; :meth:`close` lets go of every descriptor."""

    checked: Checked
    #: ``(descriptor, path, kind, recorded digest)`` of every file to checksum; ``kind`` is
    #: ``state`` (the state file, whose descriptor ``checked`` holds), ``disk`` or ``base``
    #: (the restoring VM's root disk base, when the snapshot recorded its content checksum).
    members: list[tuple[int, Path, str, str]]
    #: The root disk's base as the snapshot recorded it (messages only).
    root: SnapshotRoot | None = None

    def close(self) -> None:
        for fd, _, kind, _ in self.members:
            if kind != "state":
                os.close(fd)
        os.close(self.checked.state_fd)


def open_members(
    sdir: Path, record: SnapshotRecord, base: Path | None, abort: threading.Event
) -> Opened:
    """Open each file the metadata names inside ``sdir``: no symlink, a regular file of the
    recorded size, a captured qcow2 standalone; and ``base`` (the restoring VM's root disk
    base) when the snapshot recorded a content checksum of its base. Cheap: no file is read
    beyond a header."""
    name = record.name
    members: list[tuple[int, Path, str, str]] = []
    disks = []
    dir_fd = os.open(sdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for disk in record.disks:
            fd = _open_member(dir_fd, sdir, name, disk.file, disk.size, "disk image")
            members.append((fd, sdir / disk.file, "disk", disk.digest))
            if disk.format is DiskFormat.QCOW2:
                _check_qcow2(fd, name, sdir / disk.file)
            disks.append(CapturedDisk(disk.role, Path(disk.source), sdir / disk.file, disk.format))
        root = record.root
        if root is not None and base is not None and root.digest.startswith(DISK_DIGEST_PREFIX):
            members.append((_open_base(base, name, root), base, "base", root.digest))
        state = sdir / (name + STATE_SUFFIX)
        fd = _open_member(dir_fd, sdir, name, state.name, record.size or 0, "state file")
    except BaseException:
        for member_fd, *_ in members:
            os.close(member_fd)
        raise
    finally:
        os.close(dir_fd)
    members.append((fd, state, "state", record.state_sha256 or ""))
    return Opened(Checked(fd, _fd_path(fd, state), disks), members, record.root)


def check_digests(opened: Opened, name: str, abort: threading.Event) -> None:
    """Compare each opened file's checksum with the recorded one (SHA-256 of the state file,
    :func:`nonzero_digest_fd` of each disk and of a root disk's base); ``SnapshotError``
    names the first that differs."""
    for fd, path, kind, recorded in opened.members:
        t0 = time.perf_counter()
        if kind == "state":
            digest, size = sha256_fd(fd, abort)
        else:
            digest, size = nonzero_digest_fd(fd, abort)
            digest = DISK_DIGEST_PREFIX + digest
        _log_rate("verified", path, size, time.perf_counter() - t0)
        if digest != recorded:
            if kind == "base" and opened.root is not None:
                raise base_changed(name, opened.root, path, digest)
            raise _altered(name, path)


def base_digest(path: Path, abort: threading.Event) -> str:
    """The content checksum (:data:`DISK_DIGEST_PREFIX`) of a root disk's base that has no
    digest of its own (a save records it; blocking)."""
    fd = _open_base(path, "", None)
    try:
        digest, _ = nonzero_digest_fd(fd, abort)
    finally:
        os.close(fd)
    return DISK_DIGEST_PREFIX + digest


def base_changed(name: str, saved: SnapshotRoot, base: Path, digest: str) -> SnapshotError:
    """The refusal of a restore onto a base other than the one the snapshot's root layer lies
    over: which base, and what to do."""
    gone = "" if os.path.exists(saved.base) else "; that file no longer exists"
    return SnapshotError(
        f"snapshot {name!r} was saved on the root disk base {saved.base!r} ({saved.digest}"
        f"{gone}), but this VM's base {str(base)!r} is {digest or 'a base without a digest'}: "
        "its root disk layer only fits the base it was saved on. Restore with that base (the "
        "same --rootfs tree or image, unchanged), or boot on this one and save the snapshot "
        "again"
    )


def _open_base(base: Path, name: str, root: SnapshotRoot | None) -> int:
    """The root disk base the restoring (or saving) VM's config names, opened read-only: a
    regular file, never blocking on a FIFO."""
    try:
        fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        if root is not None and err.errno == errno.ENOENT:
            raise base_changed(name, root, base, "missing") from None
        raise SnapshotError(
            f"cannot open the root disk base {str(base)!r}: {err.strerror}"
        ) from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SnapshotError(f"the root disk base {str(base)!r} is not a regular file")
    return fd


def _altered(name: str, path: Path) -> SnapshotError:
    return SnapshotError(
        f"snapshot {name!r} is damaged: the checksum of {str(path)!r} does not match the one "
        "recorded when it was saved (the file was altered or corrupted); delete the snapshot "
        "and save it again"
    )


def _open_member(dir_fd: int, sdir: Path, name: str, file: str, size: int, what: str) -> int:
    """``file`` (a plain name) opened read-only inside the directory ``dir_fd``: a regular
    file of ``size`` bytes, never through a symlink, never blocking on a FIFO."""
    path = sdir / file
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(file, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {name!r} is missing its {what} {str(path)!r}") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise SnapshotError(
                f"snapshot {name!r}: its {what} {str(path)!r} is a symlink, refused (a "
                "snapshot's files are its own, never links to other files)"
            ) from None
        raise SnapshotError(f"cannot open {str(path)!r}: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(
                f"snapshot {name!r}: its {what} {str(path)!r} is not a regular file"
            )
        if st.st_size != size:
            raise SnapshotError(
                f"snapshot {name!r} is damaged: its {what} {str(path)!r} has {st.st_size} bytes, "
                f"its metadata says {size} (truncated or altered); delete the snapshot and save "
                "it again"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_qcow2(fd: int, name: str, path: Path) -> None:
    """A captured qcow2 is standalone: no backing file, no external data file (else its
    header could make QEMU open any host file behind the restored guest's disk). The header
    is read from the descriptor that is checksummed (``_disk.standalone_qcow2_size``)."""
    try:
        standalone_qcow2_size(path, fd=fd)
    except ConfigError as err:
        raise SnapshotError(f"snapshot {name!r}: {err}") from err


def _fd_path(fd: int, real: Path) -> Path:
    """A path that opens the very file behind ``fd`` (Linux: ``/proc/self/fd/N``), so what
    the backend reads is what was checksummed even if ``real`` is replaced meanwhile."""
    proc = Path(f"/proc/self/fd/{fd}")
    return proc if sys.platform == "linux" and proc.exists() else real
