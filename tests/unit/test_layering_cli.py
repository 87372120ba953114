"""The CLI package uses the library's public API only: no module under ``vzkit/cli/`` imports a
private module (``_x``) or a private name of another package, statically or in a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
CLI = SRC / "vzkit" / "cli"

#: Known exceptions, each a core helper the CLI renders with and that has no public name yet.
ALLOWED = {
    # The bounds shown in ``--cpus``/``--memory`` help (vzkit exports MIN_MEMORY_MB only).
    "vzkit._config.MAX_CPUS",
    "vzkit._config.MAX_MEMORY_GB",
    # The library's progress line, drawn by ``vzkit macos install``.
    "vzkit._progress.Progress",
    # The terminal escape (Ctrl-] .) of ``run -t``, shared with the vz backend's stdio console.
    "vzkit._terminal.ESCAPE",
    "vzkit._terminal.EscapeReader",
}


def _private(parts: list[str]) -> bool:
    return any(p.startswith("_") and not p.startswith("__") for p in parts)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an import in ``module`` names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".")
    base = package[: len(package) - node.level]  # a module file: level 1 is its package
    return ".".join([*base, *([node.module] if node.module else [])])


def imported_names(source: str, module: str) -> list[str]:
    """Every ``module`` / ``module.name`` that ``source`` (module ``module``) imports, in full."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            found += [f"{base}.{alias.name}" for alias in node.names]
    return found


def violations(source: str, module: str) -> list[str]:
    bad = []
    for name in imported_names(source, module):
        parts = name.split(".")
        if parts[0] != "vzkit" or parts[:2] == ["vzkit", "cli"]:
            continue  # stdlib and third-party modules, and the CLI's own modules
        if _private(parts) and name not in ALLOWED:
            bad.append(name)
    return bad


def _cli_modules() -> dict[str, str]:
    out = {}
    for path in sorted(CLI.rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts)
        if path.name == "__init__.py":
            module += ".__init__"  # so that a level-1 import resolves to the package itself
        out[module] = path.read_text(encoding="utf-8")
    return out


def test_the_cli_imports_no_private_module_of_another_package() -> None:
    modules = _cli_modules()
    assert len(modules) >= 8  # one module per command group: really split
    found = {module: violations(source, module) for module, source in modules.items()}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_allowed_exceptions_are_still_used() -> None:
    used = {name for m, source in _cli_modules().items() for name in imported_names(source, m)}
    assert used >= ALLOWED


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("from vzkit.backends.qemu import _discover\n", ["vzkit.backends.qemu._discover"]),
        (
            "from ..backends.qemu._discover import find_qemu\n",
            ["vzkit.backends.qemu._discover.find_qemu"],
        ),
        ("import vzkit.guest._image\n", ["vzkit.guest._image"]),
        (
            "def f():\n    from .._snapshot import format_rfc3339\n",
            ["vzkit._snapshot.format_rfc3339"],
        ),
        ("from vzkit.guest import _helper\n", ["vzkit.guest._helper"]),
        ("from vzkit._config import MAX_CPUS, LinuxVMConfig\n", ["vzkit._config.LinuxVMConfig"]),
        ("from vzkit.backends.vz import install_macos\nfrom vzkit import doctor\n", []),
        ("from . import _run\nfrom ._errors import F\nimport _thread\n", []),
    ],
)
def test_the_rule_catches_what_it_should(source: str, bad: list[str]) -> None:
    assert violations(source, "vzkit.cli._probe") == bad
