"""A strict stand-in for PyObjC's ``Virtualization``, ``Foundation``, ``objc`` and ``dispatch``.

Generated at import time from ``tests/data/apple-virtualization/api.json`` and
``nullability.json``: unknown selectors, wrong argument counts or kinds, ``None`` for a
nonnull argument, containers holding the wrong element type, plain Python objects for opaque
C types, APIs above the simulated macOS version or missing on the simulated architecture,
``NS_UNAVAILABLE`` initialisers, blocks of the wrong arity, non-``None`` ``NSError**``
arguments, VM calls off the VM's queue and Python exceptions escaping into "Objective-C" all
raise :class:`ContractViolation` (argument problems as its ``TypeError`` subclass
:class:`BadArgument`) *and* are recorded, so the ``fake`` fixture fails the test even if the
code under test swallowed the error.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._behaviors import guest_connect, guest_power_off, state_name, vm_crash
from ._dispatch import FakeQueue, current_queue
from ._macbehaviors import write_fake_ipsw
from ._runtime import (
    BadArgument,
    ContractViolation,
    FakeRuntime,
    ForeignObject,
    ObjCError,
    UnknownSelector,
)
from ._spec import load_api, load_raw, load_raw_nullability

__all__ = [
    "MODULE_NAMES",
    "BadArgument",
    "ContractViolation",
    "FakeQueue",
    "FakeRuntime",
    "ForeignObject",
    "ObjCError",
    "UnknownSelector",
    "current_queue",
    "guest_connect",
    "guest_power_off",
    "installed",
    "load_api",
    "load_raw",
    "load_raw_nullability",
    "state_name",
    "vm_crash",
    "write_fake_ipsw",
]

MODULE_NAMES = ("AppKit", "Virtualization", "Foundation", "objc", "dispatch")


@contextmanager
def installed(rt: FakeRuntime) -> Iterator[FakeRuntime]:
    """Put the runtime's modules in ``sys.modules`` for the duration; restore afterwards."""
    saved: dict[str, Any] = {name: sys.modules.get(name) for name in MODULE_NAMES}
    sys.modules.update(rt.modules)
    try:
        yield rt
    finally:
        rt.close()
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
