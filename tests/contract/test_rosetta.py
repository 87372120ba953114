"""Rosetta for aarch64 Linux guests on the vz backend: its directory shared under vzkit's tag,
the guest told on the kernel command line, availability checked (not supported, not
installed, installed) and the install asked of the framework."""

from __future__ import annotations

from pathlib import Path

import pytest

import vzkit
from vzkit.backends import vz as vzb

from ._graph import render
from ._support import ARM64_IMAGE, FakeFactory, take_violations
from .fakeobjc import FakeRuntime

pytestmark = pytest.mark.contract


@pytest.fixture
def cfg(tmp_path: Path) -> vzkit.LinuxVMConfig:
    kernel = tmp_path / "Image"
    kernel.write_bytes(ARM64_IMAGE)
    return vzkit.LinuxVMConfig(
        kernel_path=kernel, arch="aarch64", rosetta=True, state_dir=tmp_path / "state"
    )


def test_rosetta_is_shared_under_vzkits_tag_and_named_on_the_cmdline(
    fake: FakeRuntime, cfg: vzkit.LinuxVMConfig, tmp_path: Path
) -> None:
    cfg = cfg.replace(volumes=(vzkit.VolumeMount(tmp_path, "data"),))
    tree = render(fake, vzb.build_linux_vm_config(cfg))
    devices = tree["directorySharingDevices"]
    assert [d["tag"] for d in devices] == ["data", "vzkit-rosetta"]
    assert devices[1]["class"] == "VZVirtioFileSystemDeviceConfiguration"
    assert devices[1]["share"]["class"] == "VZLinuxRosettaDirectoryShare"
    words = tree["bootLoader"]["commandLine"].split()
    assert "vzkit.rosetta=vzkit-rosetta" in words
    assert "vzkit.shares=data" in words  # the guest mounts Rosetta itself, not as a share
    plain = render(fake, vzb.build_linux_vm_config(cfg.replace(rosetta=False)))
    assert [d["tag"] for d in plain["directorySharingDevices"]] == ["data"]
    assert "vzkit.rosetta" not in plain["bootLoader"]["commandLine"]


def test_not_installed_says_how_and_install_rosetta_installs_it(
    fake: FakeRuntime, cfg: vzkit.LinuxVMConfig
) -> None:
    fake.knobs.rosetta = 1
    assert vzb.rosetta_availability() is vzb.RosettaAvailability.NOT_INSTALLED
    with pytest.raises(vzkit.ConfigError, match=r"not installed.*vzkit macos install-rosetta"):
        vzb.build_linux_vm_config(cfg)
    vzb.install_rosetta(timeout=5)
    assert vzb.rosetta_availability() is vzb.RosettaAvailability.INSTALLED
    vzb.install_rosetta(timeout=5)  # installed: nothing to ask
    tree = render(fake, vzb.build_linux_vm_config(cfg))
    assert tree["directorySharingDevices"][-1]["tag"] == "vzkit-rosetta"


def test_a_declined_install_is_an_error(fake: FakeRuntime) -> None:
    fake.knobs.rosetta, fake.knobs.rosetta_install_ok = 1, False
    with pytest.raises(vzkit.VzkitError, match="cancelled"):
        vzb.install_rosetta(timeout=5)
    assert vzb.rosetta_availability() is vzb.RosettaAvailability.NOT_INSTALLED


def test_where_rosetta_cannot_run(
    make_fake: FakeFactory, cfg: vzkit.LinuxVMConfig, tmp_path: Path
) -> None:
    rt = make_fake()
    rt.knobs.rosetta = 0
    with pytest.raises(vzkit.UnsupportedError, match="not supported on this Mac"):
        vzb.build_linux_vm_config(cfg)
    with pytest.raises(vzkit.UnsupportedError, match="not supported"):
        vzb.install_rosetta(timeout=5)
    make_fake(macos="12.6")
    with pytest.raises(vzb.MacOSVersionError, match=r"needs macOS 13\.0"):
        vzb.rosetta_availability()
    make_fake(arch="x86_64")
    with pytest.raises(vzb.MacOSVersionError, match="Apple silicon"):
        vzb.rosetta_availability()
    assert take_violations(rt) == []


def test_a_share_may_not_take_rosettas_tag(
    fake: FakeRuntime, cfg: vzkit.LinuxVMConfig, tmp_path: Path
) -> None:
    cfg = cfg.replace(volumes=(vzkit.VolumeMount(tmp_path, "vzkit-rosetta"),))
    with pytest.raises(vzkit.ConfigError, match="'vzkit-rosetta' is Rosetta's"):
        vzb.build_linux_vm_config(cfg)


def test_a_backend_without_rosetta_refuses_the_config(cfg: vzkit.LinuxVMConfig) -> None:
    with pytest.raises(vzkit.UnsupportedError, match="qemu backend cannot offer it") as caught:
        vzkit.VirtualMachine(cfg, backend="qemu")
    assert caught.value.feature == "rosetta"


def test_a_vm_with_rosetta_runs_through_the_facade(
    fake: FakeRuntime, cfg: vzkit.LinuxVMConfig
) -> None:
    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
        vm.start(timeout=5)
        assert vm.state is vzkit.VMState.RUNNING
    assert fake.violations == []


def test_cli_install_rosetta(fake: FakeRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from click.testing import CliRunner

    from vzkit.cli import main

    monkeypatch.setattr(sys, "platform", "darwin")
    fake.knobs.rosetta = 1
    result = CliRunner().invoke(main, ["macos", "install-rosetta", "--timeout", "5"])
    assert result.exit_code == 0, result.output
    assert result.output.endswith(
        "Rosetta is installed: aarch64 guests run x86_64 programs with --rosetta\n"
    )
    again = CliRunner().invoke(main, ["macos", "install-rosetta"])
    assert (again.exit_code, again.output) == (0, "Rosetta is installed\n")
    fake.knobs.rosetta, fake.knobs.rosetta_install_ok = 1, False
    declined = CliRunner().invoke(main, ["macos", "install-rosetta"])
    assert declined.exit_code != 0
    assert "cancelled" in declined.output
