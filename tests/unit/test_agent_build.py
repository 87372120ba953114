"""Building vzkit-agent with zig: static ELF for both arches, content-addressed, reproducible."""

from __future__ import annotations

import importlib.util
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vzkit.backends.qemu._discover import user_cache_dir
from vzkit.errors import GuestError
from vzkit.image import _agent_build
from vzkit.image._agent_build import agent_key, agent_sources, build_agent, zig_command

PT_DYNAMIC, PT_INTERP = 2, 3


def _build(arch: str, out: Path | None = None, cache: Path | None = None) -> Path:
    zig_command()  # ziglang is a dependency: a missing zig fails the test, never skips it
    root = user_cache_dir()
    return build_agent(arch, out or root / "agent-build", cache_dir=cache or root / "zig")


def elf_summary(data: bytes) -> tuple[int, set[int]]:
    """``(e_machine, program header types)`` of a 64-bit little-endian ELF."""
    assert data[:4] == b"\x7fELF"
    assert (data[4], data[5]) == (2, 1), "64-bit little-endian"
    (machine,) = struct.unpack_from("<H", data, 18)
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    types = {struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)}
    return machine, types


@pytest.fixture(scope="session")
def x86_agent() -> Path:
    return _build("x86_64")


def test_x86_64_agent_is_a_small_static_elf_that_runs(x86_agent: Path) -> None:
    machine, types = elf_summary(x86_agent.read_bytes())
    assert machine == 62
    assert not types & {PT_DYNAMIC, PT_INTERP}, "statically linked, no interpreter"
    assert x86_agent.stat().st_size < 200_000
    done = subprocess.run([x86_agent, "--version"], capture_output=True, check=True)
    assert done.stdout == b"vzkit-agent 0.1.0 (protocol 2.0)\n"


def test_aarch64_agent_is_a_static_aarch64_elf() -> None:
    agent = _build("aarch64")
    machine, types = elf_summary(agent.read_bytes())
    assert machine == 183
    assert not types & {PT_DYNAMIC, PT_INTERP}
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if qemu:
        done = subprocess.run([qemu, agent, "--version"], capture_output=True, check=True)
        assert done.stdout.startswith(b"vzkit-agent ")


def test_build_is_content_addressed(x86_agent: Path) -> None:
    again = _build("x86_64")
    assert again == x86_agent
    assert again.stat().st_mtime_ns == x86_agent.stat().st_mtime_ns, "not rebuilt"
    assert x86_agent.name.startswith("vzkit-agent-x86_64-")
    sources = agent_sources()
    assert set(sources) >= {"agent.h", "main.c", "serve.c", "chan.c", "relay.c"}
    key = agent_key("x86_64", "0.17.1", sources)
    assert key != agent_key("aarch64", "0.17.1", sources)
    assert key != agent_key("x86_64", "0.17.2", sources)
    assert key != agent_key("x86_64", "0.17.1", {**sources, "main.c": b"changed"})


def test_two_builds_are_byte_identical(x86_agent: Path, tmp_path: Path) -> None:
    # A fresh local zig cache recompiles and relinks the agent; the global cache keeps the
    # already-built musl, so this takes about a second.
    cache = tmp_path / "zig"
    cache.mkdir()
    (cache / "global").symlink_to(user_cache_dir() / "zig" / "global")
    rebuilt = _build("x86_64", tmp_path / "out", cache)
    assert (cache / "local").is_dir(), "really compiled"
    assert rebuilt.read_bytes() == x86_agent.read_bytes()


def test_compile_errors_are_reported(
    x86_agent: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_agent_build, "agent_sources", lambda: {"main.c": b"int main(void)"})
    with pytest.raises(GuestError, match="building vzkit-agent for x86_64 failed:\n"):
        build_agent("x86_64", tmp_path, cache_dir=user_cache_dir() / "zig")
    assert [p.name for p in tmp_path.iterdir()] == [], "no half-built files left"


def test_missing_zig_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VZKIT_ZIG", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ziglang" else real(name)
    )
    with pytest.raises(GuestError, match=r"needs zig: install the ziglang package"):
        build_agent("x86_64", tmp_path, cache_dir=tmp_path)
    monkeypatch.setenv("VZKIT_ZIG", str(tmp_path / "no-zig"))
    with pytest.raises(GuestError, match=r"VZKIT_ZIG=.* is not an executable"):
        build_agent("x86_64", tmp_path, cache_dir=tmp_path)


def test_unknown_arch(tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="unsupported guest architecture 'riscv64'"):
        build_agent("riscv64", tmp_path, cache_dir=tmp_path)
