"""Platforms (``os/architecture[/variant]``) and how vzkit's guest arches map onto them:
``x86_64`` is OCI's ``amd64``, ``aarch64`` is ``arm64`` (whose ``v8`` variant is implied)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..._state import Arch, host_arch
from ...errors import SpecError

__all__ = ["Platform", "parse_platform", "same_variant"]

_OCI_ARCH = {Arch.X86_64: "amd64", Arch.AARCH64: "arm64"}


@dataclass(frozen=True, kw_only=True, slots=True)
class Platform:
    """``os/architecture[/variant]`` as in an index (``linux/arm64/v8``)."""

    os: str = "linux"
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text

    @classmethod
    def for_arch(cls, arch: Arch) -> Platform:
        """The Linux platform of a vzkit guest arch (``aarch64`` -> ``linux/arm64``)."""
        return cls(architecture=_OCI_ARCH[arch])

    @classmethod
    def host(cls) -> Platform:
        return cls.for_arch(host_arch())

    @property
    def arch(self) -> Arch | None:
        """vzkit's guest arch for this platform (``None``: one vzkit cannot boot)."""
        for arch, name in _OCI_ARCH.items():
            if self.architecture == name:
                return arch
        return None

    def matches(self, other: Platform) -> bool:
        """Whether ``other`` (from an image) serves this platform (asked for): the same os and
        arch, and the same variant when this one names one (``arm64``'s ``v8`` is implied)."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return self.variant is None or _variant(self) == _variant(other)


def _variant(platform: Platform) -> str | None:
    if platform.architecture == "arm64" and platform.variant in (None, "v8"):
        return "v8"
    return platform.variant


def parse_platform(text: str | Platform | None) -> Platform:
    """``"linux/arm64"``, ``"linux/arm64/v8"``, ``"arm64"``, ``"aarch64"`` -> a Platform;
    ``None``: the host's arch. :class:`~vzkit.errors.SpecError` on anything else."""
    if text is None:
        return Platform.host()
    if isinstance(text, Platform):
        return text
    parts = text.strip().split("/")
    if len(parts) == 1:
        parts = ["linux", *parts]
    if not 2 <= len(parts) <= 3 or not all(re.fullmatch(r"[a-z0-9_.-]+", p) for p in parts):
        raise SpecError(f"bad platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/arm64")
    aliases = {"x86_64": "amd64", "aarch64": "arm64"}
    return Platform(
        os=parts[0],
        architecture=aliases.get(parts[1], parts[1]),
        variant=parts[2] if len(parts) == 3 else None,
    )


def same_variant(a: Platform, b: Platform) -> bool:
    """Whether two platforms name the same variant (``arm64`` and ``arm64/v8`` do)."""
    return _variant(a) == _variant(b)
