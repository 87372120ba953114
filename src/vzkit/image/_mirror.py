"""A small Debian repository client: find and download .debs without apt (e.g. on macOS).

For each source (a mirror URL and a suite, component ``main``) :class:`DebianMirror` reads
``dists/SUITE/InRelease`` (or ``Release``), takes the SHA256 and size of
``main/binary-ARCH/Packages.xz`` (or ``.gz``) from it, downloads and verifies that index, and
looks packages up in it. A package is downloaded from its ``Filename`` and checked against
the ``Size`` and ``SHA256`` of its ``Packages`` stanza before it appears in the cache (see
:mod:`vzkit.image._download`). The newest version across all sources wins, as in apt.
Fetching and verifying the Release file (signature, dates, its SHA256 list) and the errors
of the client live in :mod:`vzkit.image._release`; this module owns the ``Packages`` indexes,
package records and .deb downloads.

Trust: the chain Release -> Packages -> .deb is verified by SHA256 at every step, so the
.debs are exactly what the Release file names. When ``gpgv`` and the Debian archive keyring
are installed (Debian/Ubuntu hosts), the Release file's OpenPGP signature is checked, as apt
does (:attr:`DebianMirror.trust` is ``"verified"``). Without them the Release file is trusted
because it comes over HTTPS from the configured mirror: :meth:`DebianMirror.load` logs a
WARNING once, and :attr:`DebianMirror.trust` is ``"unsigned"`` (recorded with the image).
A Release whose ``Valid-Until`` has passed (a stale mirror, or a replayed old Release) or whose
``Date`` lies more than an hour ahead (a clock far behind would defeat ``Valid-Until``) is
refused with :class:`ExpiredReleaseError`.

Every name the mirror supplies is checked before it becomes a path or a URL
(:class:`MirrorFieldError` names the field and value): package names and versions by Debian
policy syntax, ``Filename`` as a relative ``pool/...`` path of plain components, the paths,
sizes and hashes of the Release's SHA256 list. A .deb is stored under a name built from the
checked ``Package``, ``Version`` and ``Architecture`` (as ``apt-get download`` names it),
directly inside the destination directory.

Configuration (environment; explicit arguments win): ``VZKIT_DEBIAN_MIRROR`` (default
``https://deb.debian.org/debian``), ``VZKIT_DEBIAN_SECURITY_MIRROR`` (default
``https://deb.debian.org/debian-security``; ``none`` to skip), ``VZKIT_DEBIAN_SUITE``
(default ``bookworm``; ``-updates`` and ``-security`` are added), ``VZKIT_DEBIAN_KEYRING``
(a keyring file, or ``none`` to skip the signature check), ``VZKIT_DEBIAN_CHECK_VALID_UNTIL``
(``no`` accepts an expired Release, e.g. from ``snapshot.debian.org``, with a warning).
"""

from __future__ import annotations

import gzip
import logging
import lzma
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .._progress import Progress
from ..errors import GuestError
from ._deb import compare_versions, is_package_name, is_version, parse_control
from ._download import DownloadError, download
from ._release import (
    SHA256_HEX,
    SIZE_DIGITS,
    DebianSource,
    ExpiredReleaseError,
    Keyring,
    MirrorError,
    MirrorFieldError,
    SignatureError,
    fetch_release,
    parse_hashes,
    plain_path,
    refuse,
    resolve_keyring,
    strip_clearsign,
)

__all__ = [
    "DEFAULT_MIRROR",
    "DEFAULT_SECURITY_MIRROR",
    "DEFAULT_SUITE",
    "DebianMirror",
    "DebianSource",
    "ExpiredReleaseError",
    "Keyring",
    "MirrorError",
    "MirrorFieldError",
    "PackageRecord",
    "SignatureError",
    "deb_file_name",
    "default_sources",
    "parse_packages",
    "parse_relation",
    "strip_clearsign",
]

log = logging.getLogger(__name__)

DEFAULT_MIRROR = "https://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "https://deb.debian.org/debian-security"
DEFAULT_SUITE = "bookworm"
_INDEXES = (("Packages.xz", lzma.decompress), ("Packages.gz", gzip.decompress))
_RELATION = re.compile(
    r"^\s*([a-z0-9][a-z0-9+.\-]*)(?::\S+)?\s*(?:\(\s*([<>=]+)\s*([^)\s]+)\s*\))?"
)
_POOL_PART = re.compile(r"[A-Za-z0-9+._~-]+")  # a component of a Filename: no %, no spaces


def _check_filename(value: str, url: str) -> str:
    """A ``Filename`` of a Packages stanza: ``pool/.../NAME.deb``, else MirrorFieldError."""
    if not (value.startswith("pool/") and value.endswith(".deb") and plain_path(value, _POOL_PART)):
        raise refuse("Filename", value, url, "not a relative pool/.../*.deb path of plain names")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class PackageRecord:
    """What a ``Packages`` stanza says about one .deb, and where it lives."""

    name: str
    version: str
    architecture: str
    filename: str
    size: int
    sha256: str
    depends: str
    base_url: str

    @property
    def url(self) -> str:
        return f"{self.base_url.rstrip('/')}/{self.filename}"

    @property
    def file_name(self) -> str:
        return deb_file_name(self.name, self.version, self.architecture)


def deb_file_name(name: str, version: str, arch: str) -> str:
    """The name ``apt-get download`` gives a .deb (``:`` of an epoch as ``%3a``)."""
    return f"{name}_{version.replace(':', '%3a')}_{arch}.deb"


def _confined(directory: Path, name: str) -> Path:
    """``directory / name`` for a plain file name we built; anything else is a bug or an attack."""
    if not name or "/" in name or "\0" in name or "\n" in name or name.startswith("."):
        raise refuse("file name", name, str(directory), "not a plain file name")
    return directory / name


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def default_sources(
    mirror: str | None = None, *, security_mirror: str | None = None, suite: str | None = None
) -> tuple[DebianSource, ...]:
    """``SUITE`` and ``SUITE-updates`` from ``mirror``, ``SUITE-security`` from the security one.

    Unset arguments come from the environment (see the module docs), then the defaults. The
    kernel is often newest in ``-security``; a security mirror of ``none`` leaves it out.
    """
    base = mirror or _env("VZKIT_DEBIAN_MIRROR", DEFAULT_MIRROR)
    security = security_mirror or _env("VZKIT_DEBIAN_SECURITY_MIRROR", DEFAULT_SECURITY_MIRROR)
    name = suite or _env("VZKIT_DEBIAN_SUITE", DEFAULT_SUITE)
    sources = [
        DebianSource(url=base, suite=name),
        DebianSource(url=base, suite=f"{name}-updates", optional=True),
    ]
    if security.lower() not in ("none", "off", "no"):
        sources.append(DebianSource(url=security, suite=f"{name}-security", optional=True))
    return tuple(sources)


def parse_packages(text: str) -> dict[str, list[str]]:
    """Raw ``Packages`` stanzas by package name (parsed on demand: the index is large)."""
    stanzas: dict[str, list[str]] = {}
    for stanza in text.split("\n\n"):
        stanza = stanza.strip("\n")
        if not stanza.startswith("Package:"):
            continue
        name = stanza[8 : stanza.find("\n") if "\n" in stanza else None].strip()
        stanzas.setdefault(name, []).append(stanza)
    return stanzas


def parse_relation(value: str) -> list[tuple[str, str | None, str | None]]:
    """``"a (= 1), b | c"`` -> ``[("a", "=", "1"), ("b", None, None)]`` (first alternatives)."""
    relations = []
    for clause in value.split(","):
        if clause.strip():
            match = _RELATION.match(clause.split("|")[0])
            if match is not None:
                relations.append((match.group(1), match.group(2), match.group(3)))
    return relations


def _record(name: str, fields: dict[str, str], base_url: str, where: str) -> PackageRecord:
    """A checked PackageRecord from the fields of ``name``'s stanza (``where`` for errors)."""
    for key in ("Version", "Filename", "Size", "SHA256"):
        if key not in fields:
            raise MirrorError(f"{where}: the stanza for {name} lacks its {key} field", url=where)
    version, size, sha256 = fields["Version"], fields["Size"], fields["SHA256"]
    if not is_version(version):
        raise refuse(
            "Version", version, where, "not a Debian version ([epoch:]upstream[-revision])"
        )
    if SIZE_DIGITS.fullmatch(size) is None:
        raise refuse("Size", size, where, "not a size in bytes")
    if SHA256_HEX.fullmatch(sha256) is None:
        raise refuse("SHA256", sha256, where, "not a SHA-256 hex digest")
    return PackageRecord(
        name=name,
        version=version,
        architecture=fields["Architecture"],
        filename=_check_filename(fields["Filename"], where),
        size=int(size),
        sha256=sha256.lower(),
        depends=fields.get("Depends", ""),
        base_url=base_url,
    )


class DebianMirror:
    """The ``Packages`` indexes of some sources for one architecture, and downloads from them.

    ``index_dir`` caches the verified indexes by hash. ``keyring``: ``"auto"`` checks Release
    signatures when gpgv and the Debian keyring are there, a path always, None never (then
    :meth:`load` warns once and :attr:`trust` is ``"unsigned"``). ``check_valid_until``:
    refuse expired Release files (None: unless ``$VZKIT_DEBIAN_CHECK_VALID_UNTIL`` is ``no``).
    """

    def __init__(
        self,
        sources: Sequence[DebianSource],
        debarch: str,
        *,
        index_dir: Path | str,
        keyring: Keyring = "auto",
        timeout: float = 30.0,
        check_valid_until: bool | None = None,
    ) -> None:
        if not sources:
            raise ValueError("DebianMirror needs at least one source")
        self.sources = tuple(sources)
        self.debarch = debarch
        self.index_dir = Path(index_dir)
        self.keyring = resolve_keyring(keyring)
        self.timeout = timeout
        if check_valid_until is None:
            setting = os.environ.get("VZKIT_DEBIAN_CHECK_VALID_UNTIL", "").strip().lower()
            check_valid_until = setting not in ("no", "off", "0", "false")
        self.check_valid_until = check_valid_until
        self._packages: list[tuple[DebianSource, dict[str, list[str]]]] | None = None
        self._used: set[str] = set()

    def _index(self, source: DebianSource, release: dict[str, str]) -> dict[str, list[str]]:
        hashes = parse_hashes(release, f"{source.dists}/Release")
        directory = f"{source.component}/binary-{self.debarch}"
        for name, decompress in _INDEXES:
            entry = hashes.get(f"{directory}/{name}")
            if entry is None:
                continue
            sha256, size = entry
            plain = f"{source.dists}/{directory}/{name}"
            target = self.index_dir / f"{sha256}{Path(name).suffix}"
            self._used.add(target.name)
            with Progress(f"package index {source.suite}/{directory}", total=size) as progress:
                urls = [plain]
                if release.get("Acquire-By-Hash", "").lower() == "yes":
                    urls.insert(0, f"{source.dists}/{directory}/by-hash/SHA256/{sha256}")
                for url in urls:
                    try:
                        download(url, target, size=size, sha256=sha256, timeout=self.timeout,
                                 on_bytes=progress.advance)  # fmt: skip
                        break
                    except DownloadError as err:
                        if err.status != 404 or url == urls[-1]:
                            raise
            try:
                return parse_packages(decompress(target.read_bytes()).decode("utf-8", "replace"))
            except (lzma.LZMAError, OSError, EOFError) as err:
                target.unlink(missing_ok=True)
                raise MirrorError(f"{plain}: cannot decompress: {err}", url=plain) from err
        raise MirrorError(
            f"{source.dists}: the Release file lists no {directory}/Packages.xz or .gz "
            f"(no {self.debarch} packages in {source.component}?)",
            url=f"{source.dists}/Release",
        )

    @property
    def trust(self) -> Literal["verified", "unsigned"]:
        """``"verified"`` when Release signatures are checked, else ``"unsigned"``."""
        return "verified" if self.keyring is not None else "unsigned"

    def load(self) -> None:
        """Fetch and verify every source's Release and Packages index (once per instance).

        Without a keyring this logs one WARNING: the indexes are taken on HTTPS alone.
        """
        if self._packages is not None:
            return
        if self.keyring is None:
            log.warning(
                "Debian package indexes from %s are NOT signature-checked (no gpgv or no "
                "Debian archive keyring, or VZKIT_DEBIAN_KEYRING=none): trusting HTTPS and the "
                "mirror alone; the image is recorded as 'unsigned'. Install gpgv and "
                "debian-archive-keyring, or set VZKIT_DEBIAN_KEYRING to a keyring file",
                ", ".join(sorted({s.url for s in self.sources})),
            )
        loaded = []
        for source in self.sources:
            release = fetch_release(source, keyring=self.keyring, timeout=self.timeout,
                                    check_valid_until=self.check_valid_until)  # fmt: skip
            if release is not None:
                loaded.append((source, self._index(source, release)))
        self._packages = loaded
        self._prune()

    def _prune(self) -> None:
        """Drop cached indexes no current Release names (keeps the cache from growing)."""
        for path in self.index_dir.glob("*"):
            if path.suffix in (".xz", ".gz", ".part") and path.name not in self._used:
                path.unlink(missing_ok=True)

    def stanzas(self) -> Iterator[tuple[DebianSource, str]]:
        """Every raw ``Packages`` stanza of every source, in source order, then index order.

        Unchecked text (for a resolver that must see every package's ``Provides`` and
        ``Priority``): take what it picks through :meth:`lookup`, which checks the fields.
        """
        self.load()
        assert self._packages is not None
        for source, stanzas in self._packages:
            for texts in stanzas.values():
                for text in texts:
                    yield source, text

    def candidates(self, name: str) -> list[PackageRecord]:
        """Every version of ``name`` for our architecture (or ``all``) in the sources.

        ``name`` (it may come from a mirror's ``Depends``) and every field of the records
        are checked first: MirrorFieldError names a malformed or unsafe one.
        """
        self.load()
        assert self._packages is not None
        if not is_package_name(name):
            where = f"{self.sources[0].dists}/{self.sources[0].component}"
            raise refuse("Package", name, where, "not a Debian package name ([a-z0-9][a-z0-9+.-]+)")
        found = []
        for source, stanzas in self._packages:
            where = f"{source.dists}/{source.component}/binary-{self.debarch}/Packages"
            for stanza in stanzas.get(name, []):
                try:
                    fields = parse_control(stanza)
                except GuestError as err:
                    raise MirrorError(
                        f"{where}: malformed stanza for {name}: {err}", url=where
                    ) from err
                if fields.get("Architecture") not in (self.debarch, "all"):
                    continue
                found.append(_record(name, fields, source.url, where))
        return found

    def lookup(self, name: str, version: str | None = None) -> PackageRecord:
        """The newest ``name`` (or exactly ``version``); MirrorError when there is none."""
        found = self.candidates(name)
        if version is not None:
            found = [r for r in found if r.version == version]
        if not found:
            where = ", ".join(f"{s.dists}/{s.component}" for s in self.sources)
            wanted = f"{name} (= {version})" if version else name
            raise MirrorError(
                f"package {wanted} for {self.debarch} not found in {where}", url=where
            )
        best = found[0]
        for record in found[1:]:
            if compare_versions(record.version, best.version) > 0:
                best = record
        return best

    def download(self, records: Iterable[PackageRecord], dest_dir: Path | str) -> list[Path]:
        """Download ``records`` into ``dest_dir`` (verified, atomically), with a progress bar."""
        wanted = list(records)
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        total = sum(r.size for r in wanted)
        paths = []
        with Progress(f"downloading {len(wanted)} .deb(s)", total=total) as progress:
            for record in wanted:
                progress.step(record.file_name)
                target = _confined(dest, record.file_name)
                if target.exists():
                    progress.advance(record.size)
                path = download(record.url, target, size=record.size, sha256=record.sha256,
                                timeout=self.timeout, on_bytes=progress.advance)  # fmt: skip
                paths.append(path)
        return paths
