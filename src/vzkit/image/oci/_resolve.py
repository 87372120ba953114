"""An OCI image ready to boot: pulled, converted into a root disk, and what its config says
every command gets.

:func:`pull_image` is ``vzkit image pull``: it always asks the source (a registry answers
with the tag's current manifest) and converts what it has not converted yet.
:func:`resolve_oci_image` is what ``vzkit run --image REF`` does: a registry reference already
in the cache for the guest's arch boots as it is, offline (as ``docker run`` takes a local
tag; ``vzkit image pull`` looks for a newer one); a layout or an archive, which is on this
machine anyway, is read again (its manifest and config, cheap) so a changed file is seen.
:func:`process_defaults` turns the image's ``Env``, ``WorkingDir``, ``User``, ``Entrypoint``
and ``Cmd`` into the VM config's :class:`~vzkit.ProcessDefaults`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ..._process_defaults import ProcessDefaults
from ..._progress import Progress
from ..._state import Arch
from ...errors import ConfigError
from ._platform import Platform, parse_platform
from ._pull import pull
from ._ref import ImageReference, Transport, parse_reference
from ._store import OciImage, OciLayer, PulledLayers, convert, find_oci_image, mark_used

__all__ = ["process_defaults", "pull_image", "resolve_oci_image"]

log = logging.getLogger(__name__)


def _platform(arch: Arch | str | None, platform: str | None) -> Platform:
    """The platform asked for; ConfigError for one vzkit cannot boot."""
    if platform is not None:
        wanted = parse_platform(platform)
        if wanted.arch is None or wanted.os != "linux":
            raise ConfigError(
                f"vzkit boots linux/amd64 and linux/arm64 guests (x86_64, aarch64), not {wanted}"
            )
        return wanted
    return Platform.for_arch(Arch.parse(str(arch))) if arch is not None else Platform.host()


def pull_image(
    ref: str | ImageReference,
    *,
    arch: Arch | str | None = None,
    platform: str | None = None,
    insecure: bool = False,
    cache_dir: Path | None = None,
) -> OciImage:
    """Pull ``ref`` (skopeo's syntax: ``docker://HOST/REPO:TAG``, ``NAME[:TAG]``,
    ``oci:DIR[:NAME]``, ``oci-archive:FILE``, ``docker-archive:FILE``) for ``arch`` (or
    ``platform``, ``"linux/arm64"``; default: the host's) into the blob store and convert it
    into a cached root disk (once per config). ``insecure``: the registry may be reached over
    plain HTTP (only when asked; see docs/oci.md). Shows progress on a terminal."""
    reference = parse_reference(ref) if isinstance(ref, str) else ref
    wanted = _platform(arch, platform)
    with Progress(f"{reference.familiar if reference.transport is Transport.DOCKER else reference} "
                  f"({wanted})") as progress:  # fmt: skip
        progress.step("pulling")
        pulled = pull(reference, platform=wanted, cache_dir=cache_dir, insecure=insecure,
                      progress=progress.update)  # fmt: skip
        config = json.loads(pulled.read_config())
        layers = [
            OciLayer(layer.digest, layer.media_type, partial(pulled.store.open, layer.digest))
            for layer in pulled.layers
        ]
        step: Callable[[str], None] = progress.step
        return convert(
            PulledLayers(config_digest=pulled.config_digest, config=config, layers=layers,
                         manifest_digest=pulled.manifest_digest, refs=(str(reference),)),
            cache_dir=cache_dir, progress=step,
        )  # fmt: skip


def resolve_oci_image(
    ref: str | ImageReference,
    *,
    arch: Arch | str | None = None,
    platform: str | None = None,
    insecure: bool = False,
    cache_dir: Path | None = None,
) -> OciImage:
    """The root disk ``ref`` names for ``arch``: a registry image already converted boots
    as cached (nothing asked of the registry); anything else goes through :func:`pull_image`.
    Marks the image used (for ``vzkit image prune --unused-days``)."""
    reference = parse_reference(ref) if isinstance(ref, str) else ref
    wanted = _platform(arch, platform)
    found = None
    if reference.transport is Transport.DOCKER and wanted.arch is not None:
        found = find_oci_image(str(reference), arch=wanted.arch.value, cache_dir=cache_dir)
    if found is None:
        found = pull_image(reference, platform=str(wanted), insecure=insecure,
                           cache_dir=cache_dir)  # fmt: skip
    mark_used(found)
    return found


def process_defaults(image: OciImage) -> ProcessDefaults:
    """What the image's config says every command in it gets (``docker run``'s rules: a user
    given as ``""`` is root, a missing ``WorkingDir`` is ``/``, a relative one is under
    ``/``; an ``Env`` item that is not ``NAME=VALUE`` is left out)."""
    return ProcessDefaults(
        env=tuple(
            (name, value)
            for name, _, value in (i.partition("=") for i in image.env if "=" in i[1:])
        ),
        cwd="/" + image.working_dir.lstrip("/") if image.working_dir else "",
        user=image.user,
        entrypoint=tuple(image.entrypoint or ()),
        cmd=tuple(image.cmd or ()),
    )
