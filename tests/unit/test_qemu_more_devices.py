"""The qemu lowering of the newer devices (issue 19), pinned without booting: more disks (a
file or an NBD export on virtio-blk, NVMe or USB mass storage), more NICs, and sound (refused:
QEMU 7.2 has no virtio-sound). ``tests/e2e/test_qemu_more_devices.py`` boots the first two."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vzkit
from vzkit import Disk
from vzkit.backends.qemu import _hostprep
from vzkit.backends.qemu._argv import Plan
from vzkit.backends.qemu._devices import build_argv, migration_blockers


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"k")
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "a,b.img"  # a comma: JSON needs no ',,'
    path.write_bytes(b"x")
    return path


def plan_of(cfg: vzkit.LinuxVMConfig, **kw: object) -> Plan:
    kw.setdefault("console_log", Path("/l"))
    return Plan(config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, **kw)  # type: ignore[arg-type]


def _after(argv: list[str], first: str) -> list[str]:
    """The argv from the first argument that starts with ``first``, pairs of flag and value."""
    start = next(i for i, a in enumerate(argv) if a.startswith(first))
    return argv[start - 1 :]


def test_more_disks_pinned(kernel: Path, image: Path) -> None:
    cfg = vzkit.LinuxVMConfig(
        kernel_path=kernel,
        disks=(
            Disk(path=image),
            Disk(path=image, format="qcow2", bus="nvme", read_only=True),
            Disk(url="nbd://nas.local/vm,data", bus="usb"),
            Disk(url="nbd+unix:///?socket=/run/nbd.sock", bus="usb", read_only=True),
        ),
        network=vzkit.parse_network_mode("none"),
        vsock=False,
        balloon=False,
        entropy=False,
        console="none",
    )
    argv = build_argv(plan_of(cfg))
    pairs = list(zip(argv[1::2], argv[2::2], strict=False))
    nodes = [json.loads(v) for flag, v in pairs if flag == "-blockdev" and v.startswith("{")]
    assert nodes == [
        {"driver": "raw", "node-name": "xdisk0", "cache": {"direct": False},
         "file": {"driver": "file", "filename": str(image)}},
        {"driver": "qcow2", "node-name": "xdisk1", "cache": {"direct": False},
         "file": {"driver": "file", "filename": str(image)}, "read-only": True, "backing": None},
        {"driver": "nbd", "node-name": "xdisk2",
         "server": {"type": "inet", "host": "nas.local", "port": "10809"}, "export": "vm,data"},
        {"driver": "nbd", "node-name": "xdisk3",
         "server": {"type": "unix", "path": "/run/nbd.sock"}, "read-only": True},
    ]  # fmt: skip
    devices = [v for flag, v in pairs if flag == "-device" and ("xdisk" in v or "xhci" in v)]
    assert devices == [
        "virtio-blk-pci,drive=xdisk0,id=xdisk0-dev",
        "nvme,serial=vzkit1,drive=xdisk1,id=xdisk1-dev",
        "qemu-xhci,id=xhci0",  # once, before the first USB disk
        "usb-storage,bus=xhci0.0,drive=xdisk2,id=xdisk2-dev,removable=off",
        "usb-storage,bus=xhci0.0,drive=xdisk3,id=xdisk3-dev,removable=off",
    ]
    assert migration_blockers(plan_of(cfg)) == [
        f"the disk {str(image)!r} (disks), the disk {str(image)!r} (disks), "
        "the disk 'nbd://nas.local/vm,data' (disks), "
        "the disk 'nbd+unix:///?socket=/run/nbd.sock' (disks)"
    ]


def test_more_disks_come_after_the_main_disk_and_the_iso(kernel: Path, image: Path) -> None:
    cfg = vzkit.LinuxVMConfig(
        kernel_path=kernel, disk_path=image, iso_path=image, disks=(Disk(path=image),)
    )
    argv = build_argv(plan_of(cfg))
    ids = [a.split("id=")[1].split(",")[0] for a in argv if a.startswith("virtio-blk-pci")]
    assert ids == ["disk0-dev", "iso0-dev", "xdisk0-dev"]
    assert argv.index("virtio-blk-pci,drive=xdisk0,id=xdisk0-dev") < argv.index("user,id=net0")


@pytest.mark.parametrize("bus", ["nvme", "usb"])
def test_microvm_has_no_pci_for_nvme_or_usb(kernel: Path, image: Path, bus: str) -> None:
    cfg = vzkit.LinuxVMConfig(
        kernel_path=kernel, machine_type="microvm", disks=(Disk(path=image, bus=bus),)
    )  # type: ignore[arg-type]
    with pytest.raises(vzkit.UnsupportedError, match=r"needs PCI; the microvm machine") as caught:
        build_argv(plan_of(cfg))
    assert caught.value.feature == f"disk-bus:{bus}"
    plain = cfg.replace(disks=(Disk(path=image),))
    assert "virtio-blk-device,drive=xdisk0,id=xdisk0-dev" in build_argv(plan_of(plain))


def test_more_nics_each_with_its_mac(kernel: Path, tmp_path: Path) -> None:
    cfg = vzkit.LinuxVMConfig(
        kernel_path=kernel,
        networks=(
            vzkit.parse_network_mode("host-only"),
            vzkit.parse_network_mode("nat:host-loopback"),
        ),
    )
    macs = _hostprep.nic_macs(cfg, tmp_path)
    assert macs == tuple((tmp_path / f"mac-address-{i}").read_text().strip() for i in (1, 2))
    assert _hostprep.nic_macs(cfg, tmp_path) == macs
    argv = build_argv(plan_of(cfg, mac_address="02:00:00:00:00:01", nic_macs=macs))
    nics = _after(argv, "user,id=net0")
    assert nics[:12] == [
        "-netdev", "user,id=net0",
        "-device", "virtio-net-pci,netdev=net0,id=net0-dev,mac=02:00:00:00:00:01",
        "-netdev", "user,id=net1,restrict=on",
        "-device", f"virtio-net-pci,netdev=net1,id=net1-dev,mac={macs[0]}",
        "-netdev", "user,id=net2",
        "-device", f"virtio-net-pci,netdev=net2,id=net2-dev,mac={macs[1]}",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nat", r"NIC 2 \('nat'\) would be QEMU's user-mode network.*'nat:host-loopback'"),
        ("bridged:br0", r"NIC 2 \('bridged:br0'\): on Linux only the first NIC"),
    ],
)
def test_more_nics_on_linux_refuse_what_would_weaken_or_need_a_helper(
    kernel: Path, spec: str, message: str
) -> None:
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, networks=(vzkit.parse_network_mode(spec),))
    with pytest.raises(vzkit.UnsupportedError, match=message):
        build_argv(plan_of(cfg, host_os="linux"))
    darwin = build_argv(plan_of(cfg, host_os="darwin"))
    assert any(a.startswith(("user,id=net1", "vmnet-bridged,id=net1,ifname=br0")) for a in darwin)


def test_sound_is_refused_with_the_reason(kernel: Path) -> None:
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, sound=True)
    with pytest.raises(vzkit.UnsupportedError, match=r"QEMU 7\.2 has no virtio-sound") as caught:
        build_argv(plan_of(cfg))
    assert (caught.value.backend, caught.value.feature) == ("qemu", "sound")
    assert "--no-sound" in str(caught.value)
