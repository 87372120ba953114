"""Layering rules of ``src/vzkit``, read from the source with :mod:`ast` (nothing imported).

* No import cycle among the modules: none through module-level imports, and none either
  when the imports inside functions (deferred imports, the way the old ``_snapshot`` and
  ``_snapshot_ops`` imported each other) count as edges. Imports under
  ``if TYPE_CHECKING:`` never run and are not edges.
* The snapshots package imports downward only: record → store → operations → facades, and
  no backend imports more of it than its record layer.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "vzkit"

#: Cycles that existed before this test (each a strongly connected set of modules): none
#: when it was written. Remove an entry once its cycle is broken; a new cycle fails.
KNOWN_CYCLES: list[frozenset[str]] = []
KNOWN_DEFERRED_CYCLES: list[frozenset[str]] = []


def _modules(src: Path) -> dict[str, Path]:
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _type_checking(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (test.id if isinstance(test, ast.Name) else getattr(test, "attr", "")) == (
        "TYPE_CHECKING"
    )


def _imports(node: ast.AST, deferred: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports under ``node`` that run: never an ``if TYPE_CHECKING:`` body; those inside
    functions only when ``deferred``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif _type_checking(child):
            assert isinstance(child, ast.If)
            for other in child.orelse:
                yield from _imports(ast.Module(body=[other], type_ignores=[]), deferred)
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            if deferred:
                yield from _imports(child, deferred)
        else:
            yield from _imports(child, deferred)


def import_graph(src: Path = SRC, *, deferred: bool = False) -> dict[str, set[str]]:
    """Module → the ``vzkit`` modules it imports (at module level; also inside functions when
    ``deferred``)."""
    modules = _modules(src)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if _is_package(path) else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")), deferred):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = [
                    f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                    for alias in node.names
                ]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected sets of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_from_the_source() -> None:
    graph = import_graph()
    assert "vzkit.snapshots._record" in graph["vzkit.snapshots._store"]
    assert "vzkit.snapshots._ops" in graph["vzkit.snapshots._facade"]
    assert "vzkit._vmcore" not in graph["vzkit.snapshots._ops"]  # only under TYPE_CHECKING


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]


def test_a_deferred_cycle_like_the_old_snapshot_modules_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_snapshot.py").write_text("def save():\n    from ._snapshot_ops import save\n")
    (pkg / "_snapshot_ops.py").write_text(
        "from typing import TYPE_CHECKING\nfrom ._snapshot import FORMAT\n"
        "if TYPE_CHECKING:\n    from . import _vm\n"
    )
    (pkg / "_vm.py").write_text("from . import _snapshot_ops\n")
    assert cycles(import_graph(tmp_path)) == []
    assert cycles(import_graph(tmp_path, deferred=True)) == [
        frozenset({"vzkit._snapshot", "vzkit._snapshot_ops"})
    ]


@pytest.mark.parametrize(
    ("deferred", "known"), [(False, KNOWN_CYCLES), (True, KNOWN_DEFERRED_CYCLES)]
)
def test_no_new_import_cycle(deferred: bool, known: list[frozenset[str]]) -> None:
    found = cycles(import_graph(deferred=deferred))
    new = [sorted(c) for c in found if c not in known]
    assert new == [], f"import cycles among src/vzkit modules: {new}"
    gone = [sorted(c) for c in known if c not in found]
    assert gone == [], f"these cycles are gone: remove them from the known ones: {gone}"


#: The snapshots package's layers, lowest first; a module imports its own layer or lower.
SNAPSHOT_LAYERS = [
    {"_record", "_match"},
    {"_files", "_store"},
    {"_ops"},
    {"_facade", "_aio"},
]


def test_the_snapshots_package_imports_downward_only() -> None:
    graph = import_graph()
    prefix = "vzkit.snapshots."
    layer = {m: i for i, names in enumerate(SNAPSHOT_LAYERS) for m in names}
    assert {m.removeprefix(prefix) for m in graph if m.startswith(prefix)} == set(layer)
    upward = [
        f"{m} -> {t}"
        for m, targets in graph.items()
        if m.startswith(prefix)
        for t in targets
        if t.startswith(prefix) and layer[t.removeprefix(prefix)] > layer[m.removeprefix(prefix)]
    ]
    assert upward == []
    assert graph["vzkit.snapshots"] == set()  # the package's names load lazily
    # Below the core, only the record layer may be imported (e.g. the RFC 3339 helper).
    for m, targets in graph.items():
        if m.startswith("vzkit.backends."):
            used = {t for t in targets if t.startswith(prefix)}
            assert used <= {prefix + "_record"}, (m, used)


# -- the layers of docs/architecture.md -------------------------------------------------------

#: Module groups, lowest first (docs/architecture.md draws them); "?" marks a module no group
#: names, which fails the test below: a new module gets a group here.
_GROUP_OF_MODULE = {
    **dict.fromkeys(
        [
            "errors",
            "_state",
            "_loop",
            "_process",
            "_private",
            "_fsutil",
            "_cache",
            "_progress",
            "_units",
            "_hosttar",
            "_terminal",
            "_kernel",
            "_hostsleep",
        ],
        "foundation",
    ),
    **dict.fromkeys(
        [
            "_config",
            "_macconfig",
            "_network",
            "_volume",
            "_display",
            "_disk",
            "_diskcopy",
            "_storage",
            "_process_defaults",
        ],
        "data",
    ),
    **dict.fromkeys(["_vmcore", "_guestcore", "_guestcopy", "_portfwd"], "core"),
    **dict.fromkeys(["_vm", "aio", "_guest", "_vsock"], "facades"),
    "_oneshot": "oneshot",  # vzkit.run/start and their vzkit.aio twins (re-exported lazily)
    "doctor": "doctor",
    "_imagebuild": "builders",  # images built in a VM (the Debian image): above the facades
    "__main__": "cli",  # python -m vzkit: the CLI's entry point
}
_GROUP_OF_PACKAGE = [  # first match wins
    ("vzkit.snapshots._record", "record"),
    ("vzkit.snapshots._match", "record"),
    ("vzkit.snapshots", "snapshots"),
    ("vzkit.agent", "agent"),
    ("vzkit.image", "image"),
    ("vzkit.backends", "backends"),
    ("vzkit.cli", "cli"),
    ("vzkit.named._api", "named-api"),  # vzkit.create/connect/...: returns the facades
    ("vzkit.named", "named"),  # supervisor, control socket, the remote machine under a core
]
#: What each group may import (besides itself). The CLI has its own test (public API only);
#: ``vzkit`` itself re-exports public names lazily.
LAYERS = {
    "foundation": set(),
    "data": {"foundation"},
    "agent": {"foundation"},
    "image": {"foundation", "data", "agent"},
    "record": {"foundation", "data"},
    # backends: the data they lower, the agent's constants, the snapshot record's helpers, and
    # vzkit.doctor's Check type for their doctor_checks(); never the core, facades or the CLI
    "backends": {"foundation", "data", "agent", "record", "doctor"},
    "core": {"foundation", "data", "agent", "backends"},
    "snapshots": {"foundation", "data", "record", "backends", "core"},
    "named": {"foundation", "data", "agent", "backends", "core"},
    "facades": {"foundation", "data", "agent", "backends", "core", "snapshots", "named"},
    "named-api": {"foundation", "data", "backends", "core", "facades", "named"},
    # the default guest's config (vzkit.image) booted through the facades
    "oneshot": {"foundation", "data", "agent", "backends", "core", "facades", "image", "builders"},
    "builders": {"foundation", "data", "agent", "image", "facades"},
    # load_backend(name), backends add checks; vzkit.image for the guest's checks
    "doctor": {"foundation", "data", "backends", "image"},
}


def _group(module: str) -> str:
    if module == "vzkit":
        return "top"
    short = module.removeprefix("vzkit.")
    if short in _GROUP_OF_MODULE:
        return _GROUP_OF_MODULE[short]
    for prefix, group in _GROUP_OF_PACKAGE:
        if module == prefix or module.startswith(prefix + "."):
            return group
    return "?"


@pytest.mark.parametrize("deferred", [False, True])
def test_every_import_follows_the_layers(deferred: bool) -> None:
    graph = import_graph(deferred=deferred)
    unknown = sorted(m for m in graph if _group(m) == "?")
    assert unknown == [], f"modules in no layer (add them to test_layering.py): {unknown}"
    wrong = sorted(
        f"{m} ({_group(m)}) -> {t} ({_group(t)})"
        for m, targets in graph.items()
        if _group(m) in LAYERS
        for t in targets
        if _group(t) != _group(m) and _group(t) not in LAYERS[_group(m)]
    )
    assert wrong == []


def _backend(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "backends" and parts[2] != "_protocol":
        return parts[2]
    return None


def test_backends_never_import_each_other() -> None:
    graph = import_graph(deferred=True)
    crossing = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        for t in targets
        if _backend(m) and _backend(t) and _backend(m) != _backend(t)
    )
    assert crossing == []
