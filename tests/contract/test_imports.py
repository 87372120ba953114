"""PyObjC stays out of ``import vzkit`` and ``import vzkit.backends.vz`` (on any platform)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.contract

SRC = Path(__file__).resolve().parents[2] / "src" / "vzkit"
FRAMEWORKS = {"Virtualization", "Foundation", "objc", "dispatch", "CoreFoundation", "AppKit"}


def _imports_after(statement: str) -> list[str]:
    code = textwrap.dedent(
        f"""
        import json, sys
        {statement}
        print(json.dumps(sorted(sys.modules)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    import json

    return list(json.loads(out))


def test_import_vzkit_loads_no_backend_and_no_pyobjc() -> None:
    loaded = set(_imports_after("import vzkit"))
    assert not loaded & FRAMEWORKS
    assert "vzkit.backends.vz" not in loaded


def test_import_the_vz_backend_loads_no_pyobjc() -> None:
    loaded = set(_imports_after("import vzkit.backends.vz as vz; vz.BACKEND"))
    assert "vzkit.backends.vz" in loaded
    assert not loaded & FRAMEWORKS


def test_only_the_adapter_names_the_frameworks() -> None:
    """No module but ``_objc.py`` imports a framework module (statically or by name)."""
    for path in sorted((SRC / "backends" / "vz").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            assert not set(names) & FRAMEWORKS, f"{path.name} imports {names}"
        if path.name != "_objc.py":
            text = path.read_text(encoding="utf-8")
            assert "import_module" not in text, path.name


def test_backend_is_unavailable_off_macos() -> None:
    if sys.platform == "darwin":
        pytest.skip("this host is macOS")
    import vzkit
    from vzkit.backends import load_backend

    with pytest.raises(vzkit.BackendUnavailableError, match="needs macOS"):
        load_backend("vz")
