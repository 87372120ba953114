"""``MacVMConfig``: pure, frozen data describing a macOS guest (Apple silicon, vz backend only).

A macOS VM lives in one directory (``vm_dir``) that the installer fills and every boot reuses:

==========================  ==================================================================
``disk.img``                the main disk (raw, sparse; ``disk_size_gb`` when created)
``auxiliary-storage``       the Mac's NVRAM-like auxiliary storage (``VZMacAuxiliaryStorage``)
``hardware-model``          the ``VZMacHardwareModel`` chosen from the restore image (bytes)
``machine-identifier``      the ``VZMacMachineIdentifier`` (bytes): the same Mac every boot
``install.json``            written last by a completed install (build, macOS version)
``mac-address``             the NIC's MAC address, kept across boots (``mac-address-N``: the
                            NIC at index N of ``network`` then ``networks``)
==========================  ==================================================================

Nothing here imports a backend; :mod:`vzkit.backends.vz` lowers it and refuses what the host
cannot do.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ._config import DEVICE_BOOLS, MAX_CPUS, ConfigData, memory_gb_value
from ._disk import DiskFormat
from ._display import DisplayConfig, default_display_config
from ._network import NetworkConfig
from ._storage import Disk, check_disk_files
from ._volume import VolumeMount
from .errors import ConfigError

__all__ = [
    "MAC_AUX_FILE",
    "MAC_DISK_FILE",
    "MAC_HARDWARE_MODEL_FILE",
    "MAC_INSTALL_FILE",
    "MAC_MACHINE_ID_FILE",
    "MIN_MAC_MEMORY_GB",
    "MacKeyboard",
    "MacPointer",
    "MacVMConfig",
]

MAC_DISK_FILE = "disk.img"
MAC_AUX_FILE = "auxiliary-storage"
MAC_HARDWARE_MODEL_FILE = "hardware-model"
MAC_MACHINE_ID_FILE = "machine-identifier"
MAC_INSTALL_FILE = "install.json"
#: Below this no macOS release boots; restore images usually ask for more (checked at install).
MIN_MAC_MEMORY_GB = 2.0
#: macOS does not fit in less (Apple's sample code uses 128 GB).
MIN_MAC_DISK_GB = 32


class MacKeyboard(enum.StrEnum):
    """The guest's keyboard: ``auto`` is the Mac keyboard on macOS 14+ hosts, else USB."""

    AUTO = "auto"
    MAC = "mac"  # VZMacKeyboardConfiguration (host macOS 14+)
    USB = "usb"  # VZUSBKeyboardConfiguration


class MacPointer(enum.StrEnum):
    """The guest's pointing device: ``auto`` is a trackpad on macOS 13+ hosts, else USB."""

    AUTO = "auto"
    TRACKPAD = "trackpad"  # VZMacTrackpadConfiguration (host macOS 13+)
    USB = "usb"  # VZUSBScreenCoordinatePointingDeviceConfiguration


def _path(name: str, value: object) -> Path:
    if isinstance(value, str | os.PathLike):
        text = os.fspath(value)
        if isinstance(text, str) and text and "\x00" not in text:
            return Path(text).expanduser().absolute()
    raise ConfigError(f"{name} must be a non-empty path, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class MacVMConfig(ConfigData):
    """A macOS guest kept in ``vm_dir``: install it once, then boot it like any VM.

    ``cpus`` and ``memory_gb`` must also satisfy the restore image's requirements (checked by
    the installer). ``displays`` defaults to the seed's Mac display (1920x1200 at 144 PPI);
    ``headless`` leaves out graphics, keyboard and pointing device.
    """

    WHAT: ClassVar[str] = "macOS VM config"

    vm_dir: Path
    cpus: int = 4
    memory_gb: float = 8.0
    disk_size_gb: int = 64

    displays: tuple[DisplayConfig, ...] = (default_display_config(),)
    headless: bool = False
    #: Show the display in a window (closing it stops the VM); see ``LinuxVMConfig.gui``.
    gui: bool = False
    keyboard: MacKeyboard = MacKeyboard.AUTO
    pointer: MacPointer = MacPointer.AUTO

    volumes: tuple[VolumeMount, ...] = ()
    network: NetworkConfig = field(default_factory=NetworkConfig)
    #: More NICs after ``network``, each with its own MAC address kept in ``vm_dir``.
    networks: tuple[NetworkConfig, ...] = ()
    #: More disks after the main one: image files or NBD exports on a virtio, NVMe (host
    #: macOS 14+) or USB mass-storage (macOS 13+) bus (see :class:`~vzkit.Disk`).
    disks: tuple[Disk, ...] = ()
    vsock: bool = True
    balloon: bool = True
    entropy: bool = True
    sound: bool = False  # virtio sound output to the host's speakers
    #: Start up in macOS Recovery (host macOS 13+) instead of the installed system, e.g. to
    #: change the guest's security settings; the VM directory is unchanged.
    recovery: bool = False

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("vm_dir", _path("vm_dir", self.vm_dir))
        if not isinstance(self.cpus, int) or isinstance(self.cpus, bool):
            raise ConfigError(f"cpus must be an integer, got {self.cpus!r}")
        if not 1 <= self.cpus <= MAX_CPUS:
            raise ConfigError(f"cpus must be between 1 and {MAX_CPUS}, got {self.cpus}")
        memory_gb = memory_gb_value(self.memory_gb)
        if memory_gb < MIN_MAC_MEMORY_GB:
            raise ConfigError(
                f"memory_gb={self.memory_gb!r}: a macOS guest needs at least "
                f"{MIN_MAC_MEMORY_GB:g} GB"
            )
        put("memory_gb", memory_gb)
        size = self.disk_size_gb
        if not isinstance(size, int) or isinstance(size, bool) or size < MIN_MAC_DISK_GB:
            raise ConfigError(
                f"disk_size_gb must be an integer of at least {MIN_MAC_DISK_GB}, got {size!r}"
            )
        try:
            put("keyboard", MacKeyboard(self.keyboard))
            put("pointer", MacPointer(self.pointer))
        except ValueError as err:
            raise ConfigError(str(err)) from err
        self._check_devices(
            ("volumes", "displays", "disks", "networks"),
            ("headless", "gui", "recovery", *DEVICE_BOOLS),
        )
        if self.gui and self.headless:
            put("headless", False)  # a shown display needs one
        check_disk_files(self.disks)
        for vol in self.volumes:
            if vol.guest_path:
                raise ConfigError(
                    f"volume {str(vol)!r}: a macOS guest mounts shares itself (by tag, or under "
                    "/Volumes/My Shared Files); drop the guest path and give a tag instead"
                )
        if not self.headless and not self.displays:
            raise ConfigError("a macOS guest with graphics needs at least one display")

    # -- the VM directory ----------------------------------------------------------------

    @property
    def memory_mb(self) -> int:
        """Memory in MiB, rounded down to a whole MiB."""
        return int(self.memory_gb * 1024)

    @property
    def disk_path(self) -> Path:
        return self.vm_dir / MAC_DISK_FILE

    @property
    def disk_format(self) -> DiskFormat:
        """Always raw: vzkit creates the disk and Virtualization attaches raw images only."""
        return DiskFormat.RAW

    @property
    def auxiliary_storage_path(self) -> Path:
        return self.vm_dir / MAC_AUX_FILE

    @property
    def hardware_model_path(self) -> Path:
        return self.vm_dir / MAC_HARDWARE_MODEL_FILE

    @property
    def machine_identifier_path(self) -> Path:
        return self.vm_dir / MAC_MACHINE_ID_FILE

    @property
    def install_record_path(self) -> Path:
        return self.vm_dir / MAC_INSTALL_FILE

    @property
    def state_dir(self) -> Path:
        """Where the backend keeps per-VM state: the VM directory itself."""
        return self.vm_dir

    @property
    def installed(self) -> bool:
        """Whether a completed install left everything a boot needs in ``vm_dir``."""
        return all(
            p.is_file()
            for p in (
                self.disk_path,
                self.auxiliary_storage_path,
                self.hardware_model_path,
                self.machine_identifier_path,
                self.install_record_path,
            )
        )

    def install_record(self) -> dict[str, Any]:
        """What the installer recorded (``build``, ``macos_version``, ...)."""
        try:
            data = json.loads(self.install_record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"{str(self.vm_dir)!r} holds no completed macOS install ({err})"
            ) from err
        if not isinstance(data, dict):
            raise ConfigError(f"{str(self.install_record_path)!r} is not a JSON object")
        return data

    def check_inputs(self) -> None:
        """Raise :class:`ConfigError` unless ``vm_dir`` holds a completed install."""
        for path in (
            self.disk_path,
            self.auxiliary_storage_path,
            self.hardware_model_path,
            self.machine_identifier_path,
            self.install_record_path,
        ):
            if not path.is_file():
                raise ConfigError(
                    f"{str(self.vm_dir)!r} holds no installed macOS ({path.name} is missing); "
                    "install one from a restore image first (vzkit.backends.vz.install_macos)"
                )
        check_disk_files(self.disks)
