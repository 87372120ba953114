"""Kernels for ``VZLinuxBootLoader``: an arm64 ``Image`` as it is, gzip and EFI zboot kernels
unpacked once into the state directory, anything else refused before the framework gives an
opaque start failure. Formats are told by their magic numbers (built here byte by byte)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import stat
import struct
from pathlib import Path

import pytest

import vzkit
from vzkit._kernel import kernel_for_vz
from vzkit.backends import vz as vzb

from ._support import ARM64_IMAGE
from .fakeobjc import FakeRuntime

pytestmark = pytest.mark.contract
IMAGE = ARM64_IMAGE + os.urandom(4096) + b"\0" * 8192
BZIMAGE = bytes(0x202) + b"HdrS" + bytes(64)
ELF = b"\x7fELF\x02\x01\x01" + bytes(200)


def zboot(payload: bytes, compression: bytes) -> bytes:
    """An EFI zboot image: PE stub with 'zimg', payload offset and size, compression name."""
    offset = 0x1000
    header = struct.pack("<2s2x4sII8x32s", b"MZ", b"zimg", offset, len(payload), compression)
    return header.ljust(offset, b"\0") + payload + b"\0" * 512  # code and data follow


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


def write(tmp_path: Path, data: bytes, name: str = "vmlinuz") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_a_plain_arm64_image_is_used_where_it_is(tmp_path: Path, state: Path) -> None:
    kernel = write(tmp_path, IMAGE, "Image")
    assert kernel_for_vz(kernel, state, arm64=True) == kernel
    assert list(state.iterdir()) == []


@pytest.mark.parametrize(
    ("compression", "pack"),
    [
        (b"gzip", gzip.compress),
        (b"xzkern", lambda data: lzma.compress(data, format=lzma.FORMAT_XZ)),
        (b"lzma", lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE)),
        (b"bzip2", bz2.compress),
    ],
)
def test_an_efi_zboot_kernel_is_unpacked(
    tmp_path: Path, state: Path, compression: bytes, pack: object
) -> None:
    assert callable(pack)
    kernel = write(tmp_path, zboot(pack(IMAGE), compression))
    unpacked = kernel_for_vz(kernel, state, arm64=True)
    assert unpacked.parent == state
    assert unpacked.read_bytes() == IMAGE
    assert stat.S_IMODE(unpacked.stat().st_mode) == 0o600
    stamp = unpacked.stat().st_mtime_ns
    assert kernel_for_vz(kernel, state, arm64=True) == unpacked
    assert unpacked.stat().st_mtime_ns == stamp  # reused while the source is unchanged


def test_a_gzip_vmlinuz_is_unpacked_and_checked(tmp_path: Path, state: Path) -> None:
    unpacked = kernel_for_vz(write(tmp_path, gzip.compress(IMAGE)), state, arm64=True)
    assert unpacked.read_bytes() == IMAGE
    with pytest.raises(
        vzkit.ConfigError, match=r"unpacked from gzip-compressed\) is an x86 bzImage"
    ):
        kernel_for_vz(write(tmp_path, gzip.compress(BZIMAGE), "x86.gz"), state, arm64=True)
    assert sorted(p.name for p in state.iterdir()) == [unpacked.name]  # the refused one: gone


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (BZIMAGE, "an x86 bzImage"),
        (ELF, r"an ELF file"),
        (b"\0" * 512, "of a format vzkit does not know, not an arm64 Linux Image"),
    ],
)
def test_other_kernels_are_refused_on_apple_silicon(
    tmp_path: Path, state: Path, data: bytes, what: str
) -> None:
    kernel = write(tmp_path, data)
    with pytest.raises(vzkit.ConfigError, match=what) as caught:
        kernel_for_vz(kernel, state, arm64=True)
    assert "arm64 Linux Image" in str(caught.value)
    assert kernel_for_vz(kernel, state, arm64=False) == kernel  # an Intel Mac: as it is


def test_a_zboot_compression_vzkit_cannot_read_is_named(tmp_path: Path, state: Path) -> None:
    kernel = write(tmp_path, zboot(b"(zstd frame)", b"zstd"))
    with pytest.raises(vzkit.ConfigError, match=r"compressed with 'zstd'.*--efi"):
        kernel_for_vz(kernel, state, arm64=True)


def test_a_damaged_payload_leaves_nothing(tmp_path: Path, state: Path) -> None:
    kernel = write(tmp_path, zboot(gzip.compress(IMAGE)[:100], b"gzip"))
    with pytest.raises(vzkit.ConfigError, match="EFI zboot image \\(gzip\\) but cannot be"):
        kernel_for_vz(kernel, state, arm64=True)
    assert list(state.iterdir()) == []


def test_the_backend_refuses_an_x86_kernel_before_the_framework_sees_it(
    fake: FakeRuntime, tmp_path: Path
) -> None:
    cfg = vzkit.LinuxVMConfig(kernel_path=write(tmp_path, BZIMAGE), state_dir=tmp_path / "s")
    with pytest.raises(vzkit.ConfigError, match="x86 bzImage"):
        vzb.build_linux_vm_config(cfg)
    assert fake.violations == []
