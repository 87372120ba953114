"""Backends, imported lazily by name: ``vz`` (Apple Virtualization framework) and ``qemu``.

``import vzkit`` imports none of them; :func:`load_backend` does, on first use.
"""

from __future__ import annotations

import importlib
import sys

from ..errors import BackendUnavailableError
from ._protocol import (
    AgentStream,
    AgentVsock,
    Backend,
    BalloonCapable,
    BalloonInfo,
    Feature,
    Machine,
    PortPublisher,
    SnapshotCapable,
    StateListener,
    VsockCapable,
    VsockListenerLike,
)

__all__ = [
    "KNOWN_BACKENDS",
    "AgentStream",
    "AgentVsock",
    "Backend",
    "BalloonCapable",
    "BalloonInfo",
    "Feature",
    "Machine",
    "PortPublisher",
    "SnapshotCapable",
    "StateListener",
    "VsockCapable",
    "VsockListenerLike",
    "choose_backend",
    "load_backend",
]

#: In order of preference for ``backend="auto"``.
KNOWN_BACKENDS = ("vz", "qemu")


def load_backend(name: str) -> Backend:
    """Import ``vzkit.backends.<name>`` and return its ``BACKEND``; check it can run here."""
    if name not in KNOWN_BACKENDS:
        raise BackendUnavailableError(
            f"unknown backend {name!r}; known backends: {', '.join(KNOWN_BACKENDS)}"
        )
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ImportError as err:
        raise BackendUnavailableError(f"backend {name!r} cannot be imported here: {err}") from err
    backend = getattr(module, "BACKEND", None)
    if not isinstance(backend, Backend):
        raise BackendUnavailableError(
            f"backend {name!r} exports no BACKEND with name, features, check_available() and "
            "create_machine()"
        )
    backend.check_available()
    return backend


def choose_backend(name: str = "auto") -> Backend:
    """Resolve ``"auto"`` (vz on macOS when usable, else qemu) or load the named backend."""
    if name != "auto":
        return load_backend(name)
    errors = []
    candidates = KNOWN_BACKENDS if sys.platform == "darwin" else ("qemu",)
    for candidate in candidates:
        try:
            return load_backend(candidate)
        except BackendUnavailableError as err:
            errors.append(f"{candidate}: {err}")
    raise BackendUnavailableError("no backend can run here:\n  " + "\n  ".join(errors))
