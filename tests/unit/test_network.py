"""Network modes, configs and their spec strings."""

from __future__ import annotations

import dataclasses
import enum

import pytest

from vzkit import (
    NetworkConfig,
    NetworkMode,
    PortForward,
    PortProtocol,
    SpecError,
    parse_network_mode,
    parse_port_spec,
)

VALID_FORMS = "'nat' (or empty), 'nat:host-loopback', 'none', 'vmnet', 'host-only', 'bridged:IFACE'"


def test_network_mode_is_a_str_enum() -> None:
    assert issubclass(NetworkMode, enum.StrEnum)
    assert [m.value for m in NetworkMode] == ["nat", "bridged", "host-only", "vmnet", "none"]
    assert NetworkMode.HOST_ONLY == "host-only"
    assert NetworkMode("host-only") is NetworkMode.HOST_ONLY
    assert f"{NetworkMode.NAT}" == "nat"


def test_network_config_defaults() -> None:
    cfg = NetworkConfig()
    assert cfg.mode is NetworkMode.NAT
    assert cfg.interface == ""
    assert str(cfg) == "nat"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mode = NetworkMode.NONE  # type: ignore[misc]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", NetworkConfig(NetworkMode.NAT)),
        ("  ", NetworkConfig(NetworkMode.NAT)),
        ("nat", NetworkConfig(NetworkMode.NAT)),
        ("NAT", NetworkConfig(NetworkMode.NAT)),
        ("none", NetworkConfig(NetworkMode.NONE)),
        (" None ", NetworkConfig(NetworkMode.NONE)),
        ("vmnet", NetworkConfig(NetworkMode.VMNET)),
        ("host-only", NetworkConfig(NetworkMode.HOST_ONLY)),
        ("Host-Only", NetworkConfig(NetworkMode.HOST_ONLY)),
        ("bridged:en0", NetworkConfig(NetworkMode.BRIDGED, "en0")),
        ("BRIDGED:eth0.100", NetworkConfig(NetworkMode.BRIDGED, "eth0.100")),
        ("bridged:br-lan", NetworkConfig(NetworkMode.BRIDGED, "br-lan")),
    ],
)
def test_valid_forms(spec: str, expected: NetworkConfig) -> None:
    cfg = parse_network_mode(spec)
    assert cfg == expected
    assert isinstance(cfg.mode, NetworkMode)


@pytest.mark.parametrize(
    "cfg",
    [
        NetworkConfig(),
        NetworkConfig(NetworkMode.NONE),
        NetworkConfig(NetworkMode.VMNET),
        NetworkConfig(NetworkMode.HOST_ONLY),
        NetworkConfig(NetworkMode.BRIDGED, "en0"),
        NetworkConfig(NetworkMode.NAT, host_loopback=True),
    ],
)
def test_str_round_trip(cfg: NetworkConfig) -> None:
    assert parse_network_mode(str(cfg)) == cfg


def test_bridged_without_name_after_colon() -> None:
    with pytest.raises(SpecError) as info:
        parse_network_mode("bridged:")
    assert str(info.value) == (
        f"network spec 'bridged:' names no interface after 'bridged:'; valid forms: {VALID_FORMS}"
    )


def test_bare_bridged() -> None:
    with pytest.raises(SpecError) as info:
        parse_network_mode("bridged")
    assert str(info.value) == (
        f"bridged networking needs an interface name; valid forms: {VALID_FORMS}"
    )


@pytest.mark.parametrize("spec", ["wifi", "hostonly", "vmnet:x", "bridge:en0", "host"])
def test_unknown_word_lists_valid_forms(spec: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_network_mode(spec)
    message = str(info.value)
    assert message == f"unknown network mode {spec!r}; valid forms: {VALID_FORMS}"
    for form in ("nat", "none", "vmnet", "host-only", "bridged:IFACE"):
        assert form in message


def test_spec_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the point is the base class
        parse_network_mode("bogus")


def test_non_string_spec() -> None:
    with pytest.raises(SpecError):
        parse_network_mode(None)  # type: ignore[arg-type]


def test_network_config_accepts_mode_strings() -> None:
    assert NetworkConfig("bridged", "en0").mode is NetworkMode.BRIDGED  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "interface"),
    [
        ("wifi", ""),
        (NetworkMode.BRIDGED, ""),
        (NetworkMode.BRIDGED, "en 0"),
        (NetworkMode.BRIDGED, "x" * 65),
        (NetworkMode.NAT, "en0"),
        (NetworkMode.NONE, "en0"),
    ],
)
def test_network_config_validates(mode: str, interface: str) -> None:
    with pytest.raises(SpecError):
        NetworkConfig(mode, interface)  # type: ignore[arg-type]


# -- published ports ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("8080:80", PortForward(8080, 80)),
        ("8080:80/tcp", PortForward(8080, 80, PortProtocol.TCP)),
        (" 5353:53/UDP ", PortForward(5353, 53, PortProtocol.UDP)),
        ("0.0.0.0:2222:22", PortForward(2222, 22, host_address="0.0.0.0")),
        ("10.0.0.1:1:65535/udp", PortForward(1, 65535, PortProtocol.UDP, "10.0.0.1")),
    ],
)
def test_parse_port_spec(spec: str, expected: PortForward) -> None:
    parsed = parse_port_spec(spec)
    assert parsed == expected
    assert parse_port_spec(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "80",
            "invalid port spec '80'; expected 'HOST:GUEST[/tcp|udp]' or "
            "'ADDR:HOST:GUEST[/tcp|udp]'",
        ),
        ("a:b:c:d", "invalid port spec 'a:b:c:d'"),
        ("0:80", "port spec '0:80': host port must be a number from 1 to 65535, got 0"),
        ("80:65536", "port spec '80:65536': guest port must be a number from 1 to 65535"),
        ("x:80", "port spec 'x:80': host port must be a number from 1 to 65535, got 'x'"),
        ("80:80/sctp", "port spec '80:80/sctp': protocol must be tcp or udp, got 'sctp'"),
        ("::1:80:80", "invalid port spec"),
        ("localhost:80:80", "host address must be an IPv4 address, got 'localhost'"),
        ("1.2.3:80:80", "host address must be an IPv4 address"),
    ],
)
def test_bad_port_specs(spec: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_port_spec(spec)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_port_forward_validates_fields() -> None:
    assert str(PortForward(8080, 80)) == "127.0.0.1:8080:80/tcp"
    with pytest.raises(SpecError, match="guest port"):
        PortForward(8080, True)
    with pytest.raises(SpecError, match="protocol"):
        PortForward(8080, 80, "icmp")  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        PortForward(1, 2).host_port = 3  # type: ignore[misc]


def test_nat_keeps_the_guest_off_the_host_loopback_unless_asked() -> None:
    assert parse_network_mode("nat").host_loopback is False
    assert NetworkConfig().host_loopback is False
    cfg = parse_network_mode("NAT:Host-Loopback")
    assert cfg == NetworkConfig(NetworkMode.NAT, host_loopback=True)
    assert str(cfg) == "nat:host-loopback"


@pytest.mark.parametrize("spec", ["nat:en0", "nat:", "nat:loopback"])
def test_unknown_nat_option(spec: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_network_mode(spec)
    assert str(info.value) == (
        f"unknown nat option {spec.partition(':')[2]!r} in {spec!r}; the one option is "
        "'nat:host-loopback' (the guest reaches the host's loopback services)"
    )


@pytest.mark.parametrize("mode", [NetworkMode.NONE, NetworkMode.HOST_ONLY, NetworkMode.VMNET])
def test_host_loopback_is_a_nat_option_only(mode: NetworkMode) -> None:
    with pytest.raises(SpecError, match=f"network mode '{mode.value}' does not take it"):
        NetworkConfig(mode, host_loopback=True)
    with pytest.raises(SpecError, match="does not take it"):
        NetworkConfig(NetworkMode.BRIDGED, "br0", host_loopback=True)
    with pytest.raises(SpecError, match="must be true or false"):
        NetworkConfig(NetworkMode.NAT, host_loopback="yes")  # type: ignore[arg-type]


def test_snapshots_record_host_loopback_only_when_asked() -> None:
    """One key, present only when set: snapshots from before the option still match."""
    from vzkit import LinuxVMConfig
    from vzkit.snapshots._ops import machine_fields

    plain = machine_fields(LinuxVMConfig())
    assert "host_loopback" not in plain
    asked = machine_fields(LinuxVMConfig(network=parse_network_mode("nat:host-loopback")))
    assert {k: v for k, v in asked.items() if k != "host_loopback"} == plain
    assert asked["host_loopback"] is True
