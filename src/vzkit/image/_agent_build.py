"""Compile ``vzkit-agent`` (C sources in ``vzkit/agent/c/``) into a static musl binary (``zig cc``).

Zig comes from the ``ziglang`` PyPI package (``python -m ziglang``) or ``$VZKIT_ZIG`` (a zig
executable). It cross-compiles for both guest architectures from Linux and macOS hosts. Builds
are content-addressed — the file name carries a hash of the sources, the zig version, the target
and the flags — so an unchanged agent is never rebuilt, and reproducible: the same inputs give
byte-identical binaries.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vzkit.errors import GuestError

__all__ = ["AGENT_TARGETS", "agent_key", "agent_sources", "build_agent", "zig_command"]

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
