"""Compile ``vzkit-agent`` (C sources in ``vzkit/agent/c/``) into a static musl binary (``zig cc``).

Zig comes from the ``ziglang`` PyPI package (``python -m ziglang``) or ``$VZKIT_ZIG`` (a zig
executable). It cross-compiles for both guest architectures from Linux and macOS hosts. Builds
are content-addressed — the file name carries a hash of the sources, the zig version, the target
and the flags — so an unchanged agent is never rebuilt, and reproducible: the same inputs give
byte-identical binaries.

A wheel ships both agents prebuilt (``hatch_build.py`` calls :func:`build_shipped_agents`):
``vzkit/agent/bin/vzkit-agent-<arch>`` and ``manifest.json`` with each one's SHA-256 and
:func:`agent_key`. :func:`agent_binary` uses a shipped agent when its key matches the sources
installed beside it and its SHA-256 checks out, so an installed vzkit never needs zig; a source
checkout (no ``bin/``) builds with zig.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.resources.abc import Traversable
from pathlib import Path

from vzkit.errors import GuestError

__all__ = [
    "AGENT_TARGETS",
    "MANIFEST_NAME",
    "SHIPPED_DIR",
    "agent_binary",
    "agent_key",
    "agent_sources",
    "build_agent",
    "build_shipped_agents",
    "shipped_agent",
    "shipped_arches",
    "zig_command",
]

AGENT_TARGETS = {"x86_64": "x86_64-linux-musl", "aarch64": "aarch64-linux-musl"}
_CFLAGS = (
    "-std=c11",
    "-D_GNU_SOURCE",
    "-Os",
    "-s",
    "-static",
    "-Wall",
    "-Wextra",
    "-fno-ident",
    "-Wl,--build-id=none",
)
_BUILD_TIMEOUT_S = 900  # the first build compiles musl (~40 s on two cores)
_ELF_MACHINES = {"x86_64": 62, "aarch64": 183}


def agent_sources() -> dict[str, bytes]:
    """The agent's C sources and headers by file name (package data of :mod:`vzkit.agent`)."""
    root = importlib.resources.files("vzkit.agent").joinpath("c")
    return {
        entry.name: entry.read_bytes()
        for entry in sorted(root.iterdir(), key=lambda e: e.name)
        if entry.name.endswith((".c", ".h"))
    }


def zig_command() -> list[str]:
    """The argv prefix that runs zig: ``$VZKIT_ZIG``, else ``python -m ziglang``."""
    override = os.environ.get("VZKIT_ZIG")
    if override:
        if shutil.which(override) is None:
            raise GuestError(f"VZKIT_ZIG={override!r} is not an executable")
        return [override]
    if importlib.util.find_spec("ziglang") is None:
        raise GuestError(
            "building the guest agent needs zig: install the ziglang package "
            "(pip install ziglang) or set VZKIT_ZIG to a zig executable"
        )
    return [sys.executable, "-m", "ziglang"]


def _zig_version(zig: list[str]) -> str:
    try:
        done = subprocess.run(
            [*zig, "version"], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise GuestError(f"cannot run zig ({' '.join(zig)}): {err}") from err
    if done.returncode != 0:
        raise GuestError(f"zig version failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def agent_key(arch: str, zig_version: str, sources: dict[str, bytes] | None = None) -> str:
    """The content hash naming a build: sources, zig version, target and flags."""
    digest = hashlib.sha256(b"vzkit-agent build 1\0")
    for part in (AGENT_TARGETS[arch], zig_version, *_CFLAGS):
        digest.update(part.encode() + b"\0")
    for name, data in sorted((sources or agent_sources()).items()):
        digest.update(f"{name}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def _check_elf(path: Path, arch: str) -> None:
    head = path.read_bytes()[:20]
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise GuestError(f"zig produced no ELF executable at {path}")
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    if machine != _ELF_MACHINES[arch]:
        raise GuestError(f"zig built ELF machine {machine} for {arch}")


def build_agent(arch: str, out_dir: Path | str, *, cache_dir: Path | str) -> Path:
    """Build (or reuse) ``vzkit-agent`` for ``arch`` in ``out_dir`` and return its path.

    ``cache_dir`` holds zig's caches. Raises GuestError when zig is missing or fails.
    """
    if arch not in AGENT_TARGETS:
        raise GuestError(f"unsupported guest architecture {arch!r} (use x86_64 or aarch64)")
    zig = zig_command()
    sources = agent_sources()
    key = agent_key(arch, _zig_version(zig), sources)
    out = Path(out_dir)
    target = out / f"vzkit-agent-{arch}-{key[:16]}"
    if target.is_file():
        return target
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir)
    env = {
        **os.environ,
        "ZIG_GLOBAL_CACHE_DIR": str(cache / "global"),
        "ZIG_LOCAL_CACHE_DIR": str(cache / "local"),
    }
    with tempfile.TemporaryDirectory(prefix=".agent-build-", dir=out) as tmp:
        work = Path(tmp)
        for name, data in sources.items():  # fixed relative paths: nothing host-specific
            (work / name).write_bytes(data)
        c_files = sorted(name for name in sources if name.endswith(".c"))
        argv = [*zig, "cc", "-target", AGENT_TARGETS[arch], *_CFLAGS, "-o", "vzkit-agent"]
        try:
            done = subprocess.run(
                [*argv, *c_files],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=_BUILD_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            raise GuestError(f"building vzkit-agent for {arch} failed: {err}") from err
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-20:])
            raise GuestError(f"building vzkit-agent for {arch} failed:\n{tail}")
        built = work / "vzkit-agent"
        _check_elf(built, arch)
        built.chmod(0o755)
        os.replace(built, target)
    return target


#: Where a wheel's prebuilt agents live, inside the :mod:`vzkit.agent` package.
SHIPPED_DIR = "bin"
MANIFEST_NAME = "manifest.json"
_MANIFEST_FORMAT = 1
_REINSTALL = "reinstall vzkit (pip install --force-reinstall vzkit)"


def shipped_name(arch: str) -> str:
    """The file name of ``arch``'s prebuilt agent in :data:`SHIPPED_DIR`."""
    return f"vzkit-agent-{arch}"


def build_shipped_agents(out_dir: Path | str, *, cache_dir: Path | str) -> list[Path]:
    """Build the agent for every target into ``out_dir`` as a wheel ships them.

    Writes ``vzkit-agent-<arch>`` per target and ``manifest.json`` (the zig version and, per
    arch, the file, its size, SHA-256 and :func:`agent_key`); returns those paths. The output
    depends only on the sources, the zig version and the flags. ``cache_dir`` holds zig's
    caches (they never change the output). Raises GuestError when zig is missing or fails.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = agent_sources()
    zig_version = _zig_version(zig_command())
    agents: dict[str, dict[str, object]] = {}
    written = []
    with tempfile.TemporaryDirectory(prefix=".shipped-", dir=out) as tmp:
        for arch in AGENT_TARGETS:
            built = build_agent(arch, tmp, cache_dir=cache_dir)
            data = built.read_bytes()
            target = out / shipped_name(arch)
            os.replace(built, target)
            agents[arch] = {
                "file": target.name,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "key": agent_key(arch, zig_version, sources),
            }
            written.append(target)
    manifest = {"format": _MANIFEST_FORMAT, "zig_version": zig_version, "agents": agents}
    path = out / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return [*written, path]


def _shipped_dir() -> Traversable:
    return importlib.resources.files("vzkit.agent").joinpath(SHIPPED_DIR)


def _manifest() -> dict[str, object] | None:
    """The shipped manifest, or None when nothing is shipped (a source checkout)."""
    path = _shipped_dir().joinpath(MANIFEST_NAME)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise GuestError(f"the shipped agent manifest is unreadable ({err}): {_REINSTALL}") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("agents"), dict):
        raise GuestError(f"the shipped agent manifest is malformed: {_REINSTALL}")
    if manifest.get("format") != _MANIFEST_FORMAT:
        return None  # written by another vzkit: not ours to trust; build instead
    return manifest


def _matching_entry(arch: str, manifest: dict[str, object]) -> dict[str, object] | None:
    """``arch``'s manifest entry when it was built from exactly the installed sources."""
    agents = manifest["agents"]
    assert isinstance(agents, dict)
    entry = agents.get(arch)
    zig_version = manifest.get("zig_version")
    if not isinstance(entry, dict) or not isinstance(zig_version, str):
        return None
    if entry.get("key") != agent_key(arch, zig_version):
        return None  # the sources (or flags) changed since the wheel was built
    return entry


def shipped_arches() -> list[str]:
    """The architectures whose shipped agent matches the installed sources (no file check)."""
    manifest = _manifest()
    if manifest is None:
        return []
    return [arch for arch in AGENT_TARGETS if _matching_entry(arch, manifest) is not None]


def shipped_agent(arch: str, out_dir: Path | str) -> Path | None:
    """``arch``'s prebuilt agent, verified and copied into ``out_dir``; None when vzkit ships
    none for the installed sources (a source checkout, or sources changed since the build).

    The copy is named like :func:`build_agent`'s output for the same key. Raises GuestError
    when the shipped file does not match its recorded SHA-256.
    """
    manifest = _manifest()
    entry = _matching_entry(arch, manifest) if manifest is not None else None
    if entry is None:
        return None
    name, sha256 = entry.get("file"), entry.get("sha256")
    if not (isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")):
        raise GuestError(f"the shipped agent manifest names {name!r}: {_REINSTALL}")
    try:
        data = _shipped_dir().joinpath(name).read_bytes()
    except OSError as err:
        raise GuestError(f"the shipped agent for {arch} is missing ({err}): {_REINSTALL}") from err
    if hashlib.sha256(data).hexdigest() != sha256:
        raise GuestError(f"the shipped agent for {arch} fails its SHA-256 check: {_REINSTALL}")
    out = Path(out_dir)
    target = out / f"vzkit-agent-{arch}-{str(entry['key'])[:16]}"
    if target.is_file() and target.read_bytes() == data:
        return target
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".agent-", dir=out)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)  # the bytes just verified, not a second read of the file
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def agent_binary(arch: str, cache_dir: Path | str) -> Path:
    """The agent for ``arch``: the shipped one when it matches the sources, else built with
    zig (``cache_dir/agent``, zig's caches in ``cache_dir/zig``)."""
    if arch not in AGENT_TARGETS:
        raise GuestError(f"unsupported guest architecture {arch!r} (use x86_64 or aarch64)")
    cache = Path(cache_dir)
    shipped = shipped_agent(arch, cache / "agent")
    if shipped is not None:
        return shipped
    return build_agent(arch, cache / "agent", cache_dir=cache / "zig")
