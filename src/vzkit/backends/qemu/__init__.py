"""The QEMU backend: KVM/HVF/TCG, controlled over QMP (Linux, and macOS without entitlements).

Its names are imported on first use: the vsock device helper (``python -m
vzkit.backends.qemu.vhost_vsock``), which QEMU waits for at every boot, runs inside this
package and must not pay for the machine's imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._backend import BACKEND, QemuBackend
    from ._doctor import doctor_checks
    from ._machine import QemuMachine

__all__ = ["BACKEND", "QemuBackend", "QemuMachine", "doctor_checks"]

_LAZY = {
    "BACKEND": "._backend",
    "QemuBackend": "._backend",
    "QemuMachine": "._machine",
    "doctor_checks": "._doctor",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
