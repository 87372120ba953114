"""The snapshot catalogue: ``<vm_dir>/snapshots/<name>.vmstate`` plus ``<name>.json``.

The JSON keeps the Go vzkit's keys (``name``, ``created`` in RFC 3339, ``size``, ``vmState``,
``filePath``) so catalogues written by either implementation load in the other, and adds what
a restore needs (``backend``, ``machine`` + ``configFingerprint``, ``disks``: see
``docs/snapshots.md``). Captured disks live beside the state as ``<name>.<id>.disk0.<fmt>``.
Listing and deleting is pure file handling and lives here; :meth:`SnapshotManager.save` and
:meth:`SnapshotManager.restore` drive a VM (:mod:`vzkit._snapshot_ops` and the backends).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SnapshotError

if TYPE_CHECKING:
    from ._vm import VirtualMachine
    from .backends._protocol import ProgressFn

__all__ = ["SnapshotManager", "SnapshotMeta", "check_snapshot_name"]

log = logging.getLogger(__name__)

STATE_SUFFIX = ".vmstate"
META_SUFFIX = ".json"
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?P<frac>\.\d+)?(?P<tz>[Zz]|[+-]\d{2}:\d{2})"
)


def check_snapshot_name(name: object) -> str:
    """Return ``name`` if it is a safe snapshot name, else raise :class:`SnapshotError`.

    Names become file names: empty names, path separators, ``..``, NUL and a leading dot
    (reserved for temporary files) are refused before anything touches the disk.
    """
    if not isinstance(name, str):
        raise SnapshotError(f"snapshot name must be a string, got {type(name).__name__}")
    if not name:
        raise SnapshotError("snapshot name must not be empty")
    for bad, what in (("\x00", "a NUL byte"), ("/", "'/'"), ("\\", "'\\'"), ("..", "'..'")):
        if bad in name:
            raise SnapshotError(f"invalid snapshot name {name!r}: it contains {what}")
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
        """Every snapshot with a state file, newest first."""
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
            if not entry.is_file():
                continue  # a stray directory is not a state file
            meta = self._load(entry.name[: -len(STATE_SUFFIX)], entry)
            if meta is not None:
                metas.append(meta)
        metas.sort(key=lambda m: (m.created, m.name), reverse=True)
        return metas

    def get(self, name: str) -> SnapshotMeta:
        """The entry for ``name``; :class:`SnapshotError` when there is none."""
        state = self.state_path(name)
        meta = self._load(name, state)
        if meta is None:
            raise SnapshotError(f"no snapshot named {name!r} in {str(self.snapshot_dir)!r}")
        return meta

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

    def _load(self, name: str, state: Path) -> SnapshotMeta | None:
        try:
            st = state.stat()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise SnapshotError(f"cannot read {str(state)!r}: {err.strerror}") from err
        fallback_created = datetime.fromtimestamp(st.st_mtime, tz=UTC)
        data: dict[str, Any] = {}
        meta_file = state.with_suffix(META_SUFFIX)
        try:
            loaded = json.loads(meta_file.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                data = loaded
            else:
                log.warning("ignoring %s: not a JSON object", meta_file)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable snapshot metadata %s: %s", meta_file, err)
        created = fallback_created
        if isinstance(data.get("created"), str):
            try:
                created = parse_rfc3339(data["created"])
            except ValueError:
                log.warning("snapshot %s: bad 'created' %r, using file time", name, data["created"])
        vm_state = data.get("vmState")
        seed_keys = {"name", "created", "size", "vmState", "filePath"}
        extra = tuple(sorted((k, v) for k, v in data.items() if k not in seed_keys))
        return SnapshotMeta(
            name=name,
            created=created,
            size=st.st_size,
            vm_state=vm_state if isinstance(vm_state, str) else "",
            file_path=state,
            extra=extra,
        )
