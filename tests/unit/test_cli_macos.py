"""``vzkit codesign`` and the entitlement check, on any OS: ``codesign`` is faked at the process
boundary (``_entitlements.run_tool``) by a stand-in that checks each argv exactly and keeps
per-file signatures, so the flow, the commands and the plist are what is tested."""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from vzkit.backends.vz import _entitlements as ent
from vzkit.cli import main

CODESIGN = "/usr/bin/codesign"
BASE_ENTITLEMENTS = {"com.apple.security.cs.disable-library-validation": True}


class FakeCodesign:
    """``codesign --display --entitlements - --xml`` and ``--sign - --force --entitlements``."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.signatures: dict[tuple[int, int], dict[str, Any] | None] = {}  # by inode
        self.plists: list[bytes] = []
        self.fail_sign = False

    def of(self, path: Path) -> dict[str, Any] | None:
        """A file's signature: kept in the file, so it follows renames (keyed by inode)."""
        st = path.stat()
        return self.signatures.get((st.st_dev, st.st_ino))

    def set(self, path: Path, entitlements: dict[str, Any] | None) -> None:
        st = path.stat()
        self.signatures[(st.st_dev, st.st_ino)] = entitlements

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
        argv = list(argv)
        self.calls.append(argv)
        path = Path(argv[-1])
        if argv[:5] == [CODESIGN, "--display", "--entitlements", "-", "--xml"] and len(argv) == 6:
            found = self.of(path) if path.exists() else None
            if found is None:
                err = f"{path}: code object is not signed at all\n".encode()
                return subprocess.CompletedProcess(argv, 1, b"", err)
            out = plistlib.dumps(found) if found else b""
            return subprocess.CompletedProcess(argv, 0, out, b"Executable=" + bytes(path))
        if argv[:5] == [CODESIGN, "--sign", "-", "--force", "--entitlements"] and len(argv) == 7:
            plist = Path(argv[5])
            self.plists.append(plist.read_bytes())
            if self.fail_sign:
                return subprocess.CompletedProcess(argv, 1, b"", b"the codesign tool failed")
            assert path.is_file()
            self.set(path, plistlib.loads(plist.read_bytes()))
            return subprocess.CompletedProcess(argv, 0, b"", f"{path}: replacing".encode())
        raise AssertionError(f"unexpected codesign command: {argv}")


@pytest.fixture(autouse=True)
def on_macos(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command is run as on a Mac; its codesign tool is faked below."""
    from vzkit.cli import _macos

    monkeypatch.setattr(_macos, "_MACOS", True)


def test_off_macos_codesign_says_it_is_for_macos_and_help_marks_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vzkit.cli import _macos

    monkeypatch.setattr(_macos, "_MACOS", False)
    result = CliRunner().invoke(main, ["codesign", "--venv"], prog_name="vzkit")
    assert result.exit_code == 1
    assert "codesign is for macOS" in result.stderr
    assert "nothing needs signing" in result.stderr
    if sys.platform != "darwin":  # the listing is decided when the CLI is imported
        listing = CliRunner().invoke(main, ["--help"], prog_name="vzkit").output
        lines = {line.split()[0]: line for line in listing.splitlines() if line[:2] == "  "}
        assert "[macOS only]" in lines["codesign"]
        assert "[macOS only]" in lines["macos"]
        assert "[macOS only]" not in lines["run"]


@pytest.fixture
def interpreter(tmp_path: Path) -> Path:
    binary = tmp_path / "base" / "Python"
    binary.parent.mkdir()
    binary.write_bytes(b"\xcf\xfa\xed\xfe a Mach-O interpreter")
    return binary


@pytest.fixture
def codesign(monkeypatch: pytest.MonkeyPatch, interpreter: Path) -> FakeCodesign:
    fake = FakeCodesign()
    fake.set(interpreter, dict(BASE_ENTITLEMENTS))
    monkeypatch.setattr(ent, "run_tool", fake)
    monkeypatch.setattr(ent, "find_codesign", lambda: CODESIGN)
    monkeypatch.setattr(ent, "running_executable", lambda: interpreter)
    ent._cached_problem.cache_clear()
    yield fake
    ent._cached_problem.cache_clear()


def test_argv_and_plist() -> None:
    assert ent.display_argv("codesign", Path("/x/python")) == [
        "codesign",
        "--display",
        "--entitlements",
        "-",
        "--xml",
        "/x/python",
    ]
    assert ent.sign_argv("codesign", Path("/x/py"), Path("/x/e.plist")) == [
        "codesign",
        "--sign",
        "-",
        "--force",
        "--entitlements",
        "/x/e.plist",
        "/x/py",
    ]
    plist = ent.entitlements_plist(BASE_ENTITLEMENTS)
    assert plist.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    assert b"<key>com.apple.security.virtualization</key>\n\t<true/>" in plist
    assert plistlib.loads(plist) == {
        "com.apple.security.cs.disable-library-validation": True,
        "com.apple.security.virtualization": True,
    }


def test_parse_both_output_forms() -> None:
    xml = b"Executable=/x\n" + plistlib.dumps({"com.apple.security.virtualization": True})
    assert ent.parse_entitlements(xml) == {"com.apple.security.virtualization": True}
    text = (
        b"Executable=/usr/local/bin/python3\n[Dict]\n\t[Key] com.apple.security.virtualization\n"
        b"\t[Value]\n\t\t[Bool] true\n\t[Key] com.apple.security.get-task-allow\n\t[Value]\n"
        b"\t\t[Bool] false\n"
    )
    assert ent.parse_entitlements(text) == {
        "com.apple.security.virtualization": True,
        "com.apple.security.get-task-allow": False,
    }
    assert ent.parse_entitlements(b"") == {}
    assert ent.parse_entitlements(b"<?xml broken") == {}


def test_codesign_output_signs_a_copy(
    codesign: FakeCodesign, interpreter: Path, tmp_path: Path
) -> None:
    out = tmp_path / "python-vz"
    result = CliRunner().invoke(main, ["codesign", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert f"signed {out} (ad hoc) with com.apple.security.virtualization" in result.output
    assert out.read_bytes() == interpreter.read_bytes()
    assert os.stat(out).st_mode & 0o777 == 0o755
    copy = Path(next(c for c in codesign.calls if c[1] == "--sign")[-1])
    assert copy.parent == tmp_path
    assert copy.name.startswith(".python-vz.vzkit-")
    assert [c[1] for c in codesign.calls] == ["--display", "--sign", "--display"]
    assert codesign.calls[0][-1] == str(interpreter)  # its entitlements are kept
    assert plistlib.loads(codesign.plists[0]) == {
        **BASE_ENTITLEMENTS,
        "com.apple.security.virtualization": True,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "python-vz"]
    assert codesign.of(interpreter) == BASE_ENTITLEMENTS  # the original is untouched
    assert codesign.of(out) == {**BASE_ENTITLEMENTS, "com.apple.security.virtualization": True}


def test_a_failed_signature_leaves_nothing(codesign: FakeCodesign, tmp_path: Path) -> None:
    codesign.fail_sign = True
    out = tmp_path / "python-vz"
    result = CliRunner().invoke(main, ["codesign", "--output", str(out)])
    assert result.exit_code == 1
    assert "codesign failed for" in result.output
    assert "the codesign tool failed" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_codesign_venv_replaces_the_symlinks(
    codesign: FakeCodesign, interpreter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.symlink_to(interpreter)
    major = f"python{sys.version_info[0]}"
    minor = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    (venv / "bin" / major).symlink_to("python")
    (venv / "bin" / minor).symlink_to(interpreter)  # straight to the base, like some tools do
    monkeypatch.setattr(sys, "prefix", str(venv))
    result = CliRunner().invoke(main, ["codesign", "--venv"])
    assert result.exit_code == 0, result.output
    assert not python.is_symlink()
    assert python.read_bytes() == interpreter.read_bytes()
    assert codesign.of(python) == {
        **BASE_ENTITLEMENTS,
        "com.apple.security.virtualization": True,
    }
    assert os.readlink(venv / "bin" / major) == "python"
    assert os.readlink(venv / "bin" / minor) == "python"
    assert f"{minor} now runs python" in result.output
    assert interpreter.read_bytes().startswith(b"\xcf\xfa\xed\xfe")  # base untouched


@pytest.mark.parametrize("args", [[], ["--venv", "--output", "x"]])
def test_exactly_one_target(codesign: FakeCodesign, args: list[str]) -> None:
    result = CliRunner().invoke(main, ["codesign", *args])
    assert result.exit_code == 2
    assert "give exactly one of --output PATH or --venv" in result.output
    assert codesign.calls == []


def test_venv_outside_a_virtualenv(codesign: FakeCodesign, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "prefix", sys.base_prefix)
    result = CliRunner().invoke(main, ["codesign", "--venv"])
    assert result.exit_code == 2
    assert "not running in a virtualenv; use --output PATH" in result.output


def test_without_codesign(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ent, "find_codesign", lambda: None)
    result = CliRunner().invoke(main, ["codesign", "--output", str(tmp_path / "p")])
    assert result.exit_code == 1
    assert "codesign was not found; signing needs macOS" in result.output


def test_interpreter_problem_says_why(codesign: FakeCodesign, interpreter: Path) -> None:
    problem = ent.interpreter_problem()
    assert problem == (
        f"this interpreter ({interpreter}) lacks the com.apple.security.virtualization "
        "entitlement, so it cannot create VMs; sign it with 'vzkit codesign --venv' (in a "
        "virtualenv) or 'vzkit codesign --output PATH'"
    )
    assert ent.interpreter_problem() == problem
    assert len(codesign.calls) == 1  # asked once per process
    ent._cached_problem.cache_clear()
    codesign.set(interpreter, None)
    assert "is not signed, so it cannot create VMs" in (ent.interpreter_problem() or "")
    ent._cached_problem.cache_clear()
    codesign.set(interpreter, {"com.apple.security.virtualization": True})
    assert ent.interpreter_problem() is None


def test_no_codesign_means_unknown_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ent, "find_codesign", lambda: None)
    ent._cached_problem.cache_clear()
    assert ent.interpreter_problem(Path("/nonexistent/python")) is None
    ent._cached_problem.cache_clear()
