"""Rosetta on a real Mac (Apple silicon, macOS 13+, Rosetta installed): an x86_64 static
program prints in an aarch64 guest of the vz backend (``rosetta=True``)."""

from __future__ import annotations

import platform

import pytest

from tests.support.tiny_elf import hello_elf
from vzkit.backends import vz

from .conftest import MacVMs

pytestmark = pytest.mark.skipif(
    platform.machine() != "arm64", reason="Rosetta for Linux guests needs Apple silicon"
)


def test_an_x86_64_program_prints_in_an_aarch64_guest(macvms: MacVMs) -> None:
    if vz.rosetta_availability() is not vz.RosettaAvailability.INSTALLED:
        pytest.skip("Rosetta is not installed: vzkit macos install-rosetta")
    vm = macvms.boot("vz", arch="aarch64", rosetta=True)
    entry = vm.guest.read_file("/proc/sys/fs/binfmt_misc/rosetta").decode()
    assert entry.startswith("enabled\n")
    vm.guest.write_file("/tmp/hello", hello_elf("x86_64", b"hello from x86_64\n"), mode=0o755)
    done = vm.guest.run(["/tmp/hello"])
    assert (done.returncode, done.stdout) == (0, b"hello from x86_64\n")
    assert vm.guest.run(["uname", "-m"]).stdout == b"aarch64\n"
