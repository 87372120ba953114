"""The wheel, as a user gets it: built with both agents inside, installed into a fresh venv
without zig, and ``vzkit run -- true`` works there from an empty cache (issue 18).

The wheel is built the way pip builds it from a checkout (``pip wheel``, isolated: hatchling and
ziglang come from PyPI). ``VZKIT_ZIG`` points the build hook at the dev venv's zig, the same
version the build requirements pin, to keep this test short: with the isolated environment's
own zig (a fresh install every build, its compiled C library not in zig's cache) the build
took 85-100 s here instead of ~30 s, for the same bytes (the first test checks that the
shipped agents are the local builds). The guest's Debian packages come from the shared cache
(``~/.cache/vzkit/debs``, downloaded once like every e2e test does) through a symlink in the
empty cache, so no package is downloaded again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vzkit._cache import user_cache_dir
from vzkit._state import host_arch
from vzkit.image._agent_build import agent_key, build_agent
from vzkit.image._fetch import fetch_guest_debs

from ..unit.test_packaging import owned_by_tests

ROOT = Path(__file__).resolve().parents[2]
BIN = "vzkit/agent/bin/"


def _dev_zig() -> str:
    spec = importlib.util.find_spec("ziglang")
    assert spec is not None, "the dev venv has ziglang (the dev extra)"
    assert spec.submodule_search_locations
    return str(Path(spec.submodule_search_locations[0]) / "zig")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "VZKIT_ZIG": _dev_zig()}
    env.pop("VZKIT_CACHE_DIR", None)  # zig's caches: the user's, as the unit tests use them
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    [built] = out.glob("vzkit-*.whl")
    return built


def test_the_wheel_holds_both_agents_with_their_manifest_and_nothing_test_only(
    wheel: Path,
) -> None:
    cache = user_cache_dir()
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        shipped = {n.removeprefix(BIN): zf.getinfo(n) for n in names if n.startswith(BIN)}
        assert sorted(shipped) == ["manifest.json", "vzkit-agent-aarch64", "vzkit-agent-x86_64"]
        manifest = json.loads(zf.read(BIN + "manifest.json"))
        for arch in ("x86_64", "aarch64"):
            entry = manifest["agents"][arch]
            data = zf.read(BIN + entry["file"])
            assert hashlib.sha256(data).hexdigest() == entry["sha256"]
            assert entry["key"] == agent_key(arch, manifest["zig_version"])  # these sources
            assert shipped[entry["file"]].external_attr >> 16 & 0o111, "executable"
            local = build_agent(arch, cache / "agent-build", cache_dir=cache / "zig")
            assert data == local.read_bytes(), "prebuilt and locally built agents are identical"
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert owned_by_tests([Path(n) for n in names if n.startswith("vzkit/")]) == []
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    zig = [line for line in requires if "ziglang" in line]
    assert zig, "ziglang is still offered as an extra"
    assert all("extra ==" in line for line in zig), f"ziglang is a runtime dependency: {zig}"
    assert wheel.stat().st_size < 1_000_000


def test_the_installed_wheel_runs_a_guest_without_zig(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-4000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # not this checkout's src
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u, vzkit; "
         "print(u.find_spec('ziglang') is None, vzkit.__file__)"],
        capture_output=True, text=True, timeout=60, env=env, check=True,
    )  # fmt: skip
    no_ziglang, module = probe.stdout.split()
    assert no_ziglang == "True", "ziglang was installed with the wheel"
    assert Path(module).is_relative_to(venv), f"vzkit imported from {module}"

    arch = host_arch().value
    shared = user_cache_dir() / "debs" / arch
    fetch_guest_debs(shared, arch)  # already there after any e2e run: nothing downloaded
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    (cache / "debs" / arch).symlink_to(shared)
    env.update(VZKIT_CACHE_DIR=str(cache), VZKIT_ZIG=str(tmp_path / "no-zig"))  # zig: fails
    run = subprocess.run(
        [str(venv / "bin" / "vzkit"), "run", "--", "true"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert not (cache / "zig").exists(), "zig was not run"
    [agent] = (cache / "agent").iterdir()
    with zipfile.ZipFile(wheel) as zf:
        assert agent.read_bytes() == zf.read(f"{BIN}vzkit-agent-{arch}")
    assert [p.name.startswith(f"{arch}-") for p in (cache / "images").iterdir() if p.is_dir()] == [
        True
    ]
