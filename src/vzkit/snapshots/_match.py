"""What a restore must match: the config fields a snapshot records (``machine`` in the JSON).

Pure config → dict; part of the record layer (nothing here touches a file or a VM).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._config import ConsoleMode, LinuxVMConfig
from .._disk import DiskFormat
from .._macconfig import MacVMConfig
from .._volume import assign_volume_tags

__all__ = ["config_diff", "machine_fields"]


def _canon(path: Path | None) -> str | None:
    return None if path is None else os.path.realpath(path)


def machine_fields(cfg: LinuxVMConfig | MacVMConfig) -> dict[str, Any]:
    """What a restore must match: the guest-visible hardware and every file it refers to
    (canonical paths). The state dir, console log and console kind are per VM and free.
    ``disk_format`` is recorded when it is not raw (the default), so snapshots from before
    the field existed still fit a raw disk; ``root_disk`` only when there is one (its base is
    compared by digest: see ``_ops``)."""
    volumes = [
        {
            "host_path": _canon(v.host_path),
            "tag": v.tag,
            "read_only": v.read_only,
            # only when set, so snapshots from before guest paths existed still match
            **({"guest_path": v.guest_path} if v.guest_path else {}),
        }
        for v in assign_volume_tags(cfg.volumes)
    ]
    if isinstance(cfg, MacVMConfig):
        return {
            "guest": "macos",
            "vm_dir": _canon(cfg.vm_dir),
            "cpus": cfg.cpus,
            "memory_mb": cfg.memory_mb,
            "disk_path": _canon(cfg.disk_path),
            "volumes": volumes,
            "network": cfg.network.mode.value,
            "displays": [] if cfg.headless else [str(d) for d in cfg.displays],
            "vsock": cfg.vsock,
            "balloon": cfg.balloon,
            "entropy": cfg.entropy,
        }
    out: dict[str, Any] = {
        "arch": cfg.arch.value,
        "cpus": cfg.cpus,
        "memory_mb": cfg.memory_mb,
        "kernel_path": _canon(cfg.kernel_path),
        "initrd_path": _canon(cfg.initrd_path),
        "cmdline": cfg.cmdline,
        "disk_path": _canon(cfg.disk_path),
        "iso_path": _canon(cfg.iso_path),
        "volumes": volumes,
        "network": cfg.network.mode.value,
        # only when set, so snapshots written before the option existed still match
        **({"host_loopback": True} if cfg.network.host_loopback else {}),
        "displays": [] if cfg.headless else [str(d) for d in cfg.displays] or ["default"],
        "vsock": cfg.vsock,
        "vsock_cid": cfg.vsock_cid,
        "balloon": cfg.balloon,
        "entropy": cfg.entropy,
        "serial_console": cfg.console is not ConsoleMode.NONE,
        "nested_virtualization": cfg.nested_virtualization,
        "accelerator": cfg.accelerator,
    }
    if cfg.disk_format is not DiskFormat.RAW:
        out["disk_format"] = cfg.disk_format.value
    root = cfg.root_disk
    if root is not None:  # its base is matched by digest (the record's rootDisk), not by path
        out["root_disk"] = {
            "format": root.format.value,
            "device": root.device,
            "fstype": root.fstype,
            "init": root.init.value,
        }
    return out


def config_diff(saved: dict[str, Any], cfg: LinuxVMConfig | MacVMConfig) -> list[str]:
    """One ``"field: snapshot X, this VM Y"`` line per difference (empty: compatible)."""
    now = machine_fields(cfg)
    return [
        f"{key}: snapshot {saved.get(key)!r}, this VM {now.get(key)!r}"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    ]
