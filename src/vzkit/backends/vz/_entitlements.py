"""Whether this interpreter may use Virtualization.framework, and ad-hoc signing it so it may.

macOS lets a process create VMs only when its executable is signed with the
``com.apple.security.virtualization`` entitlement. Go tools sign their own binary; a Python
program must sign the interpreter that runs it. This module reads an executable's
entitlements with ``codesign --display`` and signs a copy of the running interpreter (or the
virtualenv's ``python``) ad hoc: ``codesign --sign - --force --entitlements <plist>``. The
interpreter's existing entitlements are kept.

It imports no framework: the only boundary is :func:`run_tool` (``subprocess.run``, so every
``codesign`` is waited for) and :func:`find_codesign`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import plistlib
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.parsers.expat import ExpatError

from ...errors import BackendUnavailableError, ConfigError, VzkitError

__all__ = [
    "ENTITLEMENT",
    "display_argv",
    "entitlements_plist",
    "find_codesign",
    "interpreter_problem",
    "parse_entitlements",
    "read_entitlements",
    "repoint_venv_aliases",
    "run_tool",
    "running_executable",
    "sign_argv",
    "sign_interpreter",
    "venv_python",
]

log = logging.getLogger(__name__)
ENTITLEMENT = "com.apple.security.virtualization"
_NOT_SIGNED = re.compile(rb"code object is not signed at all")
_KEY = re.compile(r"^\s*\[Key\]\s*(\S+)\s*$")
_BOOL = re.compile(r"^\s*\[Bool\]\s*(true|false)\s*$")


# -- the boundary --------------------------------------------------------------------------------


def run_tool(argv: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
    """Run a short-lived tool to completion (it is waited for and reaped)."""
    log.debug("running %s", " ".join(argv))
    return subprocess.run(list(argv), capture_output=True, check=False, timeout=120)


def find_codesign() -> str | None:
    """``codesign``'s path (macOS; part of the base system)."""
    return shutil.which("codesign")


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


# -- signing -------------------------------------------------------------------------------------


def venv_python() -> Path:
    """The running virtualenv's ``bin/python``."""
    if sys.prefix == sys.base_prefix:
        raise ConfigError(
            "this interpreter is not running in a virtualenv; use --output PATH to sign a copy"
        )
    return Path(sys.prefix) / "bin" / "python"


def sign_interpreter(output: Path, *, source: Path | None = None) -> Path:
    """Copy ``source`` (default: the running interpreter) to ``output`` and sign the copy ad
    hoc with the virtualization entitlement (its other entitlements kept). ``output`` is
    replaced atomically (a symlink there is replaced, not followed); nothing is left behind
    on failure."""
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
    existing = read_entitlements(src, codesign) or {}
    copy = target.with_name(f".{target.name}.vzkit-{os.getpid()}")
    plist = target.with_name(f".{target.name}.entitlements-{os.getpid()}.plist")
    try:
        shutil.copy2(src, copy)
        copy.chmod(0o755)
        plist.write_bytes(entitlements_plist(existing))
        done = run_tool(sign_argv(codesign, copy, plist))
        if done.returncode != 0:
            raise VzkitError(
                f"codesign failed for {str(target)!r}: "
                f"{done.stderr.decode(errors='replace').strip() or done.returncode}"
            )
        signed = read_entitlements(copy, codesign)
        if not signed or signed.get(ENTITLEMENT) is not True:
            raise VzkitError(f"codesign did not add {ENTITLEMENT} to {str(target)!r}")
        os.replace(copy, target)
    finally:
        copy.unlink(missing_ok=True)
        plist.unlink(missing_ok=True)
    _cached_problem.cache_clear()
    return target


def repoint_venv_aliases(python: Path) -> list[Path]:
    """Make ``python3``/``python3.X`` next to ``python`` relative symlinks to it (they may
    point at the base interpreter directly, bypassing the signed copy); returns those changed."""
    changed = []
    minor = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for name in (f"python{sys.version_info[0]}", minor):
        alias = python.with_name(name)
        if not alias.is_symlink() or alias.resolve() == python.resolve():
            continue
        tmp = alias.with_name(f".{name}.vzkit-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(python.name)
        os.replace(tmp, alias)
        changed.append(alias)
    return changed
