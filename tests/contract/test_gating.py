"""Each API is used only on the macOS version that has it (or refused with the version named).

The stand-in simulates older hosts; calling anything newer than the simulated macOS would be
a contract violation, so a build that passes here never touches a missing selector.
"""

from __future__ import annotations

import os
import platform as platform_module
from pathlib import Path

import pytest

import vzkit
from vzkit.backends import vz as vzb
from vzkit.backends.vz._gating import macos_version, require_macos

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


@pytest.fixture
def compat_interpreter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fresh version cache, and a directory alone on PATH, for a stand-in ``sw_vers``
    (:func:`say_10_16` then makes ``platform.mac_ver()`` answer as an interpreter built
    against a pre-11 SDK is answered)."""
    from vzkit.backends.vz import _gating

    monkeypatch.setattr(_gating, "_real_version", {})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


def say_10_16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform_module, "mac_ver", lambda *a, **k: ("10.16", ("", "", ""), ""))


def test_an_old_sdk_interpreter_gets_the_real_version_from_sw_vers(
    make_fake: FakeFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    kernel: Path,
    compat_interpreter: Path,
) -> None:
    rt = make_fake(macos="14.6")  # the host really runs 14.6 ...
    sw_vers = compat_interpreter / "sw_vers"
    sw_vers.write_text(
        '#!/bin/sh\n[ "$SYSTEM_VERSION_COMPAT" = 0 ] && [ "$1" = -productVersion ] '
        "&& echo 14.6 || echo 10.16\n"
    )
    sw_vers.chmod(0o755)
    say_10_16(monkeypatch)
    assert macos_version() == (14, 6)
    sw_vers.unlink()
    assert macos_version() == (14, 6)  # asked once
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, state_dir=tmp_path / "s")
    assert "machineIdentifier" in render(rt, vzb.build_linux_vm_config(cfg))["platform"]


def test_without_sw_vers_the_darwin_release_gives_the_major(
    make_fake: FakeFactory, monkeypatch: pytest.MonkeyPatch, compat_interpreter: Path
) -> None:
    make_fake(macos="15.2")
    say_10_16(monkeypatch)
    real = os.uname()
    fake_uname = os.uname_result((real[0], real[1], "24.2.0", real[3], real[4]))
    monkeypatch.setattr(os, "uname", lambda: fake_uname)
    assert macos_version() == (15, 0)
    with pytest.raises(vzb.MacOSVersionError, match=r"needs macOS 15\.2 .*this is macOS 15\.0"):
        require_macos("15.2", "a 15.2 API")  # a minor Darwin cannot vouch for: refused


@pytest.mark.parametrize(
    ("release", "version"),
    [("20.6.0", (11, 0)), ("21.6.0", (12, 0)), ("24.0.0", (15, 0)), ("25.1.0", (26, 0))],
)
def test_darwin_releases_map_to_macos_majors(release: str, version: tuple[int, int]) -> None:
    from vzkit.backends.vz._gating import _from_darwin

    assert _from_darwin(release) == version
    assert _from_darwin("19.6.0") is None  # Catalina: below anything the backend drives
