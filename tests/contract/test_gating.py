"""Each API is used only on the macOS version that has it (or refused with the version named).

The stand-in simulates older hosts; calling anything newer than the simulated macOS would be
a contract violation, so a build that passes here never touches a missing selector.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import vzkit
from vzkit.backends import vz as vzb

from ._graph import render
from ._support import ARM64_IMAGE, FakeFactory

pytestmark = pytest.mark.contract


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinuz"
    path.write_bytes(ARM64_IMAGE)
    return path


def test_macos_12_builds_without_newer_apis(
    make_fake: FakeFactory, tmp_path: Path, kernel: Path
) -> None:
    rt = make_fake(macos="12.0")
    cfg = vzkit.LinuxVMConfig(
        kernel_path=kernel, state_dir=tmp_path / "s", volumes=(vzkit.VolumeMount(tmp_path, "t"),)
    )
    tree = render(rt, vzb.build_linux_vm_config(cfg))
    assert tree["platform"] == {"class": "VZGenericPlatformConfiguration"}  # no id, no nesting
    assert not (tmp_path / "s" / "linux-machine.id").exists()
    queue = vzb.Queue("old")
    vm = vzb.create_vm(vzb.build_linux_vm_config(cfg), queue)
    assert vzb.start_vm(queue, vm).wait(5)
    assert vzb.stop_vm(queue, vm).wait(5)  # stopWithCompletionHandler: is 12.0


@pytest.mark.parametrize(
    ("changes", "version", "api"),
    [
        ({"kernel_path": None}, "13.0", "EFI boot"),
        ({"headless": False}, "13.0", "Virtio graphics"),
    ],
)
def test_macos_12_refuses_newer_features_by_version(
    make_fake: FakeFactory,
    tmp_path: Path,
    kernel: Path,
    changes: dict[str, object],
    version: str,
    api: str,
) -> None:
    make_fake(macos="12.6")
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, state_dir=tmp_path / "s").replace(**changes)
    with pytest.raises(
        vzb.MacOSVersionError,
        match=rf"{api}.* needs macOS {version} or later \(this is macOS 12\.6\)",
    ):
        vzb.build_linux_vm_config(cfg)


def test_macos_11_is_below_the_backend_minimum(
    make_fake: FakeFactory, tmp_path: Path, kernel: Path
) -> None:
    make_fake(macos="11.5")
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, state_dir=tmp_path / "s")
    with pytest.raises(vzb.MacOSVersionError, match=r"the vz backend needs macOS 12\.0") as info:
        vzb.build_linux_vm_config(cfg)
    assert (info.value.required, info.value.current) == ((12, 0), (11, 5))
    assert isinstance(info.value, vzkit.UnsupportedError)


def test_macos_14_has_machine_id_but_no_nesting(
    make_fake: FakeFactory, tmp_path: Path, kernel: Path
) -> None:
    rt = make_fake(macos="14.6")
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, state_dir=tmp_path / "s")
    platform = render(rt, vzb.build_linux_vm_config(cfg))["platform"]
    assert "machineIdentifier" in platform
    assert "nestedVirtualizationEnabled" not in platform


def test_intel_mac_builds_x86_64_guests(
    make_fake: FakeFactory, tmp_path: Path, kernel: Path
) -> None:
    rt = make_fake(macos="15.0", arch="x86_64")
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, state_dir=tmp_path / "s", arch="x86_64")
    tree = render(rt, vzb.build_linux_vm_config(cfg))
    assert tree["bootLoader"]["class"] == "VZLinuxBootLoader"
    with pytest.raises(vzkit.UnsupportedError, match="runs x86_64 guests"):
        vzb.build_linux_vm_config(cfg.replace(arch="aarch64"))
