"""The shared pieces of the image stores in the cache (Debian images, OCI images, root disks).

A store is a directory of entries, one 0700 directory each, named by a digest. An entry is
built in a ``.build-*`` directory beside them and made one by a single rename after its
metadata file is written and fsynced (:func:`commit_entry`), so a reader sees a complete entry
or none. One writer per store at a time (:func:`store_lock`, an ``flock`` across processes);
``last-used`` is an empty file whose mtime is the last time a VM booted the entry.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from .._fsutil import fsync_dir, write_atomic
from ..errors import ConfigError

__all__ = [
    "DIGEST_PREFIX_RE",
    "IMAGE_NAME",
    "LAST_USED",
    "StoredImage",
    "clear_leftovers",
    "commit_entry",
    "flock",
    "last_used",
    "list_entries",
    "mark_used",
    "pick_by_digest",
    "remove_entry",
    "store_lock",
    "write_meta",
]

LAST_USED = "last-used"
IMAGE_NAME = "root.img"
#: A digest as users type it: at least 6 hex digits, ``sha256:`` optional.
DIGEST_PREFIX_RE = re.compile(r"(sha256:)?([0-9a-f]{6,64})")
_T = TypeVar("_T")


class StoredImage:
    """What the images of a store share (mixed into their dataclasses): the entry's
    ``directory`` holding ``root.img``, and the image's ``digest`` (``sha256:...``)."""

    directory: Path
    digest: str
    created: float
    last_used: float

    @property
    def path(self) -> Path:
        """The raw ext4 image (a VM boots it read-only, with its own layer)."""
        return self.directory / IMAGE_NAME

    @property
    def short_digest(self) -> str:
        return self.digest.removeprefix("sha256:")[:12]


@contextmanager
def flock(path: Path, operation: int = fcntl.LOCK_EX) -> Iterator[None]:
    """Hold an ``flock`` (exclusive unless ``operation`` says ``LOCK_SH``) on the file
    ``path`` (made 0600) while in the block."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def store_lock(root: Path, *, builder: str | None = None) -> Iterator[Path]:
    """Yields the store ``root`` (made 0700), locked across processes and threads. With
    ``builder`` (a key such as the arch): for a builder, one per key at a time, beside the
    builders of other keys (``.lock`` shared, ``.lock-<key>`` exclusive); without: for a
    remover or pruner, alone (``.lock`` exclusive: no builder runs, no build directory is
    in use)."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if builder is None:
        with flock(root / ".lock"):
            yield root
        return
    if not builder.isidentifier():
        raise ValueError(f"bad lock key {builder!r}")  # pragma: no cover - an Arch value
    with flock(root / ".lock", fcntl.LOCK_SH), flock(root / f".lock-{builder}"):
        yield root


def mark_used(directory: Path) -> None:
    """Record that a VM uses the entry ``directory`` now (the ``last-used`` file's mtime)."""
    path = directory / LAST_USED
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)
        os.utime(path)
    except OSError:  # a read-only cache still boots
        pass


_I = TypeVar("_I", bound=StoredImage)


def list_entries(root: Path, load: Callable[[Path], _I | None]) -> list[_I]:
    """The complete entries of the store ``root`` (``load`` gives None for the rest), the most
    recently used first."""
    found = []
    for directory in sorted(root.iterdir()) if root.is_dir() else ():
        if directory.name.startswith(".") or not directory.is_dir():
            continue
        image = load(directory)
        if image is not None:
            found.append(image)
    found.sort(key=lambda image: (image.last_used, image.created), reverse=True)
    return found


def last_used(directory: Path, default: float) -> float:
    """When a VM last booted the entry, ``default`` (its creation) if none ever did."""
    try:
        return (directory / LAST_USED).stat().st_mtime
    except FileNotFoundError:
        return default


def write_meta(path: Path, info: Mapping[str, Any]) -> None:
    """Replace an entry's metadata file ``path`` with ``info`` as JSON (atomic, 0600)."""
    write_atomic(path, json.dumps(info, indent=2, sort_keys=True).encode())


def commit_entry(
    work: Path, root: Path, name: str, meta_name: str, info: Mapping[str, Any]
) -> Path:
    """Make the build directory ``work`` the entry ``root/name``: ``meta_name`` written with
    ``info`` (:func:`write_meta`) and fsynced, then one rename (an entry of that name is
    replaced). The caller holds :func:`store_lock`. Returns the entry's path."""
    write_meta(work / meta_name, info)
    fsync_dir(work)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(work, final)
    fsync_dir(root)
    return final


def remove_entry(directory: Path, root: Path) -> None:
    """Delete the entry ``directory`` of the store ``root`` (the caller holds its lock); a VM
    running on it keeps its open file until it stops."""
    if directory.parent != root:
        raise ConfigError(f"{str(directory)!r} is not in the image cache")
    shutil.rmtree(directory, ignore_errors=True)


def clear_leftovers(root: Path) -> None:
    """Remove what interrupted builds left in the store (the caller holds its lock)."""
    for leftover in root.glob(".build-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def pick_by_digest(items: Iterable[_T], text: str, digest: Callable[[_T], str]) -> _T | None:
    """The one item whose ``digest`` starts with the digest prefix ``text`` (see
    :data:`DIGEST_PREFIX_RE`; the caller checked it matches); None when none does,
    :class:`ConfigError` when several do."""
    match = DIGEST_PREFIX_RE.fullmatch(text)
    prefix = match.group(2) if match else text
    hits = [i for i in items if digest(i).removeprefix("sha256:").startswith(prefix)]
    if len(hits) > 1:
        raise ConfigError(f"image digest {text!r} names {len(hits)} images: give more digits")
    return hits[0] if hits else None
