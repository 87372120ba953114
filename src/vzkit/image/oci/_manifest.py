"""Manifests, indexes and image configs (OCI image spec and Docker schema 2), parsed strictly.

Every document is read bounded (:data:`MAX_MANIFEST_BYTES`, :data:`MAX_CONFIG_BYTES`), as JSON
without duplicate keys (two parsers must not see two different images in one document), and
checked field by field: digests are ``sha256:`` and 64 hex digits, sizes are non-negative
integers, media types are ones vzkit knows. Anything else is an :class:`ImageFormatError`
naming the document and the field. Docker schema 1 manifests (signed, from before 2017) are
refused with a pointer to re-push the image.

:func:`choose_manifest` picks the entry of an index for a :class:`Platform` (the guest's arch:
vzkit's ``x86_64``/``aarch64`` are OCI's ``amd64``/``arm64``); :class:`PlatformError` lists
what the index has instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ._errors import ImageFormatError, PlatformError
from ._platform import Platform, parse_platform, same_variant

__all__ = [
    "CONFIG_TYPES",
    "INDEX_TYPES",
    "LAYER_TYPES",
    "MANIFEST_TYPES",
    "MAX_CONFIG_BYTES",
    "MAX_MANIFEST_BYTES",
    "Descriptor",
    "ImageConfig",
    "ImageIndex",
    "ImageManifest",
    "Platform",
    "check_digest",
    "check_layers",
    "choose_manifest",
    "layer_compression",
    "load_json",
    "parse_config",
    "parse_manifest",
    "parse_platform",
]

MAX_MANIFEST_BYTES = 4 << 20
"""An index or manifest larger than this is refused (the distribution registry's own limit)."""
MAX_CONFIG_BYTES = 8 << 20
"""An image config larger than this is refused (long histories stay far below)."""

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
#: Layer media type -> its compression (``""``: a plain tar).
LAYER_TYPES: Mapping[str, str] = MappingProxyType(
    {
        "application/vnd.oci.image.layer.v1.tar": "",
        "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
        "application/vnd.docker.image.rootfs.diff.tar": "",
        "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
        "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    }
)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_MEDIA_TYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)


def layer_compression(media_type: str) -> str:
    """``""`` (plain tar), ``"gzip"`` or ``"zstd"`` for a layer media type."""
    try:
        return LAYER_TYPES[media_type]
    except KeyError:
        raise ImageFormatError(
            f"unknown layer media type {media_type!r}: vzkit unpacks tar layers "
            "(plain, gzip or zstd); this image holds something else"
        ) from None


# --- strict JSON ----------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def load_json(data: bytes, what: str, limit: int) -> dict[str, Any]:
    """A JSON object from ``data`` (at most ``limit`` bytes), strictly; ImageFormatError
    naming ``what`` otherwise."""
    if len(data) > limit:
        raise ImageFormatError(f"{what} is larger than {limit} bytes; refusing to read it")
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ImageFormatError(f"{what} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ImageFormatError(f"{what} is not a JSON object")
    return value


class _Fields:
    """Typed access to one JSON object's fields, with errors naming the document and key."""

    def __init__(self, obj: object, what: str) -> None:
        if not isinstance(obj, dict):
            raise ImageFormatError(f"{what} is not a JSON object")
        self.obj: dict[str, Any] = obj
        self.what = what

    def bad(self, key: str, why: str) -> ImageFormatError:
        return ImageFormatError(f"{self.what}: {key!r} {why}")

    def text(self, key: str) -> str | None:
        value = self.obj.get(key)
        if value is not None and not isinstance(value, str):
            raise self.bad(key, "is not a string")
        return value

    def need(self, key: str) -> str:
        value = self.text(key)
        if value is None:
            raise self.bad(key, "is missing")
        return value

    def count(self, key: str) -> int:
        value = self.obj.get(key)
        if type(value) is not int or value < 0:
            raise self.bad(key, "is not a non-negative integer")
        return value

    def entries(self, key: str) -> list[Any]:
        value = self.obj.get(key)
        if value is None:
            raise self.bad(key, "is missing")
        if not isinstance(value, list):
            raise self.bad(key, "is not a list")
        return value

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.bad(key, "is not a list of strings")
        return tuple(value)

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.obj.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.bad(key, "is not an object")
        return value

    def labels(self, key: str) -> Mapping[str, str]:
        value = self.mapping(key)
        if not all(isinstance(v, str) for v in value.values()):
            raise self.bad(key, "has a value that is not a string")
        return MappingProxyType(dict(value))


# --- descriptors, indexes, manifests --------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Descriptor:
    """A pointer to a blob: its media type, ``sha256:`` digest and size in bytes."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")


def check_digest(digest: object, what: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        shown = repr(digest)[:80]
        raise ImageFormatError(
            f"{what}: {shown} is not a sha256 digest (vzkit verifies sha256 digests only)"
        )
    return digest


def _descriptor(obj: object, what: str) -> Descriptor:
    fields = _Fields(obj, what)
    media_type = fields.need("mediaType")
    if not _MEDIA_TYPE.fullmatch(media_type):
        raise fields.bad("mediaType", "is not a media type")
    platform = None
    if "platform" in fields.obj:
        plat = _Fields(fields.obj["platform"], f"{what} platform")
        platform = Platform(
            os=plat.need("os"),
            architecture=plat.need("architecture"),
            variant=plat.text("variant") or None,
        )
    return Descriptor(
        media_type=media_type,
        digest=check_digest(fields.obj.get("digest"), f"{what} digest"),
        size=fields.count("size"),
        platform=platform,
        annotations=fields.labels("annotations"),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageIndex:
    """An OCI image index or a Docker manifest list: manifests, each for a platform."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageManifest:
    """An OCI image manifest or a Docker schema 2 manifest: one config and its layers."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def _schema2(fields: _Fields) -> None:
    if fields.obj.get("schemaVersion") != 2:
        raise fields.bad("schemaVersion", "is not 2 (a Docker schema 1 image? re-push it)")


def parse_manifest(
    data: bytes, media_type: str | None = None, *, what: str = "manifest"
) -> ImageIndex | ImageManifest:
    """An index or a manifest from ``data``. ``media_type`` (an HTTP ``Content-Type``, a
    descriptor's) must agree with the document's own ``mediaType`` when both are given; a
    document without either is recognised by its fields (``manifests`` / ``layers``)."""
    if media_type is not None:
        media_type = media_type.partition(";")[0].strip() or None
    if media_type in DOCKER_SCHEMA1:
        raise ImageFormatError(
            f"{what} is a Docker schema 1 manifest, which vzkit does not read; "
            "push the image again with a current docker, podman or skopeo"
        )
    fields = _Fields(load_json(data, what, MAX_MANIFEST_BYTES), what)
    own = fields.text("mediaType")
    if own is not None and media_type is not None and own != media_type:
        raise ImageFormatError(f"{what} says it is {own!r} but was served as {media_type!r}")
    kind = own or media_type
    if kind is None:
        kind = OCI_INDEX if "manifests" in fields.obj else OCI_MANIFEST
    if kind in DOCKER_SCHEMA1:
        raise ImageFormatError(f"{what} is a Docker schema 1 manifest; push the image again")
    if kind in INDEX_TYPES:
        _schema2(fields)
        entries = fields.entries("manifests")
        return ImageIndex(
            media_type=kind,
            manifests=tuple(
                _descriptor(e, f"{what} manifests[{i}]") for i, e in enumerate(entries)
            ),
            annotations=fields.labels("annotations"),
        )
    if kind in MANIFEST_TYPES:
        _schema2(fields)
        config = _descriptor(fields.obj.get("config"), f"{what} config")
        if config.media_type not in CONFIG_TYPES:
            raise ImageFormatError(
                f"{what}: the config is {config.media_type!r}, not a container image config "
                "(an artifact such as a chart or a signature, not something to boot)"
            )
        layers = tuple(
            _descriptor(e, f"{what} layers[{i}]") for i, e in enumerate(fields.entries("layers"))
        )
        for i, layer in enumerate(layers):
            try:
                layer_compression(layer.media_type)
            except ImageFormatError as err:
                raise ImageFormatError(f"{what} layers[{i}]: {err}") from None
        return ImageManifest(
            media_type=kind, config=config, layers=layers, annotations=fields.labels("annotations")
        )
    raise ImageFormatError(
        f"{what} has the unknown media type {kind!r}; vzkit reads OCI image indexes and "
        "manifests and Docker schema 2 manifests and manifest lists"
    )


def _available(index: ImageIndex) -> list[str]:
    seen: list[str] = []
    for entry in index.manifests:
        plat = entry.platform
        if plat is not None and plat.os != "unknown" and str(plat) not in seen:
            seen.append(str(plat))
    return seen


def choose_manifest(index: ImageIndex, platform: Platform) -> Descriptor:
    """The index entry for ``platform``: an exact variant match first, then (when the asked
    platform names no variant) the first entry of the same os and arch. Attestations and other
    entries for ``unknown/unknown`` are never picked. :class:`PlatformError` lists the
    platforms the index has."""
    candidates = [
        e
        for e in index.manifests
        if e.platform is not None
        and platform.matches(e.platform)
        and (e.media_type in MANIFEST_TYPES or e.media_type in INDEX_TYPES)
    ]
    exact = [e for e in candidates if e.platform and same_variant(e.platform, platform)]
    if exact or candidates:
        return (exact or candidates)[0]
    available = _available(index)
    raise PlatformError(
        f"the image has no manifest for {platform}; it has: {', '.join(available) or 'none'} "
        "(pick one with --platform, and a guest of that arch)",
        available=available,
    )


# --- the image config -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageConfig:
    """What a container image's config says about running it (``config`` in the JSON) and
    its file system (``rootfs.diff_ids``: the sha256 of each layer's uncompressed tar)."""

    architecture: str
    os: str
    variant: str | None = None
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    exposed_ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    stop_signal: str | None = None
    diff_ids: tuple[str, ...] = ()
    created: str | None = None

    @property
    def platform(self) -> Platform:
        return Platform(os=self.os, architecture=self.architecture, variant=self.variant)


def parse_config(data: bytes, *, what: str = "image config") -> ImageConfig:
    """An :class:`ImageConfig` from the config blob (OCI or Docker; they agree on these)."""
    top = _Fields(load_json(data, what, MAX_CONFIG_BYTES), what)
    run = _Fields(top.mapping("config"), f"{what} config")
    rootfs = _Fields(top.mapping("rootfs"), f"{what} rootfs")
    if rootfs.need("type") != "layers":
        raise rootfs.bad("type", "is not 'layers'")
    diff_ids = rootfs.strings("diff_ids")
    if diff_ids is None:
        raise rootfs.bad("diff_ids", "is missing")
    for i, diff_id in enumerate(diff_ids):
        check_digest(diff_id, f"{what} rootfs diff_ids[{i}]")
    env = run.strings("Env") or ()
    if any("\0" in item for item in env):
        raise run.bad("Env", "holds a NUL byte")
    return ImageConfig(
        architecture=top.need("architecture"),
        os=top.need("os"),
        variant=top.text("variant") or None,
        env=env,
        working_dir=run.text("WorkingDir") or "",
        user=run.text("User") or "",
        entrypoint=run.strings("Entrypoint"),
        cmd=run.strings("Cmd"),
        exposed_ports=tuple(sorted(run.mapping("ExposedPorts"))),
        volumes=tuple(sorted(run.mapping("Volumes"))),
        labels=run.labels("Labels"),
        stop_signal=run.text("StopSignal"),
        diff_ids=diff_ids,
        created=top.text("created"),
    )


def check_layers(manifest: ImageManifest, config: ImageConfig, what: str) -> None:
    """A manifest and its config must agree on the number of layers."""
    if len(manifest.layers) != len(config.diff_ids):
        raise ImageFormatError(
            f"{what}: the manifest has {len(manifest.layers)} layers but the config's "
            f"rootfs.diff_ids lists {len(config.diff_ids)}"
        )
