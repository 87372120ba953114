"""Root disks: a directory tree made into an ext4 raw image, and a cache of such base images.

:func:`build_root_disk` runs e2fsprogs' ``mke2fs -d`` (it copies a tree into a new file system
without root and without mounting anything: regular, sparse and hard-linked files, symlinks,
special files, set-id bits, odd names), then applies :class:`FileMeta` overrides with one
``debugfs -w -f SCRIPT`` run: owners and modes a tree unpacked without root could not keep,
device nodes and FIFOs it could not create at all, and extended attributes (``ea_set -f``:
each value from a file, byte for byte). :func:`rootfs_base` caches the result
content-addressed under the image cache (``<cache>/images/disks/<key>/``, see
``docs/images.md``); a VM boots it read-only with its own copy-on-write layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from .._cache import user_cache_dir
from .._fsutil import fsync_dir, fsync_file
from .._progress import Progress
from ..errors import ConfigError, GuestError
from ._entries import flock

__all__ = [
    "BaseImage",
    "FileMeta",
    "build_root_disk",
    "disk_size_for",
    "find_e2fsprogs",
    "rootfs_base",
    "tree_usage",
]

log = logging.getLogger(__name__)
_MIB = 1 << 20
_GIB = 1 << 30
#: The free space a root disk gets beyond its tree (see :func:`disk_size_for`).
MIN_HEADROOM = _GIB
#: Bump when the disk layout changes in a way the inputs do not show.
DISK_FORMAT = 1
_IMAGE_NAME = "root.img"
_META_NAME = "disk.json"
_NO_META: Mapping[str, FileMeta] = MappingProxyType({})
_LABEL = "vzkit-root"  # the file system label of cached root disks (root=LABEL=vzkit-root)
#: Where e2fsprogs lives when it is not on PATH: sbin (a user's PATH often lacks it), and
#: Homebrew's keg-only e2fsprogs on macOS.
_E2FS_DIRS = (
    "/usr/sbin",
    "/sbin",
    "/opt/homebrew/opt/e2fsprogs/sbin",
    "/usr/local/opt/e2fsprogs/sbin",
)
_TYPES = {stat.S_IFCHR: "c", stat.S_IFBLK: "b", stat.S_IFIFO: "p"}


@dataclass(frozen=True, slots=True)
class FileMeta:
    """The owner, mode and device number a guest path gets on the disk, whatever the host
    tree says. ``mode`` is a full ``st_mode`` (file type and permission bits, e.g.
    ``stat.S_IFCHR | 0o666``); ``rdev`` an ``os.makedev`` device number for device nodes.
    A device node or FIFO named here need not exist in the tree: it is created.
    ``xattrs``: extended attributes set on the disk, ``(name, value)`` pairs (e.g.
    ``security.capability``, which a tree unpacked without root cannot carry)."""

    uid: int
    gid: int
    mode: int
    rdev: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class BaseImage:
    """A cached root disk: an ext4 ``raw`` image never written after it was built."""

    path: Path
    digest: str  # "sha256:..." of the build's inputs (the tree, its meta, the size, the format)
    size: int  # bytes (the file is sparse: it takes less)
    created: float  # seconds since the epoch
    source: str  # what it was built from (the tree's path)


def find_e2fsprogs() -> tuple[str, str]:
    """``(mke2fs, debugfs)``, or :class:`GuestError` naming the package to install."""
    found = []
    for tool in ("mke2fs", "debugfs"):
        path = shutil.which(tool) or shutil.which(tool, path=os.pathsep.join(_E2FS_DIRS))
        if path is None:
            raise GuestError(
                f"building a root disk needs e2fsprogs' {tool} (Debian/Ubuntu: apt-get install "
                "e2fsprogs; macOS: brew install e2fsprogs)"
            )
        found.append(path)
    return found[0], found[1]


def _walk(tree: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every entry under ``tree`` (not following symlinks), sorted, ``tree`` itself first."""
    yield tree, tree.lstat()
    stack = [tree]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as entries:
            names = sorted(entry.name for entry in entries)
        for name in names:
            path = directory / name
            st = path.lstat()
            yield path, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)


def disk_size_for(used_bytes: int, inodes: int) -> int:
    """The size of a root disk for a tree of ``used_bytes`` (allocated) in ``inodes`` entries:
    the tree, plus 256 bytes and a 4 KiB block per entry for ext4's inode and directory
    overhead, plus headroom of half that or :data:`MIN_HEADROOM` (1 GiB), whichever is more,
    rounded up to MiB. The image is sparse and each VM's layer grows only by what it writes,
    so the headroom costs no host disk until the guest uses it."""
    need = used_bytes + inodes * (256 + 4096)
    total = need + max(need // 2, MIN_HEADROOM)
    return -(-total // _MIB) * _MIB


def tree_usage(tree: Path) -> tuple[int, int]:
    """``(allocated bytes, entries)`` of ``tree`` (hard links counted once): what
    :func:`disk_size_for` takes."""
    used = inodes = 0
    seen: set[tuple[int, int]] = set()
    for _, st in _walk(tree):
        inodes += 1
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
        used += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return used, inodes


def _normal_path(path: str) -> str:
    """``path`` absolute and normalised, or :class:`ConfigError`: no ``..``, and no newline
    (debugfs reads its script line by line; a NUL cannot be in a name at all)."""
    if not path.startswith("/") or any(c in path for c in "\n\r\x00"):
        raise ConfigError(f"meta path {path!r} must be absolute and free of newlines")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ConfigError(f"meta path {path!r} must not contain '..'")
    return "/" + "/".join(parts)


def _q(text: str) -> str:
    """One debugfs argument: double-quoted, a double quote in it doubled (its parser's rule)."""
    return '"' + text.replace('"', '""') + '"'


def _meta_script(tree: Path, meta: Mapping[str, FileMeta], values: Path) -> str:
    """The debugfs commands that apply ``meta`` (paths sorted: parents before children);
    extended attributes' values are written as files into the directory ``values`` (debugfs
    reads a value byte for byte only from a file)."""
    lines = []
    for path in sorted(meta):
        item = meta[path]
        if not isinstance(item, FileMeta):
            raise ConfigError(f"meta[{path!r}] must be a FileMeta, got {item!r}")
        normal = _normal_path(path)
        quoted = _q(normal)
        kind = stat.S_IFMT(item.mode)
        host = tree / path.lstrip("/")
        if not os.path.lexists(host):
            if kind not in _TYPES:
                raise ConfigError(
                    f"meta names {path!r}, which is not in the tree; only device nodes and "
                    "FIFOs can be created from meta alone"
                )
            # debugfs links a new node by its name in the current directory: cd there first.
            parent, name = normal.rsplit("/", 1)
            if not (tree / parent.lstrip("/")).is_dir():
                raise ConfigError(f"meta names {path!r}, whose directory is not in the tree")
            lines.append(f"cd {_q(parent or '/')}")
            if kind == stat.S_IFIFO:
                lines.append(f"mknod {_q(name)} p")
            else:
                major, minor = os.major(item.rdev), os.minor(item.rdev)
                lines.append(f"mknod {_q(name)} {_TYPES[kind]} {major} {minor}")
            lines.append("cd /")
        elif kind and kind != stat.S_IFMT(host.lstat().st_mode):
            raise ConfigError(f"meta gives {path!r} another file type than the tree's")
        lines += [
            f"sif {quoted} uid {item.uid}",
            f"sif {quoted} gid {item.gid}",
            f"sif {quoted} mode 0{item.mode:o}",
        ]
        for name, value in item.xattrs:
            if not name or any(c in name for c in '\n\r\x00"'):
                raise ConfigError(f"meta[{path!r}] has a bad extended attribute name {name!r}")
            value_file = values / f"xattr-{len(lines)}"
            value_file.write_bytes(value)
            lines.append(f"ea_set -f {_q(str(value_file))} {quoted} {_q(name)}")
    return "".join(line + "\n" for line in lines)


def _squash_script(tree: Path, owner: tuple[int, int], meta: Mapping[str, FileMeta]) -> str:
    """``sif`` lines giving root (0) the uid and gid ``owner`` has in the tree, for each entry
    ``meta`` does not name. A name with a newline cannot be named to debugfs: it keeps its
    owner, with a warning."""
    uid, gid = owner
    named = {_normal_path(path) for path in meta}
    lines, skipped = [], []
    for path, st in _walk(tree):
        rel = path.relative_to(tree)
        guest = "/" if rel == Path(".") else f"/{rel}"
        if guest in named or (st.st_uid != uid and st.st_gid != gid):
            continue
        if "\n" in guest or "\r" in guest:
            skipped.append(guest)
            continue
        if st.st_uid == uid:
            lines.append(f"sif {_q(guest)} uid 0")
        if st.st_gid == gid:
            lines.append(f"sif {_q(guest)} gid 0")
    if skipped:
        log.warning(
            "%d file(s) keep their host owner %d:%d in the root disk (a newline in the name): %r",
            len(skipped), uid, gid, skipped[:5],
        )  # fmt: skip
    return "".join(line + "\n" for line in lines)


def _run(argv: list[str], what: str) -> str:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL,
            check=False, env={**os.environ, "LC_ALL": "C"},
        )  # fmt: skip
    except OSError as err:
        raise GuestError(f"cannot run {argv[0]}: {err}") from err
    if proc.returncode != 0:
        raise GuestError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stderr


def build_root_disk(
    tree: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    meta: Mapping[str, FileMeta] = _NO_META,
    size: int | None = None,
    label: str = "vzkit-root",
    squash_owner: tuple[int, int] | None = None,
    uuid: str | None = None,
) -> Path:
    """Make the directory ``tree`` into an ext4 raw image at ``dest`` (created 0600; replaced
    atomically if it exists) and return its path.

    ``meta`` overrides owner and mode per absolute guest path and creates device nodes and
    FIFOs the tree lacks (see :class:`FileMeta`). ``size`` in bytes, else
    :func:`disk_size_for` the tree. Files keep their host owners unless ``meta`` says
    otherwise (the root directory is owned by root); ``squash_owner=(uid, gid)`` records
    that host user's and group's files as root's (what rootless podman shows of a user's own
    files; ``meta`` still wins). ``uuid`` fixes the file system's UUID and its directory
    hash seed (else mke2fs picks random ones), for images built twice alike.
    :class:`GuestError` when e2fsprogs is missing or fails,
    :class:`ConfigError` for a bad tree or meta.
    """
    source, target = Path(tree), Path(dest)
    if not source.is_dir():
        raise ConfigError(f"root file system tree {str(source)!r} is not a directory")
    mke2fs, debugfs = find_e2fsprogs()
    if size is None:
        size = disk_size_for(*tree_usage(source))
    elif not isinstance(size, int) or isinstance(size, bool) or size < 16 * _MIB:
        raise ConfigError(f"root disk size must be an integer of at least 16 MiB, got {size!r}")
    size = -(-size // 4096) * 4096
    # one -E (mke2fs keeps only the last): the seed of directory hashes goes with the UUID
    extended = "root_owner=0:0" + (f",hash_seed={uuid}" if uuid is not None else "")
    fixed = ["-U", uuid] if uuid is not None else []
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        script = _meta_script(source, meta, work)
        if squash_owner is not None:
            script = _squash_script(source, squash_owner, meta) + script
        image = work / "disk.img"
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        _run(
            [mke2fs, "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-L", label,
             "-E", extended, *fixed, "-d", str(source), str(image), f"{size // 1024}k"],
            f"mke2fs -d {source}",
        )  # fmt: skip
        if script:
            script_path = work / "meta.debugfs"
            # names are the tree's bytes: str from os.fsdecode round-trips with surrogateescape
            script_path.write_bytes(script.encode("utf-8", "surrogateescape"))
            errors = _run([debugfs, "-w", "-f", str(script_path), str(image)], "debugfs")
            bad = [line for line in errors.splitlines() if line and not _debugfs_banner(line)]
            if bad:
                raise GuestError(f"debugfs could not apply the file metadata: {bad[0]}")
        fsync_file(image)
        os.chmod(image, 0o600)
        os.replace(image, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _debugfs_banner(line: str) -> bool:
    return line.startswith("debugfs ") and "(" in line  # "debugfs 1.47.0 (5-Feb-2023)"


def _tree_key(
    tree: Path,
    meta: Mapping[str, FileMeta],
    size: int | None,
    label: str,
    squash_owner: tuple[int, int] | None = None,
) -> str:
    """The digest of everything the disk is made of: each entry's relative path (bytes), type,
    mode, owner, size, symlink target, hard-link identity and content; the meta, the size
    asked for, the label and :data:`DISK_FORMAT`. Times are left out: mke2fs copies them,
    but a tree unpacked twice should not make two images."""
    digest = hashlib.sha256()
    squash = list(squash_owner) if squash_owner is not None else None
    digest.update(json.dumps([DISK_FORMAT, size, label, squash]).encode())
    links: dict[tuple[int, int], bytes] = {}
    for path, st in _walk(tree):
        rel = os.fsencode(path.relative_to(tree))
        head = f"{st.st_mode:o} {st.st_uid} {st.st_gid} {st.st_size} {st.st_rdev}"
        digest.update(b"\0E" + rel + b"\0" + head.encode())
        if stat.S_ISLNK(st.st_mode):
            digest.update(b"\0L" + os.fsencode(os.readlink(path)))
        elif stat.S_ISREG(st.st_mode):
            first = links.setdefault((st.st_dev, st.st_ino), rel)
            if first != rel:
                digest.update(b"\0H" + first)
                continue
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(_MIB), b""):
                    digest.update(block)
    for name in sorted(meta):
        item = meta[name]
        text = f"\0M{name}\0{item.uid} {item.gid} {item.mode:o} {item.rdev}"
        digest.update(text.encode("utf-8", "surrogateescape"))  # names: the tree's bytes
        for attr, value in item.xattrs:
            attr_head = f"\0X{attr}\0{len(value)}\0".encode("utf-8", "surrogateescape")
            digest.update(attr_head + value)
    return digest.hexdigest()


def _load_base(directory: Path) -> BaseImage | None:
    try:
        info = json.loads((directory / _META_NAME).read_text())
        image = directory / _IMAGE_NAME
        if not image.is_file():
            return None
        return BaseImage(
            path=image,
            digest=str(info["digest"]),
            size=int(info["size"]),
            created=float(info["created"]),
            source=str(info["source"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def rootfs_base(
    tree: str | os.PathLike[str],
    *,
    cache_dir: Path | None = None,
    meta: Mapping[str, FileMeta] = _NO_META,
    size: int | None = None,
    squash_owner: tuple[int, int] | None = None,
) -> BaseImage:
    """The cached base image of ``tree`` (built on first use; the same tree and meta give the
    same image, found by digest). ``meta``, ``size`` and ``squash_owner`` as for
    :func:`build_root_disk`. A build happens in a temporary directory beside the cache
    entry and is renamed into place complete (image, then ``disk.json``): an interrupted
    build leaves nothing in the cache. One build per cache at a time (``flock`` on
    ``disks/.lock``): a second process building the same tree waits and finds it."""
    source = Path(tree).expanduser().absolute()
    if not source.is_dir():
        raise ConfigError(f"--rootfs {str(source)!r} is not a directory")
    disks = (cache_dir or user_cache_dir()) / "images" / "disks"  # in image_cache_dir
    disks.mkdir(parents=True, exist_ok=True, mode=0o700)
    with Progress(f"root disk from {source}") as progress:
        progress.step("hashing the tree")
        key = _tree_key(source, meta, size, _LABEL, squash_owner)
        final = disks / key[:32]
        with flock(disks / ".lock"):  # one builder per cache: a second waits, then finds it
            existing = _load_base(final)
            if existing is not None and existing.digest == f"sha256:{key}":
                progress.step("cached")
                return existing
            progress.step("building (mke2fs -d)")
            return _build_entry(source, disks, final, key, meta, size, squash_owner)


def _build_entry(
    source: Path,
    disks: Path,
    final: Path,
    key: str,
    meta: Mapping[str, FileMeta],
    size: int | None,
    squash_owner: tuple[int, int] | None,
) -> BaseImage:
    """Build the cache entry ``final`` for ``source`` (the caller holds the cache's lock)."""
    label = _LABEL
    work = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=disks))  # 0700
    try:
        image = build_root_disk(
            source, work / _IMAGE_NAME, meta=meta, size=size, label=label,
            squash_owner=squash_owner,
        )  # fmt: skip
        info = {
            "digest": f"sha256:{key}",
            "size": image.stat().st_size,
            "created": time.time(),
            "source": str(source),
            "format": "raw",
            "filesystem": "ext4",
        }
        meta_path = work / _META_NAME
        fd = os.open(meta_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(work)
        if final.exists():  # a stale or foreign entry: rebuilt
            shutil.rmtree(final, ignore_errors=True)
        os.rename(work, final)
        fsync_dir(disks)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    loaded = _load_base(final)
    if loaded is None:  # pragma: no cover - just written
        raise GuestError(f"root disk cache entry {str(final)!r} is incomplete")
    return loaded
