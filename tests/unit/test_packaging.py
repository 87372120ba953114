"""The wheel ships the library only: no test module, fake or test helper is packaged.

The file list is built the way the wheel's build configuration in ``pyproject.toml`` asks
for it (hatchling, ``[tool.hatch.build.targets.wheel] packages``: every file under each
listed package directory). Test support lives under ``tests/support`` (not packaged).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

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
    # Anything beyond "packages" (include, force-include, only-include, sources, exclude...)
    # changes the file list: this test must learn it before it can vouch for the wheel.
    wheel = _wheel_config()
    assert set(wheel) == {"packages"}, f"new wheel build options: {sorted(wheel)}"
    assert wheel["packages"] == ["src/vzkit"]


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
