"""What can run VMs here, and why not: a report every backend contributes its checks to.

    >>> from vzkit import doctor
    >>> for backend in doctor.report().backends:
    ...     print(backend.name, backend.available, [c.name for c in backend.checks if not c.ok])

``vzkit doctor`` prints it. :func:`report` loads each known backend by name
(:func:`vzkit.backends.load_backend`); one that cannot run here says why in
:attr:`BackendReport.detail`. One that can contributes its :class:`Check` items through the
function ``doctor_checks() -> list[Check]`` its package exports (the qemu backend: binaries,
accelerators, the KVM and seccomp probes, firmware, vsock, network and share helpers; the vz
backend: the Virtualization framework and this interpreter's entitlement).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

from .backends import KNOWN_BACKENDS, load_backend
from .errors import BackendUnavailableError

__all__ = ["BackendReport", "Check", "Report", "report"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One thing a backend needs or uses here: ``name`` (e.g. ``"x86_64 KVM"``), whether it is
    as good as it can be (``ok``), what was found (``detail``) and what to do about it
    (``hint``, empty when there is nothing to do)."""

    name: str
    ok: bool
    detail: str
    hint: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendReport:
    """One backend: whether it can run here (else ``detail`` says why), and its checks."""

    name: str
    available: bool
    detail: str = ""
    checks: tuple[Check, ...] = ()

    @property
    def ok(self) -> bool:
        """Available, and every check ok."""
        return self.available and all(c.ok for c in self.checks)


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """The backends, in vzkit's order of preference (``backend="auto"``)."""

    backends: tuple[BackendReport, ...]

    def backend(self, name: str) -> BackendReport:
        """The report of backend ``name`` (``KeyError`` when it was not asked for)."""
        for item in self.backends:
            if item.name == name:
                return item
        raise KeyError(name)


def report(backends: Iterable[str] = KNOWN_BACKENDS) -> Report:
    """Check ``backends`` (all known ones by default) on this machine.

    Probes may start short-lived processes (QEMU with no machine, cached per binary version);
    nothing is left running.
    """
    return Report(backends=tuple(_backend_report(name) for name in backends))


def _backend_report(name: str) -> BackendReport:
    try:
        load_backend(name)
    except BackendUnavailableError as err:
        return BackendReport(name=name, available=False, detail=str(err))
    module = importlib.import_module(f"{__package__}.backends.{name}")
    checks = cast(Callable[[], list[Check]], module.doctor_checks)
    return BackendReport(name=name, available=True, checks=tuple(checks()))
