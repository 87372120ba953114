"""Debian images in the cache: finished root disks, found by what they were built from.

A Debian image is a raw ext4 root disk (``root.img``) on which the second stage has already
run in a VM (see :mod:`vzkit._imagebuild`, which builds them). Each lives in
``<cache>/images/debian/<first 32 hex digits of its digest>/`` (0700) with ``root.img``
(0600), ``manifest.json`` (the packages, :class:`~vzkit.image._debian.DebianManifest`),
``image.json`` (:class:`DebianImage`'s fields) and ``last-used`` (an empty file whose mtime
is the last time a VM booted it). The digest is the manifest's (it covers every package's
SHA256, the suite, the arch, the epoch and the second-stage script) with
:data:`DEBIAN_PIPELINE`, the version of the steps after it.

Two keys find an image without building it:

* ``inputs``: the resolved package set (names, versions, SHA256s from the signed indexes),
  the sources, the suite and arch, and the builder's versions. ``vzkit image build`` resolves
  (cheap) and looks this up before it downloads, unpacks or boots anything.
* the reference: ``debian[:SUITE]`` plus the extra packages and the arch. ``vzkit run --image
  debian`` takes the newest image built for it, offline, as ``docker run`` takes a local tag;
  ``vzkit image build`` is what looks for newer packages.

Everything here is plain file work; building needs a VM and lives above the facades.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, GuestError
from . import _entries
from ._debian import DEBIAN_FORMAT, ResolvedDebian, parse_debian_ref
from ._entries import DIGEST_PREFIX_RE, StoredImage, pick_by_digest, store_lock
from ._image import image_cache_dir

__all__ = [
    "DEBIAN_PIPELINE",
    "DebianImage",
    "commit_debian_image",
    "debian_images_dir",
    "debian_images_lock",
    "find_by_inputs",
    "find_debian_image",
    "inputs_key",
    "list_debian_images",
    "load_debian_image",
    "mark_used",
    "normal_packages",
    "prune_debian_images",
    "remove_debian_image",
    "split_image_ref",
]

#: Bump when the steps after the tree (disk layout, the VM run, finalising) change.
DEBIAN_PIPELINE = 1
IMAGE_NAME = _entries.IMAGE_NAME
META_NAME = "image.json"
MANIFEST_NAME = "manifest.json"
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")


@dataclass(frozen=True, kw_only=True)
class DebianImage(StoredImage):
    """A finished Debian image in the cache. ``size`` is the disk's size in bytes (the file is
    sparse: ``allocated`` is what it takes on the host); times are seconds since the epoch."""

    directory: Path
    ref: str  # "debian:bookworm"
    suite: str
    arch: str  # x86_64, aarch64
    packages: tuple[str, ...]  # the extra packages asked for (sorted)
    package_count: int  # every package installed
    digest: str  # "sha256:..."
    inputs: str
    size: int
    allocated: int
    build_s: float
    created: float
    last_used: float

    @property
    def name(self) -> str:
        """``debian:bookworm`` or ``debian:bookworm+jq,curl``."""
        return self.ref + ("+" + ",".join(self.packages) if self.packages else "")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(directory=str(self.directory), path=str(self.path), name=self.name,
                   packages=list(self.packages))  # fmt: skip
        return out


def debian_images_dir(cache_dir: Path | None = None) -> Path:
    return image_cache_dir(cache_dir) / "debian"


def normal_packages(packages: Sequence[str]) -> tuple[str, ...]:
    """The extra packages, sorted and without repeats; :class:`ConfigError` for a name that
    is not a Debian package name."""
    names = {p.strip() for p in packages if p.strip()}
    bad = sorted(n for n in names if not _PACKAGE_RE.fullmatch(n))
    if bad:
        raise ConfigError(f"not a Debian package name: {', '.join(map(repr, bad))}")
    return tuple(sorted(names))


def split_image_ref(ref: str) -> tuple[str, tuple[str, ...]]:
    """``debian:bookworm+jq,curl`` -> ``("debian:bookworm", ("curl", "jq"))`` (the name an
    image with extra packages is listed under)."""
    name, plus, extra = ref.partition("+")
    return name, normal_packages(extra.split(",")) if plus else ()


def inputs_key(resolved: ResolvedDebian, packages: Sequence[str]) -> str:
    """The digest of everything a build would be made of, known before anything is
    downloaded: the resolved packages (name, version, architecture, SHA256), the core set,
    the sources, suite, arch, the extra packages, ``SOURCE_DATE_EPOCH`` if set, and the
    versions of the tree builder and of this pipeline."""
    content = {
        "pipeline": DEBIAN_PIPELINE,
        "format": DEBIAN_FORMAT,
        "suite": resolved.suite,
        "arch": resolved.debarch,
        "sources": [f"{s.url.rstrip('/')} {s.suite} {s.component}" for s in resolved.sources],
        "core": sorted(resolved.resolution.core),
        "packages": [[r.name, r.version, r.architecture, r.sha256] for r in resolved.records],
        "extra": sorted(packages),
        "epoch": os.environ.get("SOURCE_DATE_EPOCH", "").strip(),
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def load_debian_image(directory: Path) -> DebianImage | None:
    """The image in ``directory``, or None when it is not a complete one."""
    try:
        info = json.loads((directory / META_NAME).read_text())
        image = directory / IMAGE_NAME
        st = image.stat()
        used = _entries.last_used(directory, float(info["created"]))
        return DebianImage(
            directory=directory,
            ref=str(info["ref"]),
            suite=str(info["suite"]),
            arch=str(info["arch"]),
            packages=tuple(str(p) for p in info["packages"]),
            package_count=int(info["package_count"]),
            digest=str(info["digest"]),
            inputs=str(info["inputs"]),
            size=st.st_size,
            allocated=st.st_blocks * 512,
            build_s=float(info["build_s"]),
            created=float(info["created"]),
            last_used=used,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_debian_images(cache_dir: Path | None = None) -> list[DebianImage]:
    """Complete Debian images in the cache, the most recently used first."""
    return _entries.list_entries(debian_images_dir(cache_dir), load_debian_image)


def find_debian_image(
    ref: str,
    *,
    arch: str | None = None,
    packages: Sequence[str] = (),
    cache_dir: Path | None = None,
) -> DebianImage | None:
    """The cached image ``ref`` names: ``debian[:SUITE][+P1,P2]`` (with exactly ``packages``,
    or the ones after ``+``, as its extra packages; the newest such build for ``arch``, any
    arch when None), or a digest (at
    least 6 hex digits, ``sha256:`` optional: the one image it starts; ConfigError when it
    names several). None when there is none."""
    images = list_debian_images(cache_dir)
    if DIGEST_PREFIX_RE.fullmatch(ref) and not ref.startswith("debian"):
        return pick_by_digest(images, ref, lambda image: image.digest)
    name, extra = split_image_ref(ref)
    suite = parse_debian_ref(name)
    wanted = extra or normal_packages(packages)
    hits = [
        i
        for i in images
        if i.suite == suite and i.packages == wanted and (arch is None or i.arch == arch)
    ]
    return max(hits, key=lambda i: i.created) if hits else None


def find_by_inputs(inputs: str, cache_dir: Path | None = None) -> DebianImage | None:
    """The cached image built from exactly these inputs (see :func:`inputs_key`)."""
    return next((i for i in list_debian_images(cache_dir) if i.inputs == inputs), None)


def mark_used(image: DebianImage) -> None:
    """Record that a VM uses ``image`` now (the ``last-used`` file's mtime)."""
    _entries.mark_used(image.directory)


@contextmanager
def debian_images_lock(cache_dir: Path | None = None, *, arch: str | None = None) -> Iterator[Path]:
    """The Debian store's lock (:func:`~vzkit.image._entries.store_lock`): with ``arch``, a
    builder's (builders of other arches run beside it); without, a remover's or pruner's."""
    with store_lock(debian_images_dir(cache_dir), builder=arch) as root:
        yield root


def commit_debian_image(work: Path, root: Path, info: dict[str, Any]) -> DebianImage:
    """Make the build directory ``work`` (holding ``root.img`` and ``manifest.json``) the
    cache entry for ``info["digest"]``: ``image.json`` written and fsynced, then one rename
    (the caller holds :func:`debian_images_lock`). Leftovers in ``work`` besides those files
    are removed first."""
    for child in work.iterdir():
        if child.name not in (IMAGE_NAME, MANIFEST_NAME):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    missing = {"ref", "suite", "arch", "packages", "package_count", "digest", "inputs",
               "build_s", "created"} - set(info)  # fmt: skip
    if missing:
        raise GuestError(f"image metadata lacks {sorted(missing)}")  # pragma: no cover
    os.chmod(work / IMAGE_NAME, 0o600)
    name = str(info["digest"]).removeprefix("sha256:")[:32]
    # the same image again (a lost inputs key): the new one replaces it
    final = _entries.commit_entry(work, root, name, META_NAME, info)
    image = load_debian_image(final)
    if image is None:  # pragma: no cover - just written
        raise GuestError(f"Debian image {str(final)!r} is incomplete")
    return image


def remove_debian_image(image: DebianImage, cache_dir: Path | None = None) -> None:
    """Delete one cached image (a VM running on it keeps its open file until it stops)."""
    with debian_images_lock(cache_dir) as root:
        _entries.remove_entry(image.directory, root)


def prune_debian_images(
    *,
    unused_days: float | None = None,
    cache_dir: Path | None = None,
    now: float | None = None,
) -> list[DebianImage]:
    """Delete the images no VM booted for ``unused_days`` days (None: every image that is not
    the newest for its reference and arch), and leftovers of interrupted builds; returns the
    images removed."""
    if unused_days is not None and unused_days < 0:
        raise ConfigError(f"--unused-days must be 0 or more, got {unused_days}")
    clock = time.time() if now is None else now
    images = list_debian_images(cache_dir)
    newest: dict[tuple[str, str], DebianImage] = {}
    for image in images:
        key = (image.name, image.arch)
        if key not in newest or image.created > newest[key].created:
            newest[key] = image
    if unused_days is None:
        doomed = [i for i in images if newest[(i.name, i.arch)] is not i]
    else:
        doomed = [i for i in images if clock - i.last_used > unused_days * 86400]
    with debian_images_lock(cache_dir) as root:
        for image in doomed:
            _entries.remove_entry(image.directory, root)
        _entries.clear_leftovers(root)
    return doomed
