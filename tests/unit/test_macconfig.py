"""``MacVMConfig``: validation, the VM directory's layout, round trips, and the facade's refusal
to boot a macOS guest on a backend that cannot."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import vzkit
from vzkit._macconfig import MAC_AUX_FILE, MAC_INSTALL_FILE


def test_defaults_and_layout(tmp_path: Path) -> None:
    cfg = vzkit.MacVMConfig(vm_dir=tmp_path / "mac")
    assert (cfg.cpus, cfg.memory_gb, cfg.disk_size_gb) == (4, 8.0, 64)
    assert cfg.displays == (vzkit.default_display_config(),)
    assert (cfg.keyboard, cfg.pointer) == (vzkit.MacKeyboard.AUTO, vzkit.MacPointer.AUTO)
    assert cfg.disk_path == tmp_path / "mac" / "disk.img"
    assert cfg.disk_format is vzkit.DiskFormat.RAW  # always: vzkit makes it, VZ attaches raw
    assert "disk_format" not in cfg.to_dict()
    assert cfg.auxiliary_storage_path == tmp_path / "mac" / "auxiliary-storage"
    assert cfg.hardware_model_path == tmp_path / "mac" / "hardware-model"
    assert cfg.machine_identifier_path == tmp_path / "mac" / "machine-identifier"
    assert cfg.state_dir == cfg.vm_dir
    assert cfg.memory_mb == 8192
    with pytest.raises(AttributeError):
        cfg.cpus = 2  # type: ignore[misc]


def test_relative_vm_dir_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert vzkit.MacVMConfig(vm_dir="mac").vm_dir == tmp_path / "mac"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cpus": 0}, "cpus must be between 1 and 255, got 0"),
        ({"cpus": True}, "cpus must be an integer, got True"),
        ({"memory_gb": 1}, "memory_gb=1: a macOS guest needs at least 2 GB"),
        ({"memory_gb": float("nan")}, "memory_gb must be a finite number, got nan"),
        ({"memory_gb": 1e30}, "memory_gb must be at most 4096 GB (4 TiB), got 1e+30"),
        ({"memory_gb": 10**400}, "memory_gb must be at most 4096 GB (4 TiB), got an integer"),
        ({"cpus": 2**64}, "cpus must be between 1 and 255, got 18446744073709551616"),
        ({"disk_size_gb": 16}, "disk_size_gb must be an integer of at least 32, got 16"),
        ({"keyboard": "qwerty"}, "'qwerty' is not a valid MacKeyboard"),
        ({"pointer": "mouse"}, "'mouse' is not a valid MacPointer"),
        ({"displays": ()}, "a macOS guest with graphics needs at least one display"),
        ({"displays": "1080p"}, "displays must be a sequence"),
        ({"headless": 1}, "headless must be a bool, got 1"),
        ({"network": "nat"}, "network must be a NetworkConfig"),
        ({"vm_dir": ""}, "vm_dir must be a non-empty path"),
    ],
)
def test_invalid_fields_name_the_problem(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    settings: dict[str, object] = {"vm_dir": tmp_path}
    settings.update(changes)
    with pytest.raises(vzkit.ConfigError, match=re.escape(message)):
        vzkit.MacVMConfig(**settings)  # type: ignore[arg-type]


def test_headless_needs_no_display(tmp_path: Path) -> None:
    assert vzkit.MacVMConfig(vm_dir=tmp_path, headless=True, displays=()).displays == ()


def test_replace_validates_and_rejects_unknown_fields(tmp_path: Path) -> None:
    cfg = vzkit.MacVMConfig(vm_dir=tmp_path)
    assert cfg.replace(cpus=8).cpus == 8
    with pytest.raises(vzkit.ConfigError, match="unknown config field"):
        cfg.replace(kernel_path="x")
    with pytest.raises(vzkit.ConfigError, match="cpus must be"):
        cfg.replace(cpus=-1)


@given(
    cpus=st.integers(1, 255),
    memory=st.floats(2, 512, allow_nan=False),
    disk=st.integers(32, 4096),
    headless=st.booleans(),
    keyboard=st.sampled_from(list(vzkit.MacKeyboard)),
    pointer=st.sampled_from(list(vzkit.MacPointer)),
    network=st.sampled_from(["nat", "none", "bridged:en0"]),
)
def test_round_trips_through_json_and_toml(
    cpus: int,
    memory: float,
    disk: int,
    headless: bool,
    keyboard: vzkit.MacKeyboard,
    pointer: vzkit.MacPointer,
    network: str,
) -> None:
    cfg = vzkit.MacVMConfig(
        vm_dir="/tmp/vzkit-mac-roundtrip",
        cpus=cpus,
        memory_gb=memory,
        disk_size_gb=disk,
        headless=headless,
        keyboard=keyboard,
        pointer=pointer,
        network=vzkit.parse_network_mode(network),
        displays=(vzkit.parse_display_spec("retina"), vzkit.parse_display_spec("1280x800")),
        volumes=(vzkit.VolumeMount("/tmp", "tmp", True),),
    )
    assert vzkit.MacVMConfig.from_json(cfg.to_json()) == cfg
    assert vzkit.MacVMConfig.from_toml(cfg.to_toml()) == cfg


def test_from_dict_rejects_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    with pytest.raises(vzkit.ConfigError, match=r"unknown config key\(s\): kernel_path"):
        vzkit.MacVMConfig.from_dict({"vm_dir": str(tmp_path), "kernel_path": "/k"})
    with pytest.raises(vzkit.ConfigError, match="invalid macOS VM config"):
        vzkit.MacVMConfig.from_dict({"vm_dir": str(tmp_path), "displays": ["huge"]})
    with pytest.raises(vzkit.ConfigError, match="invalid JSON"):
        vzkit.MacVMConfig.from_json("{")


def test_an_install_is_complete_only_with_every_file(tmp_path: Path) -> None:
    cfg = vzkit.MacVMConfig(vm_dir=tmp_path)
    assert not cfg.installed
    with pytest.raises(vzkit.ConfigError, match=r"no installed macOS \(disk.img is missing\)"):
        cfg.check_inputs()
    for path in (cfg.disk_path, cfg.auxiliary_storage_path, cfg.hardware_model_path):
        path.write_bytes(b"x")
    cfg.machine_identifier_path.write_bytes(b"x")
    with pytest.raises(vzkit.ConfigError, match=f"{MAC_INSTALL_FILE} is missing"):
        cfg.check_inputs()
    cfg.install_record_path.write_text(json.dumps({"build": "23E224"}))
    cfg.check_inputs()
    assert cfg.installed
    assert cfg.install_record() == {"build": "23E224"}
    (tmp_path / MAC_AUX_FILE).unlink()
    assert not cfg.installed


def test_qemu_cannot_boot_a_macos_guest(tmp_path: Path) -> None:
    cfg = vzkit.MacVMConfig(vm_dir=tmp_path)
    with pytest.raises(vzkit.UnsupportedError, match="macOS guests need the vz backend") as info:
        vzkit.VirtualMachine(cfg, backend="qemu")
    assert (info.value.backend, info.value.feature) == ("qemu", "macos-guests")


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the refusal off macOS")
def test_auto_names_why_vz_cannot_run_here(tmp_path: Path) -> None:
    cfg = vzkit.MacVMConfig(vm_dir=tmp_path)
    with pytest.raises(vzkit.BackendUnavailableError, match="the vz backend needs macOS"):
        vzkit.VirtualMachine(cfg)
