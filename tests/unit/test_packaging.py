"""The wheel ships the library and the prebuilt agents only: no test module, fake or helper.

The file list is built the way the wheel's build configuration in ``pyproject.toml`` asks
for it (hatchling, ``[tool.hatch.build.targets.wheel] packages``: every file under each
listed package directory), plus what the build hook (``hatch_build.py``) adds: the agents and
their manifest. Test support lives under ``tests/support`` (not packaged). The real wheel is
built and installed by ``tests/e2e/test_wheel.py``.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest

from vzkit._cache import user_cache_dir

ROOT = Path(__file__).resolve().parents[2]
# a module or package a test suite would own: fakes, tests, pytest's conftest
TEST_ONLY = re.compile(r"^(_?fake\w*|_?tests?(_\w*)?|\w+_tests?|conftest|testing)(\.py)?$")


def _wheel_config() -> dict[str, object]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build = config["build-system"]
    assert build["build-backend"] == "hatchling.build", "this test reads hatchling's config"
    wheel: dict[str, object] = config["tool"]["hatch"]["build"]["targets"]["wheel"]
    return wheel


def packaged_files(root: Path, packages: list[str]) -> list[Path]:
    """Every file hatchling puts in the wheel for ``packages`` (relative to ``root``)."""
    files = []
    for package in packages:
        for path in sorted((root / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files.append(path.relative_to(root))
    return files


def owned_by_tests(files: list[Path]) -> list[str]:
    """The packaged paths that a test suite owns (any part of the path names one)."""
    return [str(f) for f in files if any(TEST_ONLY.match(part) for part in f.parts[1:])]


def test_the_wheel_is_built_from_the_package_directory_only() -> None:
    # Anything beyond "packages" and the agent hook (include, force-include, only-include,
    # sources, exclude, other hooks...) changes the file list: this test must learn it before
    # it can vouch for the wheel.
    wheel = _wheel_config()
    assert set(wheel) == {"packages", "hooks"}, f"new wheel build options: {sorted(wheel)}"
    assert wheel["packages"] == ["src/vzkit"]
    assert wheel["hooks"] == {"custom": {"path": "hatch_build.py"}}


class _HookBase:
    """Stands in for hatchling's ``BuildHookInterface`` (hatchling is a build requirement,
    not in the dev environment): what the hook reads of it."""

    def __init__(self, root: Path, target_name: str) -> None:
        self.root = str(root)
        self.target_name = target_name


def _hook_class(monkeypatch: pytest.MonkeyPatch) -> Any:
    parts = ["hatchling", "builders", "hooks", "plugin", "interface"]
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(parts[i - 1]))
    sys.modules["hatchling.builders.hooks.plugin.interface"].BuildHookInterface = _HookBase  # type: ignore[attr-defined]
    namespace: dict[str, Any] = {"__name__": "hatch_build"}
    exec(compile((ROOT / "hatch_build.py").read_text(), "hatch_build.py", "exec"), namespace)
    return namespace["AgentBuildHook"]


def test_the_hook_adds_both_agents_and_their_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    # zig's caches as the other agent tests use them (the hook's default: the user cache)
    monkeypatch.setenv("VZKIT_CACHE_DIR", str(user_cache_dir()))
    hook = _hook_class(monkeypatch)(ROOT, "wheel")
    build_data: dict[str, Any] = {"force_include": {}}
    hook.initialize("standard", build_data)
    try:
        added = {dest: Path(src) for src, dest in build_data["force_include"].items()}
        assert sorted(added) == [
            "vzkit/agent/bin/manifest.json",
            "vzkit/agent/bin/vzkit-agent-aarch64",
            "vzkit/agent/bin/vzkit-agent-x86_64",
        ]
        manifest = json.loads(added["vzkit/agent/bin/manifest.json"].read_text())
        assert sorted(manifest["agents"]) == ["aarch64", "x86_64"]
        for source in added.values():
            assert not source.is_relative_to(ROOT), "the source tree is not written to"
        packages = _wheel_config()["packages"]
        assert isinstance(packages, list)
        wheel = [f.relative_to("src") for f in packaged_files(ROOT, packages)]
        wheel += [Path(dest) for dest in added]
        assert owned_by_tests([Path("src", f) for f in wheel]) == []
    finally:
        hook.finalize("standard", build_data, "unused.whl")
    assert not any(Path(src).exists() for src in build_data["force_include"]), "cleaned up"
    # an editable install ships nothing: the checkout builds its agent with zig
    editable: dict[str, Any] = {"force_include": {}}
    hook.initialize("editable", editable)
    assert editable == {"force_include": {}}


def test_no_fake_or_test_module_is_packaged() -> None:
    packages = _wheel_config()["packages"]
    assert isinstance(packages, list)
    files = packaged_files(ROOT, packages)
    assert Path("src/vzkit/__init__.py") in files  # the list is real
    assert Path("src/vzkit/backends/qemu/vhost_vsock/_device.py") in files
    assert owned_by_tests(files) == []


@pytest.mark.parametrize(
    "name",
    [
        "_fakedriver.py",
        "fakeguest.py",
        "test_x.py",
        "tests/helpers.py",
        "conftest.py",
        "x_test.py",
        "testing/__init__.py",
    ],
)
def test_the_check_catches_a_test_module(tmp_path: Path, name: str) -> None:
    (tmp_path / "src/pkg/sub").mkdir(parents=True)
    (tmp_path / "src/pkg/__init__.py").write_text("")
    planted = tmp_path / "src/pkg/sub" / name
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_text("")
    found = owned_by_tests(packaged_files(tmp_path, ["src/pkg"]))
    assert found == [str(planted.relative_to(tmp_path))]


def test_library_names_that_merely_contain_test_are_not_flagged(tmp_path: Path) -> None:
    (tmp_path / "src/pkg").mkdir(parents=True)
    for name in ("_attestation.py", "contest.py", "latest.py", "_manifest.py"):
        (tmp_path / "src/pkg" / name).write_text("")
    assert owned_by_tests(packaged_files(tmp_path, ["src/pkg"])) == []
