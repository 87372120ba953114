"""Structure rules of the qemu backend (issue 14): the environment is read at the config edge
only (``vzkit._config``; even the agent's transport: the core chooses it), and the backend's
modules import each other without cycles."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import vzkit.backends.qemu

QEMU = Path(vzkit.backends.qemu.__file__).parent


def _modules() -> list[Path]:
    return sorted(QEMU.glob("*.py"))  # vhost_vsock/ is the device's own package


def test_the_qemu_backend_reads_no_environment() -> None:
    found = set()
    for path in _modules():
        text = path.read_text()
        for match in re.finditer(r"os\.environ|os\.getenv|getenv\(", text):
            line = text[: match.start()].count("\n")
            source = text.splitlines()[line]
            names = re.findall(r"VZKIT_\w+", source) or ["?"]
            found |= {(path.name, name) for name in names}
    assert found == set()


def test_the_qemu_backend_modules_import_without_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for path in _modules():
        deps = set()
        tree = ast.parse(path.read_text())
        typing_only = {  # imports for annotations only (``if TYPE_CHECKING:``) run never
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps |= {alias.name for alias in node.names}
        graph[path.stem] = {d for d in deps if (QEMU / f"{d}.py").exists()}
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        seen[name] = 1
        for dep in sorted(graph.get(name, ())):
            assert seen.get(dep) != 1, f"import cycle: {' -> '.join([*path, name, dep])}"
            if dep not in seen:
                visit(dep, [*path, name])
        seen[name] = 2

    for name in sorted(graph):
        if name not in seen:
            visit(name, [])
    assert graph["_argv"] <= {"_virtiofs"}  # the lowering stays pure: no process, no QMP
    importers = {name for name, deps in graph.items() if "_machine" in deps}
    assert importers == {"_backend"}  # the parts never import the machine back


def test_backends_take_only_the_agents_constants() -> None:
    """The agent's transport choice and its AUTH are the core's (``vzkit._guestcore``): a
    backend imports nothing from ``vzkit.agent`` but its wire constants."""
    constants = {"CONSOLE_PORT_NAME", "DEFAULT_VSOCK_PORT", "KEY_SIZE", "PROTOCOL_VERSION"}
    found: dict[str, set[str]] = {}
    for path in sorted(QEMU.parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 3 and node.module == "agent":
                found.setdefault(path.name, set()).update(a.name for a in node.names)
    assert found, "the rule sees no import at all: its pattern is out of date"
    assert set().union(*found.values()) <= constants, found
