"""EFI boot on the qemu backend: OVMF with a per-VM variable store in the state dir.

The test makes a real EFI system partition: Debian's systemd-boot as the removable-media boot
loader, with a loader entry that boots the test guest's kernel and initramfs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import vzkit
from vzkit._cache import user_cache_dir
from vzkit.backends.qemu._discover import find_firmware
from vzkit.image import DebPackage, GuestImage, apt_download

from .conftest import GuestShell, VMFactory, wait_for_console


def _systemd_boot_efi() -> bytes:
    cache = user_cache_dir() / "test-debs" / "efi"
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob("systemd-boot-efi_*.deb"))
    if not debs:
        debs = apt_download(["systemd-boot-efi"], cache, "x86_64")
    return DebPackage(debs[-1]).read("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")


def make_esp(path: Path, image: GuestImage) -> Path:
    """A 64 MiB FAT32 disk (no partition table) that boots ``image`` through systemd-boot."""
    work = path.parent / "esp-files"
    work.mkdir()
    (work / "BOOTX64.EFI").write_bytes(_systemd_boot_efi())
    (work / "loader.conf").write_text("timeout 0\ndefault vzkit.conf\n")
    (work / "vzkit.conf").write_text(
        f"title vzkit\nlinux /vmlinuz\ninitrd /initrd.img\noptions {image.cmdline()}\n"
    )
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}

    def run(*argv: str | Path) -> None:
        subprocess.run([str(a) for a in argv], check=True, capture_output=True, env=env)

    with open(path, "wb") as fh:
        fh.truncate(64 << 20)
    run("mkfs.vfat", "-F", "32", path)
    run("mmd", "-i", path, "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries")
    run("mcopy", "-i", path, work / "BOOTX64.EFI", "::/EFI/BOOT/BOOTX64.EFI")
    run("mcopy", "-i", path, work / "loader.conf", "::/loader/loader.conf")
    run("mcopy", "-i", path, work / "vzkit.conf", "::/loader/entries/vzkit.conf")
    run("mcopy", "-i", path, image.kernel, "::/vmlinuz")
    run("mcopy", "-i", path, image.initrd, "::/initrd.img")
    return path


def test_efi_boot_keeps_its_variable_store(vms: VMFactory, tmp_path: Path) -> None:
    esp = make_esp(tmp_path / "esp, disk.img", vms.images["x86_64"])
    state_dir = tmp_path / "vm state"
    template = find_firmware(vzkit.Arch.X86_64).vars_template.read_bytes()
    nvram = state_dir / "efi.nvram"
    for boot in range(2):
        vm = vms.create(
            "x86_64",
            kernel_path=None,
            initrd_path=None,
            cmdline="",
            disk_path=esp,
            state_dir=state_dir,
        )
        assert not vm.config.direct_boot
        log = vm.console_log_path
        assert log is not None
        earlier = log.stat().st_size if log.exists() else 0  # the first boot's READY is there
        vm.start(timeout=60)
        wait_for_console(vm, since=earlier)
        shell = GuestShell(vm)
        vms.shells.append(shell)
        rc, out = shell.run("ls /sys/firmware/efi")
        assert rc == 0, f"the guest did not boot through UEFI: {out}"
        vm.close()
        # The firmware recorded its boot entries in the VM's own store, which is kept.
        assert nvram.read_bytes() != template, f"boot {boot}: variable store not persisted"


def test_efi_boot_without_firmware_says_what_to_install(
    vms: VMFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vzkit.backends.qemu import _discover

    monkeypatch.setattr(_discover, "_FIRMWARE_CANDIDATES", {a: [] for a in vzkit.Arch})
    disk = vzkit.create_disk_image(tmp_path / "disk.img", 1)
    vm = vms.create("x86_64", kernel_path=None, initrd_path=None, cmdline="", disk_path=disk)
    with pytest.raises(vzkit.BackendUnavailableError, match="apt-get install ovmf"):
        vm.start(timeout=30)
    assert vm.state is vzkit.VMState.STOPPED
