"""What only a real Mac can check: codesign, doctor's verdict, and a macOS guest."""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
from pathlib import Path

import pytest

import vzkit

VZKIT = [sys.executable, "-m", "vzkit.cli"]


def test_codesign_signs_a_working_copy_of_this_interpreter(tmp_path: Path) -> None:
    out = tmp_path / "python-vz"
    done = subprocess.run([*VZKIT, "codesign", "--output", str(out)], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    shown = subprocess.run(
        ["codesign", "--display", "--entitlements", "-", "--xml", str(out)],
        capture_output=True,
        check=True,
    )
    start = shown.stdout.find(b"<?xml")
    assert plistlib.loads(shown.stdout[start:])["com.apple.security.virtualization"] is True
    verify = subprocess.run(["codesign", "--verify", str(out)], capture_output=True)
    assert verify.returncode == 0, verify.stderr.decode()
    ran = subprocess.run([str(out), "-c", "import vzkit; print('ok')"], capture_output=True)
    assert ran.stdout == b"ok\n", ran.stderr.decode()


def test_doctor_says_whether_this_interpreter_can_virtualize() -> None:
    done = subprocess.run([*VZKIT, "doctor"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("vz "))
    from vzkit.backends.vz import availability_problem

    problem = availability_problem()
    if problem is None:
        assert line.split() == ["vz", "available"]
    else:
        assert line == f"vz    unavailable: {problem}"


def test_macos_guest_installs_and_boots(tmp_path: Path) -> None:
    """Needs a restore image (about 15 GB): set VZKIT_MACOS_IPSW to a local .ipsw."""
    ipsw = os.environ.get("VZKIT_MACOS_IPSW")
    if not ipsw:
        pytest.skip("set VZKIT_MACOS_IPSW to a local macOS restore image (.ipsw)")
    from vzkit.backends import vz

    cfg = vzkit.MacVMConfig(vm_dir=tmp_path / "mac", headless=True)
    seen: list[float] = []
    info = vz.install_macos(cfg, ipsw, progress=seen.append, timeout=3600)
    assert cfg.installed
    assert seen[-1] == 1.0
    assert cfg.install_record()["build"] == info.build_version
    with vzkit.VirtualMachine(cfg, backend="vz") as vm:
        vm.start(timeout=120)
        assert vm.state is vzkit.VMState.RUNNING
        vm.pause(timeout=30)
        vm.resume(timeout=30)
        vm.stop(timeout=120)
        assert vm.state is vzkit.VMState.STOPPED
