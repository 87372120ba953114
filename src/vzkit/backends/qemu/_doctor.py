"""The qemu backend's part of :func:`vzkit.doctor.report`: what a VM would get here.

Per guest architecture: the QEMU binary, its accelerators, the KVM verdict, whether it runs
under its seccomp sandbox and the EFI firmware; then which vsock transport, NAT helper and
share daemon a VM would use.
"""

from __future__ import annotations

import asyncio
import os
import sys

from ..._state import Arch
from ...doctor import Check
from ...errors import VzkitError
from . import _discover, _passt, _virtiofs, _vsock

__all__ = ["doctor_checks"]

_KVM = {True: "works", False: "does not work here", None: "not probed yet"}


def doctor_checks() -> list[Check]:
    """The checks ``vzkit doctor`` prints under ``qemu``."""
    checks: list[Check] = []
    for guest in Arch:
        checks += _arch_checks(guest)
    return checks + _device_checks()


def _arch_checks(guest: Arch) -> list[Check]:
    arch = guest.value
    try:
        binary = _discover.find_qemu(guest)
    except VzkitError as err:
        return [Check(name=f"{arch} QEMU", ok=False, detail=str(err))]
    offered = _discover.accelerators(binary)
    checks = [
        Check(name=f"{arch} QEMU", ok=True, detail=str(binary)),
        Check(name=f"{arch} accelerators", ok=bool(offered), detail=", ".join(sorted(offered))),
    ]
    if "kvm" in offered:
        verdict = _discover.cached_kvm_probe(binary)
        detail, hint = _KVM[verdict], ""
        if verdict is False:
            why = _discover.cached_kvm_detail(binary)
            detail = f"{detail}: {why}" if why else detail
            hint = "guests run under TCG, slower; vzkit re-probes when QEMU or the kernel changes"
        elif verdict is None:
            hint = "the first VM started probes it (a boot of a few seconds)"
        checks.append(Check(name=f"{arch} KVM", ok=verdict is not False, detail=detail, hint=hint))
    sandbox = asyncio.run(_discover.sandbox_probe(binary))
    if sandbox.supported:
        detail = "QEMU runs under its seccomp sandbox (-sandbox on)"
    else:
        detail = f"QEMU runs WITHOUT a seccomp sandbox (this binary cannot: {sandbox.detail})"
    checks.append(Check(name=f"{arch} sandbox", ok=sandbox.supported, detail=detail))
    try:
        firmware = _discover.find_firmware(guest)
        checks.append(Check(name=f"{arch} EFI firmware", ok=True, detail=str(firmware.code)))
    except VzkitError as err:
        checks.append(Check(name=f"{arch} EFI firmware", ok=False, detail=str(err)))
    return checks


def _device_checks() -> list[Check]:
    """Which vsock transport, NAT helper and share daemon a VM would get here."""
    checks = [_vsock_check()]
    if sys.platform.startswith("linux"):
        checks.append(_nat_check())
    return checks + _share_checks()


def _vsock_check() -> Check:
    device = _vsock.VHOST_DEVICE
    if sys.platform != "linux":
        return Check(
            name="vsock", ok=False, detail="not on this host (QEMU's vhost devices need Linux)"
        )
    if os.access(device, os.R_OK | os.W_OK):
        return Check(name="vsock", ok=True, detail=f"kernel vhost-vsock ({device})")
    return Check(
        name="vsock", ok=True, detail=f"vzkit's user-space vhost-user-vsock device (no {device})"
    )


def _nat_check() -> Check:
    passt = _passt.find_passt()
    if passt is not None:
        detail = f"passt {passt} (the guest cannot reach the host's loopback)"
        return Check(name="nat", ok=True, detail=detail)
    return Check(
        name="nat",
        ok=False,
        detail="QEMU's user-mode network, where the guest CAN reach the host's loopback "
        "services at 10.0.2.2",
        hint="install passt to close that",
    )


def _share_checks() -> list[Check]:
    daemon = _virtiofs.find_virtiofsd()
    if daemon is None:
        return [Check(name="shares", ok=True, detail="virtio-9p (no virtiofsd found)")]
    root = os.geteuid() == 0
    if daemon.readonly:
        ro = "read-only shares with --readonly"
    elif root:
        ro = "read-only shares from a private read-only bind"
    else:
        ro = "read-only shares on virtio-9p (the bind needs root)"
    found = Check(
        name="shares", ok=True, detail=f"VirtioFS, {daemon.flavour} virtiofsd {daemon.path} ({ro})"
    )
    sandbox = _virtiofs.sandbox_mode(root)
    if sandbox is _virtiofs.VirtiofsSandbox.NAMESPACE:
        how = Check(name="share sandbox", ok=True, detail="virtiofsd runs in its namespace sandbox")
    elif sandbox is _virtiofs.VirtiofsSandbox.CHROOT:
        how = Check(
            name="share sandbox",
            ok=True,
            detail="virtiofsd runs in its chroot sandbox (no namespaces here)",
        )
    else:
        how = Check(
            name="share sandbox",
            ok=False,
            detail="virtio-9p, not VirtioFS (virtiofsd cannot be sandboxed here: "
            "no user namespaces for this user)",
        )
    return [found, how]
