"""The layers of the guest side: ``vzkit.image`` (the builder) may use ``vzkit.agent`` (it builds
and packages the agent), never the reverse; neither reaches a backend or the CLI; ``vzkit.guest``
is gone (no public name of the README used it, so there is no alias)."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import vzkit.agent
import vzkit.image
from vzkit.image._agent_build import agent_sources

SRC = Path(vzkit.agent.__file__).resolve().parents[1]  # src/vzkit
#: What each package may import from vzkit, besides itself.
ALLOWED = {
    "agent": {"vzkit.errors", "vzkit._loop"},
    "image": {
        "vzkit.errors",
        "vzkit._cache",
        "vzkit._config",
        "vzkit._disk",  # data layer (docs/architecture.md): RootDisk for default_guest_config
        "vzkit._process_defaults",  # data layer: an OCI image config as ProcessDefaults
        "vzkit._fsutil",  # foundation: the Debian image cache's atomic metadata
        "vzkit._kernel",  # foundation: arm64 kernels read by magic number (the vz backend's too)
        "vzkit._private",
        "vzkit._progress",
        "vzkit._state",
        "vzkit.agent",
    },
}


def _imports(path: Path) -> set[str]:
    """The vzkit modules ``path`` imports (relative imports resolved), at any depth."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "vzkit" or name.startswith("vzkit.")}


def _allowed(name: str, package: str) -> bool:
    own = f"vzkit.{package}"
    if name == own or name.startswith(own + "."):
        return True
    # `from vzkit.errors import X` also names `vzkit.errors.X`
    return any(name == ok or name.startswith(ok + ".") for ok in ALLOWED[package])


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_what_its_layer_allows(package: str) -> None:
    files = sorted((SRC / package).rglob("*.py"))
    assert files
    bad = {
        f"{path.relative_to(SRC)}: {name}"
        for path in files
        for name in _imports(path)
        if not _allowed(name, package)
    }
    assert bad == set()


def test_the_layer_check_sees_relative_imports() -> None:
    """Not vacuous: the backends' imports of the agent are found, resolved from ``...agent``."""
    names = _imports(SRC / "backends" / "qemu" / "_vsock.py")
    assert "vzkit.agent" in names
    assert "vzkit.agent.KEY_SIZE" in names
    assert not _allowed("vzkit.image._image", "agent")
    assert not _allowed("vzkit.backends.qemu", "image")


def _loaded_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return {name for name in json.loads(out) if name.startswith("vzkit")}


def test_importing_the_agent_loads_its_constants_only() -> None:
    loaded = _loaded_after("import vzkit.agent")
    assert loaded == {"vzkit", "vzkit.agent", "vzkit.agent._protocol", "vzkit.errors"}


def test_importing_the_builder_loads_no_backend_and_no_client() -> None:
    loaded = _loaded_after("import vzkit.image")
    assert not {name for name in loaded if name.startswith(("vzkit.backends", "vzkit.cli"))}
    assert "vzkit.agent._client" not in loaded


def test_the_agent_names_resolve_on_first_use() -> None:
    from vzkit.agent._client import AgentClient
    from vzkit.agent._connection import authenticate

    assert vzkit.agent.AgentClient is AgentClient
    assert vzkit.agent.authenticate is authenticate
    assert set(vzkit.agent.__all__) <= set(dir(vzkit.agent))
    for name in vzkit.agent.__all__:
        assert getattr(vzkit.agent, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = vzkit.agent.nope


def test_the_builder_finds_every_agent_source_in_the_agent_package() -> None:
    on_disk = {p.name for p in (SRC / "agent" / "c").iterdir() if p.suffix in (".c", ".h")}
    assert set(agent_sources()) == on_disk
    assert {"agent.h", "serve.h", "wire.c", "session.c", "transport.c", "serve.c"} <= on_disk


def test_vzkit_guest_is_gone() -> None:
    assert not (SRC / "guest").exists()
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("vzkit.guest")
    readme = (SRC.parents[1] / "README.md").read_text(encoding="utf-8")
    assert "vzkit.guest" not in readme  # else the package would need a deprecated alias


def test_no_module_of_either_package_is_over_600_lines() -> None:
    long = {
        str(path.relative_to(SRC)): n
        for package in ("agent",)
        for path in (SRC / package).rglob("*")
        if path.suffix in (".py", ".c", ".h")
        and (n := len(path.read_text(encoding="utf-8").splitlines())) > 600
    }
    assert long == {}
