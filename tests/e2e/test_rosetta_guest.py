"""What vzkit's aarch64 guest does with Rosetta (``vzkit.rosetta=TAG`` on the kernel command
line, as the vz backend sets it for ``rosetta=True``): the tag's share is mounted at
/media/rosetta, not as a share, and its ``rosetta`` is registered with binfmt_misc for x86_64
ELF programs. QEMU has no Rosetta, so the share holds a stand-in: an aarch64 program that says it
ran (an ELF, as binfmt_misc's ``O`` flag, which Rosetta's ``C`` implies, needs); one aarch64
boot (TCG)."""

from __future__ import annotations

from pathlib import Path

import vzkit
from tests.support.tiny_elf import hello_elf

from .conftest import VMFactory

STAND_IN = b"rosetta stand-in ran\n"


def test_the_aarch64_guest_registers_rosetta_for_x86_64_programs(
    vms: VMFactory, tmp_path: Path
) -> None:
    rosetta = tmp_path / "rosetta-dir"
    rosetta.mkdir()
    (rosetta / "rosetta").write_bytes(hello_elf("aarch64", STAND_IN))
    (rosetta / "rosetta").chmod(0o755)
    cfg = vms.config("aarch64", console=vzkit.ConsoleMode.LOG)
    cfg = cfg.replace(
        volumes=(vzkit.VolumeMount(rosetta, "vzkit-rosetta", read_only=True),),
        cmdline=f"{cfg.cmdline} vzkit.rosetta=vzkit-rosetta",
    )
    vm = vzkit.VirtualMachine(cfg, backend="qemu")
    vms.vms.append(vm)
    vm.start(timeout=60)
    assert vm.guest.wait_ready(timeout=180)
    entry = vm.guest.read_file("/proc/sys/fs/binfmt_misc/rosetta").decode()
    assert entry.splitlines()[0] == "enabled"
    assert "interpreter /media/rosetta/rosetta" in entry
    assert "flags: OCF" in entry
    assert "magic 7f454c4602010100000000000000000002003e00" in entry
    assert vm.guest.run(["/media/rosetta/rosetta"]).stdout == STAND_IN  # it runs here
    vm.guest.write_file("/tmp/hello-x86_64", hello_elf("x86_64"), mode=0o755)
    done = vm.guest.run(["/tmp/hello-x86_64", "an-argument"])
    assert (done.returncode, done.stdout) == (0, STAND_IN)  # the kernel ran "Rosetta"
    mounts = vm.guest.read_file("/proc/mounts").decode()
    assert " /media/rosetta " in mounts
    assert "/mnt/vzkit-rosetta" not in mounts  # Rosetta's share is not a share
    native = vm.guest.run(["uname", "-m"])  # aarch64 programs are not touched
    assert native.stdout == b"aarch64\n"
