"""What a start prepares on the host before QEMU runs: the NIC's stable MAC address, the EFI
variable store, the bridge check and the seccomp-sandbox decision. Files are 0600 (guest
state), never followed through a planted link (see ``vzkit._private``)."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from ..._config import LinuxVMConfig
from ..._network import NetworkMode, stable_mac
from ..._private import open_private, private_file
from ...errors import UnsupportedError
from . import _discover
from ._bridge import find_bridge_helper

__all__ = ["check_network", "mac_address", "nvram", "sandbox"]

log = logging.getLogger(__name__)


def mac_address(state_dir: Path | None) -> str:
    """A random locally administered unicast MAC, kept in ``state_dir`` so it stays stable
    (:func:`vzkit._network.stable_mac`)."""
    return stable_mac(state_dir)


def nvram(state_dir: Path, template: Path) -> Path:
    """The VM's EFI variable store: a 0600 copy of the firmware's template, made once."""
    nvram = state_dir / "efi.nvram"
    if nvram.exists():
        return private_file(nvram)  # also narrows one an older vzkit left 0644
    tmp = nvram.with_name(f".efi.nvram.tmp-{os.getpid()}")
    try:
        with open(template, "rb") as src, open_private(tmp, append=False) as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, nvram)
    finally:
        tmp.unlink(missing_ok=True)
    return nvram


def check_network(cfg: LinuxVMConfig) -> None:
    """What the argv cannot know: whether bridging is possible on this host."""
    net = cfg.network
    if net.mode is not NetworkMode.BRIDGED or sys.platform == "darwin":
        return
    if not Path(f"/sys/class/net/{net.interface}/bridge").is_dir():
        raise UnsupportedError(
            f"cannot bridge to {net.interface!r}: it is not a Linux bridge on this host "
            "(create one, e.g. with 'ip link add br0 type bridge', and allow it in "
            "/etc/qemu/bridge.conf)",
            backend="qemu",
            feature="network:bridged",
        )
    find_bridge_helper()


async def sandbox(binary: Path) -> bool:
    """Whether this run gets QEMU's seccomp filter (``-sandbox``, see ``_argv.sandbox_args``):
    when the binary can (else logged; ``vzkit doctor`` says so too)."""
    probe = await _discover.sandbox_probe(binary)
    if not probe.supported:
        log.warning("%s runs without its seccomp sandbox: %s", binary.name, probe.detail)
    return probe.supported
