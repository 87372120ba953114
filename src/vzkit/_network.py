"""Network modes and the ``nat`` / ``bridged:IFACE`` / ``vmnet`` / ... spec strings."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from .errors import SpecError

__all__ = ["NetworkConfig", "NetworkMode", "parse_network_mode"]

_IFACE_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")


class NetworkMode(enum.StrEnum):
    """How the guest's NIC is attached."""

    NAT = "nat"
    BRIDGED = "bridged"
    HOST_ONLY = "host-only"
    VMNET = "vmnet"
    NONE = "none"


_FORMS = "'nat' (or empty), 'none', 'vmnet', 'host-only', 'bridged:IFACE'"


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """A network attachment. ``interface`` names the host interface for bridged mode only."""

    mode: NetworkMode = NetworkMode.NAT
    interface: str = ""

    def __post_init__(self) -> None:
        try:
            mode = NetworkMode(self.mode)
        except ValueError:
            raise SpecError(f"unknown network mode {self.mode!r}; valid forms: {_FORMS}") from None
        object.__setattr__(self, "mode", mode)
        if mode is NetworkMode.BRIDGED:
            if not self.interface:
                raise SpecError(
                    f"bridged networking needs an interface name; valid forms: {_FORMS}"
                )
            if not _IFACE_RE.fullmatch(self.interface):
                raise SpecError(f"invalid network interface name {self.interface!r}")
        elif self.interface:
            raise SpecError(f"network mode {mode.value!r} takes no interface ({self.interface!r})")

    def __str__(self) -> str:
        if self.mode is NetworkMode.BRIDGED:
            return f"bridged:{self.interface}"
        return self.mode.value


def parse_network_mode(spec: str) -> NetworkConfig:
    """Parse ``""``/``nat``, ``none``, ``vmnet``, ``host-only`` or ``bridged:IFACE``."""
    if not isinstance(spec, str):
        raise SpecError(f"network spec must be a string, got {type(spec).__name__}")
    text = spec.strip()
    word, sep, iface = text.partition(":")
    word = word.lower()
    if not sep:
        if word in ("", "nat"):
            return NetworkConfig(NetworkMode.NAT)
        if word in ("none", "vmnet", "host-only"):
            return NetworkConfig(NetworkMode(word))
        if word == "bridged":
            raise SpecError(f"bridged networking needs an interface name; valid forms: {_FORMS}")
    elif word == "bridged":
        if not iface:
            raise SpecError(
                f"network spec {spec!r} names no interface after 'bridged:'; valid forms: {_FORMS}"
            )
        return NetworkConfig(NetworkMode.BRIDGED, iface)
    raise SpecError(f"unknown network mode {spec!r}; valid forms: {_FORMS}")
