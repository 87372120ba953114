"""Images that take a VM to build: the Debian image, and the guest config that boots one.

``build_debian_image("debian:bookworm", packages=["jq"])`` (``vzkit image build debian``):

1. **resolve** the package set from the signed indexes (:func:`~vzkit.image._debian.resolve_debian`)
   and look for an image built from exactly these inputs: found, nothing else happens;
2. **download** the .debs into the cache (kept: the next build, after a failure too, reuses
   them) and **unpack** them on the host, without root (:mod:`vzkit.image._debian`);
3. make the tree into a raw **ext4** disk (``mke2fs -d`` + debugfs for owners and modes; a
   UUID and hash seed derived from the manifest's digest), in a private build directory inside
   the cache (the same file system: the finished image is renamed, never copied);
4. boot that disk **read-write** with vzkit's kernel and initramfs (``root=/dev/vda``, the
   agent injected; no network; the .deb directory shared read-only at ``/mnt/debs``) and run
   the **second stage** there through the agent (``dpkg`` configures every package); its output
   streams to the progress line, and a failure raises :class:`~vzkit.errors.GuestError` with
   its last lines; then ``sync``, the root remounted read-only, the VM stopped;
5. ``e2fsck -fy`` on the host (a journal left to replay is replayed; an error fails the
   build), then ``image.json`` and one rename into ``<cache>/images/debian/<digest>/``
   (:mod:`vzkit.image._debian_image`).

Ctrl-C or a failure at any step removes the build directory (the VM is closed by its context
manager, which stops its processes); the cache holds complete images only.

This module sits above the facades (it boots a :class:`~vzkit.VirtualMachine`), so the image
package (below them) stays free of VMs; ``vzkit.default_guest_config`` comes through here.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._config import LinuxVMConfig
from ._disk import RootDisk, RootInit
from ._network import NetworkConfig, NetworkMode
from ._progress import Progress
from ._state import Arch, host_arch
from ._volume import VolumeMount
from .errors import ConfigError, GuestError, VzkitError
from .image._debian import (
    STAGE2_PATH,
    debian_deb_dir,
    parse_debian_ref,
    prepare_debian_tree,
    resolve_debian,
)
from .image._debian_image import (
    DEBIAN_PIPELINE,
    IMAGE_NAME,
    MANIFEST_NAME,
    DebianImage,
    commit_debian_image,
    debian_images_lock,
    find_by_inputs,
    find_debian_image,
    inputs_key,
    mark_used,
    normal_packages,
    split_image_ref,
)
from .image._entries import DIGEST_PREFIX_RE
from .image._image import _init_mode
from .image._image import default_guest_config as _plain_guest_config
from .image._rootdisk import build_root_disk, disk_size_for, find_e2fsprogs, tree_usage
from .image.oci._resolve import process_defaults, resolve_oci_image
from .image.oci._store import OciImage, find_oci_image
from .image.oci._store import mark_used as oci_mark_used

__all__ = ["build_debian_image", "default_guest_config", "resolve_image"]

log = logging.getLogger(__name__)

#: The smallest Debian image: room for ``apt-get install`` in a VM's layer (the file is
#: sparse; only what is written takes host disk).
MIN_DEBIAN_DISK = 4 << 30
#: Lines of the second stage's output a failure shows.
_TAIL_LINES = 40
#: The second stage under TCG takes minutes (see docs/images.md); this bounds a hung one.
_STAGE2_TIMEOUT_S = 3600.0
_DEBS_TAG = "debs"
_LABEL = "vzkit-debian"


def build_debian_image(
    ref: str = "debian",
    *,
    arch: Arch | str | None = None,
    packages: Sequence[str] = (),
    mirror: str | None = None,
    cache_dir: Path | None = None,
    backend: str = "auto",
) -> DebianImage:
    """The Debian image ``ref`` (``debian``, ``debian:bookworm``, ``debian+jq,curl``) with
    ``packages`` added, for ``arch`` (the host's by default): found in the cache when it was
    built from the same packages, else built (see the module docs; minutes under emulation).
    Needs the network for the signed indexes and any .deb not yet downloaded. Raises
    :class:`~vzkit.errors.GuestError` (a package that does not exist, a failed maintainer
    script with its output, e2fsprogs missing), :class:`~vzkit.errors.SpecError` (a bad ref).
    """
    name, named = split_image_ref(ref)
    suite = parse_debian_ref(name)
    guest = Arch.parse(str(arch)) if arch is not None else host_arch()
    extra = normal_packages([*named, *packages])
    title = f"debian:{suite} image ({guest.value})"
    with Progress(title) as progress, debian_images_lock(cache_dir, arch=guest.value) as root:
        progress.step("resolving packages")
        resolved = resolve_debian(arch=guest.value, suite=suite, packages=extra, mirror=mirror,
                                  cache_dir=cache_dir)  # fmt: skip
        inputs = inputs_key(resolved, extra)
        found = find_by_inputs(inputs, cache_dir)
        if found is not None:
            progress.step("cached")
            progress.dismiss()
            return found
        t0 = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))  # 0700, same file system
        try:
            progress.step("downloading and unpacking")
            prepared = prepare_debian_tree(work / "src", arch=guest.value, resolved=resolved,
                                           cache_dir=cache_dir, copy_debs=False)  # fmt: skip
            digest = prepared.manifest.digest
            os.replace(work / "src" / MANIFEST_NAME, work / MANIFEST_NAME)
            progress.step("making the ext4 disk")
            disk = work / IMAGE_NAME
            size = max(MIN_DEBIAN_DISK, disk_size_for(*tree_usage(prepared.tree)))
            build_root_disk(prepared.tree, disk, meta=prepared.meta, size=size, label=_LABEL,
                            uuid=str(uuid.UUID(digest[:32])))  # fmt: skip
            shutil.rmtree(work / "src")
            debs = debian_deb_dir(resolved.debarch, cache_dir)
            _second_stage(disk, guest, debs, progress, backend)
            progress.step("checking the file system")
            _fsck(disk)
            info: dict[str, Any] = {
                "ref": f"debian:{suite}",
                "suite": suite,
                "arch": guest.value,
                "packages": list(extra),
                "package_count": len(prepared.manifest.packages),
                "digest": f"sha256:{digest}",
                "manifest_digest": digest,
                "pipeline": DEBIAN_PIPELINE,
                "inputs": inputs,
                "trust": prepared.manifest.trust,
                "build_s": round(time.monotonic() - t0, 1),
                "created": time.time(),
            }
            return commit_debian_image(work, root, info)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # gone once committed (renamed)


def _second_stage(disk: Path, guest: Arch, debs: Path, progress: Progress, backend: str) -> None:
    """Boot ``disk`` read-write, run the second stage with ``debs`` shared, stop cleanly."""
    from ._vm import VirtualMachine  # the facade: booting is what needs it

    config = _plain_guest_config(
        guest, disk_path=disk, root="/dev/vda", memory_gb=1.0,
        volumes=(VolumeMount(debs, _DEBS_TAG, read_only=True),),
        network=NetworkConfig(NetworkMode.NONE),
    )  # fmt: skip
    progress.step("booting the disk")
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    with VirtualMachine(config, backend=backend) as vm:
        vm.start(timeout=120)
        vm.guest.wait_ready(timeout=300)
        argv = ["/bin/sh", "-c", f'exec /bin/sh {STAGE2_PATH} "$1" 2>&1', "sh", f"/mnt/{_DEBS_TAG}"]
        proc = vm.guest.popen(argv, stdin=False, timeout=_STAGE2_TIMEOUT_S)
        try:
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode(errors="replace").rstrip()
                tail.append(line)
                log.debug("stage2: %s", line)
                if line.startswith("vzkit stage2: "):
                    progress.step(line.removeprefix("vzkit stage2: "))
            code = proc.wait()
        except BaseException:
            # Ctrl-C: end dpkg now (waiting for it, as leaving a popen block does, would take
            # minutes); closing the VM then stops QEMU and its helpers.
            with contextlib.suppress(VzkitError, OSError):
                proc.kill()
            raise
        if code != 0:
            shown = "\n".join("  " + line for line in tail)
            raise GuestError(
                f"the second stage (dpkg configuring the packages) failed in the build VM "
                f"(exit {code}); its output ended with:\n{shown}\nThe downloaded packages are "
                "kept: fix the cause (e.g. drop the package whose script failed) and build again."
            )
        progress.step("syncing the disk")
        # Flush, then remount the root read-only so the stop finds nothing dirty.
        vm.guest.run(["/bin/sh", "-c", "sync; mount -o remount,ro / || sync"], timeout=300)
        vm.stop(timeout=60)


def _fsck(disk: Path) -> None:
    """``e2fsck -fy``: replay a journal, fix and report; 0 and 1 (fixed) are fine."""
    mke2fs, _ = find_e2fsprogs()
    e2fsck = str(Path(mke2fs).with_name("e2fsck"))
    try:
        proc = subprocess.run(
            [e2fsck, "-fy", str(disk)], capture_output=True, text=True, errors="replace",
            stdin=subprocess.DEVNULL, check=False, env={**os.environ, "LC_ALL": "C"},
        )  # fmt: skip
    except OSError as err:
        raise GuestError(f"cannot run e2fsck: {err}") from err
    if proc.returncode not in (0, 1):
        raise GuestError(
            f"e2fsck found errors it could not fix in the built image (exit {proc.returncode}): "
            f"{(proc.stdout + proc.stderr).strip()[-2000:]}"
        )
    if proc.returncode == 1:
        log.warning("e2fsck fixed the built image: %s", proc.stdout.strip()[-2000:])


def _is_debian_ref(image: str) -> bool:
    """vzkit's own Debian image: ``debian``, ``debian:SUITE``, ``debian+P1,P2`` (Docker Hub's
    is ``docker://debian:TAG``)."""
    name = image.partition("+")[0]
    return name == "debian" or name.startswith("debian:")


def resolve_image(
    image: str,
    arch: Arch | str | None = None,
    *,
    cache_dir: Path | None = None,
    insecure_registry: bool = False,
) -> DebianImage | OciImage:
    """The cached image ``image`` names, marked as used now: ``debian[:SUITE][+P1,P2]``
    (built on first use), a digest prefix of a cached image (Debian or OCI), or an OCI image
    reference (``docker://HOST/REPO:TAG``, ``NAME[:TAG]``, ``oci:DIR``, ``oci-archive:FILE``,
    ``docker-archive:FILE``: pulled and converted on first use, see
    :func:`vzkit.image.oci.resolve_oci_image`)."""
    guest = Arch.parse(str(arch)) if arch is not None else host_arch()
    if not _is_debian_ref(image) and not DIGEST_PREFIX_RE.fullmatch(image):
        return resolve_oci_image(image, arch=guest, insecure=insecure_registry,
                                 cache_dir=cache_dir)  # fmt: skip
    found: DebianImage | OciImage | None = find_debian_image(
        image, arch=guest.value, cache_dir=cache_dir
    )
    if found is None and not _is_debian_ref(image):
        found = find_oci_image(image, cache_dir=cache_dir)
        if found is not None:
            oci_mark_used(found)
    if found is None:
        if not _is_debian_ref(image):
            raise ConfigError(
                f"no cached image {image!r} for {guest.value} (see 'vzkit image list'; "
                "'vzkit image build debian' builds one, 'vzkit image pull REF' pulls one)"
            )
        name, extra = split_image_ref(image)
        found = build_debian_image(name, arch=guest, packages=extra, cache_dir=cache_dir)
    if found.arch != guest.value:
        raise ConfigError(f"image {image!r} is for {found.arch}, not {guest.value}")
    if isinstance(found, DebianImage):
        mark_used(found)
    return found


def default_guest_config(
    arch: Arch | str | None = None,
    *,
    image: str | None = None,
    init: RootInit | str = RootInit.AGENT,
    insecure_registry: bool = False,
    **overrides: Any,
) -> LinuxVMConfig:
    """:func:`vzkit.image.default_guest_config`, plus ``image``: ``None`` or ``"default"``
    (the busybox guest), ``"debian"``/``"debian:bookworm"`` (the cached Debian image, built
    on first use; ``"debian+jq,curl"`` with those packages), an OCI image reference
    (``"python:3.12-slim"``, ``"docker://HOST/REPO:TAG"``, ``"oci:DIR"``, ...; pulled and
    converted on first use; its config's env, working directory, user and command become the
    config's ``process`` unless given; ``insecure_registry``: plain HTTP to the registry) or a
    cached image's digest. The image is the VM's read-only root disk; the VM writes into its
    own layer."""
    if image in (None, "default"):
        if insecure_registry:
            raise ConfigError("insecure_registry is for an image from a registry")
        return _plain_guest_config(arch, init=init, **overrides)
    if overrides.get("rootfs") is not None or overrides.get("root") is not None:
        raise ConfigError("give image, rootfs or root, not more than one")
    found = resolve_image(str(image), arch, insecure_registry=insecure_registry)
    if isinstance(found, OciImage):
        disk = RootDisk(base=found.path, init=_init_mode(init), digest=found.disk_digest)
        overrides.setdefault("process", process_defaults(found))
    else:
        disk = RootDisk(base=found.path, init=_init_mode(init))
    return _plain_guest_config(found.arch, root_disk=disk, **overrides)
