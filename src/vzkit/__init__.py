"""vzkit: build and run lightweight virtual machines from Python.

One API over two backends: Apple's Virtualization framework (``vz``, macOS) and QEMU
(``qemu``, Linux and macOS). This package's top level is the platform-independent core: specs,
configs, disks, the snapshot catalogue, states and errors. Importing it starts no process and
imports no platform bindings; backends are loaded by name when a VM needs one.
"""

from __future__ import annotations

import logging
from typing import Any

from ._config import MIN_MEMORY_MB, ConsoleMode, LinuxVMConfig
from ._disk import DiskFormat, create_disk_image
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
from ._snapshot import SnapshotManager, SnapshotMeta
from ._state import Arch, VMState, host_arch
from ._vm import Balloon, VirtualMachine
from ._volume import VolumeMount, assign_volume_tags, parse_volume_spec
from .backends import BalloonInfo
from .errors import (
    BackendUnavailableError,
    ConfigError,
    GuestError,
    SnapshotError,
    SpecError,
    StateError,
    UnsupportedError,
    VMError,
    VMTimeoutError,
    VzkitError,
)

__version__ = "0.1.0.dev0"

# Sorted (ruff RUF022); tests/unit/test_public_api.py pins the list.
__all__ = [
    "MIN_MEMORY_MB",
    "Arch",
    "BackendUnavailableError",
    "Balloon",
    "BalloonInfo",
    "ConfigError",
    "ConsoleMode",
    "DiskFormat",
    "DisplayConfig",
    "DisplayList",
    "GuestError",
    "LinuxVMConfig",
    "MacKeyboard",
    "MacPointer",
    "MacVMConfig",
    "NetworkConfig",
    "NetworkMode",
    "PortForward",
    "PortProtocol",
    "SnapshotError",
    "SnapshotManager",
    "SnapshotMeta",
    "SpecError",
    "StateError",
    "UnsupportedError",
    "VMError",
    "VMState",
    "VMTimeoutError",
    "VirtualMachine",
    "VolumeMount",
    "VzkitError",
    "__version__",
    "assign_volume_tags",
    "create_disk_image",
    "default_display_config",
    "default_guest_config",
    "default_linux_display_config",
    "host_arch",
    "parse_display_spec",
    "parse_network_mode",
    "parse_port_spec",
    "parse_volume_spec",
]


def default_guest_config(arch: Arch | str | None = None, **overrides: Any) -> LinuxVMConfig:
    """A config for vzkit's default guest on ``arch`` (the host's by default).

    The guest image (a Debian cloud kernel, a busybox initramfs and the vzkit agent) is built
    and cached on first use. ``overrides`` are any :class:`LinuxVMConfig` fields.
    """
    from .guest._image import default_guest_config as build

    return build(arch, **overrides)


logging.getLogger(__name__).addHandler(logging.NullHandler())
