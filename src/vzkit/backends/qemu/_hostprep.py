"""What a start prepares on the host before QEMU runs: the probes (:func:`probe`: binary,
accelerator, firmware), the NIC's stable MAC address, the EFI variable store, the bridge
check and the seccomp-sandbox decision. Files are 0600 (guest
state), never followed through a planted link (see ``vzkit._private``)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

from ..._config import LinuxVMConfig
from ..._disk import DiskFormat, standalone_qcow2_size
from ..._network import NetworkMode, stable_mac
from ..._private import open_private, private_file
from ...errors import UnsupportedError
from . import _discover
from ._bridge import find_bridge_helper

__all__ = ["Host", "check_network", "mac_address", "nic_macs", "nvram", "probe", "sandbox"]

log = logging.getLogger(__name__)


def mac_address(state_dir: Path | None) -> str:
    """A random locally administered unicast MAC, kept in ``state_dir`` so it stays stable
    (:func:`vzkit._network.stable_mac`)."""
    return stable_mac(state_dir)


def nic_macs(cfg: LinuxVMConfig, state_dir: Path | None) -> tuple[str, ...]:
    """The MACs of the NICs after the first (``cfg.networks``), each kept in ``state_dir``
    (``mac-address-1``, ...) like the first one's."""
    return tuple(stable_mac(state_dir, i) for i in range(1, len(cfg.networks) + 1))


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


class Host(NamedTuple):
    """What a start found out about the host (see :func:`probe`)."""

    binary: Path
    accel: str
    sandbox: bool
    firmware_code: Path | None
    nvram: Path | None


async def probe(cfg: LinuxVMConfig, state_dir: Path, config_disk: bool) -> Host:
    """The host side of a start, checked before anything is started: the binary, its
    accelerator and sandbox (two probes side by side; one failing cancels the other), the
    firmware and variable store (in ``state_dir``) for EFI boot, the network and, when the
    run uses the config's disk (``config_disk``), a qcow2 one; a qcow2 one of ``disks``
    always (refused if its header names a data file)."""
    binary = _discover.find_qemu(cfg.arch)
    try:
        async with asyncio.TaskGroup() as probes:
            select = _discover.select_accelerator
            accel_probe = probes.create_task(
                asyncio.to_thread(select, binary, cfg.arch, cfg.accelerator, cfg.kernel_path)
            )
            sandbox_probe = probes.create_task(sandbox(binary))
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    firmware_code = vars_file = None
    if cfg.kernel_path is None:
        firmware = _discover.find_firmware(cfg.arch)
        firmware_code = firmware.code
        vars_file = nvram(state_dir, firmware.vars_template)
    check_network(cfg)
    if config_disk and cfg.disk_path is not None and cfg.disk_format is DiskFormat.QCOW2:
        # refused if its header names a data file (QEMU would open it; backing: null)
        await asyncio.to_thread(standalone_qcow2_size, cfg.disk_path)
    for disk in cfg.disks:  # more disks: the same check (opened with backing: null too)
        if disk.path is not None and disk.format is DiskFormat.QCOW2:
            await asyncio.to_thread(standalone_qcow2_size, disk.path)
    return Host(binary, accel_probe.result(), sandbox_probe.result(), firmware_code, vars_file)
