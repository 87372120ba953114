"""Disk images: sparse raw files and qcow2 through qemu-img."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzkit import BackendUnavailableError, ConfigError, DiskFormat, create_disk_image
from vzkit._disk import standalone_qcow2_size

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
    assert st.st_mode & 0o777 == 0o600


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
    assert standalone_qcow2_size(target) == 5 * GIB
    assert target.stat().st_mode & 0o777 == 0o600
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


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("umask_zero")
@pytest.mark.parametrize(
    "fmt", [DiskFormat.RAW, pytest.param(DiskFormat.QCOW2, marks=needs_qemu_img)]
)
def test_new_images_are_private_under_a_permissive_umask(tmp_path: Path, fmt: DiskFormat) -> None:
    target = create_disk_image(tmp_path / f"disk.{fmt.value}", 1, format=fmt)
    assert target.stat().st_mode & 0o777 == 0o600


# -- qcow2 headers: read here, never opened by QEMU when they name another file ------------


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, stdin=subprocess.DEVNULL)


@needs_qemu_img
def test_qcow2_naming_a_backing_file_is_refused_with_the_flatten_command(tmp_path: Path) -> None:
    host = tmp_path / "host secret.txt"
    host.write_text("secret\n")
    image = tmp_path / "img.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-b", str(host), "-F", "raw", str(image), "1M")
    with pytest.raises(ConfigError) as info:
        standalone_qcow2_size(image)
    assert str(info.value) == (
        f"disk image {str(image)!r} is a qcow2 image whose header names the backing file "
        f"{str(host)!r}; vzkit never opens files an image header names. Flatten it into a "
        f"standalone image and use that: qemu-img convert -O qcow2 {image} {image}.standalone.qcow2"
    )


@needs_qemu_img
def test_qcow2_naming_a_data_file_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "victim.bin"
    image = tmp_path / "img.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", str(image), "1M")
    with pytest.raises(
        ConfigError, match=re.escape(f"names an external data file {str(data)!r}; ")
    ) as info:
        standalone_qcow2_size(image)
    assert f"qemu-img convert -O qcow2 {image} " in str(info.value)


def _v3_header(*, incompatible: int = 0, extensions: bytes = b"", cluster_bits: int = 16) -> bytes:
    head = struct.pack(">4sIQII Q", b"QFI\xfb", 3, 0, 0, cluster_bits, 7 * GIB)
    head += bytes(72 - len(head))  # crypt, L1, refcount table, snapshots: unused here
    head += struct.pack(">QQQII", incompatible, 0, 0, 4, 104)
    return head + extensions


def test_qcow2_header_parser_on_hand_made_headers(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(_v3_header() + struct.pack(">II", 0, 0))
    assert standalone_qcow2_size(image) == 7 * GIB
    # the data-file bit without a name is refused too (QEMU would insist on a data file)
    image.write_bytes(_v3_header(incompatible=1 << 2) + struct.pack(">II", 0, 0))
    with pytest.raises(ConfigError, match="names an external data file; "):
        standalone_qcow2_size(image)
    # an unknown extension is skipped (padded to 8 bytes), the data file after it is found
    ext = struct.pack(">II", 0x12345678, 3) + b"abc" + bytes(5)
    ext += struct.pack(">II", 0x44415441, 9) + b"/etc/host" + bytes(7) + struct.pack(">II", 0, 0)
    image.write_bytes(_v3_header(extensions=ext))
    with pytest.raises(ConfigError, match="names an external data file '/etc/host'; "):
        standalone_qcow2_size(image)
    # an extension running past the header cluster is malformed
    image.write_bytes(_v3_header(cluster_bits=9, extensions=struct.pack(">II", 0x1, 1 << 20)))
    with pytest.raises(ConfigError, match="malformed qcow2 header extensions"):
        standalone_qcow2_size(image)
    # a version-2 header: no feature bits, extensions right after 72 bytes
    v2 = struct.pack(">4sIQII Q", b"QFI\xfb", 2, 0, 0, 16, GIB) + bytes(40)
    image.write_bytes(v2 + struct.pack(">II", 0, 0))
    assert standalone_qcow2_size(image) == GIB


@pytest.mark.parametrize("content", [b"", b"QF", b"\0" * 4096, b"QFI\xfb" + bytes(8)])
def test_a_file_without_a_qcow2_header_is_refused_as_qcow2(tmp_path: Path, content: bytes) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(content)
    with pytest.raises(ConfigError, match=r"is not a qcow2 image .*set disk_format to 'raw'"):
        standalone_qcow2_size(image)


def test_unknown_qcow2_version_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(struct.pack(">4sIQII Q", b"QFI\xfb", 4, 0, 0, 16, GIB) + bytes(512))
    with pytest.raises(ConfigError, match=r"vzkit cannot read \(version 4, cluster_bits 16\)"):
        standalone_qcow2_size(image)
