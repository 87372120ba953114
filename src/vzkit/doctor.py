"""What can run VMs here, and why not: a report every backend contributes its checks to.

    >>> from vzkit import doctor
    >>> for backend in doctor.report().backends:
    ...     print(backend.name, backend.available, [c.name for c in backend.checks if not c.ok])

``vzkit doctor`` prints it. :func:`report` loads each known backend by name
(:func:`vzkit.backends.load_backend`); one that cannot run here says why in
:attr:`BackendReport.detail`. One that can contributes its :class:`Check` items through the
function ``doctor_checks() -> list[Check]`` its package exports (the qemu backend: binaries,
accelerators, the KVM and seccomp probes, firmware, vsock, network and share helpers; the vz
backend: the Virtualization framework and this interpreter's entitlement). :attr:`Report.guest`
holds what vzkit's own guest needs, whatever the backend: the cached guest image per
architecture, the agent's toolchain and where packages come from.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from ._state import Arch
from .backends import KNOWN_BACKENDS, load_backend
from .errors import BackendUnavailableError, VzkitError

__all__ = ["BackendReport", "Check", "Report", "guest_checks", "report"]


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
    """The backends, in vzkit's order of preference (``backend="auto"``), and the checks of
    vzkit's guest (``guest``)."""

    backends: tuple[BackendReport, ...]
    guest: tuple[Check, ...] = ()

    def backend(self, name: str) -> BackendReport:
        """The report of backend ``name`` (``KeyError`` when it was not asked for)."""
        for item in self.backends:
            if item.name == name:
                return item
        raise KeyError(name)


def report(backends: Iterable[str] = KNOWN_BACKENDS, *, guest: bool = True) -> Report:
    """Check ``backends`` (all known ones by default) on this machine, and (``guest``) what
    vzkit's guest needs.

    Probes may start short-lived processes (QEMU with no machine, cached per binary version;
    ``zig version``); nothing is left running.
    """
    return Report(
        backends=tuple(_backend_report(name) for name in backends),
        guest=tuple(guest_checks()) if guest else (),
    )


def guest_checks(cache_dir: Path | None = None) -> list[Check]:
    """The guest image per architecture (cached or not yet built), the agent's toolchain,
    and where the guest's Debian packages come from."""
    from .image import list_images
    from .image._agent_build import _zig_version, shipped_arches, zig_command
    from .image._fetch import choose_source
    from .image._mirror import DEFAULT_MIRROR

    checks = []
    images = list_images(cache_dir)
    for arch in Arch:
        found = [img for _, img in images if img.arch == arch.value]
        if found:
            newest = found[0]
            size = newest.initrd.stat().st_size / (1 << 20)
            detail = f"cached: kernel {newest.kernel_version}, initramfs {size:.1f} MiB"
            checks.append(Check(name=f"{arch.value} guest image", ok=True, detail=detail))
        else:
            checks.append(
                Check(
                    name=f"{arch.value} guest image",
                    ok=True,
                    detail="not built yet",
                    hint=f"the first VM builds it, or now: vzkit image build --arch {arch.value}",
                )
            )
    try:
        shipped = shipped_arches()
        if len(shipped) == len(Arch):  # an installed wheel: zig is only for rebuilding
            detail = f"not needed: vzkit ships the agent prebuilt ({', '.join(shipped)})"
            checks.append(Check(name="agent toolchain", ok=True, detail=detail))
        else:
            version = _zig_version(zig_command())
            checks.append(Check(name="agent toolchain", ok=True, detail=f"zig {version}"))
    except VzkitError as err:
        checks.append(
            Check(
                name="agent toolchain",
                ok=False,
                detail=str(err).split(":", 1)[0],
                hint=str(err),
            )
        )
    try:
        source = choose_source()
        where = {
            "auto": "apt-get download where apt can, else the Debian mirror",
            "apt": "apt-get download (VZKIT_DEB_SOURCE=apt)",
            "mirror": os.environ.get("VZKIT_DEBIAN_MIRROR", "").strip() or DEFAULT_MIRROR,
        }[source]
        checks.append(Check(name="guest packages", ok=True, detail=where))
    except VzkitError as err:
        checks.append(Check(name="guest packages", ok=False, detail=str(err)))
    return checks


def _backend_report(name: str) -> BackendReport:
    try:
        load_backend(name)
    except BackendUnavailableError as err:
        return BackendReport(name=name, available=False, detail=str(err))
    module = importlib.import_module(f"{__package__}.backends.{name}")
    checks = cast(Callable[[], list[Check]], module.doctor_checks)
    return BackendReport(name=name, available=True, checks=tuple(checks()))
