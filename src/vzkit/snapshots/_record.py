"""The record layer: one snapshot's metadata as a typed, checked value.

A snapshot is ``<snapshot_dir>/<name>.vmstate`` plus ``<name>.json``. The JSON keeps the Go
vzkit's keys (``name``, ``created`` in RFC 3339, ``size``, ``vmState``, ``filePath``) so
catalogues written by either implementation load in the other, and adds what a restore needs
(``backend``, ``backendInfo``, ``machine`` + ``configFingerprint``, ``disks``, checksums: see
``docs/snapshots.md``). :meth:`SnapshotRecord.from_json` and :meth:`SnapshotRecord.to_json`
convert between the two; nothing here touches a file or a VM.

Snapshot files are untrusted input: :meth:`SnapshotRecord.from_json` checks every key it
knows (a mistake is a :class:`SnapshotError` naming the field), every file name in the
metadata must be exactly the name the writer gives it (:func:`disk_file_re`), and
``filePath`` is never used as a path (the state file is always
``<snapshot_dir>/<name>.vmstate``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from .._disk import DiskFormat
from ..errors import SnapshotError

__all__ = [
    "FORMAT",
    "READABLE_FORMATS",
    "MachineInfo",
    "SnapshotDisk",
    "SnapshotMeta",
    "SnapshotRecord",
    "SnapshotRoot",
    "check_snapshot_name",
    "fingerprint",
    "parse_metadata",
]

log = logging.getLogger(__name__)

STATE_SUFFIX = ".vmstate"
META_SUFFIX = ".json"
#: Version of the keys vzkit adds to the seed's JSON. 2: SHA-256 checksums of every file.
#: 3: ``backendInfo`` is the machine's typed hardware description (architecture, machine type,
#: CPU model... whatever the backend's ``snapshot_info()`` reports) and a restore compares it
#: with the restored machine's; a vzkit that reads only 2 would skip that comparison, so it
#: refuses 3 ("upgrade vzkit").
FORMAT = 3
#: 4: format 3 plus ``rootDisk`` (the root disk's base: path, format, digest) and a captured
#: disk of role ``root`` (the root disk's layer over that base). Written only by saves of VMs
#: with a root disk, so a vzkit that reads only 3 refuses those ("upgrade vzkit") and still
#: reads the others.
ROOT_DISK_FORMAT = 4
#: Formats a restore accepts: 2 has the same files and checksums, and its ``backendInfo`` is
#: compared the same way (it recorded fewer keys).
READABLE_FORMATS = frozenset({2, 3, 4})
#: Hex digits of a save's token (``id``), which is part of its disks' file names.
TOKEN_HEX = 12
#: A metadata file larger than this is not one vzkit wrote.
MAX_META_BYTES = 1 << 20
_SEED_KEYS = frozenset({"name", "created", "size", "vmState", "filePath"})
_TOKEN_RE = re.compile(rf"[0-9a-f]{{{TOKEN_HEX}}}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
#: ``disk<N>``: the config's disks; ``root``: the root disk's layer over its base.
ROOT_ROLE = "root"
_ROLE_RE = re.compile(r"disk[0-9]{1,3}|root")
_INFO_KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_INFO_VALUE_RE = re.compile(r"[^\x00-\x1f\x7f-\x9f]{0,200}")
_PATH_RE = re.compile(r"[^\x00-\x1f\x7f-\x9f]{1,4096}")
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
    ``<name>.<12 hex>.<role>.<format>`` (role ``disk<N>`` or ``root``, format a
    :class:`~vzkit.DiskFormat` value)."""
    formats = "|".join(re.escape(f.value) for f in DiskFormat)
    roles = rf"(?:disk[0-9]+|{ROOT_ROLE})"
    return re.compile(re.escape(name) + rf"\.[0-9a-f]{{{TOKEN_HEX}}}\.{roles}\.(?:{formats})")


@dataclass(frozen=True, slots=True)
class SnapshotDisk:
    """One captured disk (a ``disks[]`` entry): ``file`` is a plain name inside the snapshot
    dir, ``source`` the config's disk it was captured from (canonical path), ``digest`` its
    checksum (:data:`DISK_DIGEST_PREFIX` + hex)."""

    role: str
    source: str
    file: str
    format: DiskFormat
    size: int
    digest: str

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "source": self.source,
            "file": self.file,
            "format": self.format.value,
            "size": self.size,
            "digest": self.digest,
        }


@dataclass(frozen=True, slots=True)
class SnapshotRoot:
    """The root disk's base a snapshot's ``root`` layer lies over (JSON ``rootDisk``): its
    canonical path at save time (shown in messages only: a restore runs on the base its own
    config names, never on a path from the metadata), its format, and its digest: the
    root-disk cache's ``sha256:`` (``RootDisk.digest``) or, for a base without one, the
    content checksum of the file (:data:`DISK_DIGEST_PREFIX`). A restore onto a base with
    another digest is refused."""

    base: str
    format: DiskFormat
    digest: str

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "format": self.format.value, "digest": self.digest}


@dataclass(frozen=True, slots=True)
class MachineInfo:
    """The machine a state was saved from, beyond the config (JSON ``backendInfo``): what the
    backend's ``snapshot_info()`` reports. The known items are typed; any other item a backend
    reports is kept in ``other`` (sorted ``(key, value)`` strings).

    Every item but :attr:`accel` describes the guest's hardware, so a restore requires the
    restored machine to report the same value (see :meth:`mismatches`)."""

    arch: str = ""
    accel: str = ""  # how it ran (kvm, tcg, hvf...), not what the guest sees: not compared
    machine_type: str = ""
    cpu_model: str = ""
    other: tuple[tuple[str, str], ...] = ()

    #: JSON item → attribute.
    _KEYS: ClassVar[dict[str, str]] = {
        "arch": "arch",
        "accel": "accel",
        "machine": "machine_type",
        "cpu": "cpu_model",
    }
    #: Items that do not describe the guest's hardware.
    INFORMATIONAL: ClassVar[frozenset[str]] = frozenset({"accel"})

    @classmethod
    def from_items(cls, items: dict[str, str]) -> MachineInfo:
        """From ``snapshot_info()``'s items (already checked strings)."""
        known = {attr: items[key] for key, attr in cls._KEYS.items() if key in items}
        other = tuple(sorted((k, v) for k, v in items.items() if k not in cls._KEYS))
        return cls(**known, other=other)

    def items(self) -> dict[str, str]:
        """The JSON object (empty items left out)."""
        out = {key: getattr(self, attr) for key, attr in self._KEYS.items()}
        return {k: v for k, v in (*out.items(), *self.other) if v}

    def mismatches(self, now: MachineInfo) -> list[str]:
        """One ``"item: snapshot X, this machine Y"`` per hardware item both report with
        different values (an item one side does not report is not compared)."""
        saved, current = self.items(), now.items()
        return [
            f"{key}: snapshot {saved[key]!r}, this machine {current[key]!r}"
            for key in sorted(set(saved) & set(current) - self.INFORMATIONAL)
            if saved[key] != current[key]
        ]


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """The checked metadata of one snapshot. ``format`` is ``None`` for the seed's (Go) JSON,
    whose vzkit keys are absent; they are checked (and set here) for the
    :data:`READABLE_FORMATS`. :meth:`from_json` reads one, :meth:`to_json` writes one."""

    name: str
    format: int | None
    created: datetime | None
    size: int | None
    vm_state: str | None
    token: str = ""
    backend: str = ""
    machine: dict[str, Any] = field(default_factory=dict)  # the config fields a restore matches
    config_fingerprint: str = ""
    state_sha256: str = ""
    disks: tuple[SnapshotDisk, ...] = ()
    agent: bool = False
    info: MachineInfo = MachineInfo()
    file_path: str = ""  # the seed's ``filePath``: written for the Go vzkit, never read as a path
    root: SnapshotRoot | None = None  # format 4: the root disk's base

    @classmethod
    def from_json(cls, name: str, data: object) -> SnapshotRecord:
        """Check the metadata JSON of snapshot ``name`` (already a safe name): the seed's keys
        always, vzkit's keys for the :data:`READABLE_FORMATS` (other formats are only listed;
        a restore refuses them). Raises :class:`SnapshotError` naming the bad field."""
        return parse_metadata(name, data)

    def to_json(self) -> dict[str, Any]:
        """The JSON object :meth:`from_json` reads back as this record."""
        data: dict[str, Any] = {"name": self.name}
        if self.created is not None:
            data["created"] = format_rfc3339(self.created)
        if self.size is not None:
            data["size"] = self.size
        if self.vm_state is not None:
            data["vmState"] = self.vm_state
        if self.file_path:
            data["filePath"] = self.file_path
        if self.format is None:
            return data
        if self.root is not None:
            data["rootDisk"] = self.root.to_json()
        return data | {
            "format": self.format,
            "id": self.token,
            "backend": self.backend,
            "backendInfo": self.info.items(),
            "configFingerprint": self.config_fingerprint,
            "machine": self.machine,
            "disks": [d.to_json() for d in self.disks],
            "stateSha256": self.state_sha256,
            "agent": self.agent,
        }


def fingerprint(fields: dict[str, Any]) -> str:
    """``sha256:`` of the canonical JSON of a record's ``machine`` fields."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


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
    """:meth:`SnapshotRecord.from_json`."""
    if not isinstance(data, dict):
        raise SnapshotError(
            f"snapshot {name!r} has invalid metadata: it is {_json_type(data)}, not an object "
            "(delete the snapshot and save it again)"
        )
    f = _Fields(name, data)
    fmt = f.opt_int("format")
    ours = fmt in READABLE_FORMATS  # every key a vzkit save writes must be there
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
    file_path = f.opt_str("filePath") or ""  # the seed's key: never used as a path
    if not ours:
        return SnapshotRecord(name, fmt, created, size, vm_state, file_path=file_path)
    token = f.get_str("id", pattern=_TOKEN_RE, what=f"{TOKEN_HEX} lower-case hex digits")
    info = _parse_info(f, f.get_dict("backendInfo"))
    disks: list[SnapshotDisk] = []
    for i, entry in enumerate(f.get_list("disks")):
        if not isinstance(entry, dict):
            raise f.error(f"disks[{i}]", f"must be an object, not {_json_type(entry)}")
        disk = _parse_disk(name, token, _Fields(name, entry, f"disks[{i}]."))
        if any(d.role == disk.role for d in disks):
            raise f.error(f"disks[{i}].role", f"repeats {disk.role!r}")
        disks.append(disk)
    root = _parse_root(f, fmt, disks)
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
        info=info,
        file_path=file_path,
        root=root,
    )


def _parse_root(f: _Fields, fmt: int | None, disks: list[SnapshotDisk]) -> SnapshotRoot | None:
    """``rootDisk``: required by format 4 (with exactly one disk of role ``root``), absent
    before it (and then no ``root`` disk either)."""
    has_layer = any(d.role == ROOT_ROLE for d in disks)
    if fmt != ROOT_DISK_FORMAT:
        if "rootDisk" in f.data:
            raise f.error("rootDisk", f"needs metadata format {ROOT_DISK_FORMAT}, not {fmt}")
        if has_layer:
            raise f.error("disks", f"has a {ROOT_ROLE!r} disk, which needs format 4, not {fmt}")
        return None
    entry = f.get_dict("rootDisk")
    if not has_layer:
        raise f.error("disks", f"has no {ROOT_ROLE!r} disk (the root disk's layer)")
    g = _Fields(f.name, entry, "rootDisk.")
    base = g.get_str("base")
    if (
        not os.path.isabs(base)
        or os.path.normpath(base) != base
        or base.startswith("//")
        or not _PATH_RE.fullmatch(base)
    ):
        raise g.error("base", f"must be a canonical absolute path, not {_clip(base)!r}")
    fmt_text = g.get_str("format")
    try:
        disk_format = DiskFormat(fmt_text)
    except ValueError:
        known = ", ".join(repr(v.value) for v in DiskFormat)
        raise g.error("format", f"must be one of {known}, not {_clip(fmt_text)!r}") from None
    what = f"'sha256:' or {DISK_DIGEST_PREFIX!r} and {_SHA256_WHAT}"
    digest = g.get_str("digest", pattern=_BASE_DIGEST_RE, what=what)
    return SnapshotRoot(base, disk_format, digest)


def _parse_info(f: _Fields, items: dict[str, Any]) -> MachineInfo:
    """``backendInfo``: plain string items (names of at most 64 lower-case letters, digits and
    ``_``; values of at most 200 characters, no control characters)."""
    for key, value in items.items():
        if not _INFO_KEY_RE.fullmatch(key):
            raise f.error("backendInfo", f"has an invalid item name {_clip(key)!r}")
        if not isinstance(value, str):
            raise f.error(f"backendInfo.{key}", f"must be a string, not {_json_type(value)}")
        if not _INFO_VALUE_RE.fullmatch(value):
            raise f.error(
                f"backendInfo.{key}", "must be at most 200 characters without control characters"
            )
    return MachineInfo.from_items(items)


_SHA256_WHAT = "64 lower-case hex digits"
_DISK_DIGEST_RE = re.compile(re.escape(DISK_DIGEST_PREFIX) + "[0-9a-f]{64}")
#: A base's digest: the root-disk cache's (``sha256:``) or the content checksum of the file.
_BASE_DIGEST_RE = re.compile(rf"(?:sha256:|{re.escape(DISK_DIGEST_PREFIX)})[0-9a-f]{{64}}")


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
