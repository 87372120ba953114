"""OCI images in the cache: each image's layers made once into a root disk, keyed by config.

An OCI image's identity is its config's digest (what ``docker images`` calls the image id:
the config names every layer's diff id, so the same config means the same root file system).
:func:`convert` applies the layers in order onto a fresh tree
(:func:`~vzkit.image.oci._layers.apply_layers`), makes it a raw ext4 root disk with
:func:`~vzkit.image._rootdisk.build_root_disk` (owners, modes, devices and xattrs from the
tree's ``meta``, the builder's own files given to root) and keeps it in
``<cache>/images/oci/<config hex>/`` (0700): ``root.img`` (0600), ``image.json``
(:class:`OciImage`'s fields: the references, digests, arch, the config's ``Env``,
``WorkingDir``, ``User``, ``Entrypoint``, ``Cmd``, ``ExposedPorts``, ``Labels``) and
``last-used``. The second conversion of the same config converts nothing (at most it adds a
reference). A reference names one image at a time: converting a newer image under a tag moves
the tag, and :func:`prune_oci_images` removes the images left without one, as ``docker image
prune`` does. Everything is built in a ``.build-*`` directory and renamed into place complete,
under the store's lock (the pieces of :mod:`vzkit.image._entries`, shared with the Debian
images), so a failed or interrupted conversion leaves nothing.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from ...errors import ConfigError, GuestError
from .. import _entries
from .._entries import DIGEST_PREFIX_RE, IMAGE_NAME, StoredImage, pick_by_digest, store_lock
from .._image import image_cache_dir
from .._rootdisk import DISK_FORMAT, FileMeta, build_root_disk
from ._errors import ImageFormatError
from ._layers import LayerInput, LayerResult, apply_layers

__all__ = [
    "OCI_PIPELINE",
    "OciImage",
    "OciLayer",
    "PulledLayers",
    "convert",
    "find_oci_image",
    "list_oci_images",
    "load_oci_image",
    "mark_used",
    "oci_images_dir",
    "prune_oci_images",
    "remove_oci_image",
]

log = logging.getLogger(__name__)

#: Bump when the conversion (layers to tree to disk) changes in a way the config does not show.
OCI_PIPELINE = 1
META_NAME = "image.json"
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_ARCHES = {"amd64": "x86_64", "arm64": "aarch64"}  # the OCI names as vzkit's Arch has them
_FRACTION_RE = re.compile(r"(\.\d{1,6})\d*")


@dataclass(frozen=True, slots=True)
class OciLayer:
    """One layer blob as pulled: its digest, media type and a way to read it from the start
    (verified against ``digest`` by whoever stored it)."""

    digest: str
    media_type: str
    open: Callable[[], IO[bytes]]


@dataclass(frozen=True, slots=True, kw_only=True)
class PulledLayers:
    """What :func:`convert` needs of a pulled image: the config (parsed JSON) and its digest,
    the manifest's layers in order, the manifest digest and the references it was pulled as."""

    config_digest: str
    config: Mapping[str, Any]
    layers: Sequence[OciLayer]
    manifest_digest: str = ""
    refs: Sequence[str] = ()


@dataclass(frozen=True, kw_only=True)
class OciImage(StoredImage):
    """A converted OCI image in the cache. ``digest`` is the config's (the image id);
    ``disk_digest`` names the root disk's content (for ``RootDisk.digest``); ``size`` is the
    disk's size (the file is sparse: ``allocated`` is what it takes); times are seconds since
    the epoch (``image_created`` the config's own RFC 3339 ``created``, as given)."""

    directory: Path
    refs: tuple[str, ...]
    digest: str
    manifest_digest: str
    disk_digest: str
    arch: str  # x86_64, aarch64 (other OCI architectures as the config names them)
    os: str
    env: tuple[str, ...]
    working_dir: str
    user: str
    entrypoint: tuple[str, ...] | None
    cmd: tuple[str, ...] | None
    exposed_ports: tuple[str, ...]
    labels: Mapping[str, str] = field(hash=False)  # a dict: left out of the hash
    layers: tuple[str, ...]  # the layers' digests, lowest first
    image_created: str
    size: int
    allocated: int
    convert_s: float
    created: float
    last_used: float

    @property
    def name(self) -> str:
        """The first reference (a registry's in its familiar form: ``python:3.12``,
        ``127.0.0.1:5000/app:1``), else the short digest."""
        if not self.refs:
            return self.short_digest
        ref = self.refs[0]
        if ref.startswith("docker://"):
            ref = ref.removeprefix("docker://").removeprefix("docker.io/")
            ref = ref.removeprefix("library/") if ref.count("/") == 1 else ref
        return ref

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(directory=str(self.directory), path=str(self.path), name=self.name,
                   labels=dict(self.labels))  # fmt: skip
        return out


def oci_images_dir(cache_dir: Path | None = None) -> Path:
    return image_cache_dir(cache_dir) / "oci"


# -- the config ------------------------------------------------------------------------------


def _strings(value: Any, what: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageFormatError(f"image config: {what} must be a list of strings")
    return list(value)


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ImageFormatError(f"image config: {what} must be a string")
    return value


def _runtime(config: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of the config a run honours, checked, as ``image.json`` keeps them."""
    inner = config.get("config")
    inner = {} if inner is None else inner
    if not isinstance(inner, Mapping):
        raise ImageFormatError("image config: 'config' must be an object")
    ports = inner.get("ExposedPorts")
    labels = inner.get("Labels")
    ports, labels = {} if ports is None else ports, {} if labels is None else labels
    if not isinstance(ports, Mapping) or not isinstance(labels, Mapping):
        raise ImageFormatError("image config: ExposedPorts and Labels must be objects")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ImageFormatError("image config: Labels must map strings to strings")
    return {
        "env": _strings(inner.get("Env"), "Env") or [],
        "working_dir": _text(inner.get("WorkingDir"), "WorkingDir"),
        "user": _text(inner.get("User"), "User"),
        "entrypoint": _strings(inner.get("Entrypoint"), "Entrypoint"),
        "cmd": _strings(inner.get("Cmd"), "Cmd"),
        "exposed_ports": sorted(str(p) for p in ports),
        "labels": dict(sorted(labels.items())),
        "arch": _ARCHES.get(str(config.get("architecture")), str(config.get("architecture"))),
        "os": _text(config.get("os"), "os") or "linux",
        "image_created": _text(config.get("created"), "created"),
    }


def _diff_ids(config: Mapping[str, Any], layers: int) -> list[str]:
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, Mapping) else None
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and _DIGEST_RE.fullmatch(d) for d in diff_ids
    ):
        raise ImageFormatError("image config: rootfs.diff_ids must be a list of sha256 digests")
    if len(diff_ids) != layers:
        raise ImageFormatError(
            f"image config names {len(diff_ids)} layers (rootfs.diff_ids), the manifest {layers}"
        )
    return diff_ids


def _epoch(created: str) -> int | None:
    """The config's ``created`` time (RFC 3339, nanoseconds allowed) in seconds, or None."""
    try:
        text = _FRACTION_RE.sub(r"\1", created.replace("Z", "+00:00"), count=1)
        return int(datetime.datetime.fromisoformat(text).timestamp())
    except ValueError:
        return None


# -- the store -------------------------------------------------------------------------------


def load_oci_image(directory: Path) -> OciImage | None:
    """The image in ``directory``, or None when it is not a complete one."""
    try:
        info = json.loads((directory / META_NAME).read_text())
        st = (directory / IMAGE_NAME).stat()

        def words(key: str) -> tuple[str, ...] | None:
            value = info[key]
            return None if value is None else tuple(str(v) for v in value)

        return OciImage(
            directory=directory,
            refs=tuple(str(r) for r in info["refs"]),
            digest=str(info["digest"]),
            manifest_digest=str(info["manifest_digest"]),
            disk_digest=str(info["disk_digest"]),
            arch=str(info["arch"]),
            os=str(info["os"]),
            env=tuple(str(e) for e in info["env"]),
            working_dir=str(info["working_dir"]),
            user=str(info["user"]),
            entrypoint=words("entrypoint"),
            cmd=words("cmd"),
            exposed_ports=tuple(str(p) for p in info["exposed_ports"]),
            labels={str(k): str(v) for k, v in info["labels"].items()},
            layers=tuple(str(d) for d in info["layers"]),
            image_created=str(info["image_created"]),
            size=st.st_size,
            allocated=st.st_blocks * 512,
            convert_s=float(info["convert_s"]),
            created=float(info["created"]),
            last_used=_entries.last_used(directory, float(info["created"])),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def list_oci_images(cache_dir: Path | None = None) -> list[OciImage]:
    """Complete OCI images in the cache, the most recently used first."""
    return _entries.list_entries(oci_images_dir(cache_dir), load_oci_image)


def find_oci_image(
    text: str, *, arch: str | None = None, cache_dir: Path | None = None
) -> OciImage | None:
    """The cached image a reference names (as :func:`convert` recorded it: the canonical
    form) for ``arch`` (any when None: the most recently used), else the one whose config
    digest starts with ``text`` (at least 6 hex digits, ``sha256:`` optional; ConfigError when
    several do); None when there is none."""
    images = [i for i in list_oci_images(cache_dir) if arch is None or i.arch == arch]
    named = next((i for i in images if text in i.refs), None)
    if named is not None or not DIGEST_PREFIX_RE.fullmatch(text):
        return named
    return pick_by_digest(images, text, lambda image: image.digest)


def mark_used(image: OciImage) -> None:
    """Record that a VM uses ``image`` now (the ``last-used`` file's mtime)."""
    _entries.mark_used(image.directory)


def _nameable(meta: Mapping[str, FileMeta]) -> Mapping[str, FileMeta]:
    """``meta`` without the paths debugfs cannot be told (a newline in the name): those keep
    what the tree shows (root's, lstat's mode), with a warning."""
    odd = [path for path in meta if "\n" in path or "\r" in path]
    if not odd:
        return meta
    log.warning("%d path(s) with a newline keep root's owner and the tree's mode: %r",
                len(odd), odd[:5])  # fmt: skip
    return {path: item for path, item in meta.items() if path not in odd}


def _write_info(directory: Path, info: Mapping[str, Any]) -> None:
    _entries.write_meta(directory / META_NAME, info)


def _take_refs(root: Path, refs: Sequence[str], keep: Path, arch: str) -> None:
    """Move ``refs`` to the image in ``keep``: every other image of its arch drops them (under
    the lock; a multi-arch reference names one image per arch)."""
    for directory in sorted(root.iterdir()):
        if directory == keep or directory.name.startswith(".") or not directory.is_dir():
            continue
        try:
            info = json.loads((directory / META_NAME).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or info.get("arch") != arch:
            continue
        if any(r in info.get("refs", ()) for r in refs):
            info["refs"] = [r for r in info["refs"] if r not in refs]
            _write_info(directory, info)


def convert(
    pulled: PulledLayers,
    *,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> OciImage:
    """The cached root disk of ``pulled`` (converted on first use: the same config converts
    once; a new reference is added to an image already there). ``progress`` gets a line per
    step. ImageFormatError for a bad config or layer, ChecksumError for a layer whose diff id
    is not the config's, GuestError when e2fsprogs fails; nothing is left in the cache then."""
    if not _DIGEST_RE.fullmatch(pulled.config_digest):
        raise ImageFormatError(f"config digest {pulled.config_digest!r} is not sha256:<64 hex>")
    runtime = _runtime(pulled.config)
    diff_ids = _diff_ids(pulled.config, len(pulled.layers))
    refs = list(dict.fromkeys(pulled.refs))
    say = progress or (lambda line: None)
    hexdigest = pulled.config_digest.removeprefix("sha256:")
    # A converter's lock is its arch's (tags move within an arch): conversions for other
    # arches run beside it; a remover or pruner waits for them all.
    arch = str(runtime["arch"])
    builder = arch if arch in _ARCHES.values() else "other"
    with store_lock(oci_images_dir(cache_dir), builder=builder) as root:
        final = root / hexdigest
        found = load_oci_image(final)
        if found is not None:
            missing = [r for r in refs if r not in found.refs]
            if missing:
                _take_refs(root, missing, final, found.arch)
                info = json.loads((final / META_NAME).read_text())
                info["refs"] = [*missing, *info["refs"]]  # the newest name first
                _write_info(final, info)
                found = load_oci_image(final) or found
            say("cached")
            return found
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))  # 0700, same file system
        try:
            t0 = time.monotonic()
            inputs = [
                LayerInput(layer.open, layer.media_type, diff_id, layer.digest)
                for layer, diff_id in zip(pulled.layers, diff_ids, strict=True)
            ]

            def done(result: LayerResult) -> None:
                say(f"layer {result.diff_id[:19]}: {result.members} entries, "
                    f"{result.whiteouts} whiteouts")  # fmt: skip

            tree = work / "tree"
            workdir = runtime["working_dir"]
            meta = apply_layers(tree, inputs, epoch=_epoch(runtime["image_created"]),
                                progress=done, make_dirs=[workdir] if workdir else [])  # fmt: skip
            meta = _nameable(meta)
            say("making the ext4 disk")
            squash = (os.getuid(), os.getgid()) if os.getuid() != 0 else None
            build_root_disk(tree, work / IMAGE_NAME, meta=meta, squash_owner=squash,
                            uuid=str(uuid.UUID(hexdigest[:32])))  # fmt: skip
            shutil.rmtree(tree)
            disk_key = f"oci {OCI_PIPELINE} {DISK_FORMAT} {pulled.config_digest}"
            info = {
                **runtime,
                "refs": refs,
                "digest": pulled.config_digest,
                "manifest_digest": pulled.manifest_digest,
                "disk_digest": "sha256:" + hashlib.sha256(disk_key.encode()).hexdigest(),
                "layers": [layer.digest for layer in pulled.layers],
                "pipeline": OCI_PIPELINE,
                "convert_s": round(time.monotonic() - t0, 1),
                "created": time.time(),
            }
            os.chmod(work / IMAGE_NAME, 0o600)
            final = _entries.commit_entry(work, root, hexdigest, META_NAME, info)
            _take_refs(root, refs, final, str(info["arch"]))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        image = load_oci_image(final)
        if image is None:  # pragma: no cover - just written
            raise GuestError(f"OCI image {str(final)!r} is incomplete")
        return image


def remove_oci_image(image: OciImage, cache_dir: Path | None = None) -> None:
    """Delete one cached image (a VM running on it keeps its open file until it stops)."""
    with store_lock(oci_images_dir(cache_dir)) as root:
        _entries.remove_entry(image.directory, root)


def prune_oci_images(
    *,
    unused_days: float | None = None,
    cache_dir: Path | None = None,
    now: float | None = None,
) -> list[OciImage]:
    """Delete the images no VM booted for ``unused_days`` days (None: the images no reference
    names any more), and leftovers of interrupted conversions; returns the images removed."""
    if unused_days is not None and unused_days < 0:
        raise ConfigError(f"--unused-days must be 0 or more, got {unused_days}")
    clock = time.time() if now is None else now
    with store_lock(oci_images_dir(cache_dir)) as root:
        images = list_oci_images(cache_dir)
        if unused_days is None:
            doomed = [i for i in images if not i.refs]
        else:
            doomed = [i for i in images if clock - i.last_used > unused_days * 86400]
        for image in doomed:
            _entries.remove_entry(image.directory, root)
        _entries.clear_leftovers(root)
    return doomed
