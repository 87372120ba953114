"""Tar streams on the host side of ``guest.copy_in``/``copy_out``: made from a host tree, and
extracted from a guest's tar without trusting it.

:func:`write_tree` streams a host file or directory tree as a tar (GNU format: long names,
large files, which busybox's tar reads) to a writable file object, one member at a time, so
memory stays bounded whatever the tree's size. Symbolic links are stored as links, hard links
once, numeric owners only (no names: the guest's ``/etc/passwd`` is not the host's).

:func:`extract_confined` reads a tar stream that came from the guest (untrusted input: a
guest can send any bytes) and writes it under one host directory, ``root``, never outside it:

- member names are relative paths below the one top name that was asked for: an absolute
  name, a ``..`` component or another top refuses the stream;
- nothing is written through a symbolic link: every directory on the way to a member must be a
  real directory under ``root`` (``lstat``), and a member's own path is replaced, never
  opened through (``O_NOFOLLOW``, ``O_EXCL``);
- a symbolic link must stay inside the copy: a relative target whose leading ``..`` do not
  climb above the copy's top, and no ``..`` after a name (which a link could turn into a
  climb); an absolute target is refused;
- a hard link must name a regular file in the copy (reached through real directories);
- device nodes, FIFOs and other special files are refused;
- modes are kept as ``docker cp`` keeps them, less the set-id and sticky bits and group and
  other write (as :func:`tarfile.data_filter` does); owners are not restored (the files are the
  caller's). Directories are made ``0700`` and get their mode at the end.

A refusal raises :class:`~vzkit.errors.GuestError` at once; what was written before it stays.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import GuestError

__all__ = ["CHUNK", "CopyRefusedError", "extract_confined", "write_tree"]

#: Bytes of file data copied at a time (and the tar streams' buffer).
CHUNK = 128 * 1024
#: The mode bits kept on the host: no set-id, sticky, group or other write.
_KEPT_MODE = 0o755


# ---- host tree → tar ------------------------------------------------------------------------


def _walk(path: Path, arcname: str) -> Iterator[tuple[Path, str]]:
    """``path`` and, for a directory (not a link to one), everything below it, parents first."""
    yield path, arcname
    if path.is_symlink() or not path.is_dir():
        return
    stack = [(path, arcname)]
    while stack:
        directory, name = stack.pop()
        with os.scandir(directory) as entries:  # read as it goes: no listing in memory
            for entry in entries:
                child = Path(entry.path), f"{name}/{entry.name}" if name else entry.name
                yield child
                if entry.is_dir(follow_symlinks=False):
                    stack.append(child)  # entered once this directory is done


def _forget_members(tar: tarfile.TarFile) -> None:
    """Drop what :class:`tarfile.TarFile` keeps of every member (its ``TarInfo``, for random
    access a stream never has), so memory does not grow with the number of files."""
    vars(tar)["members"].clear()


def write_tree(out: IO[bytes], src: Path, arcname: str) -> None:
    """Stream ``src`` (a file, a link or a directory tree) to ``out`` as a tar whose top member
    is ``arcname`` (``""``: the directory's entries are the top members); sockets are left
    out, as tar does."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT, bufsize=CHUNK) as tar:
        inodes = vars(tar)["inodes"]  # tarfile's hard-link table: every file's inode, by name
        for path, name in _walk(src, arcname):
            if not name:
                continue  # the directory whose contents are copied: its entries are the top
            info = tar.gettarinfo(str(path), name)
            if info is None:  # a socket
                continue
            info.uname = info.gname = ""  # numeric owners: names would resolve in the guest
            info.mtime = int(info.mtime)
            if info.isreg():
                st = os.lstat(path)
                if st.st_nlink == 1:  # only files with other names can be linked to later
                    inodes.pop((st.st_ino, st.st_dev), None)
                with open(path, "rb") as data:
                    tar.addfile(info, data)
            else:
                tar.addfile(info)
            _forget_members(tar)


# ---- guest tar → host tree ------------------------------------------------------------------


class CopyRefusedError(GuestError):
    """A guest's tar stream broke a rule of :func:`extract_confined` (an escape, a device)."""


def _refuse(member: str, why: str) -> CopyRefusedError:
    return CopyRefusedError(
        f"refused the guest's tar stream at {member!r}: {why}; the copy stopped there (what "
        "was written before it stays). A guest that sends this is not to be trusted"
    )


def _parts(name: str, member: str) -> list[str]:
    """The components of a member name (``./`` and empty components dropped); absolute names
    and ``..`` are refused."""
    if name.startswith("/"):
        raise _refuse(member, "an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refuse(member, "a '..' component")
    if any("\0" in p for p in parts):
        raise _refuse(member, "a NUL byte")
    return parts


class _Extractor:
    """One extraction under ``root``: members named ``strip/...`` become ``top/...``."""

    def __init__(self, root: Path, strip: str, top: str, dir_expected: bool) -> None:
        self.root, self.top = root, [top] if top else []
        self.strip = _parts(strip, strip)
        self.dir_expected = dir_expected
        self.dirs: list[tuple[Path, int, float]] = []  # modes and times set at the end

    def target(self, name: str) -> list[str]:
        parts = _parts(name, name)
        if parts[: len(self.strip)] != self.strip:
            raise _refuse(name, f"outside {'/'.join(self.strip) or 'the copied tree'}")
        return self.top + parts[len(self.strip) :]

    def parent(self, rel: list[str], name: str, create: bool = True) -> Path:
        """The real directory that holds ``rel``; made (0700) where missing when ``create``."""
        path = self.root
        for part in rel[:-1]:
            path = path / part
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    raise _refuse(name, f"{part!r} on its path does not exist") from None
                os.mkdir(path, 0o700)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise _refuse(name, f"its path goes through {path} which is not a directory")
        return path / rel[-1] if rel else path

    def extract(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        rel = self.target(info.name)
        top = len(rel) == len(self.top)
        if not rel:  # the contents' own directory: the destination, which exists
            if not info.isdir():
                raise _refuse(info.name, "not a directory, to copy the contents of")
            return
        if top and self.dir_expected and not info.isdir():
            raise GuestError(
                f"the destination {self.root / rel[0]} (a name ending in '/') is for a "
                "directory, and the guest path is not one"
            )
        path = self.parent(rel, info.name)
        mode = info.mode & _KEPT_MODE
        if info.isdir():
            self._directory(path, info, mode)
        elif info.isreg():
            self._file(tar, path, info, mode)
        elif info.issym():
            self._symlink(path, rel, info)
        elif info.islnk():
            self._hardlink(path, info)
        else:
            raise _refuse(info.name, "a device node, FIFO or other special file")

    def _clear(self, path: Path, name: str) -> None:
        """Make room for a non-directory at ``path``: an existing file or link goes."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise GuestError(f"cannot copy {name!r} from the guest over the directory {path}")
        os.unlink(path)

    def _directory(self, path: Path, info: tarfile.TarInfo, mode: int) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, 0o700)
        else:
            if not stat.S_ISDIR(st.st_mode):
                raise GuestError(
                    f"cannot copy the guest directory {info.name!r} over {path}, which is not "
                    "a directory"
                )
            os.chmod(path, stat.S_IMODE(st.st_mode) | 0o700)  # writable while we fill it
        self.dirs.append((path, mode, info.mtime))

    def _file(self, tar: tarfile.TarFile, path: Path, info: tarfile.TarInfo, mode: int) -> None:
        self._clear(path, info.name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        source = tar.extractfile(info)
        assert source is not None  # a regular file
        with os.fdopen(os.open(path, flags, 0o600), "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
            os.fchmod(out.fileno(), mode)
        os.utime(path, (info.mtime, info.mtime), follow_symlinks=False)

    def _symlink(self, path: Path, rel: list[str], info: tarfile.TarInfo) -> None:
        target = info.linkname
        if not target or target.startswith("/") or "\0" in target:
            raise _refuse(info.name, f"a symbolic link to {target!r} (absolute or empty)")
        depth = len(rel) - 1  # the link's directory, in components below root
        floor = len(self.top) if len(rel) > len(self.top) else 0  # inside the copy's top
        seen_name = False
        for part in target.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                depth -= 1
                if seen_name or depth < floor:
                    raise _refuse(info.name, f"a symbolic link to {target!r} out of the copy")
            else:
                seen_name = True
        self._clear(path, info.name)
        os.symlink(target, path)
        try:
            os.utime(path, (info.mtime, info.mtime), follow_symlinks=False)
        except (NotImplementedError, OSError):
            pass  # a link's own time is a nicety

    def _hardlink(self, path: Path, info: tarfile.TarInfo) -> None:
        rel = self.target(info.linkname)  # in the copy, as every name of the stream
        source = self.parent(rel, info.name, create=False)  # through real directories only
        try:
            mode = os.lstat(source).st_mode
        except FileNotFoundError:
            mode = 0
        if not stat.S_ISREG(mode):
            raise _refuse(info.name, f"a hard link to {info.linkname!r}, not a regular file")
        self._clear(path, info.name)
        os.link(source, path, follow_symlinks=False)

    def finish(self) -> None:
        for path, mode, mtime in reversed(self.dirs):  # deepest first: times stay set
            os.chmod(path, mode)
            os.utime(path, (mtime, mtime))


def extract_confined(
    stream: IO[bytes], root: Path, strip: str, top: str, *, dir_expected: bool = False
) -> int:
    """Extract the tar read from ``stream`` under the existing directory ``root``: the member
    ``strip`` (and what is below it) becomes ``root/top`` (``top=""``: its contents go into
    ``root`` itself). ``dir_expected``: the top must be a directory. Returns the number of
    members written. See the module's docstring for what is refused."""
    extractor = _Extractor(root, strip, top, dir_expected)
    count = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tar:
            while (info := tar.next()) is not None:
                extractor.extract(tar, info)
                _forget_members(tar)
                count += 1
    except tarfile.TarError as err:
        raise GuestError(f"the guest's tar stream is not a valid tar: {err}") from err
    finally:
        extractor.finish()
    return count
