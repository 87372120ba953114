"""The config fields of the newer devices (issue 19): more disks (files or NBD exports on a
virtio, NVMe or USB bus), more NICs, sound output and a macOS guest's recovery start:
validated with sentences that say what to do, and round-tripped through TOML and JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

import vzkit
from vzkit import ConfigError, Disk, DiskBus, LinuxVMConfig, MacVMConfig, SpecError
from vzkit._network import mac_file, read_mac, stable_mac
from vzkit._storage import nbd_endpoint


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "data.img"
    path.write_bytes(b"\0" * 4096)
    return path


def test_disk_specs(image: Path) -> None:
    assert vzkit.parse_disk_spec(str(image)) == Disk(path=image)
    assert vzkit.parse_disk_spec(f"{image},bus=nvme,ro") == Disk(
        path=image, bus=DiskBus.NVME, read_only=True
    )
    assert vzkit.parse_disk_spec(f"{image},format=qcow2,bus=usb,rw") == Disk(
        path=image, format="qcow2", bus="usb"
    )
    odd = image.with_name("a,b.img")  # a comma in the path: options are read from the end
    assert vzkit.parse_disk_spec(f"{odd},ro").path == odd
    nbd = vzkit.parse_disk_spec("nbd://nas.local:10810/vm-data,bus=usb")
    assert (nbd.url, nbd.bus, nbd.path) == ("nbd://nas.local:10810/vm-data", DiskBus.USB, None)
    for disk in (Disk(path=image, bus="nvme", read_only=True), nbd, Disk(path=image)):
        assert vzkit.parse_disk_spec(str(disk)) == disk


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "a disk spec is SOURCE"),
        ("x.img,bus=scsi", "bus must be one of 'virtio', 'nvme', 'usb', got 'scsi'"),
        ("x.img,ro,rw", "gives ro or rw twice: give it once"),
        ("http://host/disk", "the scheme must be 'nbd' or 'nbd+unix'"),
        ("nbd://:10809/x", "name the server's host"),
        ("nbd://host:0/x", "the port must be from 1 to 65535"),
        ("nbd://host:99999/x", "Port out of range"),
        ("nbd://host/x?tls=1", "'nbd://' takes no '?query'"),
        ("nbd://user@host/x", "no user name, password"),
        ("nbd+unix:///x", "give the server's socket as '?socket='"),
        ("nbd+unix:///x?socket=rel/sock", "an absolute path"),
        ("nbd://host/x,format=qcow2", "a network block device is raw blocks"),
    ],
)
def test_bad_disk_specs_say_what_to_write(spec: str, message: str) -> None:
    with pytest.raises(SpecError, match="disk spec") as caught:
        vzkit.parse_disk_spec(spec)
    assert message in str(caught.value)


def test_nbd_endpoints() -> None:
    assert nbd_endpoint("nbd://10.0.0.5/exp%20one") == ("10.0.0.5", 10809, "", "exp one")
    assert nbd_endpoint("nbd://[::1]:1234") == ("::1", 1234, "", "")
    assert nbd_endpoint("nbd+unix:///e?socket=/run/nbd.sock") == ("", 0, "/run/nbd.sock", "e")


def test_a_disk_is_a_file_or_a_url(image: Path) -> None:
    with pytest.raises(ConfigError, match="give exactly one"):
        Disk()
    with pytest.raises(ConfigError, match="give exactly one"):
        Disk(path=image, url="nbd://h/e")
    with pytest.raises(ConfigError, match="read_only must be true or false"):
        Disk(path=image, read_only="yes")  # type: ignore[arg-type]


def test_config_disks_must_exist_and_be_disks(image: Path, tmp_path: Path) -> None:
    cfg = LinuxVMConfig(disks=[Disk(path=image), Disk(url="nbd://h/e", bus="nvme")])
    assert isinstance(cfg.disks, tuple)
    assert cfg.disks[1].bus is DiskBus.NVME
    with pytest.raises(ConfigError, match=r"disks\[1\]: '.*gone\.img' does not exist"):
        LinuxVMConfig(disks=(Disk(path=image), Disk(path=tmp_path / "gone.img")))
    with pytest.raises(ConfigError, match=r"disks must hold Disk objects \(parse_disk_spec\)"):
        LinuxVMConfig(disks=(str(image),))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="disks must be a sequence"):
        LinuxVMConfig(disks=str(image))  # type: ignore[arg-type]


def test_extra_networks(tmp_path: Path) -> None:
    nat, bridged = vzkit.parse_network_mode("nat"), vzkit.parse_network_mode("bridged:br0")
    cfg = LinuxVMConfig(networks=[nat, bridged])
    assert cfg.networks == (nat, bridged)
    with pytest.raises(ConfigError, match="other than 'none'"):
        LinuxVMConfig(networks=(vzkit.parse_network_mode("none"),))
    with pytest.raises(ConfigError, match="NetworkConfig objects"):
        LinuxVMConfig(networks=("nat",))  # type: ignore[arg-type]


def test_sound_is_a_bool() -> None:
    assert LinuxVMConfig().sound is False
    assert LinuxVMConfig(sound=True).sound is True
    with pytest.raises(ConfigError, match="sound must be a bool"):
        LinuxVMConfig(sound=1)  # type: ignore[arg-type]


def test_new_fields_round_trip_through_toml_and_json(image: Path) -> None:
    cfg = LinuxVMConfig(
        disks=(
            Disk(path=image, bus="nvme"),
            Disk(path=image, format="qcow2", read_only=True),
            Disk(url="nbd+unix:///e?socket=/run/nbd.sock", bus="usb"),
        ),
        networks=(vzkit.parse_network_mode("nat:host-loopback"),),
        sound=True,
    )
    assert LinuxVMConfig.from_toml(cfg.to_toml()) == cfg
    assert LinuxVMConfig.from_json(cfg.to_json()) == cfg
    data = cfg.to_dict()
    assert data["networks"] == ["nat:host-loopback"]
    assert data["disks"][0] == {"path": str(image), "bus": "nvme"}
    assert data["disks"][2] == {"url": "nbd+unix:///e?socket=/run/nbd.sock", "bus": "usb"}
    old = {k: v for k, v in data.items() if k not in ("disks", "networks", "sound")}
    assert LinuxVMConfig.from_dict(old) == cfg.replace(disks=(), networks=(), sound=False)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"disks": [{"path": "x", "size": 1}]}, "a disk must be a table with path or url"),
        ({"disks": [{"url": "ftp://x/y"}]}, "the scheme must be 'nbd'"),
        ({"networks": ["bogus"]}, "unknown network mode 'bogus'"),
    ],
)
def test_bad_new_fields_in_a_file(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LinuxVMConfig.from_dict(data)


def test_mac_config_has_the_devices_and_recovery(image: Path, tmp_path: Path) -> None:
    cfg = MacVMConfig(
        vm_dir=tmp_path / "mac",
        disks=[Disk(path=image, bus="usb", read_only=True)],
        networks=[vzkit.parse_network_mode("nat")],
        sound=True,
        recovery=True,
    )
    assert MacVMConfig.from_json(cfg.to_json()) == cfg
    assert MacVMConfig(vm_dir=tmp_path).recovery is False
    with pytest.raises(ConfigError, match="recovery must be a bool"):
        MacVMConfig(vm_dir=tmp_path, recovery="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"disks\[0\]: .* does not exist"):
        MacVMConfig(vm_dir=tmp_path, disks=(Disk(path=tmp_path / "nope.img"),))


def test_each_nic_keeps_its_own_mac(tmp_path: Path) -> None:
    first, second = stable_mac(tmp_path), stable_mac(tmp_path, 1)
    assert first != second
    assert (mac_file(0), mac_file(1), mac_file(2)) == (
        "mac-address",
        "mac-address-1",
        "mac-address-2",
    )
    assert (read_mac(tmp_path), read_mac(tmp_path, 1)) == (first, second)
    assert stable_mac(tmp_path, 1) == second
