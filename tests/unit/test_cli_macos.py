"""``vzkit codesign`` and the entitlement check, on any OS: the Mac's tools are faked at the
process boundary (``_entitlements.run_tool``) by :class:`FakeMac`, which checks each argv
exactly and models what the real ones do to a Mach-O file: ``codesign`` signs it,
``otool`` lists its links and load commands, ``install_name_tool`` rewrites them (and so
invalidates the signature), and running it resolves its links as dyld would, from the
executable's real location. So the flow, the commands and the plist are what is tested, and a
copy whose links were not kept fails to run as it would on a Mac."""

from __future__ import annotations

import dataclasses
import json
import os
import plistlib
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from vzkit.backends.vz import _entitlements as ent
from vzkit.cli import main

CODESIGN = "/usr/bin/codesign"
OTOOL = "/usr/bin/otool"
INSTALL_NAME_TOOL = "/usr/bin/install_name_tool"
BASE_ENTITLEMENTS = {"com.apple.security.cs.disable-library-validation": True}
MAGIC = b"\xcf\xfa\xed\xfe"
#: Where dyld finds libraries that are not files (the shared cache, macOS 11 and later).
SHARED_CACHE = ("/usr/lib/", "/System/Library/")
NO_CLT = (
    b"xcrun: error: invalid active developer path (/Library/Developer/CommandLineTools), "
    b"missing xcrun at: /Library/Developer/CommandLineTools/usr/bin/xcrun\n"
)


@dataclasses.dataclass
class MachO:
    """A fake Mach-O executable. Its links, rpaths and signature are stored in the file, so
    they travel with copies and renames like the real ones. ``signature``: the entitlements
    it was signed with, ``"invalid"`` once changed after signing, ``None`` unsigned."""

    links: list[str]
    rpaths: list[str] = dataclasses.field(default_factory=list)
    weak: list[str] = dataclasses.field(default_factory=list)
    arches: list[str] = dataclasses.field(default_factory=lambda: ["arm64"])
    signature: dict[str, Any] | str | None = None

    def write(self, path: Path) -> Path:
        path.write_bytes(MAGIC + json.dumps(dataclasses.asdict(self)).encode())
        return path

    @classmethod
    def read(cls, path: Path) -> MachO | None:
        data = path.read_bytes()
        return cls(**json.loads(data[len(MAGIC) :])) if data.startswith(MAGIC) else None


def _done(argv: list[str], code: int, out: bytes = b"", err: bytes = b"") -> Any:
    return subprocess.CompletedProcess(argv, code, out, err)


class FakeMac:
    """``codesign``, ``otool``, ``install_name_tool`` and running an executable (dyld and the
    kernel's signature check), each modelled on a :class:`MachO` file."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.plists: list[bytes] = []
        self.fail_sign = False
        self.no_clt = False  # /usr/bin/otool is a shim that fails without the Command Line Tools
        self.rewrite_error: bytes | None = None
        self.watch: Path | None = None
        self.log: list[tuple[str, bool | None]] = []  # (tool, was `watch` a symlink then)
        self.timeouts: list[float] = []

    def of(self, path: Path) -> dict[str, Any] | None:
        """A file's entitlements (``None`` unsigned or invalid)."""
        binary = MachO.read(path)
        assert binary is not None
        return binary.signature if isinstance(binary.signature, dict) else None

    def set(self, path: Path, entitlements: dict[str, Any] | None) -> None:
        binary = MachO.read(path)
        assert binary is not None
        binary.signature = entitlements
        binary.write(path)

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.log]

    def __call__(
        self, argv: Sequence[str], *, timeout_s: float = 120.0
    ) -> subprocess.CompletedProcess[bytes]:
        argv = list(argv)
        self.calls.append(argv)
        self.timeouts.append(timeout_s)
        tool = {CODESIGN: self._codesign, OTOOL: self._otool}.get(argv[0])
        if argv[0] == INSTALL_NAME_TOOL:
            tool = self._install_name_tool
        elif argv[1:] == ["-c", "import sys"]:
            tool = self._run
        if tool is None:
            raise AssertionError(f"unexpected command: {argv}")
        return tool(argv)

    def _note(self, kind: str) -> None:
        self.log.append((kind, None if self.watch is None else self.watch.is_symlink()))

    def _codesign(self, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
        path = Path(argv[-1])
        if argv[:5] == [CODESIGN, "--display", "--entitlements", "-", "--xml"] and len(argv) == 6:
            self._note("codesign --display")
            found = self.of(path) if path.exists() else None
            if found is None:
                return _done(argv, 1, err=f"{path}: code object is not signed at all\n".encode())
            out = plistlib.dumps(found) if found else b""
            return _done(argv, 0, out, b"Executable=" + bytes(path))
        if argv[:5] == [CODESIGN, "--sign", "-", "--force", "--entitlements"] and len(argv) == 7:
            self._note("codesign --sign")
            plist = Path(argv[5])
            self.plists.append(plist.read_bytes())
            if self.fail_sign:
                return _done(argv, 1, err=b"the codesign tool failed")
            assert path.is_file()
            self.set(path, plistlib.loads(plist.read_bytes()))
            return _done(argv, 0, err=f"{path}: replacing existing signature".encode())
        raise AssertionError(f"unexpected codesign command: {argv}")

    def _otool(self, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
        assert len(argv) == 3, argv
        assert argv[1] in ("-L", "-l"), argv
        self._note(f"otool {argv[1]}")
        if self.no_clt:
            return _done(argv, 1, err=NO_CLT)
        path = Path(argv[2])
        binary = MachO.read(path)
        assert binary is not None, f"otool on a file that is not Mach-O: {path}"
        lines: list[str] = []
        for arch in binary.arches:
            lines.append(
                f"{path}:" if len(binary.arches) == 1 else f"{path} (architecture {arch}):"
            )
            if argv[1] == "-L":
                for link in binary.links:
                    weak = ", weak" if link in binary.weak else ""
                    lines.append(
                        f"\t{link} (compatibility version 3.12.0, current version 3.12.0{weak})"
                    )
            else:
                lines.extend(_load_commands(binary))
        return _done(argv, 0, ("\n".join(lines) + "\n").encode())

    def _install_name_tool(self, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
        self._note("install_name_tool")
        path = Path(argv[-1])
        binary = MachO.read(path)
        assert binary is not None
        if self.rewrite_error is not None:
            return _done(argv, 1, err=self.rewrite_error)
        args = argv[1:-1]
        while args:
            flag = args.pop(0)
            if flag == "-change":
                old, new = args.pop(0), args.pop(0)
                binary.links = [new if link == old else link for link in binary.links]
            elif flag == "-rpath":
                old, new = args.pop(0), args.pop(0)
                if old not in binary.rpaths:
                    err = f"error: no LC_RPATH load command with path: {old} found in: {path}"
                    return _done(argv, 1, err=err.encode())
                binary.rpaths = [new if rpath == old else rpath for rpath in binary.rpaths]
            elif flag == "-add_rpath":
                binary.rpaths.append(args.pop(0))
            else:
                raise AssertionError(f"unexpected install_name_tool option {flag}: {argv}")
        warning = b""
        if binary.signature is not None:
            binary.signature = "invalid"
            warning = b"warning: changes being made to the file will invalidate the code signature"
        binary.write(path)
        return _done(argv, 0, err=warning)

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
        """The kernel kills what is not validly signed; dyld aborts when a link is missing."""
        self._note("run")
        path = Path(argv[0])
        binary = MachO.read(path)
        assert binary is not None
        if not isinstance(binary.signature, dict):
            return _done(argv, -9)
        for link in binary.links:
            tried = dyld_paths(link, path, binary.rpaths)
            if link not in binary.weak and not any(_present(t) for t in tried):
                reason = ", ".join(f"'{t}' (no such file)" for t in tried)
                err = (
                    f"dyld[4242]: Library not loaded: {link}\n  Referenced from: "
                    f"<1A2B3C4D-0000-0000-0000-000000000000> {os.path.realpath(path)}\n"
                    f"  Reason: tried: {reason}\n"
                )
                return _done(argv, -6, err=err.encode())
        return _done(argv, 0)

    def runs(self, path: Path) -> bool:
        """Whether ``path`` (a copy, a venv's python) would start, as dyld decides it."""
        return self._run([str(path), "-c", "import sys"]).returncode == 0


def dyld_paths(link: str, executable: Path, rpaths: list[str]) -> list[str]:
    """Where dyld looks for ``link`` of ``executable``: ``@executable_path`` (and, in the main
    executable, ``@loader_path``) is the directory of its real path; ``@rpath`` each LC_RPATH.
    The strings are joined, not normalized: the file system resolves ``..``."""
    here = os.path.dirname(os.path.realpath(executable))

    def expand(path: str) -> str:
        for prefix in ("@executable_path/", "@loader_path/"):
            if path.startswith(prefix):
                return f"{here}/{path[len(prefix) :]}"
        return path

    if link.startswith("@rpath/"):
        return [f"{expand(rpath)}/{link[len('@rpath/') :]}" for rpath in rpaths]
    return [expand(link)]


def _present(path: str) -> bool:
    return path.startswith(SHARED_CACHE) or os.path.exists(path)


def _load_commands(binary: MachO) -> list[str]:
    """``otool -l`` as the real one prints it (the commands that matter, and some that do not)."""
    commands = [
        ["cmd LC_SEGMENT_64", "cmdsize 72", "segname __PAGEZERO"],
        ["cmd LC_LOAD_DYLINKER", "cmdsize 32", "name /usr/lib/dyld (offset 12)"],
    ]
    for link in binary.links:
        kind = "LC_LOAD_WEAK_DYLIB" if link in binary.weak else "LC_LOAD_DYLIB"
        commands.append(
            [
                f"cmd {kind}",
                "cmdsize 56",
                f"name {link} (offset 24)",
                "time stamp 2 Thu Jan  1 00:00:02 1970",
                "current version 3.12.0",
                "compatibility version 3.12.0",
            ]
        )
    for rpath in binary.rpaths:
        commands.append(["cmd LC_RPATH", "cmdsize 32", f"path {rpath} (offset 12)"])
    commands.append(["cmd LC_CODE_SIGNATURE", "cmdsize 16", "dataoff 34448", "datasize 19040"])
    lines = []
    for number, command in enumerate(commands):
        lines.append(f"Load command {number}")
        lines.extend(f"      {line}" for line in command)
    return lines


def use(monkeypatch: pytest.MonkeyPatch, fake: FakeMac, interpreter: Path) -> None:
    """Route the module's tools to ``fake``; ``interpreter`` is the running one."""
    monkeypatch.setattr(ent, "run_tool", fake)
    monkeypatch.setattr(ent, "find_codesign", lambda: CODESIGN)
    monkeypatch.setattr(ent, "find_tool", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(ent, "running_executable", lambda: interpreter)
    ent._cached_problem.cache_clear()


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
    """An interpreter whose links are absolute (Homebrew's, python.org's): copies run as is."""
    binary = tmp_path / "base" / "Python"
    binary.parent.mkdir()
    return MachO(links=["/usr/lib/libSystem.B.dylib"], signature=BASE_ENTITLEMENTS).write(binary)


@pytest.fixture
def codesign(monkeypatch: pytest.MonkeyPatch, interpreter: Path) -> Iterator[FakeMac]:
    fake = FakeMac()
    use(monkeypatch, fake, interpreter)
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


def test_codesign_output_signs_a_copy(codesign: FakeMac, interpreter: Path, tmp_path: Path) -> None:
    out = tmp_path / "python-vz"
    result = CliRunner().invoke(main, ["codesign", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert f"signed {out} (ad hoc) with com.apple.security.virtualization" in result.output
    copied, base = MachO.read(out), MachO.read(interpreter)
    assert copied is not None
    assert base is not None
    assert (copied.links, copied.rpaths) == (base.links, base.rpaths)  # absolute: kept as is
    assert os.stat(out).st_mode & 0o777 == 0o755
    copy = Path(next(c for c in codesign.calls if c[1] == "--sign")[-1])
    assert copy.parent == tmp_path
    assert copy.name.startswith(".python-vz.vzkit-")
    assert codesign.kinds() == [
        "codesign --display",  # the original's entitlements
        "otool -L",
        "otool -l",  # nothing to rewrite: no install_name_tool
        "codesign --sign",
        "codesign --display",  # the entitlement is there
        "run",  # the signed copy starts
    ]
    assert codesign.calls[-1] == [str(copy), "-c", "import sys"]
    assert codesign.timeouts[-1] == ent.TRIAL_TIMEOUT_S
    assert codesign.calls[0][-1] == str(interpreter)  # its entitlements are kept
    assert plistlib.loads(codesign.plists[0]) == {
        **BASE_ENTITLEMENTS,
        "com.apple.security.virtualization": True,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "python-vz"]
    assert codesign.of(interpreter) == BASE_ENTITLEMENTS  # the original is untouched
    assert codesign.of(out) == {**BASE_ENTITLEMENTS, "com.apple.security.virtualization": True}


def test_a_failed_signature_leaves_nothing(codesign: FakeMac, tmp_path: Path) -> None:
    codesign.fail_sign = True
    out = tmp_path / "python-vz"
    result = CliRunner().invoke(main, ["codesign", "--output", str(out)])
    assert result.exit_code == 1
    assert "codesign failed for" in result.output
    assert "the codesign tool failed" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_codesign_venv_replaces_the_symlinks(
    codesign: FakeMac, interpreter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
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
    assert codesign.runs(python)
    assert codesign.of(python) == {
        **BASE_ENTITLEMENTS,
        "com.apple.security.virtualization": True,
    }
    assert os.readlink(venv / "bin" / major) == "python"
    assert os.readlink(venv / "bin" / minor) == "python"
    assert f"{minor} now runs python" in result.output
    assert codesign.of(interpreter) == BASE_ENTITLEMENTS  # base untouched
    assert "'vzkit codesign --undo' puts the original python back" in result.output


@pytest.mark.parametrize("args", [[], ["--venv", "--output", "x"]])
def test_exactly_one_target(codesign: FakeMac, args: list[str]) -> None:
    result = CliRunner().invoke(main, ["codesign", *args])
    assert result.exit_code == 2
    assert "give exactly one of --output PATH or --venv" in result.output
    assert codesign.calls == []


def test_venv_outside_a_virtualenv(codesign: FakeMac, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "prefix", sys.base_prefix)
    result = CliRunner().invoke(main, ["codesign", "--venv"])
    assert result.exit_code == 2
    assert "not running in a virtualenv; use --output PATH" in result.output


def test_without_codesign(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ent, "find_codesign", lambda: None)
    result = CliRunner().invoke(main, ["codesign", "--output", str(tmp_path / "p")])
    assert result.exit_code == 1
    assert "codesign was not found; signing needs macOS" in result.output


def test_interpreter_problem_says_why(codesign: FakeMac, interpreter: Path) -> None:
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
