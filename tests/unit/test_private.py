"""Guest data on the host: 0600 files in 0700 directories, also under a permissive umask."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import vzkit
from vzkit._network import stable_mac
from vzkit._private import open_private, private_dir, private_file
from vzkit.backends.qemu import _hostprep, _machine


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_private_dir_creates_every_missing_level_0700(tmp_path: Path, umask0: None) -> None:
    target = tmp_path / "a" / "b" / "state"
    assert private_dir(target) == target
    assert [_mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", target)] == [0o700] * 3


def test_private_dir_leaves_an_existing_dir_alone_and_warns_if_others_can_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    mine.chmod(0o755)
    private_dir(mine)
    assert _mode(mine) == 0o755  # the caller's dir: not changed
    assert "writable by other users" not in caplog.text
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    private_dir(shared)
    assert _mode(shared) == 0o777
    assert "writable by other users" in caplog.text


def test_private_files_are_0600_under_umask_0(tmp_path: Path, umask0: None) -> None:
    log = private_file(tmp_path / "console.log")
    assert _mode(log) == 0o600
    with open_private(tmp_path / "qemu.log") as fh:
        fh.write(b"x")
    with open_private(tmp_path / "qemu.log") as fh:  # appends
        fh.write(b"y")
    assert (tmp_path / "qemu.log").read_bytes() == b"xy"
    assert _mode(tmp_path / "qemu.log") == 0o600
    old = tmp_path / "old.log"  # left 0644 by an older vzkit
    old.write_bytes(b"keep")
    old.chmod(0o644)
    private_file(old)
    assert (_mode(old), old.read_bytes()) == (0o600, b"keep")
    with open_private(old, append=False) as fh:
        fh.write(b"new")
    assert (_mode(old), old.read_bytes()) == (0o600, b"new")


def test_private_files_refuse_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "console.log").symlink_to(victim)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        private_file(tmp_path / "console.log")
    assert victim.read_text() == "precious"


def test_nvram_and_mac_address_are_0600_under_umask_0(tmp_path: Path, umask0: None) -> None:
    template = tmp_path / "OVMF_VARS.fd"
    template.write_bytes(b"\x00vars" * 100)
    template.chmod(0o644)
    state = private_dir(tmp_path / "state")
    nvram = _hostprep.nvram(state, template)
    assert (nvram.read_bytes(), _mode(nvram)) == (template.read_bytes(), 0o600)
    nvram.write_bytes(b"guest wrote this")
    nvram.chmod(0o644)  # as an older vzkit left it
    assert _hostprep.nvram(state, template).read_bytes() == b"guest wrote this"  # kept
    assert _mode(nvram) == 0o600
    assert sorted(p.name for p in state.iterdir()) == ["efi.nvram"]  # no temp file left
    mac = stable_mac(state)
    assert (state / "mac-address").read_text() == f"{mac}\n"
    assert _mode(state / "mac-address") == 0o600
    assert stable_mac(state) == mac


def test_config_state_dir_is_created_0700_with_its_qemu_log(tmp_path: Path, umask0: None) -> None:
    """What the machine makes before QEMU runs (no QEMU needed for this part)."""
    state = tmp_path / "new" / "vm"
    cfg = vzkit.LinuxVMConfig(state_dir=state)
    machine = _machine.QemuMachine(cfg, lambda old, new: None)
    machine._private_state()
    assert (_mode(tmp_path / "new"), _mode(state)) == (0o700, 0o700)
    assert _mode(state / "qemu.log") == 0o600
    asyncio.run(machine.close())
    assert state.is_dir()  # the config's state dir is kept


def test_restored_overlay_is_0600_under_umask_0(tmp_path: Path, umask0: None) -> None:
    """The overlay a restored guest writes to (real qemu-img, no QEMU run)."""
    from vzkit._disk import DiskFormat
    from vzkit.backends._protocol import CapturedDisk
    from vzkit.backends.qemu import _migrate

    captured = tmp_path / "snap-disk0.raw"
    captured.write_bytes(b"\0" * 65536)
    state = tmp_path / "vm"
    machine = _machine.QemuMachine(vzkit.LinuxVMConfig(state_dir=state), lambda old, new: None)
    machine._private_state()
    disk = CapturedDisk("disk0", captured, captured, DiskFormat.RAW)
    overlay = asyncio.run(_migrate.prepare_disks(machine, [disk]))
    assert overlay is not None
    assert _mode(overlay) == 0o600
    assert {p.name: _mode(p) for p in state.iterdir()} == {
        overlay.name: 0o600,
        "qemu.log": 0o600,
    }


def test_a_device_is_never_chmodded(tmp_path: Path) -> None:
    """A console log the user points at /dev/null stays /dev/null, mode and all (as root)."""
    before = os.stat("/dev/null")
    private_file(Path("/dev/null"), follow_links=True)
    with open_private(Path("/dev/null")) as fh:
        fh.write(b"discarded")
    assert os.stat("/dev/null").st_mode == before.st_mode
    link = tmp_path / "console.log"
    link.symlink_to(tmp_path / "target.log")
    private_file(link, follow_links=True)  # a link the user made on purpose is followed
    assert _mode(tmp_path / "target.log") == 0o600
