"""The default guest image: built on first use, cached content-addressed, rebuilt on change.

An image lives in ``<cache>/images/<arch>-<key>/`` where ``key`` hashes every input: the
.deb files (by content), the agent binary, ``/init`` and the module list, and this builder's
format version. Same inputs, same directory; changed inputs, a new one. A build writes into a
temporary directory next to it and renames it into place when complete, so an interrupted
build never leaves a half image behind.

``image.json`` also records how the packages were verified (``trust``, see
:data:`~vzkit.image._fetch.Trust`): ``verified``, ``apt``, ``unsigned``, ``local`` or
``unknown``. The same bytes verified more strongly later upgrade the record.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .._cache import user_cache_dir
from .._config import LinuxVMConfig
from .._disk import RootDisk, RootInit, root_cmdline
from .._progress import Progress
from .._state import Arch, host_arch
from ..errors import ConfigError, GuestError
from ._fetch import TRUST_LEVELS, GuestDebs, Trust, fetch_guest_debs, find_guest_debs
from ._initramfs import GUEST_MODULES, GuestImage, build_guest, init_script, stage2_script
from ._rootdisk import rootfs_base

__all__ = [
    "AGENT_GUEST_PATH",
    "default_guest_config",
    "default_image",
    "image_cache_dir",
    "image_trust",
    "list_images",
    "remove_images",
]

#: Bump when the image layout changes in a way the inputs do not show.
IMAGE_FORMAT = 1
AGENT_GUEST_PATH = "/bin/vzkit-agent"
_META = "image.json"


def image_cache_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or user_cache_dir()) / "images"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _image_key(debs: GuestDebs, agent: Path) -> str:
    inputs = {
        "format": IMAGE_FORMAT,
        "kernel": _sha256(debs.kernel),
        "busybox": _sha256(debs.busybox),
        "agent": _sha256(agent),
        "init": hashlib.sha256(init_script()).hexdigest(),
        "stage2": hashlib.sha256(stage2_script()).hexdigest(),
        "modules": list(GUEST_MODULES),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _load(directory: Path) -> GuestImage | None:
    try:
        meta = json.loads((directory / _META).read_text())
        if not all(_plain(meta[key]) for key in ("kernel", "initrd")):
            return None  # image.json names files outside its directory: not ours
        image = GuestImage(
            kernel=directory / meta["kernel"],
            initrd=directory / meta["initrd"],
            arch=meta["arch"],
            kernel_version=meta["kernel_version"],
            modules=list(meta["modules"]),
            builtin_modules=list(meta.get("builtin_modules", [])),
            missing_modules=list(meta.get("missing_modules", [])),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (image.kernel.is_file() and image.initrd.is_file()):
        return None
    return image


def image_trust(directory: Path) -> Trust:
    """How the packages of the image in ``directory`` were verified (``unknown`` if unsaid)."""
    try:
        recorded = json.loads((directory / _META).read_text()).get("trust")
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return next((level for level in TRUST_LEVELS if level == recorded), "unknown")


def _upgrade_trust(directory: Path, trust: Trust) -> None:
    """Record ``trust`` for an existing image if it is stronger than what it says."""
    if TRUST_LEVELS.index(trust) <= TRUST_LEVELS.index(image_trust(directory)):
        return
    meta = json.loads((directory / _META).read_text())
    meta["trust"] = trust
    _write_meta(directory, meta)


def _write_meta(directory: Path, meta: dict[str, Any]) -> None:
    tmp = directory / f".{_META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, directory / _META)


def _plain(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One builder per cache at a time (across processes)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def default_image(
    arch: Arch | str | None = None,
    *,
    cache_dir: Path | None = None,
    deb_dir: Path | None = None,
    refresh: bool = False,
    source: str | None = None,
    mirror: str | None = None,
) -> GuestImage:
    """The default guest (kernel + initramfs with the agent) for ``arch``, building it if needed.

    Packages come from ``deb_dir`` when given, else are downloaded into the cache from
    ``source`` (``apt``, ``mirror`` or ``auto``; ``mirror`` a Debian mirror URL; see
    :func:`fetch_guest_debs`). ``refresh`` looks for newer packages. Raises
    :class:`GuestError` with what went wrong. How the packages were verified is recorded
    with the image (:func:`image_trust`).
    """
    from ._agent_build import agent_binary  # shipped, or built (the toolchain loads then)

    guest = Arch.parse(str(arch)) if arch is not None else host_arch()
    cache = cache_dir or user_cache_dir()
    images = image_cache_dir(cache)
    with Progress(f"guest image ({guest.value})") as progress, _locked(images):
        progress.step("finding packages")
        if deb_dir is not None:
            debs = find_guest_debs(deb_dir, guest.value)
        else:
            debs = fetch_guest_debs(
                cache / "debs" / guest.value,
                guest.value,
                refresh=refresh,
                source=source,
                mirror=mirror,
            )
        progress.step("preparing the agent")
        agent = agent_binary(guest.value, cache)
        key = _image_key(debs, agent)
        target = images / f"{guest.value}-{key}"
        existing = _load(target)
        if existing is not None:
            progress.step("cached")
            progress.dismiss()  # nothing built: no "done" line on every run from the cache
            _upgrade_trust(target, debs.trust)
            return existing
        progress.step("packing the initramfs")
        shutil.rmtree(target, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{guest.value}-", dir=images))
        try:
            built = build_guest(
                guest.value,
                out_dir=tmp,
                deb_dir=debs.kernel.parent,
                extra_files={AGENT_GUEST_PATH: agent},
            )
            meta = asdict(built)
            meta["kernel"] = built.kernel.name
            meta["initrd"] = built.initrd.name
            meta["trust"] = debs.trust
            _write_meta(tmp, meta)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        image = _load(target)
        if image is None:  # pragma: no cover - we just wrote it
            raise GuestError(f"guest image in {target} is incomplete")
        return image


def list_images(cache_dir: Path | None = None) -> list[tuple[Path, GuestImage]]:
    """Complete images in the cache, newest first."""
    images = image_cache_dir(cache_dir)
    found = []
    for directory in images.iterdir() if images.is_dir() else ():
        if directory.name.startswith("."):
            continue
        image = _load(directory)
        if image is not None:
            found.append((directory, image))
    found.sort(key=lambda item: item[0].stat().st_mtime, reverse=True)
    return found


def remove_images(
    cache_dir: Path | None = None, *, arch: str | None = None, default_only: bool = False
) -> list[Path]:
    """Delete cached images (of one arch, or all: root disks and Debian images too) and
    leftovers of interrupted builds. ``default_only``: the default guest's images only."""
    images = image_cache_dir(cache_dir)
    removed = []
    with _locked(images):
        for directory in sorted(images.iterdir()):
            if not directory.is_dir():
                continue
            name = directory.name.lstrip(".")
            if default_only and directory.name in ("debian", "disks", "oci"):
                continue
            if arch is not None and not name.startswith(f"{arch}-"):
                continue
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


def _init_mode(init: RootInit | str) -> RootInit:
    try:
        return RootInit(init)
    except ValueError:
        raise ConfigError(f"init must be 'agent' or 'image', got {init!r}") from None


def default_guest_config(
    arch: Arch | str | None = None,
    *,
    rootfs: str | os.PathLike[str] | None = None,
    root: str | None = None,
    init: RootInit | str = RootInit.AGENT,
    **overrides: Any,
) -> LinuxVMConfig:
    """A config for the default guest on ``arch`` (the host's by default).

    The image is built on first use (see :func:`default_image`) unless ``kernel_path`` is
    overridden. Defaults: 1 CPU, 0.5 GB, NAT networking, headless, console to a log file.

    A userland from a root disk instead of the initramfs's busybox (``docs/images.md``):
    ``rootfs`` is a directory tree, made into a cached ext4 base image (see
    :func:`~vzkit.image.rootfs_base`) that the VM boots with its own copy-on-write layer;
    ``root`` is the root device on the config's ``disk_path`` (e.g. ``/dev/vda1``), which is
    booted and written in place. Either way vzkit's initramfs mounts the root and starts the
    agent in it; ``init="image"`` runs the image's own ``/sbin/init`` beside the agent. Run by
    a user other than root, ``rootfs`` files owned by that user (and group) are root's in the
    guest.
    """
    guest = Arch.parse(str(arch)) if arch is not None else host_arch()
    if rootfs is not None and root is not None:
        raise ConfigError(
            "give rootfs (a directory tree) or root (a device of disk_path), not both"
        )
    settings: dict[str, Any] = {"arch": guest, "cpus": 1, "memory_gb": 0.5}
    if "kernel_path" not in overrides:
        image = default_image(guest)
        settings.update(kernel_path=image.kernel, initrd_path=image.initrd, cmdline=image.cmdline())
    if rootfs is not None:
        # Run by a user, their files become root's in the guest (as rootless podman shows them).
        squash = None if os.getuid() == 0 else (os.getuid(), os.getgid())
        base = rootfs_base(rootfs, squash_owner=squash)
        settings["root_disk"] = RootDisk(base=base.path, digest=base.digest, init=_init_mode(init))
    elif root is not None:
        if overrides.get("disk_path") is None:
            raise ConfigError(f"root={root!r} names a device of disk_path, but no disk_path is set")
        words = root_cmdline(root, "", init)
        cmdline = str(overrides.pop("cmdline", settings.get("cmdline", "")))
        settings["cmdline"] = f"{cmdline} {words}".strip()
    settings.update(overrides)
    return LinuxVMConfig(**settings)
