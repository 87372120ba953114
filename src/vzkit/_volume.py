"""Host folders shared with the guest: docker-style ``path[:tag][:ro|rw]`` volume specs."""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import ConfigError, SpecError

__all__ = [
    "MAX_TAG_BYTES",
    "VolumeMount",
    "assign_volume_tags",
    "parse_volume_spec",
    "share_cmdline",
]

#: virtio-fs carries the tag in a fixed 36-byte config field.
MAX_TAG_BYTES = 36

_READ_ONLY = {"ro": True, "readonly": True, "rw": False, "readwrite": False}
_BAD_TAG_CHARS = re.compile(r"[/\\\x00-\x20\x7f,:]")
_FORMS = "path[:tag][:ro|rw]"


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

    ``tag`` is the name the guest mounts by (``/mnt/<tag>`` in the default guest); empty means
    "derive from the directory's base name". ``host_path`` may be given as ``str``.
    """

    host_path: Path
    tag: str = ""
    read_only: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.host_path, Path):
            if not isinstance(self.host_path, str | os.PathLike):
                raise SpecError(f"volume host_path must be a path, got {self.host_path!r}")
            object.__setattr__(self, "host_path", Path(self.host_path))
        if not isinstance(self.read_only, bool):
            raise SpecError(f"volume read_only must be a bool, got {self.read_only!r}")
        if self.tag:
            _check_tag(self.tag, str(self.host_path))

    def __str__(self) -> str:
        parts = [str(self.host_path)]
        if self.tag:
            parts.append(self.tag)
        parts.append("ro" if self.read_only else "rw")
        return ":".join(parts)


def parse_volume_spec(spec: str) -> VolumeMount:
    """Parse ``path[:tag][:ro|rw]`` (``ro``/``readonly``/``rw``/``readwrite``, any case).

    The path is made absolute and symlink-resolved; it must exist and be a directory.
    """
    if not isinstance(spec, str):
        raise SpecError(f"volume spec must be a string, got {type(spec).__name__}")
    if not spec.strip():
        raise SpecError(f"empty volume spec; expected {_FORMS}")
    path_text, *rest = spec.split(":")
    read_only = False
    if rest and rest[-1].strip().lower() in _READ_ONLY:
        read_only = _READ_ONLY[rest.pop().strip().lower()]
    if len(rest) > 1:
        raise SpecError(
            f"volume {spec!r} names more than one tag ({', '.join(map(repr, rest))}); "
            f"expected {_FORMS}"
        )
    tag = rest[0] if rest else ""
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
    return VolumeMount(resolved, tag, read_only)


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
    return tuple(out)


def share_cmdline(volumes: Iterable[VolumeMount]) -> str:
    """Kernel command-line words telling the default guest which shares to mount.

    ``vzkit.shares=TAG,...`` lists every tag, ``vzkit.ro=TAG,...`` the read-only ones
    (mounted ``ro``; the host enforces read-only regardless); tags are percent-encoded.
    Empty without volumes. The guest needs this because kernels before 6.9 do not list
    virtiofs tags in sysfs.
    """
    tagged = assign_volume_tags(volumes)
    if not tagged:
        return ""
    words = ["vzkit.shares=" + ",".join(_encode_tag(v.tag) for v in tagged)]
    read_only = [_encode_tag(v.tag) for v in tagged if v.read_only]
    if read_only:
        words.append("vzkit.ro=" + ",".join(read_only))
    return " ".join(words)


def _encode_tag(tag: str) -> str:
    return urllib.parse.quote(tag, safe="@+-._~")
