"""Whether this interpreter may use Virtualization.framework, and ad-hoc signing it so it may.

macOS lets a process create VMs only when its executable is signed with the
``com.apple.security.virtualization`` entitlement. Go tools sign their own binary; a Python
program must sign the interpreter that runs it. This module reads an executable's
entitlements with ``codesign --display`` and signs a copy of the running interpreter (or the
virtualenv's ``python``) ad hoc: ``codesign --sign - --force --entitlements <plist>``. The
interpreter's existing entitlements are kept.

A copy must still find the interpreter's libraries. python-build-standalone (uv) links
``@executable_path/../lib/libpython3.X.dylib`` and conda ``@rpath/libpython3.X.dylib`` with an
``LC_RPATH`` of ``@executable_path/../lib`` (or ``@loader_path/../lib``): from a virtualenv's
``bin`` those point at nothing and dyld aborts the copy. So the copy's links are read
(``otool -L``, ``otool -l``) and every one relative to the executable is rewritten to the
absolute path it has from the original (``install_name_tool``) before signing; the signed copy
is then run once, and only a copy that runs replaces anything.

It imports no framework: the only boundary is :func:`run_tool` (``subprocess.run``, so every
tool is waited for), :func:`find_codesign` and :func:`find_tool`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import plistlib
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from xml.parsers.expat import ExpatError

from ...errors import BackendUnavailableError, ConfigError, VzkitError

__all__ = [
    "ENTITLEMENT",
    "TRIAL_CODE",
    "TRIAL_TIMEOUT_S",
    "Link",
    "LinkRewrite",
    "display_argv",
    "entitlements_plist",
    "find_codesign",
    "find_tool",
    "interpreter_problem",
    "links_argv",
    "load_commands_argv",
    "parse_entitlements",
    "parse_links",
    "parse_rpaths",
    "plan_rewrites",
    "read_entitlements",
    "repoint_venv_aliases",
    "restore_venv_python",
    "rewrite_argv",
    "run_tool",
    "running_executable",
    "sign_argv",
    "sign_interpreter",
    "trial_argv",
    "venv_python",
]

log = logging.getLogger(__name__)
ENTITLEMENT = "com.apple.security.virtualization"
_NOT_SIGNED = re.compile(rb"code object is not signed at all")
_KEY = re.compile(r"^\s*\[Key\]\s*(\S+)\s*$")
_BOOL = re.compile(r"^\s*\[Bool\]\s*(true|false)\s*$")
#: ``otool -L``: a tab, the install name, then ``(compatibility version ..., current version
#: ...[, weak])``; the image's own lines (``path:``, ``path (architecture arm64):``) are not.
_LINK = re.compile(r"^\s+(\S.*?) \((?:compatibility|current) version [^)]*\)\s*$")
#: ``otool -l``: ``cmd LC_RPATH`` and, a line later, ``path @executable_path/../lib (offset 12)``.
_CMD = re.compile(r"^\s*cmd (\S+)\s*$")
_PATH = re.compile(r"^\s*path (.+) \(offset \d+\)\s*$")
#: The prefixes dyld expands to the directory of the main executable (``@loader_path`` is the
#: image that loads, which for the interpreter's own links is the executable).
_HERE = ("@executable_path/", "@loader_path/")
_RPATH = "@rpath/"
#: Libraries that live in the dyld shared cache, not on disk (macOS 11 and later).
_SHARED_CACHE = ("/usr/lib/", "/System/Library/")
#: What the signed copy runs once before it replaces anything, and how long it may take.
TRIAL_CODE = "import sys"
TRIAL_TIMEOUT_S = 60.0


# -- the boundary --------------------------------------------------------------------------------


def run_tool(
    argv: Sequence[str], *, timeout_s: float = 120.0
) -> subprocess.CompletedProcess[bytes]:
    """Run a short-lived tool to completion (it is waited for and reaped; killed after
    ``timeout_s``, raising :class:`subprocess.TimeoutExpired`)."""
    log.debug("running %s", " ".join(argv))
    return subprocess.run(list(argv), capture_output=True, check=False, timeout=timeout_s)


def find_codesign() -> str | None:
    """``codesign``'s path (macOS; part of the base system)."""
    return shutil.which("codesign")


def find_tool(name: str) -> str | None:
    """The path of a developer tool (``otool``, ``install_name_tool``: the Xcode Command Line
    Tools)."""
    return shutil.which(name)


def running_executable() -> Path:
    """The Mach-O image this process runs. With a framework Python ``sys.executable`` is a
    launcher that exec'd ``Python.app``, whose signature is the one that counts."""
    if sys.platform == "darwin":
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            buf = ctypes.create_string_buffer(4096)
            size = ctypes.CDLL(None).proc_pidpath(os.getpid(), buf, 4096)
            if size > 0:
                return Path(os.fsdecode(buf.raw[:size]))
    return Path(os.path.realpath(sys.executable))


# -- commands and data ---------------------------------------------------------------------------


def display_argv(codesign: str, binary: Path) -> list[str]:
    """Print ``binary``'s entitlements as an XML plist on stdout."""
    return [codesign, "--display", "--entitlements", "-", "--xml", str(binary)]


def sign_argv(codesign: str, binary: Path, plist: Path) -> list[str]:
    """Sign ``binary`` ad hoc (identity ``-``), replacing its signature, with ``plist``."""
    return [codesign, "--sign", "-", "--force", "--entitlements", str(plist), str(binary)]


def links_argv(otool: str, binary: Path) -> list[str]:
    """List the libraries ``binary`` links (its ``LC_LOAD_DYLIB`` and kin)."""
    return [otool, "-L", str(binary)]


def load_commands_argv(otool: str, binary: Path) -> list[str]:
    """Print ``binary``'s load commands (where its ``LC_RPATH`` entries are)."""
    return [otool, "-l", str(binary)]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    """A library an image links, as ``otool -L`` shows it; a weak one may be missing."""

    path: str
    weak: bool = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LinkRewrite:
    """One change of a copy's links: ``-change`` a library link, ``-rpath`` an ``LC_RPATH``."""

    flag: Literal["-change", "-rpath"]
    old: str
    new: str


def rewrite_argv(tool: str, binary: Path, rewrites: Sequence[LinkRewrite]) -> list[str]:
    """One ``install_name_tool`` run making all of ``rewrites`` in ``binary``."""
    flags = [part for r in rewrites for part in (r.flag, r.old, r.new)]
    return [tool, *flags, str(binary)]


def trial_argv(binary: Path) -> list[str]:
    """Run the interpreter ``binary`` once: dyld loads every library it links, or aborts."""
    return [str(binary), "-c", TRIAL_CODE]


def entitlements_plist(existing: Mapping[str, Any] | None = None) -> bytes:
    """An XML entitlements plist: ``existing`` plus ``com.apple.security.virtualization``."""
    merged = dict(existing or {})
    merged[ENTITLEMENT] = True
    return plistlib.dumps(merged, fmt=plistlib.FMT_XML, sort_keys=True)


def parse_entitlements(output: bytes) -> dict[str, Any]:
    """Entitlements from ``codesign --display --entitlements -`` output: an XML plist (with
    ``--xml``, or old ``codesign``), else the ``[Key] ... [Bool] true`` text form."""
    start = output.find(b"<?xml")
    if start < 0:
        start = output.find(b"<plist")
    if start >= 0:
        try:
            data = plistlib.loads(output[start:])
        except (plistlib.InvalidFileException, ValueError, ExpatError):
            data = None
        if isinstance(data, dict):
            return data
    found: dict[str, Any] = {}
    key: str | None = None
    for line in output.decode(errors="replace").splitlines():
        match = _KEY.match(line)
        if match:
            key = match[1]
            continue
        match = _BOOL.match(line)
        if match and key is not None:
            found[key] = match[1] == "true"
            key = None
    return found


def read_entitlements(binary: Path, codesign: str) -> dict[str, Any] | None:
    """``binary``'s entitlements (``{}`` when signed without any), ``None`` when unsigned."""
    done = run_tool(display_argv(codesign, binary))
    if done.returncode != 0:
        if _NOT_SIGNED.search(done.stderr):
            return None
        raise VzkitError(
            f"codesign cannot read {str(binary)!r}: "
            f"{done.stderr.decode(errors='replace').strip() or done.returncode}"
        )
    return parse_entitlements(done.stdout)


@functools.cache
def _cached_problem(executable: Path) -> str | None:
    codesign = find_codesign()
    if codesign is None:
        log.info("codesign not found: cannot tell whether %s is entitled", executable)
        return None  # unknown; the framework says so at validation if it is not
    try:
        found = read_entitlements(executable, codesign)
    except (VzkitError, OSError, subprocess.SubprocessError) as err:
        log.info("cannot read the entitlements of %s: %s", executable, err)
        return None
    if found is not None and found.get(ENTITLEMENT) is True:
        return None
    why = "is not signed" if found is None else f"lacks the {ENTITLEMENT} entitlement"
    return (
        f"this interpreter ({executable}) {why}, so it cannot create VMs; sign it with "
        "'vzkit codesign --venv' (in a virtualenv) or 'vzkit codesign --output PATH'"
    )


def interpreter_problem(executable: Path | None = None) -> str | None:
    """Why this interpreter cannot virtualize (missing entitlement), or ``None`` when it can
    or when that cannot be told (no ``codesign``). Asked once per process."""
    return _cached_problem(executable or running_executable())


# -- library links -------------------------------------------------------------------------------


def parse_links(output: bytes) -> list[Link]:
    """The libraries in ``otool -L`` output, each once (a universal binary lists them per
    architecture)."""
    found: dict[str, Link] = {}
    for line in output.decode(errors="replace").splitlines():
        match = _LINK.match(line)
        if match and match[1] not in found:
            found[match[1]] = Link(path=match[1], weak=line.rstrip().endswith(", weak)"))
    return list(found.values())


def parse_rpaths(output: bytes) -> list[str]:
    """The ``LC_RPATH`` paths in ``otool -l`` output, in order, each once."""
    found: dict[str, None] = {}
    command = None
    for line in output.decode(errors="replace").splitlines():
        match = _CMD.match(line)
        if match:
            command = match[1]
            continue
        match = _PATH.match(line)
        if match and command == "LC_RPATH":
            found[match[1]] = None
    return list(found)


def _from(path: str, directory: Path) -> str | None:
    """``path`` with ``@executable_path``/``@loader_path`` expanded for an executable in
    ``directory`` (a real path, so ``..`` may be collapsed), ``None`` when not relative."""
    for prefix in _HERE:
        if path.startswith(prefix):
            return os.path.normpath(os.path.join(directory, path[len(prefix) :]))
    return None


def _present(path: str) -> bool:
    return path.startswith(_SHARED_CACHE) or os.path.exists(path)


def _missing(original: Path, link: str, where: str) -> VzkitError:
    return VzkitError(
        f"the interpreter {original} links {link}, {where}; a copy of it could not load that "
        "library, so nothing was signed. Repair or reinstall this Python (its library "
        "directory is incomplete), or sign another one"
    )


def plan_rewrites(
    links: Sequence[Link], rpaths: Sequence[str], *, original: Path, copy_dir: Path
) -> list[LinkRewrite]:
    """What keeps a copy in ``copy_dir`` of the executable ``original`` (both real paths)
    loading the libraries the original loads: each ``LC_RPATH`` and link relative to the
    executable that points elsewhere from ``copy_dir`` becomes the absolute path it has from
    ``original``. Absolute links and ``@rpath`` links through absolute rpaths stay. A library
    that is not where the original would load it from raises :class:`VzkitError`."""
    home = original.parent
    rewrites: list[LinkRewrite] = []
    searched: list[str] = []  # the copy's rpaths once rewritten
    for rpath in dict.fromkeys(rpaths):
        there = _from(rpath, home)
        if there is not None and there != _from(rpath, copy_dir):
            rewrites.append(LinkRewrite(flag="-rpath", old=rpath, new=there))
        searched.append(there or rpath)
    for link in links:
        there = _from(link.path, home)
        if there is not None:
            if not link.weak and not _present(there):
                raise _missing(original, link.path, f"which is {there}, and that does not exist")
            if there != _from(link.path, copy_dir):
                rewrites.append(LinkRewrite(flag="-change", old=link.path, new=there))
        elif link.path.startswith(_RPATH) and not link.weak:
            name = link.path[len(_RPATH) :]
            if not any(_present(os.path.join(d, name)) for d in searched):
                where = ", ".join(searched) or "none"
                raise _missing(original, link.path, f"found in none of its rpaths ({where})")
    return rewrites


def _keep_links(copy: Path, *, original: Path, copy_dir: Path) -> str | None:
    """Rewrite ``copy``'s links (see :func:`plan_rewrites`). Returns why they could not be
    read (no ``otool``: the trial run then tells whether the copy needs them rewritten)."""
    otool = find_tool("otool")
    if otool is None:
        return "otool was not found"
    outputs = []
    for argv in (links_argv(otool, copy), load_commands_argv(otool, copy)):
        done = run_tool(argv)
        if done.returncode != 0:
            return f"otool failed: {_said(done) or done.returncode}"
        outputs.append(done.stdout)
    rewrites = plan_rewrites(
        parse_links(outputs[0]), parse_rpaths(outputs[1]), original=original, copy_dir=copy_dir
    )
    if not rewrites:
        return None
    tool = find_tool("install_name_tool")
    changes = ", ".join(f"{r.old} -> {r.new}" for r in rewrites)
    if tool is None:
        raise BackendUnavailableError(
            f"install_name_tool was not found, and the copy of {original} needs its library "
            f"links rewritten ({changes}); install the Xcode Command Line Tools "
            "('xcode-select --install') and run this again"
        )
    done = run_tool(rewrite_argv(tool, copy, rewrites))
    if done.returncode != 0:
        raise VzkitError(
            f"install_name_tool could not rewrite the library links of the copy of {original} "
            f"({changes}): {_said(done) or done.returncode}; nothing was signed. "
            f"{_elsewhere(original)}"
        )
    log.info("rewrote the links of the copy of %s: %s", original, changes)
    return None


def _said(done: subprocess.CompletedProcess[bytes]) -> str:
    return done.stderr.decode(errors="replace").strip()


def _elsewhere(original: Path) -> str:
    return (
        "A signed copy next to the interpreter needs no rewriting: 'vzkit codesign --output "
        f"{original.parent / 'python-vz'}' (run your VM scripts with it), or make the "
        "virtualenv from a Python whose links are absolute (python.org, Homebrew)"
    )


def _exit_reason(returncode: int) -> str:
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


def _trial_run(copy: Path, *, original: Path, target: Path, unread: str | None) -> None:
    """Run the signed ``copy`` once; raise :class:`VzkitError` with what it said if it fails."""
    try:
        done = run_tool(trial_argv(copy), timeout_s=TRIAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        how, said = f"it did not finish within {TRIAL_TIMEOUT_S:g} s", ""
    except OSError as err:
        how, said = f"it could not be started: {err.strerror or err}", ""
    else:
        if done.returncode == 0:
            return
        how, said = _exit_reason(done.returncode), _said(done)[-2000:]
    left = (
        f"{target} was left as it was"
        if os.path.lexists(target)
        else f"nothing was written to {target}"
    )
    if unread is not None:
        then = (
            f"Its library links could not be read ({unread}): install the Xcode Command Line "
            "Tools ('xcode-select --install'), with which they are rewritten, and run this again"
        )
    else:
        then = _elsewhere(original)
    shown = f":\n{said}\n" if said else ". "
    raise VzkitError(f"the signed copy of {original} does not run ({how}); {left}{shown}{then}")


# -- signing -------------------------------------------------------------------------------------


def venv_python() -> Path:
    """The running virtualenv's ``bin/python``."""
    if sys.prefix == sys.base_prefix:
        raise ConfigError(
            "this interpreter is not running in a virtualenv; use --output PATH to sign a copy"
        )
    return Path(sys.prefix) / "bin" / "python"


@contextlib.contextmanager
def _signed_copy(src: Path, target: Path, codesign: str) -> Iterator[Path]:
    """A signed copy of ``src`` next to ``target`` under a temporary name, its links kept and
    tried by one run; removed on the way out unless the caller renamed it."""
    original = Path(os.path.realpath(src))
    existing = read_entitlements(src, codesign) or {}
    copy = target.with_name(f".{target.name}.vzkit-{os.getpid()}")
    plist = target.with_name(f".{target.name}.entitlements-{os.getpid()}.plist")
    try:
        shutil.copy2(src, copy)
        copy.chmod(0o755)
        copy_dir = Path(os.path.realpath(target.parent))
        unread = _keep_links(copy, original=original, copy_dir=copy_dir)
        if unread is not None:
            log.info("cannot read the links of %s (%s); its trial run decides", copy, unread)
        plist.write_bytes(entitlements_plist(existing))
        done = run_tool(sign_argv(codesign, copy, plist))
        if done.returncode != 0:
            raise VzkitError(
                f"codesign failed for {str(target)!r}: {_said(done) or done.returncode}"
            )
        signed = read_entitlements(copy, codesign)
        if not signed or signed.get(ENTITLEMENT) is not True:
            raise VzkitError(f"codesign did not add {ENTITLEMENT} to {str(target)!r}")
        _trial_run(copy, original=original, target=target, unread=unread)
        yield copy
    finally:
        copy.unlink(missing_ok=True)
        plist.unlink(missing_ok=True)


def sign_interpreter(
    output: Path, *, source: Path | None = None, keep_original: bool = False
) -> Path:
    """Copy ``source`` (default: the running interpreter) to ``output`` and sign the copy ad
    hoc with the virtualization entitlement (its other entitlements kept). Library links
    relative to the executable are made absolute first, and the signed copy is run once
    before it replaces anything. ``output`` is replaced atomically (a symlink there is
    replaced, not followed); nothing is left behind on failure. With ``keep_original`` what
    was at ``output`` is kept for :func:`restore_venv_python` (an original kept by an earlier
    run stays)."""
    codesign = find_codesign()
    if codesign is None:
        raise BackendUnavailableError(
            "codesign was not found; signing needs macOS (codesign is part of the base system)"
        )
    src = source or running_executable()
    target = Path(output).expanduser().absolute()
    if not target.parent.is_dir():
        raise ConfigError(f"directory {str(target.parent)!r} does not exist")
    if target.exists() and target.is_dir():
        raise ConfigError(f"{str(target)!r} is a directory")
    with _signed_copy(src, target, codesign) as copy:
        _replace(copy, target, keep=keep_original)
    _cached_problem.cache_clear()
    return target


def _kept(entry: Path) -> Path:
    """Where the original of a virtualenv's ``entry`` is kept while a signed copy stands in."""
    return entry.with_name(f".{entry.name}.vzkit-original")


def _keep(entry: Path) -> Path | None:
    """Keep ``entry`` as it is (a symlink: one to the same target; a file: a hard link to it)
    unless an original is kept already; returns the new keep."""
    kept = _kept(entry)
    if os.path.lexists(kept) or not os.path.lexists(entry):
        return None
    tmp = entry.with_name(f".{entry.name}.vzkit-keep-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        if entry.is_symlink():
            tmp.symlink_to(os.readlink(entry))
        else:
            try:
                os.link(entry, tmp)
            except OSError:
                shutil.copy2(entry, tmp)
        os.replace(tmp, kept)
    finally:
        tmp.unlink(missing_ok=True)
    return kept


def _replace(new: Path, entry: Path, *, keep: bool) -> None:
    """``os.replace(new, entry)``, first keeping ``entry``'s original when ``keep``."""
    kept = _keep(entry) if keep else None
    try:
        os.replace(new, entry)
    except BaseException:
        if kept is not None:
            kept.unlink(missing_ok=True)
        raise


def _aliases(python: Path) -> list[Path]:
    major = f"python{sys.version_info[0]}"
    return [python.with_name(major), python.with_name(f"{major}.{sys.version_info[1]}")]


def repoint_venv_aliases(python: Path) -> list[Path]:
    """Make ``python3``/``python3.X`` next to ``python`` relative symlinks to it (they may
    point at the base interpreter directly, bypassing the signed copy), keeping their originals
    for :func:`restore_venv_python`; returns those changed."""
    changed = []
    for alias in _aliases(python):
        if not alias.is_symlink() or alias.resolve() == python.resolve():
            continue
        tmp = alias.with_name(f".{alias.name}.vzkit-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(python.name)
        try:
            _replace(tmp, alias, keep=True)
        finally:
            tmp.unlink(missing_ok=True)
        changed.append(alias)
    return changed


def restore_venv_python(python: Path) -> list[Path]:
    """Undo ``sign_interpreter(python, keep_original=True)`` and :func:`repoint_venv_aliases`:
    put back the kept originals of ``python``, ``python3`` and ``python3.X`` exactly (a
    symlink as the same symlink); returns those restored."""
    if not os.path.lexists(_kept(python)):
        raise ConfigError(
            f"nothing to undo: no original of {python} is kept (it was not signed by "
            "'vzkit codesign --venv')"
        )
    restored = []
    for entry in [*_aliases(python), python]:  # python last: its keep marks an unfinished undo
        if os.path.lexists(_kept(entry)):
            os.replace(_kept(entry), entry)
            restored.append(entry)
    _cached_problem.cache_clear()
    return restored
