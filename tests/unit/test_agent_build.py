"""Building vzkit-agent with zig: static ELF for both arches, content-addressed, reproducible."""

from __future__ import annotations

import hashlib
import importlib.util
import json
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
    zig_command()  # ziglang is a dev dependency: a missing zig fails the test, never skips it
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
    assert done.stdout == b"vzkit-agent 0.1.0 (protocol 2.3)\n"


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


# --- the agents a wheel ships (vzkit/agent/bin/, see hatch_build.py) ---------------------------


@pytest.fixture(scope="session")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both agents and the manifest, built as the wheel's build hook builds them."""
    out = tmp_path_factory.mktemp("shipped")
    _agent_build.build_shipped_agents(out, cache_dir=user_cache_dir() / "zig")
    return out


def _no_zig(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Any attempt to find zig now fails (as on a machine without it)."""
    monkeypatch.setenv("VZKIT_ZIG", str(tmp_path / "no-zig"))


def _ship(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    monkeypatch.setattr(_agent_build, "_shipped_dir", lambda: directory)


def test_shipped_agents_are_the_local_builds_with_their_hashes_and_keys(shipped: Path) -> None:
    manifest = json.loads((shipped / "manifest.json").read_text())
    assert sorted(p.name for p in shipped.iterdir()) == [
        "manifest.json", "vzkit-agent-aarch64", "vzkit-agent-x86_64",
    ]  # fmt: skip
    zig_version = manifest["zig_version"]
    for arch, machine in (("x86_64", 62), ("aarch64", 183)):
        entry = manifest["agents"][arch]
        data = (shipped / entry["file"]).read_bytes()
        assert elf_summary(data)[0] == machine
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["size"] == len(data)
        assert entry["key"] == agent_key(arch, zig_version)
        # the prebuilt agent and a local build from the same sources are the same bytes, so
        # the image key (which hashes the agent) is the same either way
        assert data == _build(arch).read_bytes()


def test_a_shipped_agent_is_used_without_zig(
    shipped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local_name = _build("x86_64").name
    _ship(monkeypatch, shipped)
    _no_zig(monkeypatch, tmp_path)
    agent = _agent_build.agent_binary("x86_64", tmp_path / "cache")
    assert agent.read_bytes() == (shipped / "vzkit-agent-x86_64").read_bytes()
    assert agent.stat().st_mode & 0o777 == 0o755
    assert agent.name == local_name  # named as a local build of the same key
    assert agent.parent == tmp_path / "cache" / "agent"
    assert not (tmp_path / "cache" / "zig").exists()
    mtime = agent.stat().st_mtime_ns
    assert _agent_build.agent_binary("x86_64", tmp_path / "cache") == agent
    assert agent.stat().st_mtime_ns == mtime, "an identical copy is not rewritten"
    assert _agent_build.shipped_arches() == ["x86_64", "aarch64"]


def _fake_shipped(directory: Path, data: bytes, **entry: object) -> Path:
    directory.mkdir()
    (directory / "vzkit-agent-x86_64").write_bytes(data)
    record = {
        "file": "vzkit-agent-x86_64",
        "sha256": hashlib.sha256(data).hexdigest(),
        "key": agent_key("x86_64", "0.17.1"),
        **entry,
    }
    manifest = {"format": 1, "zig_version": "0.17.1", "agents": {"x86_64": record}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_a_shipped_agent_that_fails_its_hash_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = _fake_shipped(tmp_path / "bin", b"\x7fELF agent")
    (bin_dir / "vzkit-agent-x86_64").write_bytes(b"\x7fELF tampered")
    _ship(monkeypatch, bin_dir)
    with pytest.raises(GuestError, match=r"x86_64 fails its SHA-256 check: reinstall vzkit"):
        _agent_build.agent_binary("x86_64", tmp_path / "cache")
    assert not (tmp_path / "cache" / "agent").exists(), "nothing copied"


def test_a_manifest_naming_a_path_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secret").write_bytes(b"x")
    _ship(monkeypatch, _fake_shipped(tmp_path / "bin", b"x", file="../secret"))
    with pytest.raises(GuestError, match=r"names '../secret': reinstall vzkit"):
        _agent_build.shipped_agent("x86_64", tmp_path / "cache")


def test_changed_sources_or_no_shipped_agent_build_with_zig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[str] = []

    def build_agent(arch: str, out_dir: Path, *, cache_dir: Path) -> Path:
        built.append(arch)
        return Path(out_dir) / "built"

    monkeypatch.setattr(_agent_build, "build_agent", build_agent)
    _ship(monkeypatch, tmp_path / "no-bin")  # a source checkout: nothing shipped
    assert _agent_build.shipped_arches() == []
    assert _agent_build.agent_binary("x86_64", tmp_path) == tmp_path / "agent" / "built"
    # a wheel whose agent was built from other sources than those installed beside it
    _ship(monkeypatch, _fake_shipped(tmp_path / "bin", b"agent", key="0" * 64))
    assert _agent_build.shipped_arches() == []
    assert _agent_build.agent_binary("x86_64", tmp_path) == tmp_path / "agent" / "built"
    assert built == ["x86_64", "x86_64"]


def test_doctor_says_zig_is_not_needed_when_agents_ship(
    shipped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vzkit.doctor import guest_checks

    _no_zig(monkeypatch, tmp_path)
    _ship(monkeypatch, shipped)
    [toolchain] = [c for c in guest_checks(tmp_path) if c.name == "agent toolchain"]
    assert toolchain.ok
    assert toolchain.detail == "not needed: vzkit ships the agent prebuilt (x86_64, aarch64)"
    _ship(monkeypatch, tmp_path / "no-bin")
    [toolchain] = [c for c in guest_checks(tmp_path) if c.name == "agent toolchain"]
    assert not toolchain.ok  # a source checkout needs zig
