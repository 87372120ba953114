"""macOS guests against the stand-in: restore images, the installer, the Mac platform, Mac
graphics, keyboard and pointing device, and booting an installed guest through the facade."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import vzkit
from vzkit.backends import vz as vzb

from ._graph import render
from ._support import FakeFactory
from .fakeobjc import FakeRuntime, write_fake_ipsw
from .fakeobjc._macbehaviors import AUX_MAGIC

pytestmark = pytest.mark.contract

MIB = 1 << 20
GIB = 1 << 30


@pytest.fixture
def ipsw(tmp_path: Path) -> Path:
    return write_fake_ipsw(tmp_path / "UniversalMac_14.4.1_23E224_Restore.ipsw")


@pytest.fixture
def cfg(tmp_path: Path) -> vzkit.MacVMConfig:
    return vzkit.MacVMConfig(vm_dir=tmp_path / "mac", cpus=4, memory_gb=8)


def _install(cfg: vzkit.MacVMConfig, ipsw: Path) -> list[float]:
    seen: list[float] = []
    vzb.install_macos(cfg, ipsw, progress=seen.append, poll_s=0.005)
    return seen


def test_restore_image_info(fake: FakeRuntime, ipsw: Path) -> None:
    info = vzb.restore_image_info(vzb.load_restore_image(ipsw))
    assert (info.path, info.build_version, info.macos_version) == (ipsw, "23E224", "14.4.1")
    assert (info.min_cpus, info.min_memory_mb) == (2, 4096)
    assert info.hardware_model.startswith(b"FAKEVZHWM")


def test_restore_image_errors(fake: FakeRuntime, tmp_path: Path) -> None:
    with pytest.raises(vzkit.ConfigError, match=r"restore image .*nope\.ipsw' does not exist"):
        vzb.load_restore_image(tmp_path / "nope.ipsw")
    bogus = tmp_path / "bogus.ipsw"
    bogus.write_bytes(b"PK\x03\x04 not a restore image")
    with pytest.raises(vzkit.VzkitError, match="The restore image is invalid") as info:
        vzb.load_restore_image(bogus)
    assert "not a macOS restore image" in str(info.value.__cause__)
    old = write_fake_ipsw(tmp_path / "old.ipsw", has_configuration=False)
    with pytest.raises(vzkit.UnsupportedError, match="no configuration this Mac supports"):
        vzb.restore_image_info(vzb.load_restore_image(old))
    unsupported = write_fake_ipsw(tmp_path / "new.ipsw", supported=False)
    with pytest.raises(vzkit.UnsupportedError, match="cannot be installed on this Mac"):
        vzb.restore_image_info(vzb.load_restore_image(unsupported))


def test_install_persists_the_platform_and_reports_progress(
    fake: FakeRuntime, cfg: vzkit.MacVMConfig, ipsw: Path
) -> None:
    fake.knobs.install_steps = 5
    seen = _install(cfg, ipsw)
    assert seen[-1] == 1.0
    assert seen == sorted(seen)
    assert any(0 < f < 1 for f in seen)
    assert cfg.installed
    record = cfg.install_record()
    assert (record["build"], record["macos_version"]) == ("23E224", "14.4.1")
    assert record["restore_image"] == str(ipsw)
    model = cfg.hardware_model_path.read_bytes()
    assert model.startswith(b"FAKEVZHWM")
    assert cfg.auxiliary_storage_path.read_bytes() == AUX_MAGIC + model
    assert cfg.machine_identifier_path.read_bytes().startswith(b"FAKEVZMMID")
    assert cfg.disk_path.stat().st_size == 64 * GIB
    with open(cfg.disk_path, "rb") as disk:
        assert disk.read(17) == b"FAKE-MACOS:23E224"
    installer = fake.vms[0]
    assert installer._fk.extra["history"] == ["Stopped", "Running", "Stopped"]


def test_boot_graph_reloads_the_installed_mac(
    fake: FakeRuntime, cfg: vzkit.MacVMConfig, ipsw: Path, tmp_path: Path
) -> None:
    _install(cfg, ipsw)
    share = tmp_path / "share"
    share.mkdir()
    cfg = cfg.replace(volumes=(vzkit.VolumeMount(share, "", True),))
    tree = render(fake, vzb.build_macos_vm_config(cfg))
    mac = tree["networkDevices"][0]["MACAddress"]["string"]
    assert tree == {
        "class": "VZVirtualMachineConfiguration",
        "CPUCount": 4,
        "memorySize": 8 * GIB,
        "platform": {
            "class": "VZMacPlatformConfiguration",
            "hardwareModel": {
                "class": "VZMacHardwareModel",
                "init": "initWithDataRepresentation:",
                "dataRepresentation": cfg.hardware_model_path.read_bytes(),
                "supported": True,
            },
            "auxiliaryStorage": {
                "class": "VZMacAuxiliaryStorage",
                "init": "initWithURL:",
                "URL": str(cfg.auxiliary_storage_path),
            },
            "machineIdentifier": {
                "class": "VZMacMachineIdentifier",
                "init": "initWithDataRepresentation:",
                "dataRepresentation": cfg.machine_identifier_path.read_bytes(),
            },
        },
        "bootLoader": {"class": "VZMacOSBootLoader"},
        "storageDevices": [
            {
                "class": "VZVirtioBlockDeviceConfiguration",
                "init": "initWithAttachment:",
                "attachment": {
                    "class": "VZDiskImageStorageDeviceAttachment",
                    "init": "initWithURL:readOnly:cachingMode:synchronizationMode:error:",
                    "URL": str(cfg.disk_path),
                    "readOnly": False,
                    "cachingMode": 2,
                    "synchronizationMode": 2,
                },
            }
        ],
        "networkDevices": [
            {
                "class": "VZVirtioNetworkDeviceConfiguration",
                "attachment": {"class": "VZNATNetworkDeviceAttachment"},
                # chosen at install time, kept in the VM dir: the same NIC every boot
                "MACAddress": {"class": "VZMACAddress", "init": "initWithString:", "string": mac},
            }
        ],
        "entropyDevices": [{"class": "VZVirtioEntropyDeviceConfiguration"}],
        "memoryBalloonDevices": [{"class": "VZVirtioTraditionalMemoryBalloonDeviceConfiguration"}],
        "socketDevices": [{"class": "VZVirtioSocketDeviceConfiguration"}],
        "directorySharingDevices": [
            {
                "class": "VZVirtioFileSystemDeviceConfiguration",
                "init": "initWithTag:",
                "tag": "com.apple.virtio-fs.automount",
                "share": {
                    "class": "VZMultipleDirectoryShare",
                    "init": "initWithDirectories:",
                    "directories": {
                        "share": {
                            "class": "VZSharedDirectory",
                            "init": "initWithURL:readOnly:",
                            "URL": str(share),
                            "readOnly": True,
                        },
                    },
                },
            }
        ],
        "graphicsDevices": [
            {
                "class": "VZMacGraphicsDeviceConfiguration",
                "displays": [
                    {
                        "class": "VZMacGraphicsDisplayConfiguration",
                        "init": "initWithWidthInPixels:heightInPixels:pixelsPerInch:",
                        "widthInPixels": 1920,
                        "heightInPixels": 1200,
                        "pixelsPerInch": 144,
                    }
                ],
            }
        ],
        "keyboards": [{"class": "VZMacKeyboardConfiguration"}],
        "pointingDevices": [{"class": "VZMacTrackpadConfiguration"}],
    }
    assert (cfg.vm_dir / "mac-address").read_text().strip() == mac
    vzb.validate_config(vzb.build_macos_vm_config(cfg))


def test_headless_and_usb_inputs(fake: FakeRuntime, cfg: vzkit.MacVMConfig, ipsw: Path) -> None:
    _install(cfg, ipsw)
    tree = render(fake, vzb.build_macos_vm_config(cfg.replace(headless=True, vsock=False)))
    assert "graphicsDevices" not in tree
    assert "keyboards" not in tree
    assert tree["socketDevices"] == []
    usb = cfg.replace(keyboard="usb", pointer="usb")
    tree = render(fake, vzb.build_macos_vm_config(usb))
    assert tree["keyboards"] == [{"class": "VZUSBKeyboardConfiguration"}]
    assert tree["pointingDevices"] == [
        {"class": "VZUSBScreenCoordinatePointingDeviceConfiguration"}
    ]


def test_booting_an_empty_vm_dir_says_install_first(
    fake: FakeRuntime, cfg: vzkit.MacVMConfig
) -> None:
    with pytest.raises(vzkit.ConfigError, match="holds no installed macOS"):
        vzb.build_macos_vm_config(cfg)


def test_corrupt_platform_files_are_config_errors(
    fake: FakeRuntime, cfg: vzkit.MacVMConfig, ipsw: Path
) -> None:
    _install(cfg, ipsw)
    cfg.machine_identifier_path.write_bytes(b"garbage")
    with pytest.raises(vzkit.ConfigError, match="is not a Mac machine identifier"):
        vzb.build_macos_vm_config(cfg)
    cfg.hardware_model_path.write_bytes(b"garbage")
    with pytest.raises(vzkit.ConfigError, match="is not a Mac hardware model"):
        vzb.build_macos_vm_config(cfg)


def test_a_model_this_mac_cannot_run(fake: FakeRuntime, cfg: vzkit.MacVMConfig, ipsw: Path) -> None:
    _install(cfg, ipsw)
    fake.knobs.mac_hardware_supported = False
    with pytest.raises(vzkit.UnsupportedError, match="cannot run the hardware model"):
        vzb.build_macos_vm_config(cfg)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cpus": 1}, r"macOS 14\.4\.1 \(23E224\) needs at least 2 CPUs; the config has 1"),
        (
            {"memory_gb": 3},
            r"needs at least 4096 MiB of memory; the config has 3072 MiB",
        ),
    ],
)
def test_install_checks_the_image_requirements_first(
    fake: FakeRuntime,
    cfg: vzkit.MacVMConfig,
    ipsw: Path,
    changes: dict[str, object],
    message: str,
) -> None:
    with pytest.raises(vzkit.ConfigError, match=message):
        vzb.install_macos(cfg.replace(**changes), ipsw)
    assert not cfg.vm_dir.exists()
    assert fake.vms == []


def test_a_failed_install_leaves_nothing(
    fake: FakeRuntime, cfg: vzkit.MacVMConfig, ipsw: Path
) -> None:
    fake.fail_next("installWithCompletionHandler:", code=10007, description="Installation failed.")
    with pytest.raises(vzkit.VzkitError, match="Installation failed"):
        _install(cfg, ipsw)
    assert sorted(p.name for p in cfg.vm_dir.iterdir()) == []
    assert not cfg.installed


def test_a_timed_out_install_is_cancelled_and_cleaned_up(
    fake: FakeRuntime, cfg: vzkit.MacVMConfig, ipsw: Path
) -> None:
    fake.knobs.hang.add("installWithCompletionHandler:")
    with pytest.raises(
        vzkit.VMTimeoutError, match=r"installing macOS did not finish within 0\.1 s"
    ):
        vzb.install_macos(cfg, ipsw, timeout=0.1, poll_s=0.01)
    installer_vm = fake.vms[0]
    assert installer_vm._fk.extra["history"][-1] == "Stopped"  # cancelled, not abandoned
    assert list(cfg.vm_dir.iterdir()) == []


def test_an_existing_install_needs_force(
    fake: FakeRuntime, cfg: vzkit.MacVMConfig, ipsw: Path
) -> None:
    _install(cfg, ipsw)
    first_id = cfg.machine_identifier_path.read_bytes()
    with pytest.raises(vzkit.StateError, match="already holds an installed macOS"):
        _install(cfg, ipsw)
    assert cfg.machine_identifier_path.read_bytes() == first_id
    vzb.install_macos(cfg, ipsw, force=True, poll_s=0.005)
    assert cfg.machine_identifier_path.read_bytes() != first_id  # a new Mac
    assert json.loads(cfg.install_record_path.read_text())["build"] == "23E224"


def test_installed_mac_boots_through_the_facade(
    fake: FakeRuntime, cfg: vzkit.MacVMConfig, ipsw: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install(cfg, ipsw)
    monkeypatch.setattr(sys, "platform", "darwin")
    with vzkit.VirtualMachine(cfg) as vm:  # auto: macOS guests go to vz
        assert vm.backend == "vz"
        assert vm.config is cfg
        assert vm.console_log_path is None
        assert vm.state_dir == cfg.vm_dir
        vm.start(timeout=5)
        vm.pause(timeout=5)
        vm.resume(timeout=5)
        vm.balloon.set_target_gb(4)
        assert vm.balloon.info().target_gb == 4
        vm.stop(timeout=5)
        assert vm.state is vzkit.VMState.STOPPED
    assert cfg.installed  # the VM dir is the caller's: kept
    booted = fake.vms[-1]
    platform = booted._fk.extra["config"]._fk.props["platform"]
    assert type(platform).__name__ == "VZMacPlatformConfiguration"


# -- gating by host version and architecture -----------------------------------------------------


def test_macos_13_host_uses_usb_keyboard_and_refuses_the_mac_one(
    make_fake: FakeFactory, cfg: vzkit.MacVMConfig, ipsw: Path
) -> None:
    rt = make_fake(macos="13.5")
    _install(cfg, ipsw)
    tree = render(rt, vzb.build_macos_vm_config(cfg))
    assert tree["keyboards"] == [{"class": "VZUSBKeyboardConfiguration"}]
    assert tree["pointingDevices"] == [{"class": "VZMacTrackpadConfiguration"}]
    with pytest.raises(
        vzb.MacOSVersionError,
        match=r"the Mac keyboard .* needs macOS 14\.0 or later \(this is macOS 13\.5\)",
    ):
        vzb.build_macos_vm_config(cfg.replace(keyboard="mac"))


def test_macos_12_host_uses_the_older_initializers(
    make_fake: FakeFactory, cfg: vzkit.MacVMConfig, ipsw: Path
) -> None:
    rt = make_fake(macos="12.6")
    _install(cfg, ipsw)  # VZMacOSRestoreImage.isSupported is 13.0: not asked
    tree = render(rt, vzb.build_macos_vm_config(cfg))
    assert tree["platform"]["auxiliaryStorage"]["init"] == "initWithContentsOfURL:"
    assert tree["pointingDevices"] == [
        {"class": "VZUSBScreenCoordinatePointingDeviceConfiguration"}
    ]
    with pytest.raises(vzb.MacOSVersionError, match=r"trackpad.*needs macOS 13\.0"):
        vzb.create_mac_pointing_device(vzkit.MacPointer.TRACKPAD)


def test_intel_macs_cannot_run_macos_guests(
    make_fake: FakeFactory, cfg: vzkit.MacVMConfig, ipsw: Path
) -> None:
    make_fake(macos="14.0", arch="x86_64")
    with pytest.raises(vzb.MacOSVersionError, match="needs Apple silicon") as info:
        vzb.install_macos(cfg, ipsw)
    assert info.value.feature.startswith("installing macOS guests")
    with pytest.raises(vzb.MacOSVersionError, match="needs Apple silicon"):
        vzb.build_macos_vm_config(cfg)


def test_mac_graphics_default_display_is_the_seeds(fake: FakeRuntime) -> None:
    tree = render(fake, vzb.create_mac_graphics_config([]))
    assert tree["displays"][0]["widthInPixels"] == 1920
    assert tree["displays"][0]["heightInPixels"] == 1200


def test_cli_info_and_install_with_a_progress_line(
    fake: FakeRuntime, ipsw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from vzkit.cli import main

    monkeypatch.setattr(sys, "platform", "darwin")
    result = CliRunner().invoke(main, ["macos", "info", str(ipsw)])
    assert result.exit_code == 0, result.output
    assert result.output == (
        "macOS 14.4.1 (23E224)\nneeds at least 2 CPUs and 4096 MiB of memory\n"
    )
    vm_dir = tmp_path / "vm"
    args = ["macos", "install", str(ipsw), str(vm_dir), "--cpus", "2", "--memory", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.endswith(f"installed macOS 14.4.1 (23E224) in {vm_dir}\n")
    assert vzkit.MacVMConfig(vm_dir=vm_dir).installed
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1
    assert "already holds an installed macOS; replace it with force=True (--force)" in (
        again.output
    )
    too_small = CliRunner().invoke(main, [*args[:3], str(tmp_path / "vm2"), "--cpus", "1"])
    assert too_small.exit_code == 2
    assert "needs at least 2 CPUs; the config has 1" in too_small.output


def test_cli_install_disk_size_force_and_timeout(
    fake: FakeRuntime, ipsw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from vzkit.cli import main

    monkeypatch.setattr(sys, "platform", "darwin")
    vm_dir = tmp_path / "vm"
    args = ["macos", "install", str(ipsw), str(vm_dir), "--cpus", "2", "--memory", "4"]
    result = CliRunner().invoke(main, [*args, "--disk-size", "80"])
    assert result.exit_code == 0, result.output
    cfg = vzkit.MacVMConfig(vm_dir=vm_dir)
    assert cfg.disk_path.stat().st_size == 80 << 30
    first_id = cfg.machine_identifier_path.read_bytes()
    forced = CliRunner().invoke(main, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert forced.output.endswith(f"installed macOS 14.4.1 (23E224) in {vm_dir}\n")
    assert cfg.machine_identifier_path.read_bytes() != first_id  # a new Mac

    fake.knobs.hang.add("installWithCompletionHandler:")
    other = tmp_path / "vm2"
    timed_out = CliRunner().invoke(main, [*args[:3], str(other), "--timeout", "0.1"])
    assert timed_out.exit_code == 1
    assert "installing macOS did not finish within 0.1 s" in timed_out.output
    assert not other.exists() or list(other.iterdir()) == []


def test_a_mac_in_recovery_boots_through_the_facade(
    fake: FakeRuntime, cfg: vzkit.MacVMConfig, ipsw: Path
) -> None:
    """``MacVMConfig(recovery=True)`` through ``VirtualMachine``: the machine starts with
    ``startWithOptions:completionHandler:`` (Recovery); without it, a plain start."""
    _install(cfg, ipsw)
    for recovery in (True, False):
        with vzkit.VirtualMachine(cfg.replace(recovery=recovery), backend=vzb.BACKEND) as vm:
            vm.start(timeout=5)
            assert vm.state is vzkit.VMState.RUNNING
    starts = [
        spec.selector
        for spec in fake.calls
        if spec.owner == "VZVirtualMachine" and spec.selector.startswith("start")
    ]
    assert starts == ["startWithOptions:completionHandler:", "startWithCompletionHandler:"]
