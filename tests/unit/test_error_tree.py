"""Every exception class a module of vzkit exports derives from ``VzkitError``, and
``errors.py``'s docstring draws each one under its real base class."""

from __future__ import annotations

import importlib
import pkgutil
import re
from types import ModuleType

import pytest

import vzkit
from vzkit import errors

#: The PyObjC modules only macOS has; a vzkit module that cannot import without them is skipped.
PYOBJC = {"Virtualization", "Foundation", "objc", "dispatch", "CoreFoundation", "AppKit"}


def _modules() -> list[ModuleType]:
    out = [vzkit]
    for info in pkgutil.walk_packages(vzkit.__path__, "vzkit."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue  # runs its program when imported; defines nothing
        try:
            out.append(importlib.import_module(info.name))
        except ImportError as err:  # pragma: no cover - only where PyObjC half-imports
            if (err.name or "").split(".")[0] not in PYOBJC:
                raise
    return out


def _exported(module: ModuleType) -> dict[str, object]:
    """What ``__all__`` names, and every public name the module defines itself."""
    names = set(getattr(module, "__all__", ()))
    names |= {
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
    }
    return {name: getattr(module, name) for name in names}


def exported_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class some module exports, by name (each defined once)."""
    found: dict[str, type[BaseException]] = {}
    for module in _modules():
        for name, value in _exported(module).items():
            if isinstance(value, type) and issubclass(value, BaseException):
                other = found.setdefault(name, value)
                assert other is value, f"two exported exceptions are called {name}"
    return found


def drawn_tree() -> dict[str, str | None]:
    """The tree in ``errors.__doc__``: class name → the name it is drawn under."""
    doc = errors.__doc__ or ""
    lines = doc.splitlines()
    root = next(i for i, line in enumerate(lines) if line.strip() == "VzkitError")
    indent = lines[root].index("VzkitError")
    parents: dict[str, str | None] = {"VzkitError": None}
    stack = ["VzkitError"]
    for line in lines[root + 1 :]:
        if not line.strip():
            break
        match = re.match(r"[│ ]*[├└]── (\w+)", line[indent:])
        if match is None:
            continue  # a note or a continued description
        depth = (line.index("── ", indent) - indent - 1) // 4 + 1
        del stack[depth:]
        parents[match[1]] = stack[-1]
        stack.append(match[1])
    return parents


EXPORTED = exported_exceptions()


def test_the_walk_finds_the_errors_of_every_layer() -> None:
    for name in (
        "VzkitError",
        "AgentError",
        "DownloadError",
        "GuestPanic",
        "HandshakeError",
        "VhostUserProtocolError",
        "CopyAborted",
    ):
        assert name in EXPORTED


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_every_exported_exception_is_a_vzkit_error_drawn_under_its_base(name: str) -> None:
    cls = EXPORTED[name]
    assert issubclass(cls, errors.VzkitError), f"{cls.__module__}.{name}"
    tree = drawn_tree()
    assert name in tree, f"{name} is not drawn in errors.py's docstring"
    parent = tree[name]
    if parent is not None:
        assert issubclass(cls, EXPORTED[parent]), f"{name} is drawn under {parent}"


def test_standard_bases_are_kept_where_they_help() -> None:
    assert issubclass(EXPORTED["HandshakeError"], ValueError)
    assert issubclass(EXPORTED["VMTimeoutError"], TimeoutError)
    assert issubclass(EXPORTED["SpecError"], ValueError)
    assert issubclass(EXPORTED["ConfigError"], ValueError)


def test_the_tree_draws_no_class_that_does_not_exist() -> None:
    assert set(drawn_tree()) <= set(EXPORTED)
