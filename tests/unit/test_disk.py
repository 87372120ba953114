"""Disk images: sparse raw files and qcow2 through qemu-img."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from vzkit import (
    BackendUnavailableError,
    ConfigError,
    DiskFormat,
    create_disk_image,
    detect_disk_format,
)

GIB = 1 << 30
needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


@pytest.mark.parametrize("size_gb", [1, 3, 64])
def test_raw_is_sparse_and_exact(tmp_path: Path, size_gb: int) -> None:
    target = tmp_path / "disk.img"
    result = create_disk_image(target, size_gb)
    assert result == target
    st = target.stat()
    assert st.st_size == size_gb * GIB
    assert st.st_size == size_gb << 30
    assert st.st_blocks * 512 < 1 << 20  # nothing (or next to nothing) allocated
    assert detect_disk_format(target) is DiskFormat.RAW


def test_accepts_str_and_returns_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = create_disk_image("rel.img", 1)
    assert result == tmp_path / "rel.img"
    assert result.is_absolute()
    assert result.stat().st_size == GIB


def test_existing_file_left_untouched(tmp_path: Path) -> None:
    target = tmp_path / "disk.img"
    target.write_bytes(b"precious data")
    before = target.stat()
    assert create_disk_image(target, 8) == target
    assert target.read_bytes() == b"precious data"
    after = target.stat()
    assert after.st_size == len(b"precious data")
    assert after.st_mtime_ns == before.st_mtime_ns
    # the same for qcow2: nothing is converted or resized
    assert create_disk_image(target, 8, format="qcow2") == target
    assert target.read_bytes() == b"precious data"


def test_existing_image_of_other_size_untouched(tmp_path: Path) -> None:
    target = create_disk_image(tmp_path / "disk.img", 1)
    create_disk_image(target, 2)
    assert target.stat().st_size == GIB


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        create_disk_image(tmp_path, 1)


@pytest.mark.parametrize("size_gb", [0, -1, 1.5, "1", True, None])
def test_bad_size(tmp_path: Path, size_gb: object) -> None:
    target = tmp_path / "disk.img"
    with pytest.raises(ConfigError) as info:
        create_disk_image(target, size_gb)  # type: ignore[arg-type]
    assert str(info.value) == f"size_gb must be a positive integer, got {size_gb!r}"
    assert not target.exists()


def test_bad_format(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="unknown disk format 'vmdk'; expected one of: raw, qcow2"
    ):
        create_disk_image(tmp_path / "disk.img", 1, format="vmdk")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        create_disk_image(tmp_path / "no" / "disk.img", 1)
    assert not (tmp_path / "no").exists()


@needs_qemu_img
@pytest.mark.parametrize("fmt", ["qcow2", DiskFormat.QCOW2])
def test_qcow2(tmp_path: Path, fmt: str) -> None:
    target = tmp_path / "disk.qcow2"
    assert create_disk_image(target, 5, format=fmt) == target
    assert target.read_bytes()[:4] == b"QFI\xfb"
    assert detect_disk_format(target) is DiskFormat.QCOW2
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(target)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 5 * GIB
    assert target.stat().st_size < 1 << 20


def test_qcow2_without_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert shutil.which("qemu-img") is None
    target = tmp_path / "disk.qcow2"
    with pytest.raises(BackendUnavailableError) as info:
        create_disk_image(target, 1, format="qcow2")
    assert "qemu-img" in str(info.value)
    assert "qemu-utils" in str(info.value)
    assert not target.exists()


def test_qcow2_without_qemu_img_via_which(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    with pytest.raises(BackendUnavailableError, match="qemu-utils"):
        create_disk_image(tmp_path / "disk.qcow2", 1, format=DiskFormat.QCOW2)


def test_detect_raw_for_short_and_empty_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert detect_disk_format(empty) is DiskFormat.RAW
    short = tmp_path / "short"
    short.write_bytes(b"QF")
    assert detect_disk_format(short) is DiskFormat.RAW
