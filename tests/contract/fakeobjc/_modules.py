"""The ``Virtualization`` and ``objc`` stand-in modules (``Foundation`` and ``dispatch`` have
their own: :mod:`._foundation`, :mod:`._dispatch`)."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ._errors import ObjCError
from ._runtime import FakeProtocol, StrictModule

if TYPE_CHECKING:
    from ._runtime import FakeRuntime


def virtualization_module(rt: FakeRuntime) -> types.ModuleType:
    """``Virtualization``: the classes the simulated host has, the enum cases, the error domain."""
    mod = StrictModule("Virtualization", rt)
    missing = mod.__dict__["_fk_missing"]
    for name, spec in rt.api.classes.items():
        if spec.framework != "Virtualization":
            continue
        why = rt.exists(spec)
        if why is None:
            setattr(mod, name, rt.classes[name])
        else:
            missing[name] = why
    for cases in rt.api.enums.values():
        for case, value in cases.items():
            setattr(mod, case, value)
    if "VZErrorDomain" in rt.api.constants:
        mod.VZErrorDomain = "VZErrorDomain"
    return mod


def objc_module(rt: FakeRuntime) -> types.ModuleType:
    """``objc``: the few helpers vzkit uses (``python_method``, ``lookUpClass``, ...)."""
    mod = StrictModule("objc", rt)

    def python_method(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn._fk_python_method = True  # type: ignore[attr-defined]
        return fn

    def lookUpClass(name: str) -> Any:
        cls = rt.classes.get(name)
        why = rt.exists(cls._fk_spec) if cls is not None else "does not exist"
        if cls is None or why is not None:
            raise ObjCError(f"class {name!r} {why}")
        return cls

    def protocolNamed(name: str) -> FakeProtocol:
        if name not in rt.api.protocols:
            raise ObjCError(f"protocol {name!r} does not exist")
        return FakeProtocol(name)

    @contextlib.contextmanager
    def autorelease_pool() -> Iterator[None]:
        yield

    mod.python_method = python_method
    mod.lookUpClass = lookUpClass
    mod.protocolNamed = protocolNamed
    mod.autorelease_pool = autorelease_pool
    mod.error = ObjCError
    mod.__version__ = "12.2"
    return mod
