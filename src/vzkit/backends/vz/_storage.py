"""More disks (``disks`` of a Linux or macOS guest's config): one storage attachment per source
and one storage device configuration per bus, each gated by the macOS version that has it.

A :class:`~vzkit.Disk` is an image file (``VZDiskImageStorageDeviceAttachment``, raw only, with
vzkit's explicit caching and synchronization modes) or a network block device
(``VZNetworkBlockDeviceStorageDeviceAttachment``, macOS 14+), on a virtio-blk
(``VZVirtioBlockDeviceConfiguration``), NVMe (``VZNVMExpressControllerDeviceConfiguration``,
macOS 14+) or USB mass-storage bus (``VZUSBMassStorageDeviceConfiguration``, macOS 13+). All of
them are storage devices of the configuration, after the main disk and the ISO.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from typing import Any

from ..._disk import DiskFormat
from ..._storage import Disk, DiskBus
from ...errors import ConfigError, UnsupportedError
from ._devices import create_block_device, create_disk_attachment
from ._nserror import extract_nserror_message, nserror_to_exception
from ._objc import foundation, require_macos, vz

__all__ = [
    "NBD_TIMEOUT_S",
    "create_nbd_attachment",
    "create_nvme_device",
    "create_usb_mass_storage_device",
    "disk_to_vz",
    "disks_to_vz",
]

#: How long the framework waits for the NBD server at each (re)connect, in seconds. The
#: attachment reconnects by itself after a connection is lost.
NBD_TIMEOUT_S = 10.0
#: ``VZDiskSynchronizationModeFull``: writes reach the server's storage before they complete.
_NBD_SYNC = "VZDiskSynchronizationModeFull"


def create_nbd_attachment(url: str, read_only: bool = False) -> Any:
    """A ``VZNetworkBlockDeviceStorageDeviceAttachment`` for an ``nbd://`` or ``nbd+unix://``
    URL (macOS 14+), checked by the framework's ``validateURL:error:`` first; ``read_only``
    forces the export read-only."""
    require_macos("14.0", "network block devices (VZNetworkBlockDeviceStorageDeviceAttachment)")
    v = vz()
    ns_url = foundation().NSURL.URLWithString_(url)
    if ns_url is None:
        raise ConfigError(f"NBD URL {url!r} is not a URL the framework can read")
    cls = v.VZNetworkBlockDeviceStorageDeviceAttachment
    ok, error = cls.validateURL_error_(ns_url, None)
    if not ok:
        raise ConfigError(
            f"NBD URL {url!r} is not valid here: {extract_nserror_message(error)} "
            "(give nbd://HOST[:PORT][/EXPORT] or nbd+unix:///[EXPORT]?socket=/PATH)"
        )
    attachment, error = cls.alloc().initWithURL_timeout_forcedReadOnly_synchronizationMode_error_(
        ns_url, NBD_TIMEOUT_S, read_only, getattr(v, _NBD_SYNC), None
    )
    if attachment is None:
        raise nserror_to_exception(error, f"cannot attach the network block device {url!r}")
    return attachment


#: The macOS version each bus needs, and the API named when it is missing.
_BUS_GATES = {
    DiskBus.NVME: ("14.0", "NVMe disks (VZNVMExpressControllerDeviceConfiguration)"),
    DiskBus.USB: ("13.0", "USB mass storage (VZUSBMassStorageDeviceConfiguration)"),
}


def create_nvme_device(attachment: Any) -> Any:
    """An NVMe controller (``/dev/nvmeXn1`` in a Linux guest) over a storage attachment."""
    require_macos(*_BUS_GATES[DiskBus.NVME])
    return vz().VZNVMExpressControllerDeviceConfiguration.alloc().initWithAttachment_(attachment)


def create_usb_mass_storage_device(attachment: Any) -> Any:
    """A USB mass-storage device (``/dev/sdX`` in a Linux guest) over a storage attachment."""
    require_macos(*_BUS_GATES[DiskBus.USB])
    return vz().VZUSBMassStorageDeviceConfiguration.alloc().initWithAttachment_(attachment)


def _attachment(disk: Disk) -> Any:
    if disk.url:
        return create_nbd_attachment(disk.url, disk.read_only)
    assert disk.path is not None
    if disk.format is not DiskFormat.RAW:
        src = str(disk.path)
        raise UnsupportedError(
            f"the vz backend attaches raw disk images only; the disk {src!r} is "
            f"{disk.format.value}. Convert it and use the copy: qemu-img convert -f "
            f"{disk.format.value} -O raw {shlex.quote(src)} "
            f"{shlex.quote(src.removesuffix('.qcow2') + '.raw')}",
            backend="vz",
            feature=f"disk:{disk.format.value}",
        )
    return create_disk_attachment(disk.path, disk.read_only)


_DEVICES = {
    DiskBus.VIRTIO: create_block_device,
    DiskBus.NVME: create_nvme_device,
    DiskBus.USB: create_usb_mass_storage_device,
}


def disk_to_vz(disk: Disk) -> Any:
    """One disk's storage device configuration. The bus is checked before the attachment is
    made: an NVMe disk on macOS 13 is refused without touching the file or the server."""
    if disk.bus in _BUS_GATES:
        require_macos(*_BUS_GATES[disk.bus])
    return _DEVICES[disk.bus](_attachment(disk))


def disks_to_vz(disks: Iterable[Disk]) -> list[Any]:
    """The storage devices of a config's ``disks``, in order."""
    return [disk_to_vz(disk) for disk in disks]
