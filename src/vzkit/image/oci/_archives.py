"""Images in tar archives, read in place: ``oci-archive:`` (a tar of an OCI image layout) and
``docker-archive:`` (``docker save`` / ``skopeo copy ... docker-archive:`` output).

Nothing is extracted. The archive's headers are read once into a table of members; a member
name that is absolute or climbs out with ``..`` makes the whole archive refused (no image tool
writes one), as does a name that appears twice (two readers could see two different files).
Symbolic and hard links between members (``docker save``'s ``<id>/layer.tar`` ->
``../<hex>.tar``) are followed inside the table only, never outside the archive, a few hops at
most. A member is read by opening the archive file again and reading its byte range, so
parallel layer fetches share nothing. The archive must be a plain tar (what skopeo and docker
write); a compressed one is refused with the command that unpacks it.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from ._errors import ImageFormatError
from ._manifest import (
    DOCKER_CONFIG,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_MANIFEST,
    Descriptor,
    ImageManifest,
    check_layers,
    parse_config,
)
from ._platform import Platform
from ._ref import ImageReference, parse_reference
from ._sources import BlobSource, ResolvedImage, check_platform, pick_from_layout_index
from ._sources import read_layout_index as _read_layout_index

__all__ = ["DockerArchiveSource", "OciArchiveSource", "TarMembers"]

_MAX_MEMBERS = 100_000
_MAX_LINK_HOPS = 8
_HEX_NAME = re.compile(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.tar(?:\.gz|\.zst)?)?")
_COMPRESSED = {
    b"\x1f\x8b": "gzip (gunzip it)",
    b"\x28\xb5": "zstd (unzstd it)",
    b"BZ": "bzip2 (bunzip2 it)",
    b"\xfd7": "xz (unxz it)",
}


@dataclass(frozen=True, slots=True)
class _Member:
    offset: int
    size: int
    link: str | None = None  # a symlink's target (relative to its directory) or hard link's
    hard: bool = False


class _Section:
    """Bytes ``[offset, offset + size)`` of a file, as a reader of its own."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self._fh = open(path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        self._fh.seek(offset)
        self._left = size

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if size is None or size < 0 else min(size, self._left)
        data = self._fh.read(want)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> _Section:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TarMembers:
    """The member table of a plain tar archive, with names confined to the archive."""

    def __init__(self, path: Path, where: str) -> None:
        self.path = path
        self.where = where
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise ImageFormatError(f"{where}: {path} does not exist") from None
        except OSError as err:
            raise ImageFormatError(f"{where}: cannot open {path}: {err.strerror}") from None
        with fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ImageFormatError(f"{where}: {path} is not a regular file")
            self.file_size = st.st_size
            magic = fh.read(2)
            fh.seek(0)
            self.members = self._scan(fh, magic)

    def _scan(self, fh: BinaryIO, magic: bytes) -> dict[str, _Member]:
        if magic in _COMPRESSED:
            raise ImageFormatError(
                f"{self.where}: {self.path} is compressed with {_COMPRESSED[magic]} first; "
                "vzkit reads the plain tar that skopeo and docker save write"
            )
        members: dict[str, _Member] = {}
        try:
            with tarfile.open(fileobj=fh, mode="r:") as tar:
                for count, info in enumerate(tar):
                    if count >= _MAX_MEMBERS:
                        raise ImageFormatError(
                            f"{self.where}: more than {_MAX_MEMBERS} members; not an image archive"
                        )
                    name = self._confined(info.name)
                    if name is None or info.isdir():
                        continue
                    if name in members:
                        raise ImageFormatError(
                            f"{self.where}: the member {name!r} appears twice; refusing the archive"
                        )
                    members[name] = self._member(info)
        except tarfile.TarError as err:
            raise ImageFormatError(
                f"{self.where}: {self.path} is not a tar archive ({err}); expected the output "
                "of skopeo copy or docker save"
            ) from None
        if not members:
            raise ImageFormatError(f"{self.where}: {self.path} is an empty archive")
        return members

    def _confined(self, raw: str) -> str | None:
        name = posixpath.normpath(raw)
        if raw.startswith("/") or name == ".." or name.startswith("../") or "\0" in raw:
            raise ImageFormatError(
                f"{self.where}: the member {raw!r} points outside the archive; refusing it"
            )
        return None if name == "." else name

    def _member(self, info: tarfile.TarInfo) -> _Member:
        if info.issym():
            return _Member(0, 0, link=info.linkname)
        if info.islnk():
            return _Member(0, 0, link=posixpath.normpath(info.linkname), hard=True)
        if not info.isreg() or info.issparse():
            return _Member(-1, 0)  # a device, fifo or sparse file: never image content
        if info.offset_data + info.size > self.file_size:
            raise ImageFormatError(f"{self.where}: {self.path} is truncated at {info.name!r}")
        return _Member(info.offset_data, info.size)

    def find(self, name: str) -> _Member | None:
        """The regular member ``name`` (links followed inside the archive), or None."""
        current = posixpath.normpath(name)
        for _ in range(_MAX_LINK_HOPS):
            member = self.members.get(current)
            if member is None:
                return None
            if member.link is None:
                if member.offset < 0:
                    raise ImageFormatError(f"{self.where}: {current!r} is not a regular file")
                return member
            target = (
                member.link
                if member.hard
                else posixpath.join(posixpath.dirname(current), member.link)
            )
            current = posixpath.normpath(target)
            if member.link.startswith("/") or current == ".." or current.startswith("../"):
                raise ImageFormatError(
                    f"{self.where}: {name!r} links to {member.link!r}, outside the archive"
                )
        raise ImageFormatError(f"{self.where}: {name!r}: too many links")

    def open(self, name: str) -> _Section:
        member = self.find(name)
        if member is None:
            raise ImageFormatError(f"{self.where}: the archive has no {name!r}")
        return _Section(self.path, member.offset, member.size)

    def read(self, name: str, limit: int) -> bytes:
        member = self.find(name)
        if member is None:
            raise ImageFormatError(f"{self.where}: the archive has no {name!r}")
        if member.size > limit:
            raise ImageFormatError(f"{self.where}: {name!r} is larger than {limit} bytes")
        with _Section(self.path, member.offset, member.size) as section:
            return section.read()

    def size(self, name: str) -> int:
        member = self.find(name)
        return member.size if member is not None else 0


def _archive_path(reference: ImageReference) -> Path:
    if reference.path is None:
        raise ImageFormatError(f"{reference} names no file")
    return reference.path


class OciArchiveSource(BlobSource):
    """``oci-archive:FILE[:NAME]``: a tar of an OCI image layout, read in place."""

    def __init__(self, reference: ImageReference) -> None:
        super().__init__(reference)
        self.tar = TarMembers(_archive_path(reference), self.where)

    def open_blob(self, digest: str) -> BinaryIO:
        return cast(BinaryIO, self.tar.open(f"blobs/sha256/{digest.removeprefix('sha256:')}"))

    def resolve(self, platform: Platform) -> ResolvedImage:
        if self.tar.find("oci-layout") is None:
            hint = (
                " (a docker save archive? use docker-archive:)"
                if self.tar.find("manifest.json")
                else ""
            )
            raise ImageFormatError(
                f"{self.where}: not an OCI image layout archive (no oci-layout){hint}"
            )
        index = _read_layout_index(
            self.tar.read("oci-layout", 4096),
            self.tar.read("index.json", MAX_MANIFEST_BYTES),
            self.where,
        )
        start = pick_from_layout_index(index, self.reference.tag, platform, self.where)
        return self.resolve_from(start, platform)


_LAYER_TYPES = {
    "": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


def _compression(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return ""


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageFormatError(f"{what} is not a list of strings")
    return value


class DockerArchiveSource(BlobSource):
    """``docker-archive:FILE[:NAME:TAG | :@INDEX]``: ``docker save`` output. It has no
    manifest of its own; :meth:`resolve` writes an OCI manifest for it (config and layers
    named by their sha256, a plain layer's digest being its diff id)."""

    def __init__(self, reference: ImageReference) -> None:
        super().__init__(reference)
        self.tar = TarMembers(_archive_path(reference), self.where)
        self._names: dict[str, str] = {}

    def open_blob(self, digest: str) -> BinaryIO:
        name = self._names.get(digest)
        if name is None:
            raise ImageFormatError(f"{self.where}: no blob {digest} in the archive")
        return cast(BinaryIO, self.tar.open(name))

    def _entries(self) -> list[dict[str, Any]]:
        if self.tar.find("manifest.json") is None:
            hint = " (an OCI archive? use oci-archive:)" if self.tar.find("oci-layout") else ""
            raise ImageFormatError(
                f"{self.where}: not a docker save archive (no manifest.json){hint}"
            )
        data = self.tar.read("manifest.json", MAX_MANIFEST_BYTES)
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise ImageFormatError(
                f"{self.where}: manifest.json is not valid JSON: {err}"
            ) from None
        if not isinstance(value, list) or not value or not all(isinstance(e, dict) for e in value):
            raise ImageFormatError(f"{self.where}: manifest.json is not a list of images")
        return value

    def _pick(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        ref = self.reference
        if ref.index is not None:
            if ref.index >= len(entries):
                raise ImageFormatError(
                    f"{self.where}: the archive holds {len(entries)} images; no @{ref.index}"
                )
            return entries[ref.index]
        tags = [(e, _strings(e.get("RepoTags") or [], f"{self.where} RepoTags")) for e in entries]
        if ref.repository is not None:
            for entry, names in tags:
                for name in names:
                    try:
                        other = parse_reference(name)
                    except ValueError:
                        continue
                    if other.name == ref.name:
                        return entry
        elif len(entries) == 1:
            return entries[0]
        listed = ", ".join(n for _, names in tags for n in names) or "untagged images"
        what = f"no image {ref.name}" if ref.repository else f"{len(entries)} images"
        raise ImageFormatError(
            f"{self.where}: the archive holds {what}; it has: {listed} "
            "(pick one: docker-archive:FILE:NAME:TAG or docker-archive:FILE:@INDEX)"
        )

    def resolve(self, platform: Platform) -> ResolvedImage:
        entry = self._pick(self._entries())
        config_name = entry.get("Config")
        if not isinstance(config_name, str):
            raise ImageFormatError(f"{self.where}: manifest.json names no Config")
        config_bytes = self.tar.read(config_name, MAX_CONFIG_BYTES)
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        named = _HEX_NAME.fullmatch(posixpath.basename(config_name).removesuffix(".json"))
        if named and named.group(1) != config_digest[7:]:
            raise ImageFormatError(
                f"{self.where}: the config {config_name!r} hashes to {config_digest}; "
                "the archive is damaged or was tampered with"
            )
        config = parse_config(config_bytes, what=f"{self.where} config")
        check_platform(config, platform, self.where)
        layer_names = _strings(entry.get("Layers"), f"{self.where} Layers")
        if len(layer_names) != len(config.diff_ids):
            raise ImageFormatError(
                f"{self.where}: manifest.json lists {len(layer_names)} layers but the config's "
                f"rootfs.diff_ids lists {len(config.diff_ids)}"
            )
        names = {config_digest: config_name}
        layers = [
            self._layer(n, d, names) for n, d in zip(layer_names, config.diff_ids, strict=True)
        ]
        config_desc = Descriptor(
            media_type=DOCKER_CONFIG, digest=config_digest, size=len(config_bytes)
        )
        manifest = ImageManifest(media_type=OCI_MANIFEST, config=config_desc, layers=tuple(layers))
        check_layers(manifest, config, self.where)
        manifest_bytes = _manifest_json(manifest)
        self._names = names
        return ResolvedImage(
            reference=self.reference,
            platform=platform,
            manifest_digest="sha256:" + hashlib.sha256(manifest_bytes).hexdigest(),
            manifest=manifest,
            manifest_bytes=manifest_bytes,
            config=config,
            config_bytes=config_bytes,
        )

    def _layer(self, name: str, diff_id: str, names: dict[str, str]) -> Descriptor:
        member = self.tar.find(name)
        if member is None:
            raise ImageFormatError(f"{self.where}: the layer {name!r} is not in the archive")
        with self.tar.open(name) as section:
            kind = _compression(section.read(4))
        if not kind:
            digest = diff_id  # a plain tar's digest is its diff id (the store verifies it)
        elif named := _HEX_NAME.fullmatch(name):
            digest = f"sha256:{named.group(1)}"
        else:
            digest = self._hash(name)
        names[digest] = name
        return Descriptor(media_type=_LAYER_TYPES[kind], digest=digest, size=member.size)

    def _hash(self, name: str) -> str:
        hasher = hashlib.sha256()
        with self.tar.open(name) as section:
            while block := section.read(1 << 20):
                hasher.update(block)
        return "sha256:" + hasher.hexdigest()


def _manifest_json(manifest: ImageManifest) -> bytes:
    def desc(d: Descriptor) -> Mapping[str, object]:
        return {"mediaType": d.media_type, "digest": d.digest, "size": d.size}

    doc = {
        "schemaVersion": 2,
        "mediaType": manifest.media_type,
        "config": desc(manifest.config),
        "layers": [desc(layer) for layer in manifest.layers],
    }
    return json.dumps(doc, separators=(",", ":")).encode()
