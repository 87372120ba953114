"""Where an image's blobs come from: an OCI layout directory or a registry (the archives are in
:mod:`._archives`), behind one small protocol.

An :class:`ImageSource` does two things. :meth:`~ImageSource.resolve` finds the image for a
platform: it walks from the entry point (a layout's ``index.json``, a registry's tag) through
indexes to one manifest, reads the config, and checks that the config's platform is the one
asked for and that the config and manifest agree on the layers. Everything read on the way is
bounded and verified against its digest in memory before it is parsed.
:meth:`~ImageSource.fetch` puts one blob into the :class:`~._blobs.BlobStore`, verified there.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from .._download import ChecksumError
from ._blobs import BlobStore, ByteProgress
from ._errors import ImageFormatError, PlatformError
from ._manifest import (
    DOCKER_SCHEMA1,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    Descriptor,
    ImageConfig,
    ImageIndex,
    ImageManifest,
    check_layers,
    choose_manifest,
    load_json,
    parse_config,
    parse_manifest,
)
from ._platform import Platform
from ._ref import ImageReference

__all__ = [
    "ImageSource",
    "LayoutSource",
    "RegistryClientLike",
    "RegistrySource",
    "ResolvedImage",
    "read_verified",
]

REF_NAME = "org.opencontainers.image.ref.name"
SCHEMA1 = frozenset(DOCKER_SCHEMA1)
_MAX_DEPTH = 4
"""Indexes nested deeper than this are refused (a layout's index.json -> an image index ->
a manifest is two)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ResolvedImage:
    """One image found for one platform: its manifest and config, read and verified."""

    reference: ImageReference
    platform: Platform
    manifest_digest: str
    manifest: ImageManifest
    manifest_bytes: bytes = field(repr=False)
    config: ImageConfig
    config_bytes: bytes = field(repr=False)

    @property
    def config_descriptor(self) -> Descriptor:
        return self.manifest.config

    @property
    def layers(self) -> tuple[Descriptor, ...]:
        return self.manifest.layers


class ImageSource(Protocol):
    """A place images are read from (a layout, an archive, a registry)."""

    reference: ImageReference

    def resolve(self, platform: Platform) -> ResolvedImage: ...

    def fetch(
        self, descriptor: Descriptor, store: BlobStore, progress: ByteProgress | None = None
    ) -> None:
        """Put the blob ``descriptor`` names into ``store`` (verified there)."""

    def close(self) -> None: ...


def read_verified(reader: BinaryIO, descriptor: Descriptor, limit: int, what: str) -> bytes:
    """A small blob (manifest, config) read whole, at most ``limit`` bytes, and checked
    against the descriptor's size and digest before anyone parses it."""
    with reader:
        if descriptor.size > limit:
            raise ImageFormatError(
                f"{what} {descriptor.digest} is {descriptor.size} bytes, over the {limit} bytes "
                "vzkit reads; refusing it"
            )
        data = reader.read(descriptor.size + 1)
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if len(data) != descriptor.size or got != descriptor.digest:
        raise ChecksumError(
            f"{what} {descriptor.digest} does not verify ({len(data)} bytes hashing to {got}, "
            f"expected {descriptor.size} bytes); the image is damaged or was tampered with",
            url=what,
        )
    return data


def check_platform(config: ImageConfig, platform: Platform, what: str) -> None:
    """The config's own platform must be the asked one (an image without an index says its
    arch only here)."""
    if not platform.matches(config.platform):
        raise PlatformError(
            f"{what} is an image for {config.platform}, not {platform}; it has only "
            f"{config.platform} (pick it with --platform, and a guest of that arch)",
            available=[str(config.platform)],
        )


class BlobSource:
    """What the layout and archive sources share: a walk from a root document to one image,
    and fetches of blobs opened by digest. Subclasses give :meth:`open_blob`."""

    reference: ImageReference

    def __init__(self, reference: ImageReference) -> None:
        self.reference = reference
        self.where = str(reference)

    def open_blob(self, digest: str) -> BinaryIO:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing is held open between calls (each read opens its own file)."""

    def read_small(self, descriptor: Descriptor, limit: int, what: str) -> bytes:
        return read_verified(self.open_blob(descriptor.digest), descriptor, limit, what)

    def fetch(
        self, descriptor: Descriptor, store: BlobStore, progress: ByteProgress | None = None
    ) -> None:
        if store.has(descriptor.digest):
            store.ingest(descriptor.digest, descriptor.size, io.BytesIO(), origin=self.where)
            return
        with self.open_blob(descriptor.digest) as reader:
            store.ingest(
                descriptor.digest, descriptor.size, reader, progress=progress, origin=self.where
            )

    def resolve_from(
        self, start: Descriptor, platform: Platform, *, first: ImageIndex | None = None
    ) -> ResolvedImage:
        """Walk from ``start`` (or from the index ``first`` already read) to the manifest
        for ``platform``, then read and check its config."""
        current = start
        document: ImageIndex | ImageManifest | None = first
        data = b""
        for _ in range(_MAX_DEPTH + 1):
            if document is None:
                if current.media_type not in INDEX_TYPES | MANIFEST_TYPES:
                    raise ImageFormatError(
                        f"{self.where}: {current.digest} is {current.media_type!r}, neither an "
                        "image index nor an image manifest"
                    )
                data = self.read_small(current, MAX_MANIFEST_BYTES, f"{self.where} manifest")
                document = parse_manifest(
                    data, current.media_type, what=f"{self.where} manifest {current.digest}"
                )
            if isinstance(document, ImageManifest):
                return self._finish(current.digest, document, data, platform)
            current = choose_manifest(document, platform)
            document = None
        raise ImageFormatError(f"{self.where}: indexes nested deeper than {_MAX_DEPTH}")

    def _finish(
        self, digest: str, manifest: ImageManifest, data: bytes, platform: Platform
    ) -> ResolvedImage:
        config_bytes = self.read_small(manifest.config, MAX_CONFIG_BYTES, f"{self.where} config")
        config = parse_config(config_bytes, what=f"{self.where} config {manifest.config.digest}")
        check_platform(config, platform, self.where)
        check_layers(manifest, config, self.where)
        return ResolvedImage(
            reference=self.reference,
            platform=platform,
            manifest_digest=digest,
            manifest=manifest,
            manifest_bytes=data,
            config=config,
            config_bytes=config_bytes,
        )


def pick_from_layout_index(
    index: ImageIndex, name: str | None, platform: Platform, where: str
) -> Descriptor:
    """The entry of a layout's ``index.json`` to start from: the one named ``name``
    (``org.opencontainers.image.ref.name``), the only one, or the platform's among entries
    that say their platform."""
    names = sorted({e.annotations[REF_NAME] for e in index.manifests if REF_NAME in e.annotations})
    entries = index.manifests
    if name is not None:
        entries = tuple(e for e in entries if e.annotations.get(REF_NAME) == name)
        if not entries:
            raise ImageFormatError(
                f"{where}: no image named {name!r} in the layout; it has: "
                f"{', '.join(names) or 'no named images'}"
            )
    if len(entries) == 1:
        return entries[0]
    if not entries:
        raise ImageFormatError(f"{where}: the layout's index.json lists no image")
    if all(e.platform is not None for e in entries):
        sub = ImageIndex(media_type=OCI_INDEX, manifests=entries)
        return choose_manifest(sub, platform)
    raise ImageFormatError(
        f"{where}: the layout holds {len(entries)} images; name one "
        f"({', '.join(names) or 'they have no names'}) after the path: oci:DIR:NAME"
    )


def read_layout_index(oci_layout: bytes, index: bytes, where: str) -> ImageIndex:
    """Check an image layout's ``oci-layout`` marker and parse its ``index.json``."""
    marker = load_json(oci_layout, f"{where} oci-layout", 4096)
    if not isinstance(marker.get("imageLayoutVersion"), str):
        raise ImageFormatError(f"{where}: oci-layout has no imageLayoutVersion")
    parsed = parse_manifest(index, None, what=f"{where} index.json")
    if not isinstance(parsed, ImageIndex):
        raise ImageFormatError(f"{where}: index.json is not an image index")
    return parsed


# --- an OCI image layout directory ----------------------------------------------------------


def _open_regular(path: Path, where: str) -> BinaryIO:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageFormatError(f"{where}: {path.name} is missing") from None
    except OSError as err:
        raise ImageFormatError(f"{where}: cannot open {path}: {err.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageFormatError(f"{where}: {path} is not a regular file")
    return os.fdopen(fd, "rb")


def _read_file(path: Path, limit: int, where: str) -> bytes:
    with _open_regular(path, where) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ImageFormatError(f"{where}: {path.name} is larger than {limit} bytes")
    return data


class LayoutSource(BlobSource):
    """``oci:DIR[:NAME]``: an OCI image layout on disk (``oci-layout``, ``index.json``,
    ``blobs/sha256/``). Blob paths come only from validated digests, so they stay inside."""

    def __init__(self, reference: ImageReference) -> None:
        super().__init__(reference)
        if reference.path is None:
            raise ImageFormatError(f"{reference} names no directory")
        self.root = reference.path
        if not self.root.is_dir():
            raise ImageFormatError(
                f"{self.where}: {self.root} is not a directory (an OCI image layout; for a tar "
                "of one use oci-archive:)"
            )

    def open_blob(self, digest: str) -> BinaryIO:
        hexpart = digest.removeprefix("sha256:")
        return _open_regular(self.root / "blobs" / "sha256" / hexpart, f"{self.where} blob")

    def resolve(self, platform: Platform) -> ResolvedImage:
        try:
            marker = _read_file(self.root / "oci-layout", 4096, self.where)
        except ImageFormatError:
            raise ImageFormatError(
                f"{self.where}: {self.root} is not an OCI image layout (no oci-layout file)"
            ) from None
        index = read_layout_index(
            marker, _read_file(self.root / "index.json", MAX_MANIFEST_BYTES, self.where), self.where
        )
        start = pick_from_layout_index(index, self.reference.tag, platform, self.where)
        return self.resolve_from(start, platform)


# --- a registry -----------------------------------------------------------------------------


class RegistryClientLike(Protocol):
    """What :class:`RegistrySource` needs of ``_registry.RegistryClient``; ``fetch_blob`` must
    verify the blob's SHA256 before ``dest`` exists (the store trusts it for that)."""

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]: ...

    def open_blob(self, repository: str, digest: str, *, offset: int = 0) -> BinaryIO: ...

    def fetch_blob(
        self,
        repository: str,
        digest: str,
        dest: Path,
        *,
        size: int | None,
        progress: Callable[[int], None] | None,
    ) -> None: ...


class RegistrySource(BlobSource):
    """``docker://HOST/REPO[:TAG][@DIGEST]`` through a registry client; manifests and the
    config are verified here, layers by the client's resumable fetch and again by the store."""

    def __init__(self, client: RegistryClientLike, reference: ImageReference) -> None:
        super().__init__(reference)
        if reference.repository is None:
            raise ImageFormatError(f"{reference} names no repository")
        self.client = client
        self.repository = reference.repository

    def open_blob(self, digest: str) -> BinaryIO:
        return self.client.open_blob(self.repository, digest)

    def close(self) -> None:
        closer = getattr(self.client, "close", None)
        if callable(closer):
            closer()

    def resolve(self, platform: Platform) -> ResolvedImage:
        ref = self.reference
        asked = ref.digest or ref.tag or "latest"
        body, media_type, _ = self.client.get_manifest(self.repository, asked)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.digest is not None and digest != ref.digest:
            raise ChecksumError(
                f"{self.where}: the registry sent a manifest hashing to {digest}, not the "
                f"{ref.digest} asked for",
                url=self.where,
            )
        hint = media_type if media_type in INDEX_TYPES | MANIFEST_TYPES | SCHEMA1 else None
        top = parse_manifest(body, hint, what=f"{self.where} manifest")
        start = Descriptor(media_type=top.media_type, digest=digest, size=len(body))
        if isinstance(top, ImageManifest):
            return self._finish(digest, top, body, platform)
        return self.resolve_from(start, platform, first=top)

    def read_small(self, descriptor: Descriptor, limit: int, what: str) -> bytes:
        if descriptor.media_type in INDEX_TYPES | MANIFEST_TYPES:
            if descriptor.size > limit:
                raise ImageFormatError(f"{what} {descriptor.digest} is over {limit} bytes")
            body, _, _ = self.client.get_manifest(self.repository, descriptor.digest)
            return read_verified(io.BytesIO(body), descriptor, limit, what)
        return super().read_small(descriptor, limit, what)

    def fetch(
        self, descriptor: Descriptor, store: BlobStore, progress: ByteProgress | None = None
    ) -> None:
        def download(partial: Path) -> None:
            self.client.fetch_blob(
                self.repository, descriptor.digest, partial, size=descriptor.size, progress=progress
            )

        # RegistryClient.fetch_blob verifies the digest before DEST exists (a mismatch is its
        # ChecksumError, nothing kept): the store need not hash the blob again.
        store.ingest_file(descriptor.digest, descriptor.size, download, origin=self.where,
                          fetch_verifies=True)  # fmt: skip
