"""Unpack .debs into a directory tree without root, keeping what the host cannot in a table.

:class:`TreeWriter` writes the data tarball of each package (:meth:`DebPackage.members`) into
``root``, a private (0700) directory that stands for the guest's ``/``, and records in
:attr:`TreeWriter.meta` the guest metadata lstat will not show: a :class:`FileMeta` (owner,
full ``st_mode``, device number) for every path whose owner is not ``0:0`` or whose mode
differs from the file on disk. Paths absent from ``meta`` are ``root:root`` with lstat's mode.
On disk, files keep at least ``u+rw`` and directories ``u+rwx`` (so the tree stays readable
and writable by the user building it); device nodes, which a user cannot create, exist only
in ``meta``; fifos, hard links and symlinks (absolute targets too) are made as they are.

Confinement: every path is resolved inside ``root`` the way the guest will see it, as
``openat2(RESOLVE_IN_ROOT)`` does: a symlinked directory on the way is followed with ``root``
as ``/`` (``..`` stops at ``root``), so an entry under ``/bin`` of a merged-/usr tree lands in
``/usr/bin``, and an entry under a symlink to ``/etc`` or ``../../..`` lands in the tree's
``/etc``, never outside. The last component is never followed: a symlink there is replaced,
not written through. The tree belongs to this process while it is built (0700, nobody else
writes in it), which is what makes resolving path by path sound.

Merged /usr: :meth:`TreeWriter.merge_usr` makes ``/bin``, ``/sbin``, ``/lib`` (and ``/lib64``
on amd64) symlinks into ``/usr`` before anything is unpacked, as debootstrap and mmdebstrap do
for bookworm: its packages still ship files under ``/bin`` and ``/lib``, its base-files does
not ship the links (trixie's does), and ``usr-is-merged`` (which ``init-system-helpers``
needs, or the ``usrmerge`` converter instead) refuses to install on a tree that is not merged.

Layers (OCI images, :mod:`vzkit.image.oci._layers`) also take things away and replace what
is there: :meth:`TreeWriter.remove` deletes an entry and all below it (a whiteout), and
:meth:`TreeWriter.set_xattrs` keeps extended attributes (``security.capability``) in ``meta``.
Every writing method returns the resolved guest path it wrote.

Times: entries keep the mtime their tarball records; what the writer creates itself (parent
directories no tarball names, the merged-/usr links, the second stage's files) gets the
``epoch``: the one given (``SOURCE_DATE_EPOCH``), else the newest mtime of any package member,
so the same packages give the same times. Directory modes and all times the epoch decides are
applied in :meth:`TreeWriter.finish`, after all content is written.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from ..errors import GuestError
from ._deb import DebEntry, DebPackage
from ._rootdisk import FileMeta  # the root-disk writer's: what it applies

__all__ = ["MERGED_USR", "FileMeta", "TreeWriter", "UnpackError"]

MERGED_USR = {"amd64": ("bin", "sbin", "lib", "lib64"), "arm64": ("bin", "sbin", "lib")}
"""The top-level directories that are symlinks into ``/usr`` per architecture (debootstrap)."""

_SPARSE_BLOCK = 1 << 16
_MAX_LINKS = 40  # like the kernel's limit on symlinks followed while resolving one path
_TYPE_BITS = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "hardlink": stat.S_IFREG,
    "chardev": stat.S_IFCHR,
    "blockdev": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


class UnpackError(GuestError):
    """A package's files cannot be laid out in the tree (a path clash, or too many symlinks)."""


def _chmod(path: Path, mode: int) -> None:
    """chmod, dropping setuid/setgid where the host refuses them (e.g. the setgid bit on
    macOS for a group the user is not in): ``meta`` then records the guest's mode."""
    try:
        os.chmod(path, mode)  # a path this writer just made: no symlink
    except PermissionError:
        os.chmod(path, mode & ~(stat.S_ISUID | stat.S_ISGID))


def _copy_sparse(data: IO[bytes], out: IO[bytes]) -> None:
    """Copy ``data`` into ``out`` in 64 KiB blocks, seeking over blocks of zeros."""
    size = 0
    for block in iter(lambda: data.read(_SPARSE_BLOCK), b""):
        size += len(block)
        if block.count(0) == len(block):
            out.seek(len(block), os.SEEK_CUR)
        else:
            out.write(block)
    out.truncate(size)  # a hole at the end


@dataclass
class _Dir:
    mode: int
    uid: int
    gid: int
    mtime: int | None  # None: the epoch


class TreeWriter:
    """Lays packages out under ``root`` (created 0700, must not exist or be empty).

    ``epoch``: the time of what the writer makes itself; None for the newest member's mtime.
    """

    def __init__(self, root: Path, *, epoch: int | None = None) -> None:
        self.root = root
        self._epoch = epoch
        self._newest = 0
        self._pending: set[str] = set()  # paths whose mtime is the epoch, set in finish()
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        root.chmod(0o700)
        if any(root.iterdir()):
            raise UnpackError(f"{root} is not empty: unpack into a fresh directory")
        self.meta: dict[str, FileMeta] = {"/": FileMeta(0, 0, stat.S_IFDIR | 0o755)}
        self._dirs: dict[str, _Dir] = {"/": _Dir(0o755, 0, 0, None)}
        self._resolved: dict[str, str] = {}
        self._xattrs: dict[str, tuple[tuple[str, bytes], ...]] = {}

    @property
    def epoch(self) -> int:
        """The given epoch, else the newest mtime of the members unpacked so far."""
        return self._newest if self._epoch is None else self._epoch

    # -- paths -----------------------------------------------------------------------------

    def host(self, guest: str) -> Path:
        """The host path of a resolved guest path."""
        return self.root / guest.lstrip("/") if guest != "/" else self.root

    def resolve(self, guest: str, *, follow_last: bool = False) -> str:
        """``guest`` with every symlink on the way followed inside the tree (see module docs)."""
        todo = [p for p in guest.split("/") if p][::-1]
        done: list[str] = []
        hops = 0
        while todo:
            part = todo.pop()
            if part == ".":
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            host = self.root.joinpath(*done, part)
            if (todo or follow_last) and host.is_symlink():
                hops += 1
                if hops > _MAX_LINKS:
                    raise UnpackError(f"{guest}: too many levels of symbolic links in the tree")
                target = os.readlink(host)
                if target.startswith("/"):
                    done = []
                todo.extend([p for p in target.split("/") if p][::-1])
                continue
            done.append(part)
        return "/" + "/".join(done)

    def _parent(self, guest: str) -> str:
        """The resolved, existing directory that will hold ``guest`` (made when missing)."""
        parent = guest.rsplit("/", 1)[0] or "/"
        cached = self._resolved.get(parent)
        if cached is not None:
            return cached
        resolved = self.resolve(parent, follow_last=True)
        path = "/"
        for part in [p for p in resolved.split("/") if p]:
            path = f"{path.rstrip('/')}/{part}"
            host = self.host(path)
            if not host.exists():
                host.mkdir(mode=0o755)
                self._dirs[path] = _Dir(0o755, 0, 0, None)
            elif not host.is_dir() or host.is_symlink():
                raise UnpackError(f"cannot put {guest} in the tree: {path} is not a directory")
        self._resolved[parent] = resolved
        return resolved

    def _clear(self, guest: str) -> None:
        """Make room for a non-directory at ``guest`` (a later package replaces the file)."""
        host = self.host(guest)
        if host.is_symlink() or host.exists():
            if host.is_dir() and not host.is_symlink():
                raise UnpackError(f"cannot replace the directory {guest} with a non-directory")
            if host.is_symlink():
                self._resolved.clear()  # paths through the old link lead elsewhere now
            host.unlink()
        self.meta.pop(guest, None)
        self._dirs.pop(guest, None)
        self._pending.discard(guest)
        self._xattrs.pop(guest, None)

    def _record(self, guest: str, uid: int, gid: int, mode: int, rdev: int = 0) -> None:
        """Keep ``(uid, gid, mode)`` in meta when lstat of the host file will not show it."""
        shown = self.host(guest).lstat().st_mode
        if (uid, gid) != (0, 0) or shown != mode or rdev:
            self.meta[guest] = FileMeta(uid, gid, mode, rdev)
        else:
            self.meta.pop(guest, None)

    # -- writing ---------------------------------------------------------------------------

    def merge_usr(self, debarch: str) -> None:
        """``/bin`` -> ``usr/bin`` and the rest of :data:`MERGED_USR` (before any package)."""
        for name in MERGED_USR.get(debarch, ("bin", "sbin", "lib")):
            self.directory(f"/usr/{name}", 0o755)
            self.symlink(f"/{name}", f"usr/{name}")

    def directory(self, guest: str, mode: int, uid: int = 0, gid: int = 0,
                  mtime: int | None = None) -> str:  # fmt: skip
        parent = self._parent(guest)
        name = guest.rsplit("/", 1)[1]
        path = f"{parent.rstrip('/')}/{name}" if name else parent
        host = self.host(path)
        if host.is_symlink():
            target = self.resolve(path, follow_last=True)
            if self.host(target).is_dir():
                return path  # dpkg keeps a symlink to a directory where a package has a directory
            raise UnpackError(f"{guest}: a symlink to a non-directory is in the way")
        if host.exists() and not host.is_dir():
            raise UnpackError(f"cannot make the directory {guest}: a file is in the way")
        host.mkdir(mode=0o700, exist_ok=True)
        self._dirs[path] = _Dir(mode, uid, gid, mtime)
        return path

    def file(self, guest: str, data: IO[bytes] | bytes, mode: int, uid: int = 0, gid: int = 0,
             mtime: int | None = None) -> str:  # fmt: skip
        """Write a regular file (runs of zeros a block long left as holes: a sparse file
        stays sparse); returns its resolved guest path."""
        path = self._place(guest)
        host = self.host(path)
        fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            if isinstance(data, bytes):
                out.write(data)
            else:
                _copy_sparse(data, out)
        _chmod(host, (mode & 0o7777) | 0o600)
        self._finish(path, uid, gid, stat.S_IFREG | (mode & 0o7777), mtime)
        return path

    def symlink(self, guest: str, target: str, uid: int = 0, gid: int = 0,
                mtime: int | None = None) -> str:  # fmt: skip
        path = self._place(guest)
        os.symlink(target, self.host(path))
        self._resolved.clear()  # a directory path may now lead elsewhere
        self._finish(path, uid, gid, stat.S_IFLNK | 0o777, mtime)
        return path

    def hardlink(self, guest: str, target: str, mtime: int | None = None) -> str:
        source = self.resolve(target)
        source_host = self.host(source)
        if not source_host.is_file() or source_host.is_symlink():
            raise UnpackError(f"{guest}: hard link to {target}, which is not a file in the tree")
        path = self._place(guest)
        os.link(source_host, self.host(path), follow_symlinks=False)
        if source in self.meta:
            self.meta[path] = self.meta[source]
        if source in self._xattrs:
            self._xattrs[path] = self._xattrs[source]
        return path

    def node(self, guest: str, kind: str, mode: int, uid: int, gid: int, rdev: int,
             mtime: int | None = None) -> str:  # fmt: skip
        """A fifo (made on disk) or a device node (only in meta: users cannot mknod)."""
        path = self._place(guest)
        full = _TYPE_BITS[kind] | (mode & 0o7777)
        if kind == "fifo":
            os.mkfifo(self.host(path), 0o600)
            _chmod(self.host(path), (mode & 0o7777) | 0o600)
            self._finish(path, uid, gid, full, mtime)
        else:
            self.meta[path] = FileMeta(uid, gid, full, rdev)
        return path

    def _place(self, guest: str) -> str:
        parent = self._parent(guest)
        path = f"{parent.rstrip('/')}/{guest.rsplit('/', 1)[1]}"
        self._clear(path)
        return path

    def _finish(self, path: str, uid: int, gid: int, mode: int, mtime: int | None) -> None:
        if mtime is None:
            self._pending.add(path)
        else:
            os.utime(self.host(path), ns=(mtime * 10**9, mtime * 10**9), follow_symlinks=False)
        self._record(path, uid, gid, mode)

    def add(self, entry: DebEntry, stream: IO[bytes] | None) -> str:
        """One member of a tarball (its mtime counts for the epoch); returns the resolved
        guest path written."""
        self._newest = max(self._newest, entry.mtime)
        if entry.kind == "dir":
            return self.directory(entry.path, entry.mode, entry.uid, entry.gid, entry.mtime)
        if entry.kind == "file":
            assert stream is not None
            return self.file(entry.path, stream, entry.mode, entry.uid, entry.gid, entry.mtime)
        if entry.kind == "symlink":
            return self.symlink(entry.path, entry.linkname, entry.uid, entry.gid, entry.mtime)
        if entry.kind == "hardlink":
            return self.hardlink(entry.path, entry.linkname, entry.mtime)
        rdev = os.makedev(entry.devmajor, entry.devminor)
        return self.node(entry.path, entry.kind, entry.mode, entry.uid, entry.gid, rdev,
                         entry.mtime)  # fmt: skip

    def unpack(self, package: DebPackage) -> int:
        """Every member of ``package``'s data tarball; returns how many."""
        count = 0
        for entry, stream in package.members():
            if entry.path == "/":
                self._newest = max(self._newest, entry.mtime)
                continue  # the tree's root keeps the mode meta["/"] records
            self.add(entry, stream)
            count += 1
        return count

    # -- taking away (layers) ----------------------------------------------------------------

    def kind(self, path: str) -> str | None:
        """``"dir"``, ``"other"`` or None (nothing there) for a resolved guest path; a device
        node that lives only in ``meta`` counts."""
        host = self.host(path)
        if host.is_symlink():
            return "other"
        if host.exists():
            return "dir" if host.is_dir() else "other"
        return "other" if path in self.meta else None

    def children(self, path: str) -> list[str]:
        """The names in the resolved guest directory ``path`` (meta-only nodes too), sorted."""
        host = self.host(path)
        names = set(os.listdir(host)) if host.is_dir() and not host.is_symlink() else set()
        prefix = path.rstrip("/") + "/"
        for key in self.meta:
            if key.startswith(prefix) and "/" not in key[len(prefix) :]:
                names.add(key[len(prefix) :])
        return sorted(names)

    def remove(self, path: str) -> None:
        """Delete the entry at the resolved guest path ``path`` and everything below it (a
        symlink is removed, never followed); nothing there is not an error."""
        if path == "/":
            raise UnpackError("cannot remove the tree's root")
        host = self.host(path)
        if host.is_dir() and not host.is_symlink():
            shutil.rmtree(host)
        elif host.is_symlink() or host.exists():
            host.unlink()
        prefix = path + "/"
        for table in (self.meta, self._dirs, self._xattrs):
            for key in [k for k in table if k == path or k.startswith(prefix)]:
                del table[key]
        self._pending = {p for p in self._pending if p != path and not p.startswith(prefix)}
        self._resolved.clear()

    def set_xattrs(self, path: str, xattrs: tuple[tuple[str, bytes], ...]) -> None:
        """The extended attributes of the resolved guest path ``path`` (put in its ``meta``
        by :meth:`finish`); an empty tuple clears them."""
        if xattrs:
            self._xattrs[path] = xattrs
        else:
            self._xattrs.pop(path, None)

    def finish(self) -> Mapping[str, FileMeta]:
        """Apply the epoch's times, then directory modes and times (deepest first); returns the
        final ``meta``, sorted by path."""
        epoch_ns = self.epoch * 10**9
        for path in sorted(self._pending):
            os.utime(self.host(path), ns=(epoch_ns, epoch_ns), follow_symlinks=False)
        for path in sorted(self._dirs, key=lambda p: (-p.count("/"), p)):
            info = self._dirs[path]
            host = self.host(path)
            when = epoch_ns if info.mtime is None else info.mtime * 10**9
            if path != "/":
                _chmod(host, (info.mode & 0o7777) | 0o700)
            os.utime(host, ns=(when, when))
            if path != "/":
                self._record(path, info.uid, info.gid, stat.S_IFDIR | (info.mode & 0o7777))
        self.meta["/"] = FileMeta(0, 0, stat.S_IFDIR | 0o755)
        for path, xattrs in self._xattrs.items():
            item = self.meta.get(path) or FileMeta(0, 0, self.host(path).lstat().st_mode)
            self.meta[path] = replace(item, xattrs=xattrs)
        return dict(sorted(self.meta.items()))
