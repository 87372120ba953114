"""The newer framework devices (issue 19) against the strict stand-in: more disks (image files
and network block devices on virtio, NVMe and USB mass storage), more NICs, virtio sound
output, a macOS guest's start in Recovery and the latest supported restore image. Each graph
is rendered and compared; each API is refused below the macOS version that has it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import vzkit
from vzkit import Disk
from vzkit.backends import vz as vzb

from ._graph import find, render
from ._support import ARM64_IMAGE, FakeFactory
from .fakeobjc import FakeRuntime, write_fake_ipsw

pytestmark = pytest.mark.contract

NBD = "VZNetworkBlockDeviceStorageDeviceAttachment"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {name: tmp_path / name for name in ("Image", "a.img", "b.img", "c.img")}
    for path in out.values():
        path.write_bytes(ARM64_IMAGE + bytes(448))
    out["state"] = tmp_path / "state"
    return out


def linux(files: dict[str, Path], **kw: object) -> vzkit.LinuxVMConfig:
    return vzkit.LinuxVMConfig(kernel_path=files["Image"], state_dir=files["state"], **kw)  # type: ignore[arg-type]


def _file_attachment(path: Path, read_only: bool) -> dict[str, object]:
    return {
        "class": "VZDiskImageStorageDeviceAttachment",
        "init": "initWithURL:readOnly:cachingMode:synchronizationMode:error:",
        "URL": str(path),
        "readOnly": read_only,
        "cachingMode": 2,
        "synchronizationMode": 2,
    }


def test_more_disks_on_each_bus_and_from_nbd(fake: FakeRuntime, files: dict[str, Path]) -> None:
    disks = (
        Disk(path=files["a.img"]),
        Disk(path=files["b.img"], bus="nvme"),
        Disk(path=files["c.img"], bus="usb", read_only=True),
        Disk(url="nbd://nas.local:10810/vm-data", bus="nvme", read_only=True),
        Disk(url="nbd+unix:///e?socket=/tmp/nbd.sock"),
    )
    tree = render(fake, vzb.build_linux_vm_config(linux(files, disks=disks)))
    assert tree["storageDevices"] == [
        {
            "class": "VZVirtioBlockDeviceConfiguration",
            "init": "initWithAttachment:",
            "attachment": _file_attachment(files["a.img"], False),
        },
        {
            "class": "VZNVMExpressControllerDeviceConfiguration",
            "init": "initWithAttachment:",
            "attachment": _file_attachment(files["b.img"], False),
        },
        {
            "class": "VZUSBMassStorageDeviceConfiguration",
            "init": "initWithAttachment:",
            "attachment": _file_attachment(files["c.img"], True),
        },
        {
            "class": "VZNVMExpressControllerDeviceConfiguration",
            "init": "initWithAttachment:",
            "attachment": {
                "class": NBD,
                "init": "initWithURL:timeout:forcedReadOnly:synchronizationMode:error:",
                "URL": "nbd://nas.local:10810/vm-data",
                "timeout": 10.0,
                "forcedReadOnly": True,
                "synchronizationMode": 0,  # VZDiskSynchronizationModeFull
            },
        },
        {
            "class": "VZVirtioBlockDeviceConfiguration",
            "init": "initWithAttachment:",
            "attachment": {
                "class": NBD,
                "init": "initWithURL:timeout:forcedReadOnly:synchronizationMode:error:",
                "URL": "nbd+unix:///e?socket=/tmp/nbd.sock",
                "timeout": 10.0,
                "forcedReadOnly": False,
                "synchronizationMode": 0,
            },
        },
    ]
    vzb.validate_config(vzb.build_linux_vm_config(linux(files, disks=disks)))


def test_more_disks_come_after_the_main_disk_and_the_iso(
    fake: FakeRuntime, files: dict[str, Path]
) -> None:
    cfg = linux(
        files,
        disk_path=files["a.img"],
        iso_path=files["b.img"],
        disks=(Disk(path=files["c.img"], bus="usb"),),
    )
    devices = render(fake, vzb.build_linux_vm_config(cfg))["storageDevices"]
    assert [(d["class"], d["attachment"]["URL"]) for d in devices] == [
        ("VZVirtioBlockDeviceConfiguration", str(files["a.img"])),
        ("VZVirtioBlockDeviceConfiguration", str(files["b.img"])),
        ("VZUSBMassStorageDeviceConfiguration", str(files["c.img"])),
    ]


@pytest.mark.parametrize(
    ("macos", "disk", "version", "api"),
    [
        ("13.5", {"path": "a.img", "bus": "nvme"}, "14.0", "NVMe disks"),
        ("13.5", {"url": "nbd://h/e"}, "14.0", "network block devices"),
        ("12.6", {"path": "a.img", "bus": "usb"}, "13.0", "USB mass storage"),
    ],
)
def test_each_bus_and_source_is_refused_below_its_macos(
    make_fake: FakeFactory,
    files: dict[str, Path],
    macos: str,
    disk: dict[str, str],
    version: str,
    api: str,
) -> None:
    make_fake(macos=macos)
    if "path" in disk:
        disk = {**disk, "path": str(files[disk["path"]])}
    cfg = linux(files, disks=(Disk(**disk),))  # type: ignore[arg-type]
    with pytest.raises(
        vzb.MacOSVersionError,
        match=rf"{api} .* needs macOS {version} or later \(this is macOS {macos}\)",
    ) as caught:
        vzb.build_linux_vm_config(cfg)
    assert caught.value.required == tuple(int(p) for p in version.split("."))


def test_usb_mass_storage_on_macos_13(make_fake: FakeFactory, files: dict[str, Path]) -> None:
    rt = make_fake(macos="13.0")
    cfg = linux(files, disks=(Disk(path=files["a.img"], bus="usb"),))
    tree = render(rt, vzb.build_linux_vm_config(cfg))
    assert [d["class"] for d in tree["storageDevices"]] == ["VZUSBMassStorageDeviceConfiguration"]


def test_a_qcow2_disk_is_refused_with_the_conversion(
    fake: FakeRuntime, files: dict[str, Path]
) -> None:
    cfg = linux(files, disks=(Disk(path=files["a.img"], format="qcow2", bus="nvme"),))
    with pytest.raises(vzkit.UnsupportedError, match=r"raw disk images only.*qemu-img convert"):
        vzb.build_linux_vm_config(cfg)


def test_nbd_failures_are_config_errors(fake: FakeRuntime, files: dict[str, Path]) -> None:
    with pytest.raises(vzkit.ConfigError, match=r"NBD URL 'nbd:/x' is not valid here"):
        vzb.create_nbd_attachment("nbd:/x")
    fake.fail_next(
        "initWithURL:timeout:forcedReadOnly:synchronizationMode:error:",
        description="The server refused the export.",
    )
    cfg = linux(files, disks=(Disk(url="nbd://h/e"),))
    with pytest.raises(vzkit.VzkitError, match="The server refused the export") as caught:
        vzb.build_linux_vm_config(cfg)
    assert "cannot attach the network block device 'nbd://h/e'" in str(caught.value)


def test_sound_output_to_the_hosts_speakers(fake: FakeRuntime, files: dict[str, Path]) -> None:
    tree = render(fake, vzb.build_linux_vm_config(linux(files, sound=True)))
    assert tree["audioDevices"] == [
        {
            "class": "VZVirtioSoundDeviceConfiguration",
            "streams": [
                {
                    "class": "VZVirtioSoundDeviceOutputStreamConfiguration",
                    "sink": {"class": "VZHostAudioOutputStreamSink"},
                }
            ],
        }
    ]
    assert "audioDevices" not in render(fake, vzb.build_linux_vm_config(linux(files)))


def test_sound_on_the_oldest_macos(make_fake: FakeFactory, files: dict[str, Path]) -> None:
    rt = make_fake(macos="12.0")
    tree = render(rt, vzb.build_linux_vm_config(linux(files, sound=True)))
    assert tree["audioDevices"][0]["class"] == "VZVirtioSoundDeviceConfiguration"


def test_each_nic_keeps_its_own_mac(fake: FakeRuntime, files: dict[str, Path]) -> None:
    nets = (vzkit.parse_network_mode("nat"), vzkit.parse_network_mode("bridged:en1"))
    cfg = linux(files, networks=nets)
    first = render(fake, vzb.build_linux_vm_config(cfg))["networkDevices"]
    assert [d["attachment"]["class"] for d in first] == [
        "VZNATNetworkDeviceAttachment",
        "VZNATNetworkDeviceAttachment",
        "VZBridgedNetworkDeviceAttachment",
    ]
    macs = [d["MACAddress"]["string"] for d in first]
    assert len(set(macs)) == 3
    state = files["state"]
    kept = [(state / name).read_text().strip() for name in ("mac-address", "mac-address-1")]
    assert [*kept, (state / "mac-address-2").read_text().strip()] == macs
    again = render(fake, vzb.build_linux_vm_config(cfg))["networkDevices"]
    assert [d["MACAddress"] for d in again] == [
        {"class": "VZMACAddress", "init": "initWithString:", "string": mac} for mac in macs
    ]
    none_first = cfg.replace(network=vzkit.parse_network_mode("none"))
    only_extra = render(fake, vzb.build_linux_vm_config(none_first))["networkDevices"]
    assert [d["MACAddress"]["string"] for d in only_extra] == macs[1:]
    vzb.validate_config(vzb.build_linux_vm_config(cfg))


def test_a_vm_with_the_new_devices_runs(fake: FakeRuntime, files: dict[str, Path]) -> None:
    cfg = linux(
        files,
        sound=True,
        networks=(vzkit.parse_network_mode("nat"),),
        disks=(Disk(path=files["a.img"], bus="nvme"), Disk(url="nbd://h/e", bus="usb")),
    )
    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
        vm.start(timeout=5)
        assert vm.state is vzkit.VMState.RUNNING


# -- macOS guests ------------------------------------------------------------------------------


@pytest.fixture
def mac(fake: FakeRuntime, tmp_path: Path) -> vzkit.MacVMConfig:
    cfg = vzkit.MacVMConfig(vm_dir=tmp_path / "mac", cpus=4, memory_gb=8)
    vzb.install_macos(cfg, write_fake_ipsw(tmp_path / "r.ipsw"), poll_s=0.005)
    return cfg


def test_a_mac_guest_gets_disks_nics_and_sound(
    fake: FakeRuntime, mac: vzkit.MacVMConfig, files: dict[str, Path]
) -> None:
    cfg = mac.replace(
        disks=(Disk(path=files["a.img"], bus="usb", read_only=True),),
        networks=(vzkit.parse_network_mode("nat"),),
        sound=True,
    )
    tree = render(fake, vzb.build_macos_vm_config(cfg))
    assert [d["class"] for d in tree["storageDevices"]] == [
        "VZVirtioBlockDeviceConfiguration",
        "VZUSBMassStorageDeviceConfiguration",
    ]
    assert tree["storageDevices"][1]["attachment"] == _file_attachment(files["a.img"], True)
    assert len(tree["networkDevices"]) == 2
    assert (cfg.vm_dir / "mac-address-1").is_file()
    assert find(tree, "VZHostAudioOutputStreamSink") == [{"class": "VZHostAudioOutputStreamSink"}]
    vzb.validate_config(vzb.build_macos_vm_config(cfg))


def test_recovery_start_options(
    make_fake: FakeFactory, fake: FakeRuntime, mac: vzkit.MacVMConfig
) -> None:
    assert vzb.mac_start_options(mac) is None
    options = vzb.mac_start_options(mac.replace(recovery=True))
    assert render(fake, options) == {
        "class": "VZMacOSVirtualMachineStartOptions",
        "startUpFromMacOSRecovery": True,
    }
    recovery = mac.replace(recovery=True)
    queue = vzb.Queue("recovery")
    vm = vzb.create_vm(vzb.build_macos_vm_config(recovery), queue)
    handler = vzb.start_mac_vm(queue, vm, recovery)
    assert handler.wait(5)
    assert handler.error is None
    assert vzb.vm_state(queue, vm) is vzkit.VMState.RUNNING
    assert vzb.stop_vm(queue, vm).wait(5)
    assert vzb.start_mac_vm(queue, vm, mac).wait(5)  # not in Recovery: the plain start
    starts = [c.selector for c in fake.calls if c.selector.startswith("startWith")]
    assert starts == ["startWithOptions:completionHandler:", "startWithCompletionHandler:"]
    assert vzb.stop_vm(queue, vm).wait(5)
    make_fake(macos="12.6")
    with pytest.raises(vzb.MacOSVersionError, match=r"Recovery .* needs macOS 13\.0"):
        vzb.mac_start_options(mac.replace(recovery=True))
    make_fake(macos="14.0", arch="x86_64")
    with pytest.raises(vzb.MacOSVersionError, match="needs Apple silicon"):
        vzb.mac_start_options(mac.replace(recovery=True))


def test_fetch_latest_restore_image(make_fake: FakeFactory, fake: FakeRuntime) -> None:
    latest = vzb.fetch_latest_restore_image(timeout=5)
    assert latest == vzb.LatestRestoreImage(
        url="https://updates.cdn-apple.com/fake/UniversalMac_15.1_24B83_Restore.ipsw",
        build_version="24B83",
        macos_version="15.1.0",
        min_cpus=2,
        min_memory_mb=4096,
    )
    fake.knobs.latest_restore_image = None
    with pytest.raises(vzkit.VzkitError, match="offline") as caught:
        vzb.fetch_latest_restore_image(timeout=5)
    assert "cannot fetch the latest macOS restore image" in str(caught.value)
    make_fake(macos="15.0", arch="x86_64")
    with pytest.raises(vzb.MacOSVersionError, match="needs Apple silicon"):
        vzb.fetch_latest_restore_image(timeout=5)


def test_cli_macos_latest(fake: FakeRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from vzkit.cli import main

    monkeypatch.setattr(sys, "platform", "darwin")
    result = CliRunner().invoke(main, ["macos", "latest", "--timeout", "5"])
    assert result.exit_code == 0, result.output
    assert result.output == (
        "macOS 15.1.0 (24B83)\n"
        "needs 2 CPUs and 4096 MiB of memory\n"
        "https://updates.cdn-apple.com/fake/UniversalMac_15.1_24B83_Restore.ipsw\n"
    )
    fake.knobs.latest_restore_image = None
    offline = CliRunner().invoke(main, ["macos", "latest"])
    assert offline.exit_code != 0
    assert "offline" in offline.output


def test_snapshots_capture_the_writable_disk_files_and_refuse_a_written_nbd_export(
    fake: FakeRuntime, files: dict[str, Path], tmp_path: Path
) -> None:
    import asyncio

    from vzkit.backends.vz import _snapshots

    cfg = linux(
        files,
        disk_path=files["a.img"],
        disks=(
            Disk(path=files["b.img"], bus="nvme"),
            Disk(path=files["c.img"], read_only=True),  # never written: nothing to capture
            Disk(url="nbd://h/e", read_only=True),
        ),
    )
    assert _snapshots.writable_disks(cfg) == [("disk0", files["a.img"]), ("disk1", files["b.img"])]
    snap = tmp_path / "snap"
    snap.mkdir()
    captured = asyncio.run(_snapshots.capture_disks(cfg, snap, "s.", None))
    assert [(d.role, d.source) for d in captured] == [
        ("disk0", files["a.img"]),
        ("disk1", files["b.img"]),
    ]
    files["b.img"].write_bytes(b"moved on")
    asyncio.run(_snapshots.copy_back_disks(cfg, captured, None))
    assert files["b.img"].read_bytes() == ARM64_IMAGE + bytes(448)
    written = cfg.replace(disks=(Disk(url="nbd://h/e"),))
    with pytest.raises(vzkit.UnsupportedError, match=r"cannot capture the network block device"):
        asyncio.run(_snapshots.capture_disks(written, snap, "t.", None))
