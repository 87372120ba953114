"""Render a stand-in object graph as plain data, so tests can compare whole graphs."""

from __future__ import annotations

from typing import Any

from .fakeobjc import FakeRuntime


def render(rt: FakeRuntime, obj: Any, depth: int = 0) -> Any:
    """Framework objects become ``{"class": ..., <property>: ...}``; URLs become paths,
    NSData bytes, sequences lists. Only what the code under test set is shown."""
    if depth > 12:
        return "..."
    if isinstance(obj, list | tuple):
        return [render(rt, item, depth + 1) for item in obj]
    if isinstance(obj, dict):
        return {key: render(rt, value, depth + 1) for key, value in obj.items()}
    fk = getattr(obj, "__dict__", {}).get("_fk")
    if fk is None:
        return obj
    name = type(obj).__name__
    if name == "NSURL":
        return fk.props["path"]
    if name == "NSData":
        return fk.props["bytes"]
    if name == "NSFileHandle":
        return {"class": name, "fd": fk.props["fd"]}
    out: dict[str, Any] = {"class": name}
    if fk.init_call is not None and fk.init_call[0] != "init":
        out["init"] = fk.init_call[0]
    for key, value in sorted(fk.props.items()):
        out[key] = render(rt, value, depth + 1)
    return out


def find(tree: Any, cls: str) -> list[dict[str, Any]]:
    """Every rendered node of class ``cls`` (depth first)."""
    found: list[dict[str, Any]] = []
    if isinstance(tree, dict):
        if tree.get("class") == cls:
            found.append(tree)
        for value in tree.values():
            found.extend(find(value, cls))
    elif isinstance(tree, list):
        for item in tree:
            found.extend(find(item, cls))
    return found
