"""A Debian root filesystem tree from Debian packages, built on the host without root.

:func:`prepare_debian_tree` is the host side of ``vzkit image build debian[:SUITE]``:

1. **resolve** (:mod:`vzkit.image._debian_resolve`): ``Priority: required`` and
   ``Essential: yes``, ``apt``, ``python3``, ``ca-certificates`` and the user's packages, closed
   over ``Pre-Depends``/``Depends``, from the sources of
   :func:`~vzkit.image._mirror.default_sources`: ``SUITE``, ``SUITE-updates`` and
   ``SUITE-security``, component ``main``, signed Release files checked as for the default guest;
2. **download** through :class:`~vzkit.image._mirror.DebianMirror` into the user cache
   (``<cache>/debs/<arch>/debian/``, each .deb verified against the index before it appears;
   a second run downloads nothing that is already there, a cut-off download resumes);
3. **unpack** every package's data tarball into ``DEST/tree`` (merged /usr, confined, hard
   links, symlinks, modes; :mod:`vzkit.image._debian_unpack`), with ``meta``: the owner and
   mode of each path lstat cannot show (see :class:`~vzkit.image._debian_unpack.FileMeta`);
4. lay down the **second stage** (:mod:`vzkit.image._debian_stage2`): the dpkg database, the
   .debs, apt's sources, and the script the guest runs to configure the packages.

The :class:`DebianManifest` (``DEST/manifest.json``) lists the packages with their versions
and SHA256; :attr:`DebianManifest.digest` hashes it with the builder's format version and the
second stage script, so the same packages give the same digest: the image's cache key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .._cache import user_cache_dir
from .._private import open_private, private_dir
from .._progress import Progress
from ..errors import SpecError
from ._deb import DebPackage
from ._debian_resolve import PackageIndex, Resolution, resolve
from ._debian_stage2 import STAGE2_PATH, lay_down_second_stage
from ._debian_unpack import FileMeta, TreeWriter
from ._fetch import deb_arch, record_trust
from ._mirror import (
    DEFAULT_SUITE,
    DebianMirror,
    DebianSource,
    Keyring,
    PackageRecord,
    default_sources,
)

__all__ = [
    "DEBIAN_FORMAT",
    "STAGE2_PATH",
    "DebianManifest",
    "ManifestPackage",
    "PreparedTree",
    "ResolvedDebian",
    "debian_deb_dir",
    "parse_debian_ref",
    "prepare_debian_tree",
    "resolve_debian",
]

log = logging.getLogger(__name__)

DEBIAN_FORMAT = 1
"""Bump when the tree or the second stage changes in a way the package list does not show."""
_SUITES = ("bookworm",)


def parse_debian_ref(ref: str) -> str:
    """``debian`` or ``debian:SUITE`` -> the suite (``bookworm`` by default); SpecError else."""
    name, _, suite = ref.partition(":")
    if name != "debian":
        raise SpecError(f"not a Debian image reference: {ref!r} (use debian or debian:bookworm)")
    suite = suite or DEFAULT_SUITE
    if suite not in _SUITES:
        raise SpecError(
            f"unsupported Debian suite {suite!r} (supported: {', '.join(_SUITES)}; Docker "
            f"Hub's image of that name is docker://debian:{suite})"
        )
    return suite


@dataclass(frozen=True, kw_only=True)
class ManifestPackage:
    """One package of the image: what was resolved and exactly which file was unpacked
    (``deb``: its file name in the cache, and in :data:`ARCHIVES` of the tree)."""

    name: str
    version: str
    architecture: str
    sha256: str
    size: int
    deb: str


@dataclass(frozen=True, kw_only=True)
class DebianManifest:
    """What a tree was built from. ``trust`` says how the indexes were verified."""

    suite: str
    arch: str
    sources: tuple[str, ...]
    epoch: int
    core: tuple[str, ...]
    packages: tuple[ManifestPackage, ...]
    stage2_sha256: str
    debs_in_tree: bool
    trust: str
    format: int = DEBIAN_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @property
    def digest(self) -> str:
        """SHA256 over everything but ``trust`` (the same bytes verified later are the same)."""
        content: dict[str, Any] = asdict(self)
        del content["trust"]
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class PreparedTree(NamedTuple):
    """The tree (the guest's ``/``), its metadata table and the manifest."""

    tree: Path
    meta: Mapping[str, FileMeta]
    manifest: DebianManifest


def debian_deb_dir(arch: str, cache_dir: Path | None = None) -> Path:
    """Where the .debs of Debian images for ``arch`` are cached (apart from the default
    guest's two, so its scan of its directory stays small)."""
    guest = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    return (cache_dir or user_cache_dir()) / "debs" / guest / "debian"


def _epoch() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    return int(value) if value.isdigit() else None


def _unpack(writer: TreeWriter, debarch: str, debs: Mapping[str, Path]) -> None:
    writer.merge_usr(debarch)
    with Progress(f"unpacking {len(debs)} packages", total=len(debs)) as progress:
        for name in sorted(debs):
            progress.step(name)
            writer.unpack(DebPackage(debs[name]))
            progress.advance(1)


def _pre_depends(resolution: Resolution) -> dict[str, list[str]]:
    """Package -> the selected packages named in its ``Pre-Depends`` (any alternative)."""
    names = set(resolution.names)
    return {
        pkg.name: sorted({r.name for group in pkg.relations("Pre-Depends") for r in group} & names)
        for pkg in resolution.packages
    }


class ResolvedDebian(NamedTuple):
    """What :func:`resolve_debian` chose: the packages, exactly (no .deb downloaded yet)."""

    suite: str
    debarch: str
    sources: tuple[DebianSource, ...]
    client: DebianMirror
    resolution: Resolution
    records: tuple[PackageRecord, ...]


def resolve_debian(
    *,
    arch: str,
    suite: str = DEFAULT_SUITE,
    packages: Sequence[str] = (),
    mirror: str | None = None,
    sources: Sequence[DebianSource] | None = None,
    keyring: Keyring = "auto",
    cache_dir: Path | None = None,
) -> ResolvedDebian:
    """Step 1 of :func:`prepare_debian_tree`: fetch the signed indexes and resolve the package
    set (each package's version and SHA256 from the index). Cheap next to the rest, so a
    caller can look for a finished image of exactly these packages before anything else."""
    debarch = deb_arch(arch)
    debs_dir = debian_deb_dir(debarch, cache_dir)
    chosen = tuple(sources or default_sources(mirror, suite=suite))
    client = DebianMirror(chosen, debarch, index_dir=debs_dir / f".mirror-{suite}",
                          keyring=keyring)  # fmt: skip
    index = PackageIndex.from_mirror(client)
    resolution = resolve(index, packages)
    records = tuple(client.lookup(p.name, p.version) for p in resolution.packages)
    return ResolvedDebian(suite, debarch, chosen, client, resolution, records)


def prepare_debian_tree(
    dest_dir: Path | str,
    *,
    arch: str,
    suite: str = DEFAULT_SUITE,
    packages: Sequence[str] = (),
    mirror: str | None = None,
    sources: Sequence[DebianSource] | None = None,
    keyring: Keyring = "auto",
    cache_dir: Path | None = None,
    copy_debs: bool = True,
    resolved: ResolvedDebian | None = None,
) -> PreparedTree:
    """Resolve, download and unpack a Debian ``suite`` for ``arch`` into ``DEST/tree``.

    ``packages`` are added to the required set and :data:`BASE_PACKAGES`; ``mirror`` (or
    ``sources``) as for the default guest. ``resolved`` (from :func:`resolve_debian`) skips
    the resolution (the other arguments but ``dest_dir``, ``cache_dir`` and ``copy_debs`` are
    then unused). Writes ``DEST/manifest.json``; ``DEST/tree`` must
    not exist or be empty, and is removed again when the build fails. ``copy_debs=False``
    leaves the .debs out of the tree (the second stage is then given their directory, see
    :func:`~vzkit.image._debian_stage2.lay_down_second_stage`). Raises
    PackageNotFoundError / UnsatisfiableError (resolution), DownloadError (network, checksums),
    UnpackError, all :class:`~vzkit.errors.GuestError`.
    """
    dest = Path(dest_dir)
    t0 = time.monotonic()
    if resolved is None:
        resolved = resolve_debian(
            arch=arch, suite=suite, packages=packages, mirror=mirror, sources=sources,
            keyring=keyring, cache_dir=cache_dir,
        )  # fmt: skip
    suite, debarch, chosen, client, resolution, records = resolved
    debs_dir = debian_deb_dir(debarch, cache_dir)
    t1 = time.monotonic()
    paths = client.download(records, debs_dir)
    record_trust(debs_dir, paths, client.trust)
    debs = {record.name: path for record, path in zip(records, paths, strict=True)}
    t2 = time.monotonic()
    tree = private_dir(dest) / "tree"
    writer = TreeWriter(tree, epoch=_epoch())  # refuses a tree that holds anything
    try:
        _unpack(writer, debarch, debs)
        script = lay_down_second_stage(writer, debs, sorted(resolution.core), chosen,
                                       _pre_depends(resolution), copy_debs=copy_debs)  # fmt: skip
        meta = writer.finish()
    except BaseException:
        shutil.rmtree(tree, ignore_errors=True)
        raise
    t3 = time.monotonic()
    manifest = _manifest(suite, debarch, chosen, writer.epoch, resolution, records, script,
                         client.trust, copy_debs)  # fmt: skip
    with open_private(dest / "manifest.json", append=False) as out:
        out.write(manifest.to_json().encode())
    log.info(
        "debian %s %s: %d packages (%.1f MB) resolved in %.2f s, fetched in %.1f s, "
        "unpacked in %.1f s; digest %s", suite, debarch, len(records),
        sum(r.size for r in records) / 1e6, t1 - t0, t2 - t1, t3 - t2, manifest.digest,
    )  # fmt: skip
    return PreparedTree(tree, meta, manifest)


def _manifest(
    suite: str,
    debarch: str,
    sources: Sequence[DebianSource],
    epoch: int,
    resolution: Resolution,
    records: Sequence[PackageRecord],
    script: str,
    trust: str,
    debs_in_tree: bool,
) -> DebianManifest:
    return DebianManifest(
        suite=suite,
        arch=debarch,
        sources=tuple(f"{s.url.rstrip('/')} {s.suite} {s.component}" for s in sources),
        epoch=epoch,
        core=tuple(sorted(resolution.core)),
        packages=tuple(
            ManifestPackage(
                name=r.name,
                version=r.version,
                architecture=r.architecture,
                sha256=r.sha256,
                size=r.size,
                deb=r.file_name,
            )
            for r in records
        ),
        stage2_sha256=hashlib.sha256(script.encode()).hexdigest(),
        debs_in_tree=debs_in_tree,
        trust=trust,
    )
