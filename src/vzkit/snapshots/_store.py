"""The store layer: one snapshot directory on disk, written atomically, read strictly.

Every backend's snapshots go through here (the operations in :mod:`._ops` call it; no backend
writes snapshot files of its own):

* a save's files are written under temporary names (a leading dot: the catalogue ignores
  them) carrying the save's token, sealed (:func:`._files.seal`), then committed by
  :meth:`SnapshotStore.commit`: renamed into place, the metadata last, and the directory
  fsynced. Captured disks get names unique to one save (``<name>.<token>.disk0.raw``), so a
  new save never overwrites the disks an older snapshot of the same name still points to;
  the older state and metadata are kept as hard links until the new metadata is in place,
  so a failure at any step leaves the older snapshot whole;
* reading (:meth:`SnapshotStore.checked`) parses the metadata with
  :meth:`~._record.SnapshotRecord.from_json`; :meth:`SnapshotStore.open_members` opens and
  checks the files themselves, :func:`._files.check_digests` their checksums;
* the snapshot dir is 0700 and every file a save writes is owner-only (0400 or 0600).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import secrets
import stat
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .._diskcopy import fsync_dir
from ..backends._protocol import CapturedDisk
from ..errors import SnapshotError
from . import _files
from ._record import (
    MAX_META_BYTES,
    META_SUFFIX,
    STATE_SUFFIX,
    TOKEN_HEX,
    SnapshotMeta,
    SnapshotRecord,
    check_snapshot_name,
    disk_file_re,
)

__all__ = ["SnapshotStore", "make_private_dir", "read_metadata"]

log = logging.getLogger(__name__)
_SEED_KEYS = frozenset({"name", "created", "size", "vmState", "filePath"})


class SnapshotStore:
    """The snapshots of one directory (``<vm_dir>/snapshots``)."""

    def __init__(self, snapshot_dir: Path) -> None:
        self.snapshot_dir = snapshot_dir

    def state_path(self, name: str) -> Path:
        return self.snapshot_dir / (check_snapshot_name(name) + STATE_SUFFIX)

    def meta_path(self, name: str) -> Path:
        return self.snapshot_dir / (check_snapshot_name(name) + META_SUFFIX)

    def disk_files(self, name: str) -> list[Path]:
        """Every captured-disk file of snapshot ``name``, referenced or left over."""
        pattern = disk_file_re(name)
        try:
            return [p for p in self.snapshot_dir.iterdir() if pattern.fullmatch(p.name)]
        except FileNotFoundError:
            return []

    # -- reading -----------------------------------------------------------------------------

    def list(self) -> list[SnapshotMeta]:
        """Every snapshot with a state file, newest first.

        Forgiving, so a damaged snapshot can still be seen and deleted: one whose metadata
        is invalid is listed from its state file alone (file time, no extras) with a warning;
        :meth:`get` and :meth:`restore` refuse it with the :class:`SnapshotError` naming the
        field. Files that cannot be snapshots (bad names, symlinks, directories) are skipped.
        """
        try:
            entries = sorted(self.snapshot_dir.iterdir())
        except FileNotFoundError:
            return []
        except OSError as err:
            raise SnapshotError(f"cannot list {str(self.snapshot_dir)!r}: {err.strerror}") from err
        metas = []
        for entry in entries:
            if entry.suffix != STATE_SUFFIX or entry.name.startswith("."):
                continue
            name = entry.name[: -len(STATE_SUFFIX)]
            try:
                check_snapshot_name(name)
            except SnapshotError as err:
                log.warning("skipping %s: %s", entry, err)
                continue
            loaded = self.load(name, strict=False)
            if loaded is not None:
                metas.append(loaded[0])
        metas.sort(key=lambda m: (m.created, m.name), reverse=True)
        return metas

    def get(self, name: str) -> SnapshotMeta:
        """The entry for ``name``; :class:`SnapshotError` when there is none or when its
        metadata is invalid (naming the field)."""
        return self.checked(name)[0]

    def checked(self, name: str) -> tuple[SnapshotMeta, SnapshotRecord | None]:
        """The entry for ``name`` and its checked metadata (``None``: no metadata file)."""
        loaded = self.load(check_snapshot_name(name), strict=True)
        if loaded is None:
            raise SnapshotError(f"no snapshot named {name!r} in {str(self.snapshot_dir)!r}")
        return loaded

    def load(self, name: str, *, strict: bool) -> tuple[SnapshotMeta, SnapshotRecord | None] | None:
        state = self.state_path(name)
        try:
            st = os.lstat(state)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise SnapshotError(f"cannot read {str(state)!r}: {err.strerror}") from err
        if not stat.S_ISREG(st.st_mode):
            if not strict:
                return None
            raise SnapshotError(
                f"snapshot {name!r}: {str(state)!r} is not a regular file (a symlink, a "
                "directory or a device is never one vzkit wrote); remove it"
            )
        record: SnapshotRecord | None = None
        data: dict[str, Any] = {}
        try:
            loaded = read_metadata(self.meta_path(name))
            if loaded is not None:
                record = SnapshotRecord.from_json(name, loaded)
                assert isinstance(loaded, dict)
                data = loaded
        except SnapshotError as err:
            if strict:
                raise
            log.warning("%s; listing it from its state file alone", err)
        created = datetime.fromtimestamp(st.st_mtime, tz=UTC)
        if record is not None and record.created is not None:
            created = record.created
        vm_state = record.vm_state if record is not None else None
        extra = tuple(sorted((k, v) for k, v in data.items() if k not in _SEED_KEYS))
        meta = SnapshotMeta(
            name=name,
            created=created,
            size=st.st_size,
            vm_state=vm_state or "",
            file_path=state,
            extra=extra,
        )
        return meta, record

    def open_members(
        self, record: SnapshotRecord, base: Path | None, abort: threading.Event
    ) -> _files.Opened:
        """Open every file ``record`` names (and ``base``, the restoring VM's root disk base,
        when the record holds its content checksum) and check all but the checksums
        (blocking)."""
        return _files.open_members(self.snapshot_dir, record, base, abort)

    # -- writing -----------------------------------------------------------------------------

    def begin(self, name: str) -> str:
        """A new save of ``name``: the 0700 directory exists; returns the save's token."""
        check_snapshot_name(name)
        make_private_dir(self.snapshot_dir)
        return secrets.token_hex(TOKEN_HEX // 2)

    def temp_state(self, name: str, token: str) -> Path:
        """Where a save writes its state file before the commit."""
        return self.snapshot_dir / f".{name}.{token}{STATE_SUFFIX}.tmp"

    def temp_prefix(self, name: str, token: str) -> str:
        """The prefix of the save's captured disks before the commit."""
        return f".{name}.{token}."

    def seal(
        self, state: Path, disks: Sequence[Path], abort: threading.Event
    ) -> builtins.list[tuple[str, int]]:
        """0400 and checksummed: ``(hex, size)`` of the state file, then of each disk."""
        return _files.seal(state, disks, abort)

    def discard(self, name: str, token: str) -> None:
        """Remove every file a failed save made (they all carry its token)."""
        mine = self.temp_prefix(name, token)
        with contextlib.suppress(OSError):
            _unlink(*(p for p in self.snapshot_dir.iterdir() if p.name.startswith(mine)))

    def commit(
        self, record: SnapshotRecord, tmp_state: Path, captured: Sequence[CapturedDisk]
    ) -> None:
        """Rename a sealed save into place, metadata last, and fsync the directory.

        ``captured`` are the save's disks under their temporary names; ``record`` names them
        by their final names. Synchronous, so no cancellation can split it. The older
        snapshot's state and metadata are kept as hard links until the end: on any failure
        they are put back and the new files removed, so the older snapshot of the name stays
        whole.
        """
        sdir, name, token = self.snapshot_dir, record.name, record.token
        state, meta_path = self.state_path(name), self.meta_path(name)
        meta_tmp = sdir / f".{name}.{token}{META_SUFFIX}.tmp"
        backups: dict[Path, Path | None] = {}
        for path in (state, meta_path):
            link = sdir / f".{path.name}.{token}.old"
            try:
                os.link(path, link)
                backups[path] = link
            except FileNotFoundError:
                backups[path] = None
        finals: list[Path] = []
        try:
            for disk in captured:
                final = sdir / disk.path.name.lstrip(".")
                os.replace(disk.path, final)
                finals.append(final)
            _write_new(meta_tmp, json.dumps(record.to_json(), indent=2) + "\n")
            os.replace(tmp_state, state)
            os.replace(meta_tmp, meta_path)
            fsync_dir(sdir)
        except BaseException:
            for path, saved in backups.items():  # back to the older snapshot (or none)
                with contextlib.suppress(OSError):
                    if saved is not None:
                        os.replace(saved, path)
                    else:
                        path.unlink(missing_ok=True)
            _unlink(meta_tmp, *finals)
            raise
        finally:
            _unlink(*(b for b in backups.values() if b is not None))
        keep = {d.file for d in record.disks}
        for old in self.disk_files(name):  # the disks of the snapshot this one replaced
            if old.name not in keep:
                _unlink(old)

    def delete(self, name: str) -> None:
        """Remove a snapshot's state, metadata and captured disks; :class:`SnapshotError` if
        it does not exist. VMs running from it keep their open files."""
        state, meta = self.state_path(name), self.meta_path(name)
        if not state.exists() and not meta.exists():
            raise SnapshotError(f"no snapshot named {name!r} in {str(self.snapshot_dir)!r}")
        # Metadata first: a crash in between leaves a state file that still lists, never
        # metadata that points at nothing.
        for path in (meta, state, *self.disk_files(name)):
            try:
                path.unlink(missing_ok=True)
            except OSError as err:
                raise SnapshotError(f"cannot delete {str(path)!r}: {err.strerror}") from err


def make_private_dir(path: Path) -> None:
    """Create ``path`` and its missing parents as 0700 (whatever the umask); an existing
    ``path`` of ours that others can read is tightened to 0700."""
    missing = []
    parent = path
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)  # the umask can only remove bits
    st = os.stat(path)
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        os.chmod(path, 0o700)


def _unlink(*paths: Path | None) -> None:
    for path in paths:
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()


def _write_new(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        data = text.encode()
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_metadata(path: Path) -> object | None:
    """The parsed JSON at ``path`` (``None`` if there is none); :class:`SnapshotError` if it
    is not a regular file, too large or not JSON. Never follows a symlink, never blocks on a
    FIFO."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise SnapshotError(f"cannot read snapshot metadata {str(path)!r}: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_META_BYTES:
            raise SnapshotError(
                f"snapshot metadata {str(path)!r} is not a regular file of at most "
                f"{MAX_META_BYTES} bytes; it was not written by vzkit (remove the snapshot)"
            )
        with os.fdopen(os.dup(fd), "rb") as fh:
            raw = fh.read(MAX_META_BYTES + 1)
    except OSError as err:
        raise SnapshotError(f"cannot read snapshot metadata {str(path)!r}: {err.strerror}") from err
    finally:
        os.close(fd)
    try:
        data: object = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise SnapshotError(
            f"snapshot metadata {str(path)!r} is not valid JSON ({err}); delete the snapshot "
            "and save it again"
        ) from None
    return data
