"""Obtain the Debian packages a guest is built from: a kernel and ``busybox-static``.

Packages come from a directory of pre-downloaded ``.deb`` files (:func:`find_guest_debs`) or
are fetched into a cache directory (:func:`fetch_guest_debs`) from one of two sources:

- ``apt``: ``apt-get download`` (Debian/Ubuntu hosts), see :func:`apt_download`;
- ``mirror``: straight from a Debian mirror over HTTPS, verified against the repository's
  Release and Packages checksums (any host, e.g. macOS), see :mod:`vzkit.image._mirror`.

The default, ``auto``, uses apt when ``apt-get`` exists and falls back to the mirror when apt
fails; ``$VZKIT_DEB_SOURCE`` (``auto``/``apt``/``mirror``) or the ``source`` argument choose
explicitly, and naming a mirror (``$VZKIT_DEBIAN_MIRROR`` or ``mirror=``) selects ``mirror``.

How each .deb in the cache was verified is remembered next to it (``.trust.json``, bound to
the file's size and mtime) and carried in :attr:`GuestDebs.trust`, see :data:`Trust`.

``apt-get download PKG:ARCH`` only finds packages of architectures dpkg knows about. For a
foreign architecture that is not enabled (``dpkg --add-architecture``), :func:`apt_download`
runs apt with a private package-list directory under the destination, configured for that
architecture only: this needs neither root nor changes to the host's apt configuration.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from vzkit.errors import GuestError

from ._deb import DebPackage, compare_versions
from ._download import DownloadError
from ._mirror import (
    DebianMirror,
    DebianSource,
    Keyring,
    PackageRecord,
    default_sources,
    parse_relation,
)

__all__ = [
    "DEB_ARCHES",
    "DEB_SOURCES",
    "TRUST_LEVELS",
    "GuestDebs",
    "Trust",
    "apt_download",
    "deb_arch",
    "fetch_guest_debs",
    "find_guest_debs",
    "kernel_metapackage",
    "mirror_guest_debs",
    "record_trust",
    "recorded_trust",
]

log = logging.getLogger(__name__)

DebSource = Literal["auto", "apt", "mirror"]
DEB_SOURCES: tuple[DebSource, ...] = ("auto", "apt", "mirror")
"""Where :func:`fetch_guest_debs` gets packages from."""

DEB_ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}
"""Guest architecture (``uname -m`` style) -> Debian architecture."""

Trust = Literal["unknown", "local", "unsigned", "apt", "verified"]
"""How the packages of an image were verified, weakest first:

- ``unknown``: cached .debs whose origin was not recorded (an older vzkit, or copied in);
- ``local``: the caller's own .debs (``deb_dir``), not checked by vzkit;
- ``unsigned``: from a Debian mirror by SHA256 chain, but the Release signature not checked;
- ``apt``: ``apt-get download``, verified by apt against its signed package lists;
- ``verified``: from a Debian mirror, the Release's OpenPGP signature checked with gpgv.
"""
TRUST_LEVELS: tuple[Trust, ...] = ("unknown", "local", "unsigned", "apt", "verified")
_TRUST_FILE = ".trust.json"

_KERNEL_PACKAGE = re.compile(r"^linux-image-\d[^ ]*$")
_LIST_MAX_AGE = 24 * 3600.0
_APT_TIMEOUT = 600.0


def deb_arch(arch: str) -> str:
    """``"x86_64"`` -> ``"amd64"``, ``"aarch64"`` -> ``"arm64"``; Debian names pass through."""
    if arch in DEB_ARCHES:
        return DEB_ARCHES[arch]
    if arch in DEB_ARCHES.values():
        return arch
    raise GuestError(f"unsupported guest architecture {arch!r} (use x86_64 or aarch64)")


def kernel_metapackage(arch: str) -> str:
    """The Debian metapackage that tracks the current cloud kernel for ``arch``."""
    return f"linux-image-cloud-{deb_arch(arch)}"


def _is_kernel(pkg: DebPackage) -> bool:
    return bool(_KERNEL_PACKAGE.match(pkg.name)) and not pkg.name.endswith("-dbg")


@dataclass(frozen=True)
class GuestDebs:
    """The two packages a guest is built from, and how they were verified (the weaker one)."""

    kernel: Path
    busybox: Path
    trust: Trust = field(default="local", compare=False)


def _weakest(levels: Sequence[Trust]) -> Trust:
    """The weakest of some trust levels (``unknown`` for none)."""
    return min(levels, key=TRUST_LEVELS.index, default="unknown")


def _read_trust_file(cache: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads((cache / _TRUST_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def record_trust(cache: Path, paths: Sequence[Path], trust: Trust) -> None:
    """Remember that ``paths`` (files in ``cache``) were verified as ``trust``."""
    records = _read_trust_file(cache)
    for path in paths:
        size, mtime_ns = _stamp(path)
        records[path.name] = {"trust": trust, "size": size, "mtime_ns": mtime_ns}
    records = {k: v for k, v in records.items() if (cache / k).is_file()}
    tmp = cache / f"{_TRUST_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(records, indent=1, sort_keys=True))
    os.replace(tmp, cache / _TRUST_FILE)


def recorded_trust(path: Path) -> Trust:
    """How ``path`` was verified when it was downloaded; ``unknown`` if it changed since."""
    entry = _read_trust_file(path.parent).get(path.name, {})
    try:
        unchanged = (entry.get("size"), entry.get("mtime_ns")) == _stamp(path)
    except OSError:
        return "unknown"
    if not unchanged:
        return "unknown"
    return next((level for level in TRUST_LEVELS if level == entry.get("trust")), "unknown")


def _cached(debs: GuestDebs) -> GuestDebs:
    """``debs`` (in a download cache) with the trust recorded for both files."""
    trust = _weakest([recorded_trust(debs.kernel), recorded_trust(debs.busybox)])
    return replace(debs, trust=trust)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=_APT_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise GuestError(
            f"{cmd[0]} not found: apt is needed to download packages; on other systems fetch "
            "the .debs by hand and pass deb_dir="
        ) from None
    except subprocess.TimeoutExpired:
        raise GuestError(f"{' '.join(cmd)} timed out after {_APT_TIMEOUT:.0f}s") from None


def _enabled_arches() -> set[str]:
    arches: set[str] = set()
    for flag in ("--print-architecture", "--print-foreign-architectures"):
        try:
            out = subprocess.run(
                ["dpkg", flag], capture_output=True, text=True, check=True, timeout=30
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return set()
        arches.update(out.split())
    return arches


def _private_apt(state: Path, debarch: str) -> list[str]:
    """apt options for a self-contained package list of one architecture under ``state``."""
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    return [
        "-o", f"APT::Architecture={debarch}",
        "-o", f"APT::Architectures::={debarch}",
        "-o", f"Dir::State::Lists={state / 'lists'}",
        "-o", f"Dir::Cache={state / 'cache'}",
        "-o", "Dir::State::status=/dev/null",
    ]  # fmt: skip


def _refresh_private_lists(state: Path, options: list[str]) -> None:
    stamp = state / "updated"
    if stamp.exists() and time.time() - stamp.stat().st_mtime < _LIST_MAX_AGE:
        return
    result = _run(["apt-get", "-q", *options, "update"], state)
    if result.returncode != 0:
        raise GuestError(f"apt-get update (private lists in {state}) failed:\n{result.stderr}")
    stamp.touch()


def _fail(packages: Sequence[str], debarch: str, stderr: str, private: bool) -> GuestError:
    hint = ""
    if "Unable to locate package" in stderr or "Can't select" in stderr:
        hint = (
            "\nthe package lists may be stale or lack this architecture: run "
            f"'dpkg --add-architecture {debarch} && apt-get update' (as root)"
            if not private
            else "\nthe package is not in the configured apt sources for this architecture"
        )
    errors = "\n".join(line for line in stderr.splitlines() if not line.startswith("W:"))
    return GuestError(f"apt-get download {' '.join(packages)} ({debarch}) failed:\n{errors}{hint}")


def _downloaded(dest: Path, name: str, debarch: str) -> Path:
    candidates = [
        p for arch in (debarch, "all") for p in dest.glob(f"{name}_*_{arch}.deb") if p.is_file()
    ]
    if not candidates:
        raise GuestError(f"apt-get reported success but no {name}_*.deb appeared in {dest}")
    return _newest([DebPackage(p) for p in candidates]).path


def apt_download(
    packages: Sequence[str], dest_dir: Path | str, arch: str, *, private: bool | None = None
) -> list[Path]:
    """Download ``packages`` for ``arch`` into ``dest_dir`` with ``apt-get download``.

    Returns the ``.deb`` paths in the order of ``packages``. ``private`` selects apt's
    package lists: False uses the host's (the architecture must be enabled in dpkg), True a
    private per-architecture list under ``dest_dir/.apt-ARCH`` (refreshed daily), None (the
    default) the host's when it knows the architecture and the package, else the private one.
    Failures raise GuestError carrying apt's error output.
    """
    debarch = deb_arch(arch)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    if not packages:
        return []
    specs = [f"{name}:{debarch}" for name in packages]
    if private is None:
        private = debarch not in _enabled_arches()
        if not private:
            result = _run(["apt-get", "-q", "download", *specs], dest)
            if result.returncode == 0:
                return [_downloaded(dest, name, debarch) for name in packages]
            if "Unable to locate package" not in result.stderr:
                raise _fail(packages, debarch, result.stderr, private=False)
            private = True  # stale or incomplete host lists: fall back to our own
    options: list[str] = []
    if private:
        state = dest / f".apt-{debarch}"
        options = _private_apt(state, debarch)
        _refresh_private_lists(state, options)
    result = _run(["apt-get", "-q", *options, "download", *specs], dest)
    if result.returncode != 0:
        raise _fail(packages, debarch, result.stderr, private)
    return [_downloaded(dest, name, debarch) for name in packages]


def _scan(deb_dir: Path, debarch: str) -> list[DebPackage]:
    if not deb_dir.is_dir():
        raise GuestError(f"package directory {deb_dir} does not exist")
    found = []
    for path in sorted(deb_dir.glob("*.deb")):
        pkg = DebPackage(path)
        if pkg.architecture in (debarch, "all"):
            found.append(pkg)
    return found


def _newest(pkgs: list[DebPackage]) -> DebPackage:
    best = pkgs[0]
    for pkg in pkgs[1:]:
        if compare_versions(pkg.version, best.version) > 0:
            best = pkg
    return best


def find_guest_debs(deb_dir: Path | str, arch: str) -> GuestDebs:
    """Pick the kernel and busybox-static packages for ``arch`` among ``deb_dir/*.deb``.

    The kernel is a real ``linux-image-<version>-<flavour>`` package. With several, the one
    the cloud metapackage (if present) depends on wins, else the highest version.
    """
    debarch = deb_arch(arch)
    pkgs = _scan(Path(deb_dir), debarch)
    busyboxes = [p for p in pkgs if p.name == "busybox-static"]
    kernels = [p for p in pkgs if _is_kernel(p)]
    if not busyboxes:
        raise GuestError(f"no busybox-static package for {debarch} in {deb_dir}")
    if not kernels:
        raise GuestError(f"no linux-image-<version> kernel package for {debarch} in {deb_dir}")
    kernel = None
    metas = [p for p in pkgs if p.name == kernel_metapackage(arch)]
    if metas:
        wanted = {name for group in _newest(metas).depends for name in group}
        chosen = [p for p in kernels if p.name in wanted]
        kernel = _newest(chosen) if chosen else None
    return GuestDebs(kernel=(kernel or _newest(kernels)).path, busybox=_newest(busyboxes).path)


def _resolve_kernel(meta: DebPackage, dest: Path, arch: str) -> Path:
    """Follow ``Depends`` from a metapackage to the real ``linux-image-<version>`` package."""
    pkg = meta
    for _ in range(4):
        if _is_kernel(pkg):
            return pkg.path
        targets = [n for group in pkg.depends for n in group if n.startswith("linux-image-")]
        if not targets:
            raise GuestError(f"{pkg.name} {pkg.version} depends on no linux-image package")
        local = [DebPackage(p) for p in dest.glob(f"{targets[0]}_*.deb") if p.is_file()]
        if local:
            pkg = _newest(local)
        else:
            pkg = DebPackage(apt_download([targets[0]], dest, arch)[0])
            record_trust(dest, [pkg.path], "apt")
    raise GuestError(f"{meta.name}: linux-image dependency chain too long")


def _mirror_kernel(client: DebianMirror, meta: PackageRecord) -> PackageRecord:
    """Follow ``Depends`` (with its ``=`` version) from the metapackage to the real kernel."""
    pkg = meta
    for _ in range(4):
        if _KERNEL_PACKAGE.match(pkg.name) and not pkg.name.endswith("-dbg"):
            return pkg
        targets = [r for r in parse_relation(pkg.depends) if r[0].startswith("linux-image-")]
        if not targets:
            raise GuestError(f"{pkg.name} {pkg.version} depends on no linux-image package")
        name, op, version = targets[0]
        pkg = client.lookup(name, version if op == "=" else None)
    raise GuestError(f"{meta.name}: linux-image dependency chain too long")


def mirror_guest_debs(
    cache_dir: Path | str,
    arch: str,
    *,
    sources: Sequence[DebianSource] | None = None,
    mirror: str | None = None,
    keyring: Keyring = "auto",
) -> GuestDebs:
    """Download the kernel metapackage, the kernel and busybox-static from a Debian mirror.

    ``sources`` default to :func:`~vzkit.image._mirror.default_sources` of ``mirror``. The
    newest versions across the sources win; every file is verified against the indexes.
    """
    cache = Path(cache_dir)
    client = DebianMirror(
        sources or default_sources(mirror), deb_arch(arch), index_dir=cache / ".mirror",
        keyring=keyring,
    )  # fmt: skip
    meta = client.lookup(kernel_metapackage(arch))
    kernel = _mirror_kernel(client, meta)
    busybox = client.lookup("busybox-static")
    paths = client.download([meta, kernel, busybox], cache)
    record_trust(cache, paths, client.trust)
    return GuestDebs(kernel=paths[1], busybox=paths[2], trust=client.trust)


def choose_source(source: str | None = None, mirror: str | None = None) -> DebSource:
    """``source``, else ``$VZKIT_DEB_SOURCE``, else ``mirror`` when one is named, else auto."""
    chosen = source or os.environ.get("VZKIT_DEB_SOURCE", "").strip()
    if not chosen:
        named = mirror or os.environ.get("VZKIT_DEBIAN_MIRROR", "").strip()
        chosen = "mirror" if named else "auto"
    for known in DEB_SOURCES:
        if chosen == known:
            return known
    raise GuestError(f"unknown package source {chosen!r} (use one of {', '.join(DEB_SOURCES)})")


def _apt_guest_debs(cache: Path, arch: str) -> GuestDebs:
    meta_path, busybox = apt_download([kernel_metapackage(arch), "busybox-static"], cache, arch)
    record_trust(cache, [meta_path, busybox], "apt")
    kernel = _resolve_kernel(DebPackage(meta_path), cache, arch)
    return _cached(GuestDebs(kernel=kernel, busybox=busybox))


def fetch_guest_debs(
    cache_dir: Path | str,
    arch: str,
    *,
    refresh: bool = False,
    source: str | None = None,
    mirror: str | None = None,
) -> GuestDebs:
    """Kernel and busybox-static packages for ``arch``, downloaded into ``cache_dir``.

    The cloud kernel metapackage (``linux-image-cloud-ARCH``) is downloaded and its
    ``Depends`` followed to the real kernel package. Without ``refresh``, packages already
    in the cache are used as they are and nothing is downloaded. ``source`` is ``"apt"``,
    ``"mirror"`` or ``"auto"`` (see the module docs); ``mirror`` a Debian mirror URL.
    ``trust`` of the result says how the packages were verified (see :data:`Trust`).
    """
    cache = Path(cache_dir)
    chosen = choose_source(source, mirror)
    if not refresh and cache.is_dir():
        try:
            return _cached(find_guest_debs(cache, arch))
        except GuestError:
            pass
    if refresh and cache.is_dir():
        for stale in cache.glob(f"{kernel_metapackage(arch)}_*.deb"):
            stale.unlink()
    if chosen == "mirror" or (chosen == "auto" and shutil.which("apt-get") is None):
        return mirror_guest_debs(cache, arch, mirror=mirror)
    try:
        return _apt_guest_debs(cache, arch)
    except GuestError as apt_err:
        if chosen == "apt":
            raise
        log.warning("apt-get download failed, trying the Debian mirror: %s", apt_err)
        try:
            return mirror_guest_debs(cache, arch, mirror=mirror)
        except DownloadError as err:
            raise type(err)(
                f"{err}\n(apt-get download had failed first: {apt_err})",
                url=err.url,
                status=err.status,
            ) from err
