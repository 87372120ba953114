"""Read Debian binary packages (``.deb``) without dpkg.

A ``.deb`` is an ``ar`` archive holding ``debian-binary`` (the format version), a
``control.tar.*`` (package metadata) and a ``data.tar.*`` (the files to install). This module
parses the ``ar`` container, the ``control`` file (deb822 fields) and streams the data tarball
through :mod:`tarfile`, which handles gzip, xz, bzip2 and uncompressed tarballs. Zstandard
members raise :class:`~vzkit.errors.GuestError` unless the interpreter's ``tarfile`` knows them
(Python 3.14+).

The helpers :func:`parse_depends` and :func:`compare_versions` implement the parts of Debian
policy the guest builder needs: dependency fields and version ordering.
"""

from __future__ import annotations

import io
import lzma
import posixpath
import re
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from vzkit.errors import GuestError

__all__ = [
    "DebEntry",
    "DebPackage",
    "compare_versions",
    "is_package_name",
    "is_version",
    "parse_control",
    "parse_depends",
    "tar_entry",
]

_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60
_StreamMode = Literal["r|", "r|gz", "r|xz", "r|bz2", "r|zst"]
_TAR_SUFFIXES: dict[str, _StreamMode] = {
    "": "r|",
    ".gz": "r|gz",
    ".xz": "r|xz",
    ".bz2": "r|bz2",
    ".zst": "r|zst",
}

_PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_VERSION = re.compile(r"(?:([0-9]+):)?([0-9][A-Za-z0-9.+~:-]*?)(?:-([A-Za-z0-9.+~]+))?")
_MAX_FIELD = 256

EntryKind = Literal["file", "dir", "symlink", "hardlink", "chardev", "blockdev", "fifo"]


@dataclass(frozen=True)
class DebEntry:
    """One member of a package's data tarball.

    ``path`` is absolute and normalised (``./usr/bin/x`` becomes ``/usr/bin/x``); ``mode``
    holds the permission bits only; ``linkname`` is the target of a symlink or hard link.
    ``uid``/``gid`` are the numeric owner, ``mtime`` the modification time and
    ``devmajor``/``devminor`` the device numbers of a device node, as the tarball records them.
    """

    path: str
    kind: EntryKind
    mode: int
    size: int
    linkname: str = ""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    devmajor: int = 0
    devminor: int = 0


@dataclass(frozen=True)
class _ArMember:
    name: str
    offset: int
    size: int


class _Slice(io.RawIOBase):
    """A read-only window ``[offset, offset + size)`` onto an open binary file."""

    def __init__(self, fh: IO[bytes], offset: int, size: int) -> None:
        super().__init__()
        self._fh = fh
        self._pos = offset
        self._end = offset + size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        want = min(len(buffer), self._end - self._pos)
        if want <= 0:
            return 0
        self._fh.seek(self._pos)
        chunk = self._fh.read(want)
        buffer[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)


def _read_ar_index(fh: IO[bytes], where: str) -> list[_ArMember]:
    if fh.read(len(_AR_MAGIC)) != _AR_MAGIC:
        raise GuestError(f"{where}: not a Debian package (no ar archive header)")
    members: list[_ArMember] = []
    offset = len(_AR_MAGIC)
    while True:
        header = fh.read(_AR_HEADER)
        if not header:
            return members
        if len(header) < _AR_HEADER or header[58:60] != b"`\n":
            raise GuestError(f"{where}: corrupt ar member header at offset {offset}")
        name = header[0:16].decode("ascii", "replace").rstrip(" ").removesuffix("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise GuestError(f"{where}: bad size in ar member {name!r}") from None
        data_offset = offset + _AR_HEADER
        fh.seek(0, io.SEEK_END)
        if data_offset + size > fh.tell():
            raise GuestError(f"{where}: ar member {name!r} is truncated")
        members.append(_ArMember(name, data_offset, size))
        offset = data_offset + size + (size & 1)
        fh.seek(offset)


def parse_control(text: str) -> dict[str, str]:
    """Parse one deb822 paragraph into ``{field: value}``.

    Continuation lines (starting with a space or tab) are joined to the previous field's
    value with newlines, as dpkg keeps them. Raises GuestError on a line that is neither.
    """
    fields: dict[str, str] = {}
    current: str | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if fields:
                break  # only the first paragraph
            continue
        if line[0] in " \t":
            if current is None:
                raise GuestError(f"control line {lineno}: continuation without a field")
            fields[current] += "\n" + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or " " in name:
            raise GuestError(f"control line {lineno}: expected 'Field: value', got {line!r}")
        current = name
        fields[name] = value.strip()
    return fields


_RELATION = re.compile(r"^\s*([a-z0-9][a-z0-9+.\-]*)(?::[a-z0-9\-]+)?\s*(?:\(.*\))?\s*(?:\[.*\])?")


def parse_depends(value: str) -> list[list[str]]:
    """Package names in a ``Depends``-style field, as groups of alternatives.

    ``"a (>= 1), b | c:any"`` gives ``[["a"], ["b", "c"]]``; versions, architecture
    qualifiers and restrictions are dropped.
    """
    groups: list[list[str]] = []
    for clause in value.split(","):
        if not clause.strip():
            continue
        names = []
        for alt in clause.split("|"):
            match = _RELATION.match(alt)
            if match is None:
                raise GuestError(f"cannot parse dependency {alt.strip()!r}")
            names.append(match.group(1))
        groups.append(names)
    return groups


def is_package_name(name: str) -> bool:
    """Whether ``name`` is a package name by Debian policy 5.6.1: ``[a-z0-9][a-z0-9+.-]+``."""
    return len(name) <= _MAX_FIELD and _PACKAGE_NAME.fullmatch(name) is not None


def is_version(version: str) -> bool:
    """Whether ``version`` is ``[epoch:]upstream[-revision]`` by Debian policy 5.6.12.

    The epoch is a number; the upstream version starts with a digit and holds
    ``[A-Za-z0-9.+~-]`` (and ``:`` only after an epoch); the revision, after the last ``-``,
    holds ``[A-Za-z0-9.+~]``. So a valid version has no ``/``, space, NUL or newline.
    """
    match = _VERSION.fullmatch(version) if len(version) <= _MAX_FIELD else None
    if match is None or version.endswith("-"):  # an empty revision
        return False
    return match.group(1) is not None or ":" not in version


def _order(char: str) -> int:
    if char == "~":
        return -1
    if char.isalpha():
        return ord(char)
    return ord(char) + 256


def _compare_part(a: str, b: str) -> int:
    """dpkg's comparison of an upstream version or a revision."""
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ca = _order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            cb = _order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ca != cb:
                return -1 if ca < cb else 1
            i += 1
            j += 1
        si = i
        while i < len(a) and a[i].isdigit():
            i += 1
        sj = j
        while j < len(b) and b[j].isdigit():
            j += 1
        na, nb = int(a[si:i] or "0"), int(b[sj:j] or "0")
        if na != nb:
            return -1 if na < nb else 1
    return 0


def _split_version(version: str) -> tuple[int, str, str]:
    epoch, sep, rest = version.strip().partition(":")
    if not sep:
        epoch, rest = "0", version.strip()
    if not epoch.isdigit():
        raise GuestError(f"bad epoch in version {version!r}")
    upstream, sep, revision = rest.rpartition("-")
    if not sep:
        upstream, revision = rest, ""
    return int(epoch), upstream, revision


def compare_versions(a: str, b: str) -> int:
    """Compare two Debian versions like ``dpkg --compare-versions``: -1, 0 or 1."""
    ea, ua, ra = _split_version(a)
    eb, ub, rb = _split_version(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


def _zstandard() -> Any:
    """The optional ``zstandard`` module (zstd members before Python 3.14), or None."""
    try:
        import zstandard  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    return zstandard


def _normal(name: str) -> str:
    """``./usr/bin/x``, ``usr/bin/x`` and ``/usr/bin/x`` all become ``/usr/bin/x``."""
    path = posixpath.normpath("/" + name)
    return "/" + path.lstrip("/")


def tar_entry(info: tarfile.TarInfo) -> DebEntry | None:
    """A tar member as a :class:`DebEntry` (its name and a hard link's target absolute and
    normalised, ``..`` stopping at ``/``); None for a member type a tree cannot hold."""
    path = _normal(info.name)
    kind: EntryKind
    if info.isreg():
        kind = "file"
    elif info.isdir():
        kind = "dir"
    elif info.issym():
        kind = "symlink"
    elif info.islnk():
        kind = "hardlink"
    elif info.ischr():
        kind = "chardev"
    elif info.isblk():
        kind = "blockdev"
    elif info.isfifo():
        kind = "fifo"
    else:
        return None
    linkname = info.linkname
    if kind == "hardlink":
        linkname = _normal(linkname)
    return DebEntry(
        path,
        kind,
        info.mode & 0o7777,
        info.size if kind == "file" else 0,
        linkname,
        uid=info.uid,
        gid=info.gid,
        mtime=int(info.mtime),
        devmajor=info.devmajor if kind in ("chardev", "blockdev") else 0,
        devminor=info.devminor if kind in ("chardev", "blockdev") else 0,
    )


class DebPackage:
    """A ``.deb`` file on disk; the ar index and control fields are read on construction.

    >>> pkg = DebPackage("busybox-static_1.35.0_amd64.deb")  # doctest: +SKIP
    >>> pkg.name, pkg.version, pkg.architecture  # doctest: +SKIP
    >>> pkg.read("/bin/busybox")  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with self.path.open("rb") as fh:
                members = _read_ar_index(fh, str(self.path))
        except OSError as err:
            raise GuestError(f"cannot read {self.path}: {err}") from err
        by_name = {m.name: m for m in members}
        version = by_name.get("debian-binary")
        if not members or members[0].name != "debian-binary" or version is None:
            raise GuestError(f"{self.path}: not a Debian package (no debian-binary member)")
        if not self._read_member(version).startswith(b"2."):
            raise GuestError(f"{self.path}: unsupported deb format version")
        self._control_member = self._find(members, "control.tar")
        self._data_member = self._find(members, "data.tar")
        control = self._tar_files(self._control_member, lambda p: p == "/control")
        if "/control" not in control:
            raise GuestError(f"{self.path}: control.tar has no control file")
        self.control: dict[str, str] = parse_control(control["/control"].decode("utf-8", "replace"))
        for field in ("Package", "Version", "Architecture"):
            if field not in self.control:
                raise GuestError(f"{self.path}: control file lacks the {field} field")

    def __repr__(self) -> str:
        return f"DebPackage({self.name} {self.version} {self.architecture})"

    @property
    def name(self) -> str:
        return self.control["Package"]

    @property
    def version(self) -> str:
        return self.control["Version"]

    @property
    def architecture(self) -> str:
        return self.control["Architecture"]

    @property
    def depends(self) -> list[list[str]]:
        """``Pre-Depends`` and ``Depends`` as groups of alternative package names."""
        value = ", ".join(self.control.get(f, "") for f in ("Pre-Depends", "Depends"))
        return parse_depends(value)

    def _find(self, members: list[_ArMember], stem: str) -> _ArMember:
        for member in members:
            if member.name.startswith(stem) and member.name[len(stem) :] in _TAR_SUFFIXES:
                return member
        raise GuestError(f"{self.path}: no {stem}[.gz|.xz|.zst|.bz2] member")

    def _read_member(self, member: _ArMember) -> bytes:
        with self.path.open("rb") as fh:
            fh.seek(member.offset)
            return fh.read(member.size)

    def _tar_entries(self, member: _ArMember) -> Iterator[tuple[DebEntry, IO[bytes] | None]]:
        suffix = member.name[member.name.index(".tar") + 4 :]
        mode = _TAR_SUFFIXES[suffix]
        zstd = None
        if suffix == ".zst" and sys.version_info < (3, 14):  # 3.14 has compression.zstd
            zstd = _zstandard()
            if zstd is None:
                raise GuestError(
                    f"{self.path}: {member.name} is zstd-compressed (Ubuntu's packages are), "
                    "which this Python cannot decompress before 3.14: install the zstandard "
                    "package (pip install 'vzkit[zstd]')"
                )
            mode = "r|"
        try:
            with self.path.open("rb") as fh:
                raw: IO[bytes] = io.BufferedReader(_Slice(fh, member.offset, member.size))
                if zstd is not None:
                    raw = zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
                with tarfile.open(fileobj=raw, mode=mode) as tar:
                    for info in tar:
                        entry = tar_entry(info)
                        if entry is not None:
                            yield entry, tar.extractfile(info) if info.isreg() else None
        except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError) as err:
            raise GuestError(f"{self.path}: corrupt {member.name}: {err}") from err
        except Exception as err:  # zstandard.ZstdError is not an OSError
            if zstd is None or not isinstance(err, zstd.ZstdError):
                raise
            raise GuestError(f"{self.path}: corrupt {member.name}: {err}") from err

    def _tar_files(self, member: _ArMember, select: Callable[[str], bool]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for entry, stream in self._tar_entries(member):
            if entry.kind == "hardlink" and select(entry.path) and entry.linkname in found:
                found[entry.path] = found[entry.linkname]
            elif stream is not None and select(entry.path):
                found[entry.path] = stream.read()
        return found

    def entries(self) -> list[DebEntry]:
        """Every member of the data tarball, in archive order."""
        return [entry for entry, _ in self._tar_entries(self._data_member)]

    def members(self) -> Iterator[tuple[DebEntry, IO[bytes] | None]]:
        """Stream every member of the data tarball with a reader for regular files' content.

        One pass in archive order; read each stream before advancing (it is invalid after).
        """
        return self._tar_entries(self._data_member)

    def iter_files(self, select: Callable[[DebEntry], bool]) -> Iterator[tuple[DebEntry, bytes]]:
        """Stream ``(entry, content)`` for the regular files ``select`` accepts.

        One pass over the data tarball; only the current file's content is held in memory.
        """
        for entry, stream in self._tar_entries(self._data_member):
            if stream is not None and select(entry):
                yield entry, stream.read()

    def extract(self, paths: Iterable[str] | Callable[[str], bool]) -> dict[str, bytes]:
        """Contents of the selected regular files (and hard links to them), keyed by path.

        ``paths`` is a collection of absolute paths or a predicate on the path. Paths that do
        not exist are simply absent from the result.
        """
        if callable(paths):
            return self._tar_files(self._data_member, paths)
        wanted = {_normal(p) for p in paths}
        return self._tar_files(self._data_member, wanted.__contains__)

    def read(self, path: str) -> bytes:
        """The content of one regular file of the package; GuestError if it is absent."""
        normal = _normal(path)
        found = self.extract([normal])
        if normal not in found:
            raise GuestError(f"{self.path}: package {self.name} has no file {normal}")
        return found[normal]
