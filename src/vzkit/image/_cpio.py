"""Write and read cpio archives in the "newc" format the Linux kernel unpacks as initramfs.

Every entry header is the ASCII magic ``070701`` followed by thirteen 8-digit hex fields,
then the NUL-terminated name padded to a multiple of four bytes, then the content padded
the same way; a ``TRAILER!!!`` entry ends the archive.

:class:`CpioWriter` output is reproducible: entries are sorted by path (so parents come before
children), inode numbers are assigned sequentially in output order, owner is root and every
mtime is 0 unless asked otherwise; the gzip wrapper carries no file name and mtime 0. Two builds
from the same inputs are byte-identical.
"""

from __future__ import annotations

import gzip
import io
import posixpath
import stat
import zlib
from dataclasses import dataclass
from typing import Literal

from vzkit.errors import GuestError

__all__ = ["CpioEntry", "CpioWriter", "read_cpio"]

_MAGIC = b"070701"
_MAGIC_CRC = b"070702"
_HEADER_LEN = 110
_TRAILER = "TRAILER!!!"

CpioKind = Literal["file", "dir", "symlink", "chardev", "blockdev", "fifo", "other"]


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _clean(path: str) -> str:
    """Archive name of ``path``: relative, normalised, no ``..``; ``/dev/x`` -> ``dev/x``."""
    name = posixpath.normpath("/" + path).lstrip("/")
    if not name or path.strip("/") in ("", "."):
        raise GuestError(f"invalid cpio path {path!r}")
    if ".." in path.split("/"):
        raise GuestError(f"cpio path {path!r} must not contain '..'")
    return name


@dataclass(frozen=True)
class CpioEntry:
    """One entry of a cpio archive; ``name`` is as stored (relative, e.g. ``dev/console``)."""

    name: str
    mode: int  # file type bits + permissions, as in st_mode
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    nlink: int = 1
    ino: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0

    @property
    def kind(self) -> CpioKind:
        fmt = stat.S_IFMT(self.mode)
        kinds: dict[int, CpioKind] = {
            stat.S_IFREG: "file",
            stat.S_IFDIR: "dir",
            stat.S_IFLNK: "symlink",
            stat.S_IFCHR: "chardev",
            stat.S_IFBLK: "blockdev",
            stat.S_IFIFO: "fifo",
        }
        return kinds.get(fmt, "other")

    @property
    def permissions(self) -> int:
        return stat.S_IMODE(self.mode)

    @property
    def linkname(self) -> str:
        """Target of a symlink (its content); empty for other kinds."""
        return self.data.decode("utf-8", "surrogateescape") if self.kind == "symlink" else ""


class CpioWriter:
    """Collects entries, then renders a reproducible newc archive.

    Parent directories are created implicitly (mode 0755) unless added explicitly. Adding a
    path twice raises GuestError, except re-adding a directory with the same mode.
    """

    def __init__(self, *, mtime: int = 0) -> None:
        self._mtime = mtime
        self._entries: dict[str, CpioEntry] = {}

    def __contains__(self, path: str) -> bool:
        return _clean(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _add(self, path: str, mode: int, data: bytes = b"", major: int = 0, minor: int = 0) -> None:
        name = _clean(path)
        parent = posixpath.dirname(name)
        if parent:
            self._add_parent(parent)
        nlink = 2 if stat.S_ISDIR(mode) else 1
        entry = CpioEntry(
            name, mode, data, mtime=self._mtime, nlink=nlink, rdevmajor=major, rdevminor=minor
        )
        old = self._entries.get(name)
        if old is not None:
            if old == entry and stat.S_ISDIR(mode):
                return
            raise GuestError(f"cpio path /{name} added twice")
        self._entries[name] = entry

    def _add_parent(self, name: str) -> None:
        old = self._entries.get(name)
        if old is None:
            self._add(name, stat.S_IFDIR | 0o755)
        elif old.kind != "dir":
            raise GuestError(f"cpio path /{name} is a {old.kind}, not a directory")

    def discard(self, path: str) -> None:
        """Remove a non-directory entry if present (so it can be added again)."""
        name = _clean(path)
        old = self._entries.get(name)
        if old is not None and old.kind == "dir":
            raise GuestError(f"cannot replace directory /{name}")
        self._entries.pop(name, None)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._add(path, stat.S_IFDIR | stat.S_IMODE(mode))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(path, stat.S_IFREG | stat.S_IMODE(mode), bytes(data))

    def add_symlink(self, path: str, target: str) -> None:
        if not target:
            raise GuestError(f"symlink {path!r} needs a target")
        self._add(path, stat.S_IFLNK | 0o777, target.encode("utf-8", "surrogateescape"))

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(path, stat.S_IFCHR | stat.S_IMODE(mode), major=major, minor=minor)

    def add_blockdev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(path, stat.S_IFBLK | stat.S_IMODE(mode), major=major, minor=minor)

    def add_fifo(self, path: str, mode: int = 0o644) -> None:
        self._add(path, stat.S_IFIFO | stat.S_IMODE(mode))

    def entries(self) -> list[CpioEntry]:
        """The entries in output order (sorted by path components), with inode numbers set."""
        ordered = sorted(self._entries.values(), key=lambda e: e.name.split("/"))
        return [_with_ino(entry, ino) for ino, entry in enumerate(ordered, start=1)]

    def to_bytes(self) -> bytes:
        """The uncompressed newc archive, trailer included."""
        out = io.BytesIO()
        for entry in self.entries():
            _write_entry(out, entry)
        _write_entry(out, CpioEntry(_TRAILER, 0, nlink=1))
        return out.getvalue()

    def to_gzip(self, level: int = 9) -> bytes:
        """The archive gzip-compressed reproducibly (no file name, mtime 0 in the header)."""
        out = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=level, mtime=0) as gz:
            gz.write(self.to_bytes())
        return out.getvalue()


def _with_ino(entry: CpioEntry, ino: int) -> CpioEntry:
    return CpioEntry(
        entry.name, entry.mode, entry.data, entry.uid, entry.gid, entry.mtime, entry.nlink,
        ino, entry.rdevmajor, entry.rdevminor,
    )  # fmt: skip


def _write_entry(out: io.BytesIO, entry: CpioEntry) -> None:
    name = entry.name.encode("utf-8", "surrogateescape") + b"\0"
    fields = (
        entry.ino, entry.mode, entry.uid, entry.gid, entry.nlink, entry.mtime, len(entry.data),
        0, 0, entry.rdevmajor, entry.rdevminor, len(name), 0,
    )  # fmt: skip
    for value in fields:
        if not 0 <= value <= 0xFFFFFFFF:
            raise GuestError(f"cpio field value {value} out of range for /{entry.name}")
    header = _MAGIC + b"".join(b"%08X" % value for value in fields)
    out.write(header + name + _pad4(_HEADER_LEN + len(name)))
    out.write(entry.data + _pad4(len(entry.data)))


def _maybe_gunzip(data: bytes) -> bytes:
    if not data.startswith(b"\x1f\x8b"):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise GuestError(f"corrupt gzip-compressed cpio archive: {err}") from err


def read_cpio(data: bytes) -> list[CpioEntry]:
    """Parse a newc (or newc-with-crc) archive, gzip-compressed or not, into entries.

    Concatenated archives (as the kernel accepts them, with zero padding between) are read
    in sequence; trailers are not returned. Raises GuestError on malformed input.
    """
    raw = _maybe_gunzip(data)
    if not raw:
        raise GuestError("empty cpio archive")
    entries: list[CpioEntry] = []
    pos = 0
    seen_trailer = False
    while pos < len(raw):
        if raw[pos] == 0 and seen_trailer:  # padding between or after archives
            pos += 1
            continue
        magic = raw[pos : pos + 6]
        if magic not in (_MAGIC, _MAGIC_CRC):
            raise GuestError(f"bad cpio magic {magic!r} at offset {pos}")
        header = raw[pos : pos + _HEADER_LEN]
        if len(header) < _HEADER_LEN:
            raise GuestError(f"truncated cpio header at offset {pos}")
        try:
            fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise GuestError(f"non-hex cpio header field at offset {pos}") from None
        ino, mode, uid, gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, _ = fields
        name_end = pos + _HEADER_LEN + namesize
        if namesize == 0 or name_end > len(raw) or raw[name_end - 1] != 0:
            raise GuestError(f"bad cpio entry name at offset {pos}")
        name = raw[pos + _HEADER_LEN : name_end - 1].decode("utf-8", "surrogateescape")
        data_start = name_end + (-(_HEADER_LEN + namesize) % 4)
        data_end = data_start + size
        if data_end > len(raw):
            raise GuestError(f"truncated cpio data for {name!r}")
        pos = data_end + (-size % 4)
        if name == _TRAILER:
            seen_trailer = True
            continue
        seen_trailer = False
        entries.append(
            CpioEntry(name, mode, raw[data_start:data_end], uid, gid, mtime, nlink, ino, rmaj, rmin)
        )
    if entries and not seen_trailer:
        raise GuestError("cpio archive has no TRAILER!!! entry (truncated?)")
    return entries
