"""``vzkit codesign --venv`` on a real Mac, in a virtualenv of uv's own Python
(python-build-standalone, which links ``@executable_path/../lib/libpython3.X.dylib``): the
signed copy starts, loads the Virtualization bindings and carries the entitlement, and
``--undo`` puts the virtualenv's python back.

Needs ``uv`` (``brew install uv``) and the network the first time (uv downloads its Python and
the PyObjC wheels); the Xcode Command Line Tools for ``otool`` and ``install_name_tool``.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTITLEMENT = "com.apple.security.virtualization"


def _run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _ok(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = _run(argv, timeout)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done


def test_codesign_venv_of_a_uv_python_runs_and_undo_restores(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed (brew install uv): it makes the virtualenv under test")
    venv = tmp_path / "venv"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    _ok([uv, "venv", "--python-preference", "only-managed", "--python", version, str(venv)])
    python = venv / "bin" / "python"
    _ok([uv, "pip", "install", "--python", str(python), f"{ROOT}[vz]"])
    assert python.is_symlink()
    before = os.readlink(python)

    signed = _ok([str(python), "-m", "vzkit.cli", "codesign", "--venv"], timeout=300)
    assert f"signed {python} (ad hoc) with {ENTITLEMENT}" in signed.stdout
    assert not python.is_symlink()
    _ok([str(python), "-c", "import Virtualization"], timeout=120)
    shown = _ok(["codesign", "--display", "--entitlements", "-", "--xml", str(python)], 60)
    start = shown.stdout.find("<?xml")
    assert plistlib.loads(shown.stdout[start:].encode())[ENTITLEMENT] is True
    verify = _run(["codesign", "--verify", str(python)], 60)
    assert verify.returncode == 0, verify.stderr
    check = "from vzkit.backends.vz._entitlements import interpreter_problem as p; print(p())"
    assert _ok([str(python), "-c", check], 120).stdout == "None\n"

    undone = _ok([str(python), "-m", "vzkit.cli", "codesign", "--undo"], timeout=120)
    assert f"restored {python}" in undone.stdout
    assert python.is_symlink()
    assert os.readlink(python) == before
    assert not (venv / "bin" / ".python.vzkit-original").exists()
    _ok([str(python), "-c", "import sys"], timeout=120)
