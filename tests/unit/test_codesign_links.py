"""``vzkit codesign`` keeps the interpreter's library links, runs the signed copy before it
replaces anything, and ``--undo`` puts the virtualenv back (issue 19).

The Mac's tools are :class:`~tests.unit.test_cli_macos.FakeMac`: a copied interpreter runs
only when dyld, resolving its links from the copy's real location, finds every library, and
only when it was signed after its links were last changed. Three interpreters are modelled:

* uv's (python-build-standalone): ``@executable_path/../lib/libpython3.12.dylib``;
* conda's: ``@rpath/libpython3.12.dylib`` with an ``LC_RPATH`` of ``@executable_path/../lib``
  (or ``@loader_path/../lib``);
* python.org's framework build: absolute links, nothing to rewrite.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from vzkit.backends.vz import _entitlements as ent
from vzkit.cli import main

from .test_cli_macos import FakeMac, MachO, use

LIBSYSTEM = "/usr/lib/libSystem.B.dylib"
MAJOR = f"python{sys.version_info[0]}"
MINOR = f"python{sys.version_info[0]}.{sys.version_info[1]}"
ENTITLED = {"com.apple.security.virtualization": True}


@dataclasses.dataclass(frozen=True)
class Python:
    """An installed interpreter: its executable, its library, and what a copy elsewhere
    needs rewritten (``install_name_tool`` flags)."""

    executable: Path
    library: Path
    rewrites: list[str]


def uv_python(root: Path) -> Python:
    home = root / "uv" / "python" / "cpython-3.12.8-macos-aarch64-none"
    (home / "bin").mkdir(parents=True)
    (home / "lib").mkdir()
    library = home / "lib" / "libpython3.12.dylib"
    library.write_bytes(b"a dylib")
    link = "@executable_path/../lib/libpython3.12.dylib"
    exe = MachO(links=[link, LIBSYSTEM], signature={}).write(home / "bin" / "python3.12")
    return Python(exe, library, ["-change", link, str(library)])


def conda_python(root: Path, rpath: str = "@executable_path/../lib") -> Python:
    home = root / "miniconda3"
    (home / "bin").mkdir(parents=True)
    (home / "lib").mkdir()
    library = home / "lib" / "libpython3.12.dylib"
    library.write_bytes(b"a dylib")
    binary = MachO(links=["@rpath/libpython3.12.dylib", LIBSYSTEM], rpaths=[rpath], signature={})
    exe = binary.write(home / "bin" / "python3.12")
    return Python(exe, library, ["-rpath", rpath, str(home / "lib")])


def framework_python(root: Path) -> Python:
    versions = root / "Library" / "Frameworks" / "Python.framework" / "Versions" / "3.12"
    macos = versions / "Resources" / "Python.app" / "Contents" / "MacOS"
    macos.mkdir(parents=True)
    library = versions / "Python"
    library.write_bytes(b"a framework")
    exe = MachO(links=[str(library), LIBSYSTEM], signature={}).write(macos / "Python")
    return Python(exe, library, [])


FLAVOURS: dict[str, Callable[[Path], Python]] = {
    "uv": uv_python,
    "conda": conda_python,
    "conda-loader-path": lambda root: conda_python(root, "@loader_path/../lib"),
    "python.org": framework_python,
}


@pytest.fixture(autouse=True)
def on_macos(monkeypatch: pytest.MonkeyPatch) -> None:
    from vzkit.cli import _macos

    monkeypatch.setattr(_macos, "_MACOS", True)


@pytest.fixture
def fake() -> Iterator[FakeMac]:
    yield FakeMac()
    ent._cached_problem.cache_clear()


def make_venv(
    root: Path, python: Python, monkeypatch: pytest.MonkeyPatch, fake: FakeMac, *, copies: bool
) -> Path:
    """A virtualenv of ``python`` (``python`` a symlink to it, or a copy with ``copies``),
    with ``python3`` -> ``python`` and ``python3.X`` straight to the base (as uv makes them),
    running as this process."""
    bindir = root / "venv" / "bin"
    bindir.mkdir(parents=True)
    (root / "venv" / "pyvenv.cfg").write_text(f"home = {python.executable.parent}\n")
    venv_python = bindir / "python"
    if copies:
        shutil.copy2(python.executable, venv_python)
    else:
        venv_python.symlink_to(python.executable)
    (bindir / MAJOR).symlink_to("python")
    (bindir / MINOR).symlink_to(python.executable)
    monkeypatch.setattr(sys, "prefix", str(root / "venv"))
    running = venv_python if copies else python.executable
    use(monkeypatch, fake, Path(os.path.realpath(running)))
    fake.watch = venv_python
    return venv_python


def snapshot(directory: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry of ``directory`` as it is: a symlink's target, a file's bytes, mode, inode."""
    found: dict[str, tuple[Any, ...]] = {}
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink():
            found[entry.name] = ("symlink", os.readlink(entry))
        else:
            st = entry.lstat()
            found[entry.name] = ("file", entry.read_bytes(), st.st_mode, st.st_ino)
    return found


def codesign(*args: str) -> Result:
    return CliRunner().invoke(main, ["codesign", *args])


# -- the pieces ----------------------------------------------------------------------------------


def test_argvs() -> None:
    copy = Path("/v/bin/.python.vzkit-7")
    assert ent.links_argv("/usr/bin/otool", copy) == ["/usr/bin/otool", "-L", str(copy)]
    assert ent.load_commands_argv("/usr/bin/otool", copy) == ["/usr/bin/otool", "-l", str(copy)]
    rewrites = [
        ent.LinkRewrite(flag="-rpath", old="@executable_path/../lib", new="/c/lib"),
        ent.LinkRewrite(flag="-change", old="@executable_path/../lib/l.dylib", new="/u/l.dylib"),
    ]
    assert ent.rewrite_argv("/usr/bin/install_name_tool", copy, rewrites) == [
        "/usr/bin/install_name_tool",
        "-rpath",
        "@executable_path/../lib",
        "/c/lib",
        "-change",
        "@executable_path/../lib/l.dylib",
        "/u/l.dylib",
        str(copy),
    ]
    assert ent.trial_argv(copy) == [str(copy), "-c", "import sys"]


OTOOL_L_UNIVERSAL = b"""\
/x/bin/python3.12 (architecture x86_64):
\t@executable_path/../lib/libpython3.12.dylib (compatibility version 3.12.0, current version 3.12.0)
\t/System/Library/Frameworks/CoreFoundation.framework/Versions/A/CoreFoundation \
(compatibility version 150.0.0, current version 1971.0.0, weak)
\t/usr/lib/libSystem.B.dylib (compatibility version 1.0.0, current version 1336.0.0)
/x/bin/python3.12 (architecture arm64):
\t@executable_path/../lib/libpython3.12.dylib (compatibility version 3.12.0, current version 3.12.0)
\t/System/Library/Frameworks/CoreFoundation.framework/Versions/A/CoreFoundation \
(compatibility version 150.0.0, current version 1971.0.0, weak)
\t/usr/lib/libSystem.B.dylib (compatibility version 1.0.0, current version 1336.0.0)
"""

OTOOL_l = b"""\
/x/bin/python3.12:
Load command 7
          cmd LC_LOAD_DYLINKER
      cmdsize 32
         name /usr/lib/dyld (offset 12)
Load command 12
          cmd LC_LOAD_DYLIB
      cmdsize 56
         name @rpath/libpython3.12.dylib (offset 24)
   time stamp 2 Thu Jan  1 00:00:02 1970
      current version 3.12.0
compatibility version 3.12.0
Load command 14
          cmd LC_RPATH
      cmdsize 32
         path @loader_path/../lib (offset 12)
Load command 15
          cmd LC_RPATH
      cmdsize 48
         path /opt/with space/lib (offset 12)
Load command 16
      cmd LC_FUNCTION_STARTS
  cmdsize 16
  dataoff 34400
 datasize 48
"""


def test_parse_links_and_rpaths() -> None:
    assert ent.parse_links(OTOOL_L_UNIVERSAL) == [
        ent.Link(path="@executable_path/../lib/libpython3.12.dylib"),
        ent.Link(
            path="/System/Library/Frameworks/CoreFoundation.framework/Versions/A/CoreFoundation",
            weak=True,
        ),
        ent.Link(path="/usr/lib/libSystem.B.dylib"),
    ]
    assert ent.parse_rpaths(OTOOL_l) == ["@loader_path/../lib", "/opt/with space/lib"]
    assert ent.parse_links(b"") == []
    assert ent.parse_rpaths(b"") == []


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_plan_rewrites_makes_relative_links_absolute(flavour: str, tmp_path: Path) -> None:
    python = FLAVOURS[flavour](tmp_path)
    binary = MachO.read(python.executable)
    assert binary is not None
    links = [ent.Link(path=link) for link in binary.links]
    venv_bin = tmp_path / "venv" / "bin"
    plan = ent.plan_rewrites(links, binary.rpaths, original=python.executable, copy_dir=venv_bin)
    assert [part for r in plan for part in (r.flag, r.old, r.new)] == python.rewrites
    # a copy next to the original needs nothing rewritten
    home = python.executable.parent
    assert ent.plan_rewrites(links, binary.rpaths, original=python.executable, copy_dir=home) == []


def test_plan_rewrites_names_a_library_that_is_not_there(tmp_path: Path) -> None:
    uv = uv_python(tmp_path / "a")
    uv.library.unlink()
    link = ent.Link(path="@executable_path/../lib/libpython3.12.dylib")
    with pytest.raises(ent.VzkitError) as info:
        ent.plan_rewrites([link], [], original=uv.executable, copy_dir=tmp_path)
    assert str(info.value) == (
        f"the interpreter {uv.executable} links @executable_path/../lib/libpython3.12.dylib, "
        f"which is {uv.library}, and that does not exist; a copy of it could not load that "
        "library, so nothing was signed. Repair or reinstall this Python (its library "
        "directory is incomplete), or sign another one"
    )
    conda = conda_python(tmp_path / "b")
    conda.library.unlink()
    link = ent.Link(path="@rpath/libpython3.12.dylib")
    with pytest.raises(
        ent.VzkitError, match=r"found in none of its rpaths \(/.*/b/miniconda3/lib\)"
    ):
        ent.plan_rewrites(
            [link], ["@executable_path/../lib"], original=conda.executable, copy_dir=tmp_path
        )
    # a weak link may be missing, as it may for the original
    weak = ent.Link(path="@rpath/libpython3.12.dylib", weak=True)
    assert ent.plan_rewrites(
        [weak], ["@executable_path/../lib"], original=conda.executable, copy_dir=tmp_path
    ) == [
        ent.LinkRewrite(flag="-rpath", old="@executable_path/../lib", new=str(conda.library.parent))
    ]


def test_the_model_aborts_a_plain_copy_as_dyld_would(tmp_path: Path) -> None:
    """What makes the tests below mean something: a copy of uv's or conda's interpreter into
    a virtualenv does not start unless its links are rewritten and it is signed after that."""
    fake = FakeMac()
    for name, make in FLAVOURS.items():
        python = make(tmp_path / name)
        assert fake.runs(python.executable), name
        copy = tmp_path / name / "copy"
        copy.mkdir()
        shutil.copy2(python.executable, copy / "python")
        assert fake.runs(copy / "python") == (python.rewrites == []), name
        tool = "/usr/bin/install_name_tool"
        if python.rewrites:
            fake([tool, *python.rewrites, str(copy / "python")])
            assert not fake.runs(copy / "python"), "changed after signing: killed"
            fake.set(copy / "python", ENTITLED)
            assert fake.runs(copy / "python"), name
    uv = uv_python(tmp_path / "plain")
    shutil.copy2(uv.executable, tmp_path / "python")
    aborted = fake([str(tmp_path / "python"), "-c", "import sys"])
    assert aborted.returncode == -6
    assert aborted.stderr.startswith(
        b"dyld[4242]: Library not loaded: @executable_path/../lib/libpython3.12.dylib\n"
    )


# -- vzkit codesign --venv -----------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_venv_signing_keeps_the_links_and_runs_the_copy_first(
    flavour: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeMac
) -> None:
    python = FLAVOURS[flavour](tmp_path)
    before = MachO.read(python.executable)
    venv_python = make_venv(tmp_path, python, monkeypatch, fake, copies=False)
    result = codesign("--venv")
    assert result.exit_code == 0, result.output
    rewrite = ["install_name_tool"] if python.rewrites else []
    assert fake.kinds() == [
        "codesign --display",
        "otool -L",
        "otool -l",
        *rewrite,  # before signing: install_name_tool invalidates a signature
        "codesign --sign",
        "codesign --display",
        "run",
    ]
    copy = fake.calls[1][-1]
    assert Path(copy).parent == venv_python.parent
    assert Path(copy).name.startswith(".python.vzkit-")
    if python.rewrites:
        assert fake.calls[3] == ["/usr/bin/install_name_tool", *python.rewrites, copy]
    assert fake.calls[-1] == [copy, "-c", "import sys"]
    assert fake.log[-1] == ("run", True)  # venv/bin/python was still the original symlink
    # the venv's python is the signed copy, and it starts
    assert not venv_python.is_symlink()
    assert fake.of(venv_python) == ENTITLED
    assert fake.runs(venv_python)
    signed = MachO.read(venv_python)
    assert signed is not None
    assert all(link.startswith(("/", "@rpath/")) for link in signed.links)
    assert all(rpath.startswith("/") for rpath in signed.rpaths)
    assert os.readlink(venv_python.with_name(MINOR)) == "python"
    # the original is kept for --undo, the base untouched
    assert os.readlink(venv_python.with_name(".python.vzkit-original")) == str(python.executable)
    assert MachO.read(python.executable) == before
    assert sorted(p.name for p in venv_python.parent.iterdir()) == sorted(
        [".python.vzkit-original", f".{MINOR}.vzkit-original", "python", MAJOR, MINOR]
    )


def _skip_rewrites(monkeypatch: pytest.MonkeyPatch, fake: FakeMac) -> None:
    """Sign the copy as vzkit did before issue 19: no links rewritten."""
    monkeypatch.setattr(ent, "plan_rewrites", lambda *args, **kwargs: [])


def _no_command_line_tools(monkeypatch: pytest.MonkeyPatch, fake: FakeMac) -> None:
    fake.no_clt = True


@pytest.mark.parametrize(
    ("flavour", "setup", "then"),
    [
        ("uv", _no_command_line_tools, "install the Xcode Command Line Tools"),
        ("conda", _no_command_line_tools, "('xcode-select --install')"),
        ("uv", _skip_rewrites, "A signed copy next to the interpreter needs no rewriting"),
        ("conda", _skip_rewrites, "make the virtualenv from a Python whose links are absolute"),
    ],
)
def test_a_copy_that_does_not_start_leaves_the_venv_as_it_was(
    flavour: str,
    setup: Callable[[pytest.MonkeyPatch, FakeMac], None],
    then: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake: FakeMac,
) -> None:
    python = FLAVOURS[flavour](tmp_path)
    venv_python = make_venv(tmp_path, python, monkeypatch, fake, copies=False)
    before = snapshot(venv_python.parent)
    setup(monkeypatch, fake)
    result = codesign("--venv")
    assert result.exit_code == 1
    assert "install_name_tool" not in fake.kinds()
    assert fake.kinds()[-1] == "run"
    assert snapshot(venv_python.parent) == before  # byte for byte, no temporary file left
    message = result.stderr
    assert message.startswith(
        f"vzkit: error: the signed copy of {python.executable} does not run (killed by "
        f"SIGABRT); {venv_python} was left as it was:\ndyld[4242]: Library not loaded: "
    )
    assert "Reason: tried: " in message
    assert then in message
    if setup is _no_command_line_tools:
        assert "invalid active developer path" in message
    else:
        assert f"'vzkit codesign --output {python.executable.parent}/python-vz'" in message


def test_a_missing_library_is_named_and_nothing_is_signed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeMac
) -> None:
    python = uv_python(tmp_path)
    venv_python = make_venv(tmp_path, python, monkeypatch, fake, copies=False)
    python.library.unlink()
    before = snapshot(venv_python.parent)
    result = codesign("--venv")
    assert result.exit_code == 1
    assert f"links @executable_path/../lib/libpython3.12.dylib, which is {python.library}" in (
        result.stderr
    )
    assert "Repair or reinstall this Python" in result.stderr
    assert fake.kinds() == ["codesign --display", "otool -L", "otool -l"]
    assert snapshot(venv_python.parent) == before


def test_a_rewrite_that_fails_leaves_the_venv_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeMac
) -> None:
    python = conda_python(tmp_path)
    venv_python = make_venv(tmp_path, python, monkeypatch, fake, copies=False)
    before = snapshot(venv_python.parent)
    fake.rewrite_error = (
        b"error: install_name_tool: changing install names or rpaths can't be redone for: "
        b"python (for architecture arm64) because larger updated load commands do not fit"
    )
    result = codesign("--venv")
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"vzkit: error: install_name_tool could not rewrite the library links of the copy of "
        f"{python.executable} (@executable_path/../lib -> {python.library.parent}): "
        "error: install_name_tool: changing install names"
    )
    assert "nothing was signed" in result.stderr
    assert f"'vzkit codesign --output {python.executable.parent}/python-vz'" in result.stderr
    assert "codesign --sign" not in fake.kinds()
    assert snapshot(venv_python.parent) == before


def test_a_copy_that_hangs_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeMac
) -> None:
    python = uv_python(tmp_path)
    venv_python = make_venv(tmp_path, python, monkeypatch, fake, copies=False)
    before = snapshot(venv_python.parent)

    def hangs(argv: Sequence[str], *, timeout_s: float = 120.0) -> Any:
        if list(argv[1:]) == ["-c", "import sys"]:
            raise subprocess.TimeoutExpired(list(argv), timeout_s)
        return fake(argv, timeout_s=timeout_s)

    monkeypatch.setattr(ent, "run_tool", hangs)
    result = codesign("--venv")
    assert result.exit_code == 1
    assert "does not run (it did not finish within 60 s)" in result.stderr
    assert snapshot(venv_python.parent) == before


def test_output_names_what_was_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeMac
) -> None:
    python = uv_python(tmp_path)
    use(monkeypatch, fake, python.executable)
    fake.no_clt = True
    out = tmp_path / "elsewhere" / "python-vz"
    out.parent.mkdir()
    result = codesign("--output", str(out))
    assert result.exit_code == 1
    assert f"(killed by SIGABRT); nothing was written to {out}:" in result.stderr
    assert list(out.parent.iterdir()) == []


# -- vzkit codesign --undo -----------------------------------------------------------------------


@pytest.mark.parametrize("copies", [False, True], ids=["symlink", "copies"])
@pytest.mark.parametrize("args", [["--undo"], ["--venv", "--undo"]])
def test_undo_puts_the_venv_back_exactly(
    copies: bool,
    args: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake: FakeMac,
) -> None:
    python = framework_python(tmp_path) if copies else uv_python(tmp_path)
    venv_python = make_venv(tmp_path, python, monkeypatch, fake, copies=copies)
    before = snapshot(venv_python.parent)
    assert codesign("--venv").exit_code == 0
    assert fake.of(venv_python) == ENTITLED
    assert codesign("--venv").exit_code == 0  # twice: the first original stays kept
    result = codesign(*args)
    assert result.exit_code == 0, result.output
    assert snapshot(venv_python.parent) == before
    restored = [venv_python.with_name(MINOR), venv_python]
    assert result.output == "".join(f"restored {p}\n" for p in restored) + (
        "this virtualenv's python is the original again\n"
    )


def test_undo_with_nothing_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeMac
) -> None:
    venv_python = make_venv(tmp_path, uv_python(tmp_path), monkeypatch, fake, copies=False)
    before = snapshot(venv_python.parent)
    result = codesign("--undo")
    assert result.exit_code == 2
    assert result.stderr == (
        f"vzkit: error: nothing to undo: no original of {venv_python} is kept (it was not "
        "signed by 'vzkit codesign --venv')\n"
    )
    assert snapshot(venv_python.parent) == before
    assert fake.calls == []


def test_undo_is_for_a_venv(tmp_path: Path, fake: FakeMac) -> None:
    result = codesign("--undo", "--output", str(tmp_path / "python-vz"))
    assert result.exit_code == 2
    assert "--undo puts back a virtualenv's python; a copy made with --output is a plain" in (
        result.output
    )
    assert fake.calls == []
