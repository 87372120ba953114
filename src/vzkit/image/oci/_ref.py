"""Image references in skopeo's transport syntax, so the habits of ``skopeo``/``podman`` users
carry over.

=============================================  ============================================
``docker://HOST[:PORT]/REPO[:TAG][@DIGEST]``   a registry (the OCI distribution spec)
``NAME[:TAG][@DIGEST]`` (no transport)         the same, with Docker Hub's short-name rules
``oci:DIR[:REF]``                              an OCI image layout directory (``REF``: its
                                               ``org.opencontainers.image.ref.name``)
``oci-archive:FILE[:REF]``                     a tar of an OCI image layout
``docker-archive:FILE[:NAME:TAG | :@INDEX]``   ``docker save`` output
=============================================  ============================================

Docker Hub's rules (``distribution/reference``'s normalisation): a name whose first component
has no ``.`` or ``:`` and is not ``localhost`` lives on ``docker.io``, and a one-component name
there is under ``library/``; so ``python:3.12`` is ``docker.io/library/python:3.12`` and
``localhost:5000/x`` is repository ``x`` on registry ``localhost:5000``. No tag and no digest
means the tag ``latest``. Like skopeo, the path of a layout or an archive ends at its first
``:``. Only ``sha256`` digests are taken (the store verifies them).

The bare names ``debian``, ``debian:SUITE`` and ``debian+PKGS`` mean vzkit's own Debian image;
callers route them before they reach :func:`parse_reference` (``docker://debian:bookworm``
reaches Docker Hub).
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ...errors import SpecError

__all__ = ["DOCKER_HUB", "ImageReference", "Transport", "parse_reference"]

DOCKER_HUB = "docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_MAX_NAME = 255
_OTHER_TRANSPORTS = frozenset(
    {"dir", "containers-storage", "docker-daemon", "ostree", "sif", "tarball"}
)  # skopeo's, which vzkit does not read

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?"
)
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_ANY_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,}")
# An OCI layout's org.opencontainers.image.ref.name (image-spec, "annotations").
_REF_NAME = re.compile(
    r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*(?:/[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*)*"
)


class Transport(enum.Enum):
    """Where an image comes from (skopeo's transport names as values)."""

    DOCKER = "docker"
    OCI = "oci"
    OCI_ARCHIVE = "oci-archive"
    DOCKER_ARCHIVE = "docker-archive"


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageReference:
    """A parsed reference; ``str(ref)`` is its canonical form (registry and ``library/``
    spelled out, absolute paths).

    ``registry``/``repository``: for ``DOCKER``, and for a ``docker-archive`` picked by name.
    ``tag``: the tag (``DOCKER``, ``docker-archive``) or the layout's ref name (``oci``,
    ``oci-archive``); ``None`` when not given (a registry reference then has a digest).
    ``digest``: ``sha256:...`` pinned by the reference. ``path``: the layout or archive.
    ``index``: a ``docker-archive``'s ``@INDEX``.
    """

    transport: Transport
    registry: str | None = None
    repository: str | None = None
    tag: str | None = None
    digest: str | None = None
    path: Path | None = None
    index: int | None = None

    @property
    def name(self) -> str:
        """``registry/repository[:tag][@digest]`` (``""`` for a layout or archive without a
        docker name)."""
        if self.repository is None:
            return ""
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def familiar(self) -> str:
        """The short form people type: ``python:3.12`` for ``docker.io/library/python:3.12``;
        the canonical form for the other transports."""
        if self.transport is not Transport.DOCKER:
            return str(self)
        name = self.name
        if self.registry == DOCKER_HUB:
            name = name.removeprefix(f"{DOCKER_HUB}/").removeprefix("library/")
        return name

    def __str__(self) -> str:
        if self.transport is Transport.DOCKER:
            return f"docker://{self.name}"
        text = f"{self.transport.value}:{self.path}"
        if self.transport is Transport.DOCKER_ARCHIVE:
            if self.index is not None:
                return f"{text}:@{self.index}"
            return f"{text}:{self.name}" if self.repository else text
        return f"{text}:{self.tag}" if self.tag is not None else text


def _bad(text: str, why: str) -> SpecError:
    return SpecError(
        f"bad image reference {text!r}: {why} (expected NAME[:TAG][@sha256:...], "
        "docker://HOST/REPO[:TAG], oci:DIR[:TAG], oci-archive:FILE[:TAG] or "
        "docker-archive:FILE[:NAME:TAG])"
    )


def _docker_name(text: str, whole: str) -> tuple[str, str, str | None, str | None]:
    """``(registry, repository, tag, digest)`` of a docker reference, normalised."""
    rest, at, digest = text.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        if _ANY_DIGEST.fullmatch(digest):
            raise _bad(whole, f"only sha256 digests are supported, not {digest!r}")
        raise _bad(whole, f"{digest!r} is not a digest (sha256: and 64 hex digits)")
    tag: str | None = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise _bad(whole, f"{tag!r} is not a valid tag")
    if not rest:
        raise _bad(whole, "no repository name")
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        registry, path = first, remainder
        if not _DOMAIN.fullmatch(registry):
            raise _bad(whole, f"{registry!r} is not a registry host[:port]")
    else:
        registry, path = DOCKER_HUB, rest
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    for component in path.split("/"):
        if not _COMPONENT.fullmatch(component):
            if component.lower() != component:
                raise _bad(whole, f"repository names are lower case, not {component!r}")
            raise _bad(whole, f"{component!r} is not a valid repository name component")
    if len(registry) + 1 + len(path) > _MAX_NAME:
        raise _bad(whole, f"the name is longer than {_MAX_NAME} characters")
    if tag is None and not at:
        tag = "latest"
    return registry, path, tag, (digest if at else None)


def _local_path(text: str, whole: str) -> Path:
    if not text:
        raise _bad(whole, "no path")
    if "\0" in text:
        raise _bad(whole, "a NUL byte in the path")
    return Path(os.path.abspath(os.path.expanduser(text)))


def _layout(transport: Transport, rest: str, whole: str) -> ImageReference:
    path, sep, name = rest.partition(":")
    if sep and not _REF_NAME.fullmatch(name):
        raise _bad(whole, f"{name!r} is not a valid image name in a layout")
    return ImageReference(
        transport=transport, path=_local_path(path, whole), tag=name if sep else None
    )


def _docker_archive(rest: str, whole: str) -> ImageReference:
    path, sep, name = rest.partition(":")
    where = _local_path(path, whole)
    if not sep:
        return ImageReference(transport=Transport.DOCKER_ARCHIVE, path=where)
    if name.startswith("@"):
        if not name[1:].isdigit() or len(name) > 10:
            raise _bad(whole, f"{name!r} is not @INDEX (a number)")
        return ImageReference(transport=Transport.DOCKER_ARCHIVE, path=where, index=int(name[1:]))
    registry, repository, tag, digest = _docker_name(name, whole)
    if digest is not None:
        raise _bad(whole, "a docker-archive image is picked by NAME:TAG, not by digest")
    return ImageReference(
        transport=Transport.DOCKER_ARCHIVE,
        path=where,
        registry=registry,
        repository=repository,
        tag=tag,
    )


def parse_reference(text: str) -> ImageReference:
    """Parse ``text`` (see the module docstring); :class:`~vzkit.errors.SpecError` says what
    is wrong and what forms are taken."""
    if not isinstance(text, str):
        raise SpecError(f"an image reference is a string, not {type(text).__name__}")
    text = text.strip()
    if not text:
        raise _bad(text, "empty")
    transport, sep, rest = text.partition(":")
    if sep and transport == "docker":
        if not rest.startswith("//"):
            raise _bad(text, "docker references are written docker://NAME")
        registry, repository, tag, digest = _docker_name(rest[2:], text)
        return ImageReference(
            transport=Transport.DOCKER,
            registry=registry,
            repository=repository,
            tag=tag,
            digest=digest,
        )
    if sep and transport in ("oci", "oci-archive"):
        return _layout(Transport(transport), rest, text)
    if sep and transport == "docker-archive":
        return _docker_archive(rest, text)
    if sep and (transport in _OTHER_TRANSPORTS or rest.startswith("//")):
        known = ", ".join(t.value for t in Transport)
        raise _bad(text, f"unknown transport {transport!r} (known: {known})")
    registry, repository, tag, digest = _docker_name(text, text)
    return ImageReference(
        transport=Transport.DOCKER, registry=registry, repository=repository, tag=tag, digest=digest
    )
