"""vzkit: build and run lightweight virtual machines from Python.

One API over two backends: Apple's Virtualization framework (``vz``, macOS) and QEMU
(``qemu``, Linux and macOS). This package's top level is the platform-independent core: specs,
configs, disks, the snapshot catalogue, states and errors. Importing it starts no process and
imports no platform bindings; backends are loaded by name when a VM needs one.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, imported on first use (see __getattr__)
    from ._config import MIN_MEMORY_MB, ConsoleMode, LinuxVMConfig
    from ._disk import DiskFormat, RootDisk, RootInit, create_disk_image
    from ._display import (
        DisplayConfig,
        DisplayList,
        default_display_config,
        default_linux_display_config,
        parse_display_spec,
    )
    from ._macconfig import MacKeyboard, MacPointer, MacVMConfig
    from ._network import (
        NetworkConfig,
        NetworkMode,
        PortForward,
        PortProtocol,
        parse_network_mode,
        parse_port_spec,
    )
    from ._oneshot import run, start
    from ._process_defaults import ProcessDefaults
    from ._state import Arch, VMState, host_arch
    from ._storage import Disk, DiskBus, parse_disk_spec
    from ._units import format_size, parse_size
    from ._vm import Balloon, VirtualMachine
    from ._volume import VolumeMount, assign_volume_tags, parse_volume_spec
    from .backends import BalloonInfo
    from .errors import (
        ArgumentError,
        BackendUnavailableError,
        ConfigError,
        GuestError,
        SnapshotError,
        SpecError,
        StateError,
        UnsupportedError,
        VMError,
        VMExistsError,
        VMNotFoundError,
        VMTimeoutError,
        VzkitError,
    )
    from .named._api import GuestCommand, VMInfo, connect, create, list_vms, remove_vm
    from .named._exec import exec_call
    from .snapshots._facade import SnapshotManager
    from .snapshots._record import SnapshotMeta

#: Public name → the module that defines it. ``import vzkit`` imports none of them: a program
#: that needs one part (the vsock device helper QEMU waits for at every boot, ``vzkit --help``)
#: does not pay for the rest.
_LAZY = {
    "MIN_MEMORY_MB": "._config",
    "ConsoleMode": "._config",
    "LinuxVMConfig": "._config",
    "DiskFormat": "._disk",
    "RootDisk": "._disk",
    "ProcessDefaults": "._process_defaults",
    "RootInit": "._disk",
    "create_disk_image": "._disk",
    "format_size": "._units",
    "parse_size": "._units",
    "DisplayConfig": "._display",
    "DisplayList": "._display",
    "default_display_config": "._display",
    "default_linux_display_config": "._display",
    "parse_display_spec": "._display",
    "MacKeyboard": "._macconfig",
    "MacPointer": "._macconfig",
    "MacVMConfig": "._macconfig",
    "NetworkConfig": "._network",
    "NetworkMode": "._network",
    "PortForward": "._network",
    "PortProtocol": "._network",
    "parse_network_mode": "._network",
    "parse_port_spec": "._network",
    "run": "._oneshot",
    "start": "._oneshot",
    "SnapshotManager": ".snapshots._facade",
    "SnapshotMeta": ".snapshots._record",
    "Arch": "._state",
    "VMState": "._state",
    "host_arch": "._state",
    "Disk": "._storage",
    "DiskBus": "._storage",
    "parse_disk_spec": "._storage",
    "Balloon": "._vm",
    "VirtualMachine": "._vm",
    "VolumeMount": "._volume",
    "assign_volume_tags": "._volume",
    "parse_volume_spec": "._volume",
    "BalloonInfo": ".backends",
    "ArgumentError": ".errors",
    "BackendUnavailableError": ".errors",
    "ConfigError": ".errors",
    "GuestError": ".errors",
    "SnapshotError": ".errors",
    "SpecError": ".errors",
    "StateError": ".errors",
    "UnsupportedError": ".errors",
    "VMError": ".errors",
    "VMExistsError": ".errors",
    "VMNotFoundError": ".errors",
    "GuestCommand": ".named._api",
    "VMInfo": ".named._api",
    "connect": ".named._api",
    "create": ".named._api",
    "list_vms": ".named._api",
    "exec_call": ".named._exec",
    "remove_vm": ".named._api",
    "VMTimeoutError": ".errors",
    "VzkitError": ".errors",
    "build_debian_image": "._imagebuild",
    "pull_image": ".image.oci._resolve",
}

__version__ = "0.1.0.dev0"

# Sorted (ruff RUF022); tests/unit/test_public_api.py pins the list.
__all__ = [
    "MIN_MEMORY_MB",
    "Arch",
    "ArgumentError",
    "BackendUnavailableError",
    "Balloon",
    "BalloonInfo",
    "ConfigError",
    "ConsoleMode",
    "Disk",
    "DiskBus",
    "DiskFormat",
    "DisplayConfig",
    "DisplayList",
    "GuestCommand",
    "GuestError",
    "LinuxVMConfig",
    "MacKeyboard",
    "MacPointer",
    "MacVMConfig",
    "NetworkConfig",
    "NetworkMode",
    "PortForward",
    "PortProtocol",
    "ProcessDefaults",
    "RootDisk",
    "RootInit",
    "SnapshotError",
    "SnapshotManager",
    "SnapshotMeta",
    "SpecError",
    "StateError",
    "UnsupportedError",
    "VMError",
    "VMExistsError",
    "VMInfo",
    "VMNotFoundError",
    "VMState",
    "VMTimeoutError",
    "VirtualMachine",
    "VolumeMount",
    "VzkitError",
    "__version__",
    "assign_volume_tags",
    "build_debian_image",
    "connect",
    "create",
    "create_disk_image",
    "default_display_config",
    "default_guest_config",
    "default_linux_display_config",
    "exec_call",
    "format_size",
    "host_arch",
    "list_vms",
    "parse_disk_spec",
    "parse_display_spec",
    "parse_network_mode",
    "parse_port_spec",
    "parse_size",
    "parse_volume_spec",
    "pull_image",
    "remove_vm",
    "run",
    "start",
]


def default_guest_config(arch: Arch | str | None = None, **overrides: Any) -> LinuxVMConfig:
    """A config for vzkit's default guest on ``arch`` (the host's by default).

    The guest image (a Debian cloud kernel, a busybox initramfs and the vzkit agent) is built
    and cached on first use. ``overrides`` are any :class:`LinuxVMConfig` fields, and
    ``image="debian"`` boots the cached Debian image (built on first use), ``image=REF`` an
    OCI image (``"python:3.12-slim"``, ``"docker://HOST/REPO:TAG"``, ``"oci:DIR"``, ...;
    pulled and converted on first use, its config's env, working directory, user and command
    in ``process``; ``docs/oci.md``), ``rootfs=`` a tree, ``root=`` a device of ``disk_path``
    (``docs/images.md``).
    """
    from ._imagebuild import default_guest_config as build

    return build(arch, **overrides)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vzkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


logging.getLogger(__name__).addHandler(logging.NullHandler())
