"""The snapshot catalogue: ``<vm_dir>/snapshots/<name>.vmstate`` plus ``<name>.json``.

The JSON keeps the Go vzkit's keys (``name``, ``created`` in RFC 3339, ``size``, ``vmState``,
``filePath``) so catalogues written by either implementation load in the other, and adds what
a restore needs (``backend``, ``machine`` + ``configFingerprint``, ``disks``, checksums: see
``docs/snapshots.md``). Captured disks live beside the state as ``<name>.<id>.disk0.<fmt>``.
Listing and deleting is pure file handling and lives here; :meth:`SnapshotManager.save` and
:meth:`SnapshotManager.restore` drive a VM (:mod:`vzkit._snapshot_ops` and the backends).

Snapshot files are untrusted input: :func:`parse_metadata` checks every key it knows (a
mistake is a :class:`SnapshotError` naming the field), every file name in the metadata must be
exactly the name the writer gives it (:func:`disk_file_re`), and ``filePath`` is never used as
a path (the state file is always ``<snapshot_dir>/<name>.vmstate``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._disk import DiskFormat
from .errors import SnapshotError

if TYPE_CHECKING:
    from ._vm import VirtualMachine
    from .backends._protocol import ProgressFn

__all__ = [
    "SnapshotDisk",
    "SnapshotManager",
    "SnapshotMeta",
    "SnapshotRecord",
    "check_snapshot_name",
    "parse_metadata",
]

log = logging.getLogger(__name__)

STATE_SUFFIX = ".vmstate"
META_SUFFIX = ".json"
#: Version of the keys vzkit adds to the seed's JSON. 2: SHA-256 checksums of every file.
FORMAT = 2
#: Hex digits of a save's token (``id``), which is part of its disks' file names.
TOKEN_HEX = 12
#: A metadata file larger than this is not one vzkit wrote.
MAX_META_BYTES = 1 << 20
_SEED_KEYS = frozenset({"name", "created", "size", "vmState", "filePath"})
_TOKEN_RE = re.compile(rf"[0-9a-f]{{{TOKEN_HEX}}}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_ROLE_RE = re.compile(r"disk[0-9]{1,3}")
#: Captured disks are checksummed over their non-zero 1 MiB blocks (see ``docs/snapshots.md``).
DISK_DIGEST_PREFIX = "sha256-nonzero-1m:"
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?P<frac>\.\d+)?(?P<tz>[Zz]|[+-]\d{2}:\d{2})"
)


def check_snapshot_name(name: object) -> str:
    """Return ``name`` if it is a safe snapshot name, else raise :class:`SnapshotError`.

    Names become file names: empty names, path separators, ``..``, control characters (C0,
    DEL, C1: they garble terminals and logs) and a leading dot (reserved for temporary files)
    are refused before anything touches the disk.
    """
    if not isinstance(name, str):
        raise SnapshotError(f"snapshot name must be a string, got {type(name).__name__}")
    if not name:
        raise SnapshotError("snapshot name must not be empty")
    for bad, what in (("\x00", "a NUL byte"), ("/", "'/'"), ("\\", "'\\'"), ("..", "'..'")):
        if bad in name:
            raise SnapshotError(f"invalid snapshot name {name!r}: it contains {what}")
    control = next((c for c in name if c < " " or "\x7f" <= c <= "\x9f"), None)
    if control is not None:
        raise SnapshotError(
            f"invalid snapshot name {name!r}: it contains the control character "
            f"U+{ord(control):04X} (use letters, digits and punctuation)"
        )
    if name.startswith("."):
        raise SnapshotError(f"invalid snapshot name {name!r}: it starts with '.'")
    if len(name.encode()) > 200:
        raise SnapshotError(f"invalid snapshot name {name!r}: longer than 200 bytes")
    return name


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (any fraction length, ``Z`` or an offset) to an aware datetime.

    Go writes nanoseconds; Python keeps microseconds, so extra digits are truncated.
    """
    match = _RFC3339.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    norm = text.strip()
    frac = match["frac"]
    if frac and len(frac) > 7:
        norm = norm.replace(frac, frac[:7], 1)
    tz = match["tz"]
    if tz in ("Z", "z"):
        norm = norm[: -len(tz)] + "+00:00"
    return datetime.fromisoformat(norm.replace("t", "T"))


def format_rfc3339(when: datetime) -> str:
    """RFC 3339 with microseconds and an explicit offset (``Z`` for UTC)."""
    if when.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    text = when.isoformat(timespec="microseconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def disk_file_re(name: str) -> re.Pattern[str]:
    """The file names a save gives the captured disks of snapshot ``name``:
    ``<name>.<12 hex>.disk<N>.<format>`` (a :class:`~vzkit.DiskFormat` value)."""
    formats = "|".join(re.escape(f.value) for f in DiskFormat)
    return re.compile(re.escape(name) + rf"\.[0-9a-f]{{{TOKEN_HEX}}}\.disk[0-9]+\.(?:{formats})")


@dataclass(frozen=True, slots=True)
class SnapshotDisk:
    """One checked ``disks[]`` entry: ``file`` is a plain name inside the snapshot dir."""

    role: str
    source: str
    file: str
    format: DiskFormat
    size: int
    digest: str


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """The checked metadata of one snapshot. ``format`` is ``None`` for the seed's (Go) JSON;
    the vzkit keys are checked (and set here) only when ``format`` is :data:`FORMAT`."""

    name: str
    format: int | None
    created: datetime | None
    size: int | None
    vm_state: str | None
    token: str = ""
    backend: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    config_fingerprint: str = ""
    state_sha256: str = ""
    disks: tuple[SnapshotDisk, ...] = ()
    agent: bool = False
    backend_info: dict[str, Any] = field(default_factory=dict)  # the backend's snapshot_info()


class _Fields:
    """Typed reads of one JSON object; every mistake is a :class:`SnapshotError` that names
    the snapshot and the field. ``opt_*`` take a missing key or ``null`` as absent."""

    def __init__(self, name: str, data: dict[str, Any], where: str = "") -> None:
        self.name, self.data, self.where = name, data, where

    def error(self, key: str, problem: str) -> SnapshotError:
        return SnapshotError(
            f"snapshot {self.name!r} has invalid metadata: field {self.where + key!r} {problem} "
            "(the file is damaged or was not written by vzkit: delete the snapshot and save it "
            "again)"
        )

    def _value(self, key: str, kind: type, what: str, required: bool) -> Any:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, "is missing" if key not in self.data else "is null")
            return None
        # bool is an int in Python, never in JSON
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.error(key, f"must be {what}, not {_json_type(value)}")
        return value

    def opt_str(
        self, key: str, *, pattern: re.Pattern[str] | None = None, what: str = "a string"
    ) -> str | None:
        value: str | None = self._value(key, str, what, required=False)
        if value is not None and pattern is not None and not pattern.fullmatch(value):
            raise self.error(key, f"must be {what}, not {_clip(value)!r}")
        return value

    def get_str(
        self, key: str, *, pattern: re.Pattern[str] | None = None, what: str = "a string"
    ) -> str:
        self._value(key, str, what, required=True)
        return str(self.opt_str(key, pattern=pattern, what=what))

    def opt_int(self, key: str) -> int | None:
        value: int | None = self._value(key, int, "a non-negative integer", required=False)
        if value is not None and value < 0:
            raise self.error(key, f"must be a non-negative integer, not {value}")
        return value

    def get_int(self, key: str) -> int:
        self._value(key, int, "a non-negative integer", required=True)
        return int(self.opt_int(key) or 0)

    def get_bool(self, key: str) -> bool:
        return bool(self._value(key, bool, "true or false", required=True))

    def get_dict(self, key: str) -> dict[str, Any]:
        value: dict[str, Any] = self._value(key, dict, "an object", required=True)
        return value

    def get_list(self, key: str) -> list[Any]:
        value: list[Any] = self._value(key, list, "a list", required=True)
        return value


def _json_type(value: object) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    names |= {list: "a list", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _clip(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def parse_metadata(name: str, data: object) -> SnapshotRecord:
    """Check the metadata JSON of snapshot ``name`` (already a safe name): the seed's keys
    always, vzkit's keys when ``format`` is :data:`FORMAT` (older or newer formats are only
    listed; a restore refuses them). Raises :class:`SnapshotError` naming the bad field."""
    if not isinstance(data, dict):
        raise SnapshotError(
            f"snapshot {name!r} has invalid metadata: it is {_json_type(data)}, not an object "
            "(delete the snapshot and save it again)"
        )
    f = _Fields(name, data)
    fmt = f.opt_int("format")
    ours = fmt == FORMAT  # every key a vzkit save writes must be there
    saved_name = f.get_str("name") if ours else f.opt_str("name")
    if saved_name is not None and saved_name != name:
        raise f.error("name", f"is {_clip(saved_name)!r}, but the file is named {name!r}")
    created = None
    what = "an RFC 3339 timestamp"
    created_text = f.get_str("created", what=what) if ours else f.opt_str("created", what=what)
    if created_text is not None:
        try:
            created = parse_rfc3339(created_text)
        except ValueError:
            raise f.error("created", f"must be {what}, not {_clip(created_text)!r}") from None
    size = f.get_int("size") if ours else f.opt_int("size")
    vm_state = f.get_str("vmState") if ours else f.opt_str("vmState")
    f.opt_str("filePath")  # the seed's key: never used as a path
    if not ours:
        return SnapshotRecord(name, fmt, created, size, vm_state)
    token = f.get_str("id", pattern=_TOKEN_RE, what=f"{TOKEN_HEX} lower-case hex digits")
    backend_info = f.get_dict("backendInfo")
    disks: list[SnapshotDisk] = []
    for i, entry in enumerate(f.get_list("disks")):
        if not isinstance(entry, dict):
            raise f.error(f"disks[{i}]", f"must be an object, not {_json_type(entry)}")
        disk = _parse_disk(name, token, _Fields(name, entry, f"disks[{i}]."))
        if any(d.role == disk.role for d in disks):
            raise f.error(f"disks[{i}].role", f"repeats {disk.role!r}")
        disks.append(disk)
    return SnapshotRecord(
        name=name,
        format=fmt,
        created=created,
        size=size,
        vm_state=vm_state,
        token=token,
        backend=f.get_str("backend"),
        machine=f.get_dict("machine"),
        config_fingerprint=f.get_str("configFingerprint"),
        state_sha256=f.get_str("stateSha256", pattern=_SHA256_RE, what=_SHA256_WHAT),
        disks=tuple(disks),
        agent=f.get_bool("agent"),
        backend_info=backend_info,
    )


_SHA256_WHAT = "64 lower-case hex digits"
_DISK_DIGEST_RE = re.compile(re.escape(DISK_DIGEST_PREFIX) + "[0-9a-f]{64}")


def _parse_disk(name: str, token: str, f: _Fields) -> SnapshotDisk:
    role = f.get_str("role", pattern=_ROLE_RE, what="'disk' and a number")
    fmt_text = f.get_str("format")
    try:
        fmt = DiskFormat(fmt_text)
    except ValueError:
        known = ", ".join(repr(v.value) for v in DiskFormat)
        raise f.error("format", f"must be one of {known}, not {_clip(fmt_text)!r}") from None
    source = f.get_str("source")
    if not os.path.isabs(source) or "\x00" in source:
        raise f.error("source", f"must be an absolute path, not {_clip(source)!r}")
    # The one name the writer gives this disk: no separator, no '..', nothing to choose.
    expected = f"{name}.{token}.{role}.{fmt.value}"
    file = f.get_str("file")
    if file != expected or not disk_file_re(name).fullmatch(file):
        problem = f"must be {expected!r} (a file of this snapshot), not {_clip(file)!r}"
        raise f.error("file", problem)
    what = f"{DISK_DIGEST_PREFIX!r} and {_SHA256_WHAT}"
    digest = f.get_str("digest", pattern=_DISK_DIGEST_RE, what=what)
    return SnapshotDisk(role, source, file, fmt, f.get_int("size"), digest)


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


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """One catalogue entry. ``size`` is always the state file's size on disk."""

    name: str
    created: datetime
    size: int
    vm_state: str
    file_path: Path
    extra: tuple[tuple[str, Any], ...] = ()  # keys beyond the seed's (backend, disks, ...)

    def to_json_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "created": format_rfc3339(self.created),
            "size": self.size,
            "vmState": self.vm_state,
            "filePath": str(self.file_path),
        }
        data.update(self.extra)
        return data


class SnapshotManager:
    """Manages the snapshots of one VM directory (``<vm_dir>/snapshots``)."""

    def __init__(self, vm_dir: str | os.PathLike[str]) -> None:
        self.vm_dir = Path(vm_dir).expanduser().absolute()
        self.snapshot_dir = self.vm_dir / "snapshots"

    def __repr__(self) -> str:
        return f"SnapshotManager({str(self.vm_dir)!r})"

    def state_path(self, name: str) -> Path:
        return self.snapshot_dir / (check_snapshot_name(name) + STATE_SUFFIX)

    def meta_path(self, name: str) -> Path:
        return self.snapshot_dir / (check_snapshot_name(name) + META_SUFFIX)

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
            loaded = self._load(name, strict=False)
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
        loaded = self._load(check_snapshot_name(name), strict=True)
        if loaded is None:
            raise SnapshotError(f"no snapshot named {name!r} in {str(self.snapshot_dir)!r}")
        return loaded

    def save(
        self,
        vm: VirtualMachine,
        name: str,
        timeout: float | None = None,
        *,
        progress: ProgressFn | None = None,
    ) -> SnapshotMeta:
        """Save ``vm`` (running or paused) as snapshot ``name``, replacing an older one only
        once the new one is complete. A running VM is paused for the save and resumed; a
        paused one stays paused. ``progress(done, total)`` gets the bytes written (default:
        a progress bar on a terminal)."""
        from ._loop import run_sync
        from ._progress import Progress
        from ._snapshot_ops import save
        from ._vmcore import _within

        agent = vm.guest.connected
        with Progress(f"saving snapshot {name}") as bar:
            coro = save(self, vm._core, name, progress or bar.update, agent=agent)
            return run_sync(_within(timeout, f"saving snapshot {name!r}", coro))

    def restore(self, vm: VirtualMachine, name: str, timeout: float | None = None) -> SnapshotMeta:
        """Restore snapshot ``name`` into the stopped ``vm``, whose config must match the one
        saved (else :class:`SnapshotError`, before anything starts). The VM ends PAUSED;
        ``vm.resume()`` runs it and steps the guest clock through the agent."""
        from ._loop import run_sync
        from ._snapshot_ops import restore
        from ._vmcore import _within

        vm.guest.close()
        coro = restore(self, vm._core, name)
        return run_sync(_within(timeout, f"restoring snapshot {name!r}", coro))

    def delete(self, name: str) -> None:
        """Remove a snapshot's state, metadata and captured disks; :class:`SnapshotError` if
        it does not exist. VMs running from it keep their open files."""
        from ._snapshot_ops import disk_files

        state, meta = self.state_path(name), self.meta_path(name)
        if not state.exists() and not meta.exists():
            raise SnapshotError(f"no snapshot named {name!r} in {str(self.snapshot_dir)!r}")
        # Metadata first: a crash in between leaves a state file that still lists, never
        # metadata that points at nothing.
        for path in (meta, state, *disk_files(self, name)):
            try:
                path.unlink(missing_ok=True)
            except OSError as err:
                raise SnapshotError(f"cannot delete {str(path)!r}: {err.strerror}") from err

    def _load(
        self, name: str, *, strict: bool
    ) -> tuple[SnapshotMeta, SnapshotRecord | None] | None:
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
                record = parse_metadata(name, loaded)
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
