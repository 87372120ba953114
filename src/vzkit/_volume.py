"""Host folders shared with the guest: docker-style volume specs, ``path[:tag][:ro|rw]`` and
``path:/guest/path[:ro|rw]``."""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, SpecError

__all__ = [
    "MAX_TAG_BYTES",
    "VolumeMount",
    "assign_volume_tags",
    "parse_volume_spec",
    "share_cmdline",
    "volume_from_dict",
]

#: virtio-fs carries the tag in a fixed 36-byte config field.
MAX_TAG_BYTES = 36

_READ_ONLY = {"ro": True, "readonly": True, "rw": False, "readwrite": False}
_BAD_TAG_CHARS = re.compile(r"[/\\\x00-\x20\x7f,:]")
_FORMS = "path[:tag][:ro|rw] or path:/guest/path[:ro|rw]"
#: Where the guest keeps its kernel file systems and vzkit's own tools: no share goes there.
_RESERVED_GUEST_DIRS = ("/proc", "/sys", "/dev", "/run")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def _check_guest_path(path: str, spec: str) -> str:
    """``path`` normalised (no ``//``, ``.`` or trailing ``/``), else :class:`SpecError`."""
    if not path.startswith("/"):
        raise SpecError(
            f"volume {spec!r}: guest path {path!r} is not absolute; write it from the guest's "
            "root, e.g. '/data'"
        )
    bad = _CONTROL_CHARS.search(path)
    if bad is not None:
        raise SpecError(f"volume {spec!r}: guest path {path!r} contains a control character")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise SpecError(
            f"volume {spec!r}: guest path {path!r} contains '..'; name the directory directly"
        )
    if not parts:
        raise SpecError(
            f"volume {spec!r}: a share cannot be mounted at the guest's root '/'; "
            "pick a directory such as '/data'"
        )
    clean = "/" + "/".join(parts)
    for reserved in _RESERVED_GUEST_DIRS:
        if _inside(clean, reserved):
            raise SpecError(
                f"volume {spec!r}: guest path {clean!r} is under {reserved}, which the guest "
                "keeps for itself; pick another directory such as '/data'"
            )
    return clean


def _inside(path: str, parent: str) -> bool:
    """Whether ``path`` is ``parent`` or below it (both normalised, absolute)."""
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _check_tag(tag: str, spec: str) -> None:
    if tag in (".", ".."):
        raise SpecError(f"volume {spec!r}: tag {tag!r} is not allowed")
    bad = _BAD_TAG_CHARS.search(tag)
    if bad is not None:
        raise SpecError(
            f"volume {spec!r}: tag {tag!r} contains {bad.group()!r}; "
            "tags may not contain '/', '\\', ',', ':', spaces or control characters"
        )
    if len(tag.encode()) > MAX_TAG_BYTES:
        raise SpecError(f"volume {spec!r}: tag {tag!r} is longer than {MAX_TAG_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class VolumeMount:
    """A host directory shared into the guest (VirtioFS, or virtio-9p where that is missing).

    ``tag`` is the name the guest mounts by; empty means "derive from the directory's base
    name". ``guest_path`` is where vzkit's guests mount the share (absolute; normalised here);
    empty means ``/mnt/<tag>``. ``host_path`` may be given as ``str``.
    """

    host_path: Path
    tag: str = ""
    read_only: bool = False
    guest_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.host_path, Path):
            if not isinstance(self.host_path, str | os.PathLike):
                raise SpecError(f"volume host_path must be a path, got {self.host_path!r}")
            object.__setattr__(self, "host_path", Path(self.host_path))
        if not isinstance(self.read_only, bool):
            raise SpecError(f"volume read_only must be a bool, got {self.read_only!r}")
        if self.tag:
            _check_tag(self.tag, str(self.host_path))
        if not isinstance(self.guest_path, str):
            raise SpecError(f"volume guest_path must be a string, got {self.guest_path!r}")
        if self.guest_path:
            where = f"{self.host_path}:{self.guest_path}"
            object.__setattr__(self, "guest_path", _check_guest_path(self.guest_path, where))

    def __str__(self) -> str:
        parts = [str(self.host_path)]
        if self.guest_path:
            parts.append(self.guest_path)
        elif self.tag:
            parts.append(self.tag)
        parts.append("ro" if self.read_only else "rw")
        return ":".join(parts)

    @property
    def mount_point(self) -> str:
        """Where vzkit's guests mount the share: ``guest_path``, else ``/mnt/<tag>`` (``""``
        while the tag is still to be assigned)."""
        if self.guest_path:
            return self.guest_path
        return f"/mnt/{self.tag}" if self.tag else ""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a config file; ``guest_path`` only when set, so files written
        before it existed read back the same."""
        out: dict[str, Any] = {
            "host_path": str(self.host_path),
            "tag": self.tag,
            "read_only": self.read_only,
        }
        if self.guest_path:
            out["guest_path"] = self.guest_path
        return out


_DICT_KEYS = {"host_path", "tag", "read_only", "guest_path"}


def volume_from_dict(data: object) -> VolumeMount:
    """Inverse of :meth:`VolumeMount.to_dict`; :class:`ConfigError` for another shape."""
    if not isinstance(data, Mapping) or "host_path" not in data or set(data) - _DICT_KEYS:
        raise ConfigError(f"each volume needs host_path[, tag, read_only, guest_path]: {data!r}")
    return VolumeMount(
        data["host_path"],
        data.get("tag", ""),
        data.get("read_only", False),
        data.get("guest_path", ""),
    )


def parse_volume_spec(spec: str) -> VolumeMount:
    """Parse ``path[:tag][:ro|rw]`` or ``path:/guest/path[:ro|rw]`` (``ro``/``readonly``/
    ``rw``/``readwrite``, any case). A second part with a ``/`` is the guest path the share is
    mounted at (its tag is then derived from the directory); without one it is the tag, and
    the share is mounted at ``/mnt/<tag>``.

    The host path is made absolute and symlink-resolved; it must exist and be a directory.
    """
    if not isinstance(spec, str):
        raise SpecError(f"volume spec must be a string, got {type(spec).__name__}")
    if not spec.strip():
        raise SpecError(f"empty volume spec; expected {_FORMS}")
    path_text, *rest = spec.split(":")
    read_only = False
    if rest and rest[-1].strip().lower() in _READ_ONLY:
        read_only = _READ_ONLY[rest.pop().strip().lower()]
    if len(rest) > 1 and any("/" in part for part in rest):
        raise SpecError(
            f"volume {spec!r}: a spec names a guest path or a tag, not both, and a guest path "
            "holds no ':'; expected path:/guest/path[:ro|rw], or VolumeMount(host_path, tag, "
            "read_only, guest_path) for both"
        )
    if len(rest) > 1:
        raise SpecError(
            f"volume {spec!r} names more than one tag ({', '.join(map(repr, rest))}); "
            f"expected {_FORMS}"
        )
    tag = rest[0] if rest else ""
    guest_path = ""
    if "/" in tag:
        tag, guest_path = "", _check_guest_path(tag, spec)
    if not path_text:
        raise SpecError(f"volume {spec!r} has no host path; expected {_FORMS}")
    path = Path(path_text).expanduser()
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise SpecError(f"volume {spec!r}: host path {str(path)!r} does not exist") from None
    except (OSError, RuntimeError) as err:
        raise SpecError(f"volume {spec!r}: cannot resolve {str(path)!r}: {err}") from err
    if not resolved.is_dir():
        raise SpecError(f"volume {spec!r}: host path {str(resolved)!r} is not a directory")
    if tag:
        _check_tag(tag, spec)
    return VolumeMount(resolved, tag, read_only, guest_path)


def _auto_tag(path: Path) -> str:
    base = path.name or "root"
    base = _BAD_TAG_CHARS.sub("_", base)
    if base in (".", ".."):
        base = "share"
    # Leave room for a "-NN" suffix, cut on a character boundary.
    encoded = base.encode()[: MAX_TAG_BYTES - 4]
    return encoded.decode(errors="ignore") or "share"


def assign_volume_tags(volumes: Iterable[VolumeMount]) -> tuple[VolumeMount, ...]:
    """Give every volume a unique tag, keeping order.

    Explicit tags are kept as given (a duplicate explicit tag is a :class:`ConfigError`);
    empty tags become the directory's base name, then ``name-1``, ``name-2``, ... on collision.
    """
    items = tuple(volumes)
    taken: set[str] = set()
    for vol in items:
        if vol.tag:
            if vol.tag in taken:
                raise ConfigError(
                    f"volume tag {vol.tag!r} is used by more than one volume; tags must be unique"
                )
            taken.add(vol.tag)
    out: list[VolumeMount] = []
    for vol in items:
        if vol.tag:
            out.append(vol)
            continue
        base = _auto_tag(vol.host_path)
        tag, n = base, 0
        while tag in taken:
            n += 1
            tag = f"{base}-{n}"
        taken.add(tag)
        out.append(replace(vol, tag=tag))
    _check_mount_points(out)
    return tuple(out)


def _check_mount_points(volumes: Iterable[VolumeMount]) -> None:
    """:class:`ConfigError` when two (tagged) shares would be mounted at the same guest
    directory or one inside the other: the guest mounts each share once, at its own
    directory, and never makes a mount point inside another share (that would create a
    directory on the host, or fail on a read-only share)."""
    seen: list[VolumeMount] = []
    for vol in volumes:
        for other in seen:
            a, b = other.mount_point, vol.mount_point
            if a == b:
                raise ConfigError(
                    f"volumes {str(other)!r} and {str(vol)!r} are both mounted at {a} in the "
                    "guest; give each its own guest path"
                )
            if _inside(a, b) or _inside(b, a):
                outer, inner = (b, a) if _inside(a, b) else (a, b)
                raise ConfigError(
                    f"volumes {str(other)!r} and {str(vol)!r}: {inner} would be inside the "
                    f"share at {outer}, and vzkit does not nest shares; mount them side by side "
                    "(e.g. /data and /data2), or share the parent directory once"
                )
        seen.append(vol)


def share_cmdline(volumes: Iterable[VolumeMount]) -> str:
    """Kernel command-line words telling vzkit's guests which shares to mount, and where.

    ``vzkit.shares=TAG,...`` lists every tag, ``vzkit.ro=TAG,...`` the read-only ones
    (mounted ``ro``; the host enforces read-only regardless), ``vzkit.mounts=TAG=PATH,...``
    the guest path of each share that has one (the others go to ``/mnt/<tag>``); tags and
    paths are percent-encoded, so no word holds a space, a ``,`` or an ``=`` of its own.
    Empty without volumes. The guest needs this because kernels before 6.9 do not list
    virtiofs tags in sysfs.
    """
    tagged = assign_volume_tags(volumes)
    if not tagged:
        return ""
    words = ["vzkit.shares=" + ",".join(_encode(v.tag) for v in tagged)]
    read_only = [_encode(v.tag) for v in tagged if v.read_only]
    if read_only:
        words.append("vzkit.ro=" + ",".join(read_only))
    placed = [f"{_encode(v.tag)}={_encode(v.guest_path, '/')}" for v in tagged if v.guest_path]
    if placed:
        words.append("vzkit.mounts=" + ",".join(placed))
    return " ".join(words)


def _encode(text: str, also_safe: str = "") -> str:
    """Percent-encoding that leaves only ``A-Za-z0-9@+-._~`` (and ``also_safe``): the
    characters the guest's init decodes (init.sh)."""
    return urllib.parse.quote(text, safe="@+-._~" + also_safe)
