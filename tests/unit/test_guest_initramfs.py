"""Unit tests for vzkit.image.build_guest and friends on synthetic packages (no network)."""

from __future__ import annotations

import gzip
import io
import lzma
import struct
import subprocess
import tarfile
from collections.abc import Mapping
from pathlib import Path

import pytest

from vzkit.errors import GuestError
from vzkit.image import (
    GUEST_MODULES,
    GuestImage,
    build_guest,
    find_guest_debs,
    init_script,
    read_cpio,
    stage2_script,
    uncompress_arm64_kernel,
)

KVER = "6.1.0-9-cloud-amd64"


def _tar(files: Mapping[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def make_deb(path: Path, package: str, version: str, arch: str, files: Mapping[str, bytes],
             depends: str = "") -> Path:  # fmt: skip
    control = f"Package: {package}\nVersion: {version}\nArchitecture: {arch}\n"
    control += f"Depends: {depends}\n" if depends else ""
    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", _tar({"./control": control.encode()})),
        ("data.tar.xz", _tar(files)),
    ]
    blob = b"!<arch>\n"
    for name, data in members:
        blob += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        blob += data + b"\n" * (len(data) % 2)
    out = path / f"{package}_{version}_{arch}.deb"
    out.write_bytes(blob)
    return out


def make_elf(machine: int, modinfo: bytes | None = None) -> bytes:
    """A minimal ELF64 LE file; with ``modinfo`` it has .modinfo and .shstrtab sections."""
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    if modinfo is None:
        return ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0, 0, 0, 0, 64, 0, 0, 64, 0, 0)
    strtab = b"\0.modinfo\0.shstrtab\0"
    body = modinfo + strtab
    body += b"\0" * (-len(body) % 8)
    shoff = 64 + len(body)
    sh = struct.Struct("<IIQQQQIIQQ")
    headers = sh.pack(*[0] * 10)
    headers += sh.pack(1, 1, 0, 0, 64, len(modinfo), 0, 0, 1, 0)
    headers += sh.pack(10, 3, 0, 0, 64 + len(modinfo), len(strtab), 0, 0, 1, 0)
    header = struct.pack("<HHIQQQIHHHHHH", 1, machine, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    return ident + header + body + headers


def module(name: str, depends: str = "") -> bytes:
    return make_elf(62, f"name={name}\0depends={depends}\0license=GPL\0".encode())


MODULES = {
    "kernel/drivers/virtio/virtio_ring.ko": module("virtio_ring"),
    "kernel/drivers/virtio/virtio.ko": module("virtio", "virtio_ring"),
    "kernel/drivers/virtio/virtio_pci.ko": module("virtio_pci", "virtio_ring,virtio"),
    "kernel/drivers/virtio/virtio_balloon.ko.xz": lzma.compress(
        module("virtio_balloon", "virtio,virtio_ring")
    ),
    "kernel/drivers/char/hw_random/virtio-rng.ko": module("virtio_rng", "virtio,virtio_ring"),
    "kernel/net/vmw_vsock/vsock.ko": module("vsock"),
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko": module(
        "vmw_vsock_virtio_transport_common", "vsock"
    ),
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko": module(
        "vmw_vsock_virtio_transport", "virtio,vmw_vsock_virtio_transport_common,virtio_ring,vsock"
    ),
    "kernel/sound/unrelated.ko": module("unrelated"),
}


@pytest.fixture
def debs(tmp_path: Path) -> Path:
    deb_dir = tmp_path / "debs"
    deb_dir.mkdir()
    files = {f"./lib/modules/{KVER}/{rel}": data for rel, data in MODULES.items()}
    files[f"./boot/vmlinuz-{KVER}"] = b"MZ fake bzImage"
    files[f"./lib/modules/{KVER}/modules.builtin"] = b"kernel/fs/ext4/ext4.ko\n"
    make_deb(deb_dir, f"linux-image-{KVER}", "6.1.1-1", "amd64", files)
    make_deb(deb_dir, "linux-image-cloud-amd64", "6.1.1-1", "amd64", {},
             depends=f"linux-image-{KVER} (= 6.1.1-1)")  # fmt: skip
    make_deb(deb_dir, "busybox-static", "1:1.35.0-4", "amd64", {"./bin/busybox": make_elf(62)})
    make_deb(deb_dir, "busybox-static", "1:1.35.0-4", "arm64", {"./bin/busybox": make_elf(183)})
    return deb_dir


MODS = ("virtio_pci", "virtio_balloon", "virtio_rng", "vmw_vsock_virtio_transport", "ext4", "9p")


def test_build_guest_contents(debs: Path, tmp_path: Path) -> None:
    image = build_guest("x86_64", deb_dir=debs, out_dir=tmp_path / "out", modules=MODS)
    assert image.kernel_version == KVER
    assert image.kernel.read_bytes() == b"MZ fake bzImage"
    assert image.kernel.name == f"vmlinuz-{KVER}"
    assert image.console == "ttyS0"
    assert image.cmdline("x=1") == "console=ttyS0 quiet init_on_alloc=0 preempt=none x=1"
    assert image.modules == [
        "virtio_ring", "virtio", "virtio_pci", "virtio_balloon", "virtio_rng", "vsock",
        "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
    ]  # fmt: skip
    assert image.builtin_modules == ["ext4"]
    assert image.missing_modules == ["9p"]
    entries = {e.name: e for e in read_cpio(image.initrd.read_bytes())}
    assert entries["init"].data == init_script()
    assert entries["init"].permissions == 0o755
    assert entries["etc/vzkit/stage2.sh"].data == stage2_script()  # PID 1 on a root disk
    assert entries["etc/vzkit/stage2.sh"].permissions == 0o755
    assert entries["bin/busybox"].data == make_elf(62)
    assert entries["bin/sh"].linkname == "busybox"
    console = entries["dev/console"]
    assert (console.kind, console.rdevmajor, console.rdevminor) == ("chardev", 5, 1)
    assert entries["etc/hostname"].data == b"vzkit\n"
    load = entries["etc/vzkit/modules"].data.decode().splitlines()
    assert [line.split()[0] for line in load] == image.modules
    for line in load:
        path = line.split()[1]
        assert path.startswith(f"/lib/modules/{KVER}/kernel/")
        assert path.endswith(".ko")
        assert entries[path.lstrip("/")].data.startswith(b"\x7fELF")  # stored uncompressed
    assert f"lib/modules/{KVER}/kernel/sound/unrelated.ko" not in entries


def test_build_guest_is_reproducible(debs: Path, tmp_path: Path) -> None:
    one = build_guest("x86_64", deb_dir=debs, out_dir=tmp_path / "a", modules=MODS)
    two = build_guest("x86_64", deb_dir=debs, out_dir=tmp_path / "b", modules=MODS)
    assert one.initrd.read_bytes() == two.initrd.read_bytes()


def test_extra_files_hostname_and_required_modules(debs: Path, tmp_path: Path) -> None:
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/sh\necho hello\n")
    script.chmod(0o755)
    image = build_guest(
        "x86_64",
        deb_dir=debs,
        out_dir=tmp_path / "out",
        modules=(),
        required_modules=["virtio_rng"],
        hostname="box",
        extra_files={"/usr/bin/hello": script, "/init": b"#!/bin/sh\nexec sh\n"},
    )
    entries = {e.name: e for e in read_cpio(image.initrd.read_bytes())}
    assert entries["usr/bin/hello"].permissions == 0o755
    assert entries["init"].data == b"#!/bin/sh\nexec sh\n"
    assert entries["init"].permissions == 0o644
    assert entries["etc/hostname"].data == b"box\n"
    assert image.modules == ["virtio_ring", "virtio", "virtio_rng"]
    with pytest.raises(GuestError, match="'9p' not found"):
        build_guest("x86_64", deb_dir=debs, out_dir=tmp_path / "x", required_modules=["9p"])


def test_build_guest_argument_and_package_errors(debs: Path, tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="exactly one of"):
        build_guest("x86_64", out_dir=tmp_path)
    with pytest.raises(GuestError, match="exactly one of"):
        build_guest("x86_64", deb_dir=debs, cache_dir=debs, out_dir=tmp_path)
    with pytest.raises(GuestError, match="unsupported guest architecture"):
        build_guest("riscv64", deb_dir=debs, out_dir=tmp_path)
    with pytest.raises(GuestError, match="no linux-image-<version> kernel package for arm64"):
        build_guest("aarch64", deb_dir=debs, out_dir=tmp_path)
    (debs / "busybox-static_1:1.35.0-4_amd64.deb").unlink()
    make_deb(debs, "busybox-static", "1:1.35.0-5", "amd64", {"./bin/busybox": make_elf(183)})
    with pytest.raises(GuestError, match="ELF machine 183, not x86_64"):
        build_guest("x86_64", deb_dir=debs, out_dir=tmp_path)


def test_a_kernel_version_is_one_path_part(debs: Path, tmp_path: Path) -> None:
    """The version in ``/boot/vmlinuz-VERSION`` names the image in the output directory: a
    package whose image sits deeper (``vmlinuz-a/b``) has no kernel image (a GuestError, not a
    path made of the package's text)."""
    deb = next(debs.glob(f"linux-image-{KVER}_*.deb"))
    deb.unlink()
    files = {f"./boot/vmlinuz-{KVER}/x": b"MZ fake bzImage"}
    make_deb(debs, f"linux-image-{KVER}", "6.1.1-1", "amd64", files)
    out = tmp_path / "out"
    with pytest.raises(GuestError, match="no /boot/vmlinuz-"):
        build_guest("x86_64", deb_dir=debs, out_dir=out, modules=MODS)


def test_find_guest_debs_prefers_the_metapackage_target(debs: Path) -> None:
    make_deb(debs, "linux-image-6.2.0-1-cloud-amd64", "6.2.0-1", "amd64", {})
    found = find_guest_debs(debs, "x86_64")
    assert found.kernel.name.startswith(f"linux-image-{KVER}_")
    assert found.busybox.name.endswith("_amd64.deb")
    (debs / "linux-image-cloud-amd64_6.1.1-1_amd64.deb").unlink()
    assert find_guest_debs(debs, "amd64").kernel.name.startswith("linux-image-6.2.0-1-cloud")
    with pytest.raises(GuestError, match=r"no busybox-static package for arm64"):
        find_guest_debs(debs / "..", "aarch64")
    with pytest.raises(GuestError, match="does not exist"):
        find_guest_debs(debs / "nope", "x86_64")


def test_default_module_list_covers_the_devices() -> None:
    for name in ("virtio_pci", "virtio_mmio", "virtio_balloon", "vmw_vsock_virtio_transport"):
        assert name in GUEST_MODULES


def test_init_script_announces_readiness() -> None:
    script = init_script().decode()
    assert script.startswith("#!/bin/busybox sh\n")
    assert "\\nVZKIT-GUEST-READY\\n" in script
    assert "/etc/vzkit/modules" in script


def test_both_stages_parse_as_shell_scripts(tmp_path: Path) -> None:
    """``sh -n`` (POSIX syntax: busybox ash accepts it) on ``init.sh`` and ``stage2.sh``."""
    for name, script in (("init.sh", init_script()), ("stage2.sh", stage2_script())):
        path = tmp_path / name
        path.write_bytes(script)
        proc = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
    stage2 = stage2_script().decode()
    assert stage2.startswith("#!/run/vzkit/busybox sh\n")
    assert "\\nVZKIT-GUEST-READY\\n" in stage2
    assert "IMAGE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in stage2


def _arm64_image() -> bytes:
    return b"\0" * 56 + b"ARM\x64" + bytes(range(200))


def test_uncompress_arm64_kernel(tmp_path: Path) -> None:
    raw = _arm64_image()
    (tmp_path / "Image").write_bytes(raw)
    (tmp_path / "Image.gz").write_bytes(gzip.compress(raw))
    payload = gzip.compress(raw)
    zboot = b"MZ\0\0zimg" + struct.pack("<II", 64, len(payload)) + b"\0" * 8 + b"gzip"
    zboot = zboot.ljust(64, b"\0") + payload
    (tmp_path / "zboot.efi").write_bytes(zboot)
    for name in ("Image", "Image.gz", "zboot.efi"):
        out = uncompress_arm64_kernel(tmp_path / name, tmp_path / f"{name}.raw")
        assert out.read_bytes() == raw
    (tmp_path / "bz").write_bytes(b"MZ" + b"\0" * 100)
    with pytest.raises(GuestError, match="not an arm64 Linux Image"):
        uncompress_arm64_kernel(tmp_path / "bz", tmp_path / "o")
    (tmp_path / "zstd.efi").write_bytes(zboot.replace(b"gzip", b"zstd"))
    with pytest.raises(GuestError, match="'zstd' payload"):
        uncompress_arm64_kernel(tmp_path / "zstd.efi", tmp_path / "o")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b\x08\x00broken")
    with pytest.raises(GuestError, match="corrupt gzip"):
        uncompress_arm64_kernel(tmp_path / "bad.gz", tmp_path / "o")


def test_cmdline_tuning_follows_the_kernel_of_each_arch() -> None:
    def image(arch: str) -> GuestImage:
        return GuestImage(Path("k"), Path("i"), arch, "6.1.0-56-cloud", [])

    # Debian's amd64 kernel can switch preemption models at boot; its arm64 one cannot, and
    # an unknown parameter would only end up in init's environment
    assert image("x86_64").cmdline() == "console=ttyS0 quiet init_on_alloc=0 preempt=none"
    assert image("aarch64").cmdline("x=1") == "console=ttyAMA0 quiet init_on_alloc=0 x=1"
