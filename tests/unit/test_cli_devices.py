"""The VM options of the newer devices: ``--add-disk``, ``--add-network`` and ``--sound``,
through ``vzkit config`` (the commands that boot take the same options to the same config)."""

from __future__ import annotations

from pathlib import Path

from vzkit import Disk, LinuxVMConfig, parse_network_mode

from .test_cli_core import run


def test_add_disk_add_network_and_sound(tmp_path: Path) -> None:
    disk = tmp_path / "data.img"
    disk.write_bytes(b"")
    result = run(
        "config",
        "--add-disk", f"{disk},bus=nvme",
        "--add-disk", "nbd://nas.local/vm,bus=usb,ro",
        "--add-network", "nat",
        "--add-network", "host-only",
        "--sound",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cfg = LinuxVMConfig.from_toml(result.stdout)
    assert cfg.disks == (
        Disk(path=disk, bus="nvme"),  # type: ignore[arg-type]
        Disk(url="nbd://nas.local/vm", bus="usb", read_only=True),  # type: ignore[arg-type]
    )
    assert cfg.networks == (parse_network_mode("nat"), parse_network_mode("host-only"))
    assert cfg.sound is True
    plain = LinuxVMConfig.from_toml(run("config").stdout)
    assert (plain.disks, plain.networks, plain.sound) == ((), (), False)


def test_bad_device_options_say_what_to_write(tmp_path: Path) -> None:
    bad = run("config", "--add-disk", "nbd://h/e,bus=scsi")
    assert bad.exit_code == 2
    assert "bus must be one of 'virtio', 'nvme', 'usb', got 'scsi'" in bad.output
    missing = run("config", "--add-disk", tmp_path / "gone.img")
    assert missing.exit_code != 0
    assert "disks[0]: " in missing.output
    assert "does not exist" in missing.output
    assert run("config", "--add-network", "bogus").exit_code == 2
    none = run("config", "--add-network", "none")
    assert none.exit_code != 0
    assert "other than 'none'" in none.output
