"""An OCI image's layers applied in order onto a root tree, without root.

Each layer is a tar stream (plain, gzip or zstd: see :data:`LAYER_MEDIA_TYPES`) read once,
start to end, decompressed on the fly: memory stays bounded whatever the layer's size (a
file's content is copied through in 1 MiB blocks). The uncompressed bytes are hashed on the
way, and the layer's *diff id* (the SHA256 of the uncompressed tar) must be the one the image
config's ``rootfs.diff_ids`` names, or :class:`~vzkit.image._download.ChecksumError`.

The changeset rules are the image spec's (``layer.md``):

* a member replaces what lower layers had at its path; a directory over a directory merges
  (the newer owner, mode and time win), anything else first removes what was there;
* ``DIR/.wh.NAME`` deletes ``DIR/NAME`` (and all below it) of the lower layers;
* ``DIR/.wh..wh..opq`` makes ``DIR`` opaque: what lower layers had under it is hidden, what
  this layer puts there stays, in whichever order the tar lists them;
* whiteout files never appear in the result; other ``.wh..wh.`` names (aufs' own
  bookkeeping) are skipped;
* hard links point at files of this or a lower layer.

The writing is :class:`~vzkit.image._debian_unpack.TreeWriter`'s (shared with Debian trees):
every path is resolved inside the tree as the guest will see it, so ``../`` names and
symlinks that point outside (absolute or relative) can never lead a write out of it; symlinks
are stored as the layer has them. Owners, full modes (set-id bits), device nodes and the
extended attributes a user cannot set on the host (``SCHILY.xattr.*`` PAX records:
``security.capability``, ``user.*``, ACLs) go into the tree's ``meta``, which
:func:`~vzkit.image._rootdisk.build_root_disk` applies to the ext4 image with debugfs.
Dropped: ``trusted.overlay.*`` attributes (an overlay's own bookkeeping) and member types a
file system cannot hold (tar's volume labels, GNU multi-volume pieces).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import logging
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .._deb import tar_entry
from .._debian_unpack import FileMeta, TreeWriter, UnpackError
from .._download import ChecksumError
from ._errors import ImageFormatError

__all__ = [
    "LAYER_MEDIA_TYPES",
    "LayerInput",
    "LayerResult",
    "apply_layer",
    "apply_layers",
    "layer_compression",
    "open_layer",
]

log = logging.getLogger(__name__)

#: Layer media types and their compression (``nondistributable`` layers read the same).
LAYER_MEDIA_TYPES: Mapping[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_XATTR_PAX = "SCHILY.xattr."
_XATTR_KEPT = ("security.", "user.", "trusted.", "system.posix_acl_")
_XATTR_DROPPED = ("trusted.overlay.",)
_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class LayerInput:
    """One layer to apply: ``open`` gives its blob (as stored: compressed or not) from the
    start; ``media_type`` its descriptor's (None: sniffed from the first bytes);
    ``diff_id`` the config's ``rootfs.diff_ids`` entry for it (None: not checked);
    ``name`` what messages call it (its digest)."""

    open: Callable[[], IO[bytes]]
    media_type: str | None
    diff_id: str | None
    name: str


@dataclass(frozen=True, slots=True)
class LayerResult:
    """What applying one layer did: its diff id (``sha256:...`` of the uncompressed tar),
    the uncompressed size, the members written, the whiteouts (opaque ones too) applied."""

    diff_id: str
    size: int
    members: int
    whiteouts: int


def layer_compression(media_type: str) -> str:
    """``"tar"``, ``"gzip"`` or ``"zstd"`` for a layer media type; ImageFormatError for one
    that is not a layer vzkit can read."""
    kind = LAYER_MEDIA_TYPES.get(media_type)
    if kind is None:
        raise ImageFormatError(
            f"layer media type {media_type!r} is not one vzkit reads (tar, tar+gzip, tar+zstd)"
        )
    return kind


class _Hashing(io.RawIOBase):
    """Reads through ``inner``, hashing and counting what passes."""

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        count = len(data)
        buffer[:count] = data
        self.digest.update(data)
        self.size += count
        return count

    def drain(self) -> None:
        while self.readinto(bytearray(_BLOCK)):
            pass


class _Peeked(io.RawIOBase):
    """``head`` (already read from ``rest``) followed by the rest of ``rest``."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            count = min(len(buffer), len(self._head))
            buffer[:count] = self._head[:count]
            self._head = self._head[count:]
            return count
        data = self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _zstd_reader(raw: IO[bytes], name: str) -> IO[bytes]:
    """A streaming zstd decompressor over ``raw``: Python 3.14's ``compression.zstd``, else
    the optional ``zstandard`` package; ImageFormatError saying what to install when neither
    is there."""
    try:
        stdlib: Any = importlib.import_module("compression.zstd")
    except ImportError:
        stdlib = None
    if stdlib is not None:
        return stdlib.ZstdFile(raw)  # type: ignore[no-any-return]
    try:
        zstandard: Any = importlib.import_module("zstandard")
    except ImportError:
        raise ImageFormatError(
            f"layer {name} is zstd-compressed, which this Python cannot decompress before "
            "3.14: install the zstandard package (pip install 'vzkit[zstd]')"
        ) from None
    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)  # type: ignore[no-any-return]


def open_layer(blob: IO[bytes], media_type: str | None, name: str = "layer") -> IO[bytes]:
    """The uncompressed tar stream of a layer blob (read forwards only, bounded memory)."""
    if media_type is None:
        head = blob.read(4)
        kind = next((k for magic, k in _MAGIC.items() if head.startswith(magic)), "tar")
        blob = io.BufferedReader(_Peeked(head, blob), _BLOCK)
    else:
        kind = layer_compression(media_type)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=blob, mode="rb")  # type: ignore[return-value]
    if kind == "zstd":
        return _zstd_reader(blob, name)
    return blob


def _xattrs(info: tarfile.TarInfo) -> tuple[tuple[str, bytes], ...]:
    """The member's extended attributes worth keeping (PAX ``SCHILY.xattr.`` records; the
    values are bytes, which tarfile decodes with surrogateescape)."""
    found = []
    for key, value in info.pax_headers.items():
        if not key.startswith(_XATTR_PAX):
            continue
        name = key[len(_XATTR_PAX) :]
        if name.startswith(_XATTR_DROPPED) or not name.startswith(_XATTR_KEPT):
            log.debug("%s: extended attribute %s dropped", info.name, name)
            continue
        found.append((name, value.encode("utf-8", "surrogateescape")))
    return tuple(sorted(found))


class _Layer:
    """The application of one layer's members to a writer."""

    def __init__(self, writer: TreeWriter) -> None:
        self.writer = writer
        self.written: set[str] = {"/"}  # resolved paths this layer made, and their parents
        self.members = 0
        self.whiteouts = 0

    def _mark(self, path: str) -> None:
        while path not in self.written:
            self.written.add(path)
            path = posixpath.dirname(path)

    def member(self, info: tarfile.TarInfo, stream: IO[bytes] | None) -> None:
        entry = tar_entry(info)
        if entry is None:
            log.debug("layer member %s of type %r skipped", info.name, info.type)
            return
        if entry.path == "/":
            return  # the tree's root stays root's 0755
        parent, base = posixpath.split(entry.path)
        if base == _OPAQUE:
            self._opaque(parent)
        elif base.startswith(_WHITEOUT + _WHITEOUT):
            log.debug("layer member %s (aufs bookkeeping) skipped", entry.path)
        elif base.startswith(_WHITEOUT):
            name = base[len(_WHITEOUT) :]
            if name in ("", ".", ".."):  # names no entry of the directory: nothing to hide
                log.debug("layer member %s whites out nothing", entry.path)
            else:
                self._whiteout(posixpath.join(parent, name))
        else:
            writer = self.writer
            here = writer.resolve(entry.path)
            kind = writer.kind(here)
            if kind is not None and (kind == "dir") != (entry.kind == "dir"):
                writer.remove(here)  # a file over a directory, or a directory over a file
            path = writer.add(entry, stream)
            if entry.kind != "hardlink":  # a link shares its target's; others are the member's
                writer.set_xattrs(path, _xattrs(info))
            self._mark(path)
            self.members += 1

    def _whiteout(self, guest: str) -> None:
        path = self.writer.resolve(guest)
        self.whiteouts += 1
        if path in self.written or path == "/":
            return  # the spec: a whiteout hides lower layers' entries only
        self.writer.remove(path)

    def _opaque(self, guest: str) -> None:
        directory = self.writer.resolve(guest, follow_last=True)
        self.whiteouts += 1
        if self.writer.kind(directory) == "dir":
            self._hide_lower(directory)

    def _hide_lower(self, directory: str) -> None:
        for name in self.writer.children(directory):
            path = posixpath.join(directory, name)
            if path not in self.written:
                self.writer.remove(path)
            elif self.writer.kind(path) == "dir":
                self._hide_lower(path)


def apply_layer(writer: TreeWriter, layer: LayerInput) -> LayerResult:
    """Apply one layer onto the tree ``writer`` builds; checks its diff id when given.
    ImageFormatError for a layer that is not a tar or cannot be laid out,
    ChecksumError for a diff id that differs."""
    state = _Layer(writer)
    try:
        with layer.open() as blob:
            hashing = _Hashing(open_layer(blob, layer.media_type, layer.name))
            reader = io.BufferedReader(hashing, _BLOCK)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for info in tar:
                    state.member(info, tar.extractfile(info) if info.isreg() else None)
            hashing.drain()  # the end-of-archive blocks and any padding count too
    except UnpackError as err:
        raise ImageFormatError(f"layer {layer.name}: {err}") from err
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise ImageFormatError(f"layer {layer.name} is not a readable tar: {err}") from err
    except ImageFormatError:
        raise
    except Exception as err:  # zstandard.ZstdError is not an OSError
        if type(err).__name__ != "ZstdError":
            raise
        raise ImageFormatError(f"layer {layer.name} is not readable zstd: {err}") from err
    diff_id = "sha256:" + hashing.digest.hexdigest()
    if layer.diff_id is not None and diff_id != layer.diff_id:
        raise ChecksumError(
            f"layer {layer.name}: its uncompressed content has digest {diff_id}, the image "
            f"config says {layer.diff_id}: the blob is damaged or not this image's; pull it again",
            url=layer.name,
        )
    return LayerResult(diff_id, hashing.size, state.members, state.whiteouts)


def apply_layers(
    root: Path,
    layers: Iterable[LayerInput],
    *,
    epoch: int | None = None,
    progress: Callable[[LayerResult], None] | None = None,
    make_dirs: Sequence[str] = (),
) -> Mapping[str, FileMeta]:
    """Build the tree ``root`` (a fresh directory, made 0700) from ``layers``, lowest first,
    and return its ``meta`` for :func:`~vzkit.image._rootdisk.build_root_disk`. ``epoch``:
    the time of directories no layer names (None: the newest member's). ``progress`` is
    called after each layer. ``make_dirs``: absolute guest paths made (0755, root's, with
    their parents) when the layers left them out, as a runtime makes an image's
    ``WorkingDir``; one that a file is in the way of is left out, with a warning."""
    writer = TreeWriter(root, epoch=epoch)
    for layer in layers:
        result = apply_layer(writer, layer)
        if progress is not None:
            progress(result)
    for wanted in make_dirs:
        path = ""
        for part in (p for p in wanted.split("/") if p):
            path = f"{path}/{part}"
            try:
                if writer.kind(writer.resolve(path, follow_last=True)) is None:
                    writer.directory(path, 0o755)
            except UnpackError as err:
                log.warning("cannot make %s: %s", wanted, err)
                break
    return writer.finish()
