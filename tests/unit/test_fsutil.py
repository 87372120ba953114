"""The shared helpers: atomic writes, directory fsync (``_fsutil``) and the NIC's stable MAC
address (``_network``), which both backends and the config use."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzkit._fsutil import fsync_dir, fsync_file, write_atomic
from vzkit._network import MAC_FILE, random_mac, read_mac, save_mac, stable_mac


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomic_replaces_the_file_owner_only_and_leaves_no_temp(
    tmp_path: Path, umask0: None
) -> None:
    target = tmp_path / "meta.json"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o600  # a fresh file, not the old one rewritten
    write_atomic(tmp_path / "config.toml", b"x", mode=0o644)
    assert _mode(tmp_path / "config.toml") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "meta.json"]


def test_a_failed_write_atomic_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()  # the rename over a directory fails
    (target / "inside").write_bytes(b"kept")
    with pytest.raises(IsADirectoryError):
        write_atomic(target, b"new")
    assert (target / "inside").read_bytes() == b"kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_write_atomic_never_writes_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"untouched")
    link = tmp_path / "link"
    link.symlink_to(outside)
    write_atomic(link, b"new")  # replaces the link itself
    assert outside.read_bytes() == b"untouched"
    assert not link.is_symlink()
    assert link.read_bytes() == b"new"


def test_fsync_dir(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "file")


def test_fsync_file_reads_nothing_and_refuses_what_is_missing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"x" * 4096)
    fsync_file(data)  # opened read-only: the content and the mode stay as they are
    assert data.read_bytes() == b"x" * 4096
    with pytest.raises(FileNotFoundError):
        fsync_file(tmp_path / "missing")


def test_random_mac_is_locally_administered_unicast() -> None:
    macs = {random_mac() for _ in range(64)}
    assert len(macs) == 64
    for mac in macs:
        first = int(mac[:2], 16)
        assert (first & 0x01, first & 0x02) == (0, 0x02)
        assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac)


def test_stable_mac_is_kept_in_the_state_dir(tmp_path: Path, umask0: None) -> None:
    mac = stable_mac(tmp_path)
    assert (tmp_path / MAC_FILE).read_text() == f"{mac}\n"
    assert _mode(tmp_path / MAC_FILE) == 0o600
    assert stable_mac(tmp_path) == mac
    assert read_mac(tmp_path) == mac
    assert stable_mac(None) != stable_mac(None)  # no directory: a new one each time


def test_read_mac_accepts_upper_case_and_refuses_garbage(tmp_path: Path) -> None:
    (tmp_path / MAC_FILE).write_text("02:AB:CD:EF:01:23\n")
    assert read_mac(tmp_path) == "02:ab:cd:ef:01:23"
    (tmp_path / MAC_FILE).write_text("not a mac address\n")  # 17 characters, not a MAC
    assert read_mac(tmp_path) is None
    fresh = stable_mac(tmp_path)
    assert (tmp_path / MAC_FILE).read_text() == f"{fresh}\n"
    (tmp_path / MAC_FILE).write_bytes(b"\xff\xfe")
    assert read_mac(tmp_path) is None
    assert read_mac(None) is None


def test_save_mac_into_a_missing_directory_is_not_an_error(tmp_path: Path) -> None:
    save_mac(tmp_path / "gone", "02:00:00:00:00:01")
    assert not (tmp_path / "gone").exists()
