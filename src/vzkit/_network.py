"""Network modes and the ``nat`` / ``bridged:IFACE`` / ``vmnet`` / ... spec strings; the NIC's
stable MAC address (kept in a VM's state directory, used by both backends)."""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ._fsutil import write_atomic
from .errors import ConfigError, SpecError

__all__ = [
    "MAC_FILE",
    "NetworkConfig",
    "NetworkMode",
    "PortForward",
    "PortProtocol",
    "check_more_networks",
    "mac_file",
    "parse_network_mode",
    "parse_port_spec",
    "random_mac",
    "read_mac",
    "save_mac",
    "stable_mac",
]

_IFACE_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")


class NetworkMode(enum.StrEnum):
    """How the guest's NIC is attached."""

    NAT = "nat"
    BRIDGED = "bridged"
    HOST_ONLY = "host-only"
    VMNET = "vmnet"
    NONE = "none"


_FORMS = "'nat' (or empty), 'nat:host-loopback', 'none', 'vmnet', 'host-only', 'bridged:IFACE'"
HOST_LOOPBACK = "host-loopback"


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """A network attachment. ``interface`` names the host interface for bridged mode only.

    ``host_loopback`` (``nat`` only) lets the guest reach the host's loopback services at
    the NAT gateway (10.0.2.2:PORT is the host's 127.0.0.1:PORT). Off by default: a guest
    should not reach services that listen on the host's loopback because they trust it.
    """

    mode: NetworkMode = NetworkMode.NAT
    interface: str = ""
    host_loopback: bool = False

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
        if not isinstance(self.host_loopback, bool):
            raise SpecError(f"host_loopback must be true or false, got {self.host_loopback!r}")
        if self.host_loopback and mode is not NetworkMode.NAT:
            raise SpecError(
                f"host_loopback is a 'nat' option; network mode {mode.value!r} does not take it"
            )

    def __str__(self) -> str:
        if self.mode is NetworkMode.BRIDGED:
            return f"bridged:{self.interface}"
        if self.host_loopback:
            return f"nat:{HOST_LOOPBACK}"
        return self.mode.value


def check_more_networks(networks: Iterable[object]) -> None:
    """:class:`ConfigError` unless each of a config's ``networks`` (the NICs after the first)
    is a :class:`NetworkConfig` that adds a NIC (not ``none``)."""
    for net in networks:
        if not isinstance(net, NetworkConfig) or net.mode is NetworkMode.NONE:
            raise ConfigError(
                "networks holds the NICs after the first (network): NetworkConfig objects "
                f"other than 'none' (parse_network_mode), got {net!r}"
            )


def parse_network_mode(spec: str) -> NetworkConfig:
    """Parse ``""``/``nat``, ``nat:host-loopback``, ``none``, ``vmnet``, ``host-only`` or
    ``bridged:IFACE``."""
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
    elif word == "nat":
        if iface.lower() == HOST_LOOPBACK:
            return NetworkConfig(NetworkMode.NAT, host_loopback=True)
        raise SpecError(
            f"unknown nat option {iface!r} in {spec!r}; the one option is "
            f"'nat:{HOST_LOOPBACK}' (the guest reaches the host's loopback services)"
        )
    elif word == "bridged":
        if not iface:
            raise SpecError(
                f"network spec {spec!r} names no interface after 'bridged:'; valid forms: {_FORMS}"
            )
        return NetworkConfig(NetworkMode.BRIDGED, iface)
    raise SpecError(f"unknown network mode {spec!r}; valid forms: {_FORMS}")


class PortProtocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


_PORT_FORMS = "'HOST:GUEST[/tcp|udp]' or 'ADDR:HOST:GUEST[/tcp|udp]'"


def _port(value: object, what: str) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise SpecError(f"{what} must be a number from 1 to 65535, got {value!r}")
    return value


def _protocol(value: object) -> PortProtocol:
    try:
        return PortProtocol(str(value))
    except ValueError:
        raise SpecError(f"protocol must be tcp or udp, got {value!r}") from None


@dataclass(frozen=True, slots=True)
class PortForward:
    """A host port published to a guest port (``vzkit run -p``); loopback unless told.

    On the qemu backend's ``nat`` network (and ``host-only`` on Linux) QEMU's network serves
    it: passt's ``--tcp-ports``/``--udp-ports``, or user-mode networking's ``hostfwd``.
    Everywhere else (vz; qemu with ``none``, bridged, vmnet) the core forwards it through
    the guest agent (:mod:`vzkit._portfwd`) to the guest's ``127.0.0.1:guest_port``.
    ``host_address`` is the IPv4 address to listen on (``0.0.0.0``: every interface).
    """

    host_port: int
    guest_port: int
    protocol: PortProtocol = PortProtocol.TCP
    host_address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        object.__setattr__(self, "host_port", _port(self.host_port, "host port"))
        object.__setattr__(self, "guest_port", _port(self.guest_port, "guest port"))
        object.__setattr__(self, "protocol", _protocol(self.protocol))
        try:
            address = ipaddress.IPv4Address(self.host_address)
        except (ValueError, TypeError):
            raise SpecError(
                f"host address must be an IPv4 address, got {self.host_address!r}"
            ) from None
        object.__setattr__(self, "host_address", str(address))

    def __str__(self) -> str:
        return f"{self.host_address}:{self.host_port}:{self.guest_port}/{self.protocol.value}"


def parse_port_spec(spec: str) -> PortForward:
    """Parse ``HOST:GUEST[/tcp|udp]`` or ``ADDR:HOST:GUEST[/tcp|udp]`` (docker's ``-p``)."""
    if not isinstance(spec, str):
        raise SpecError(f"port spec must be a string, got {type(spec).__name__}")
    body, sep, proto = spec.strip().partition("/")
    parts = body.split(":")
    if len(parts) not in (2, 3):
        raise SpecError(f"invalid port spec {spec!r}; expected {_PORT_FORMS}")
    address = parts[0] if len(parts) == 3 else "127.0.0.1"
    try:
        return PortForward(
            _port(parts[-2], "host port"),
            _port(parts[-1], "guest port"),
            _protocol(proto.lower() if sep else "tcp"),
            address,
        )
    except SpecError as err:
        raise SpecError(f"port spec {spec!r}: {err}") from None


# -- the NIC's MAC address ---------------------------------------------------------------------

#: The file in a VM's state directory that keeps its NIC's MAC address across boots (the first
#: NIC's; the NIC at index N of ``network`` then ``networks`` keeps its own in
#: ``mac-address-N``: :func:`mac_file`).
MAC_FILE = "mac-address"
_MAC_RE = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")


def mac_file(index: int = 0) -> str:
    """The name of the file keeping the MAC of the VM's NIC number ``index`` (0: the first)."""
    return MAC_FILE if index == 0 else f"{MAC_FILE}-{index}"


def random_mac() -> str:
    """A random locally administered unicast MAC address (``02:...`` style, lower case)."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def read_mac(state_dir: Path | None, index: int = 0) -> str | None:
    """The MAC address kept in ``state_dir`` for NIC ``index`` (lower case), or ``None`` if
    there is no usable one (no directory, no file, or not a MAC address)."""
    if state_dir is None:
        return None
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = (state_dir / mac_file(index)).read_text().strip().lower()
        if _MAC_RE.fullmatch(text):
            return text
    return None


def save_mac(state_dir: Path, mac: str, index: int = 0) -> None:
    """Keep ``mac`` for NIC ``index`` in ``state_dir`` (atomically, 0600); a directory that
    cannot be written only costs the VM a new address next boot."""
    with contextlib.suppress(OSError):
        write_atomic(state_dir / mac_file(index), f"{mac}\n".encode())


def stable_mac(state_dir: Path | None, index: int = 0) -> str:
    """The MAC address kept in ``state_dir`` for NIC ``index``, or a new random one kept there
    from now on."""
    mac = read_mac(state_dir, index)
    if mac is None:
        mac = random_mac()
        if state_dir is not None:
            save_mac(state_dir, mac, index)
    return mac
