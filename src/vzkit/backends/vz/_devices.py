"""Lowering devices to Virtualization's device configurations, one small function each.

Storage (raw disk images with explicit caching and synchronization modes, the read-only ISO),
network (NAT or bridged, a MAC address per NIC kept across boots), entropy, sound output,
memory balloon, vsock,
the virtio serial console, VirtioFS shares and graphics (Virtio GPU for Linux guests, Mac
graphics for macOS guests). Each ``*_to_vz`` function takes a :class:`~vzkit.LinuxVMConfig`
and returns the framework objects for one device kind; :mod:`._build` puts them together
into a ``VZVirtualMachineConfiguration``. The seed's ``Create*`` helpers are public under
snake_case names (re-exported by :mod:`._build` and the package).

Each API is gated by the macOS version that introduced it (:class:`MacOSVersionError`).
"""

from __future__ import annotations

import enum
import os
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..._config import ConsoleMode, LinuxVMConfig
from ..._disk import DiskFormat
from ..._display import DisplayConfig, default_display_config, default_linux_display_config
from ..._macconfig import MacVMConfig
from ..._network import NetworkConfig, NetworkMode, mac_file, read_mac, save_mac
from ..._volume import VolumeMount, assign_volume_tags
from ...errors import ConfigError, UnsupportedError
from ._nserror import extract_nserror_message, nserror_to_exception
from ._objc import foundation, require_macos, vz

__all__ = [
    "DiskCaching",
    "DiskSync",
    "add_memory_balloon_device",
    "balloon_to_vz",
    "create_block_device",
    "create_directory_share",
    "create_disk_attachment",
    "create_file_serial_console",
    "create_mac_graphics_config",
    "create_network_attachment",
    "create_network_device",
    "create_serial_console",
    "create_stdio_serial_console",
    "create_virtio_graphics_config",
    "create_virtiofs_devices",
    "entropy_to_vz",
    "file_url",
    "graphics_to_vz",
    "network_devices_to_vz",
    "network_to_vz",
    "require_raw_disk",
    "serial_to_vz",
    "sound_to_vz",
    "storage_to_vz",
    "vsock_to_vz",
]


class DiskCaching(enum.StrEnum):
    """``VZDiskImageCachingMode``. vzkit defaults to ``CACHED``: the framework's automatic
    mode corrupted Linux guest filesystems (lima #1957, tart #675)."""

    AUTOMATIC = "automatic"
    UNCACHED = "uncached"
    CACHED = "cached"


class DiskSync(enum.StrEnum):
    """``VZDiskImageSynchronizationMode``; vzkit defaults to ``FSYNC`` (as lima does)."""

    FULL = "full"
    FSYNC = "fsync"
    NONE = "none"


_CACHING_CASE = {
    DiskCaching.AUTOMATIC: "VZDiskImageCachingModeAutomatic",
    DiskCaching.UNCACHED: "VZDiskImageCachingModeUncached",
    DiskCaching.CACHED: "VZDiskImageCachingModeCached",
}
_SYNC_CASE = {
    DiskSync.FULL: "VZDiskImageSynchronizationModeFull",
    DiskSync.FSYNC: "VZDiskImageSynchronizationModeFsync",
    DiskSync.NONE: "VZDiskImageSynchronizationModeNone",
}


def file_url(path: str | os.PathLike[str]) -> Any:
    return foundation().NSURL.fileURLWithPath_(os.fspath(path))


# -- storage -----------------------------------------------------------------------------------


def create_disk_attachment(
    path: str | os.PathLike[str],
    read_only: bool = False,
    *,
    caching: DiskCaching = DiskCaching.CACHED,
    sync: DiskSync = DiskSync.FSYNC,
) -> Any:
    """A ``VZDiskImageStorageDeviceAttachment`` for a raw image, with explicit caching and
    synchronization modes (never the framework's defaults)."""
    require_macos("12.0", "disk caching/synchronization modes")
    target = Path(path)
    if not target.is_file():
        raise ConfigError(f"disk image {str(target)!r} does not exist")
    v = vz()
    alloc = v.VZDiskImageStorageDeviceAttachment.alloc()
    attachment, error = alloc.initWithURL_readOnly_cachingMode_synchronizationMode_error_(
        file_url(target),
        read_only,
        getattr(v, _CACHING_CASE[DiskCaching(caching)]),
        getattr(v, _SYNC_CASE[DiskSync(sync)]),
        None,
    )
    if attachment is None:
        raise nserror_to_exception(error, f"cannot attach disk image {str(target)!r}")
    return attachment


def create_block_device(attachment: Any) -> Any:
    """A ``VZVirtioBlockDeviceConfiguration`` over a storage attachment."""
    return vz().VZVirtioBlockDeviceConfiguration.alloc().initWithAttachment_(attachment)


def require_raw_disk(cfg: LinuxVMConfig | MacVMConfig) -> None:
    """Virtualization attaches a disk image as raw bytes: a qcow2 file would be the guest's
    to overwrite (and read as garbage). Refuse it, saying how to convert it."""
    if cfg.disk_path is None or cfg.disk_format is DiskFormat.RAW:
        return
    src = str(cfg.disk_path)
    raw = f"{src.removesuffix('.qcow2')}.raw"
    raise UnsupportedError(
        f"the vz backend attaches raw disk images only; {src!r} is configured as "
        f"{cfg.disk_format.value}. Convert it and use the copy (disk_format 'raw'): "
        f"qemu-img convert -f {cfg.disk_format.value} -O raw {shlex.quote(src)} "
        f"{shlex.quote(raw)}",
        backend="vz",
        feature=f"disk:{cfg.disk_format.value}",
    )


def storage_to_vz(cfg: LinuxVMConfig, root_layer: Path | None = None) -> list[Any]:
    """The root disk's layer (the VM's own copy of the base: ``/dev/vda``) when the config has
    one, the main disk (raw only: :func:`require_raw_disk`), then the ISO read-only (the
    seed's order)."""
    require_raw_disk(cfg)
    devices = []
    if cfg.root_disk is not None and root_layer is not None:
        devices.append(create_block_device(create_disk_attachment(root_layer, False)))
    if cfg.disk_path is not None:
        devices.append(create_block_device(create_disk_attachment(cfg.disk_path, False)))
    if cfg.iso_path is not None:
        devices.append(create_block_device(create_disk_attachment(cfg.iso_path, True)))
    return devices


# -- network -----------------------------------------------------------------------------------


def create_network_attachment(config: NetworkConfig) -> Any:
    """NAT, or bridged to the named host interface. ``vmnet``/``host-only`` need macOS 26's
    ``VZVmnetNetworkDeviceAttachment`` with a vmnet network, which is not wired up yet."""
    v = vz()
    mode = config.mode
    if mode is NetworkMode.NAT and config.host_loopback:
        raise UnsupportedError(
            "'nat:host-loopback' is not possible on the vz backend: its NAT never reaches the "
            "host's loopback (a host service the guest should reach must listen on the "
            "NAT gateway's address); use 'nat'",
            backend="vz",
            feature="network:host-loopback",
        )
    if mode is NetworkMode.NAT:
        return v.VZNATNetworkDeviceAttachment.alloc().init()
    if mode is NetworkMode.BRIDGED:
        interfaces = list(v.VZBridgedNetworkInterface.networkInterfaces() or ())
        for iface in interfaces:
            if str(iface.identifier()) == config.interface:
                return v.VZBridgedNetworkDeviceAttachment.alloc().initWithInterface_(iface)
        names = ", ".join(str(i.identifier()) for i in interfaces) or "none"
        raise ConfigError(
            f"no bridgeable host interface {config.interface!r} (available: {names}; bridging "
            "also needs the com.apple.vm.networking entitlement)"
        )
    if mode in (NetworkMode.VMNET, NetworkMode.HOST_ONLY):
        require_macos("26.0", f"{mode.value} networking (VZVmnetNetworkDeviceAttachment)")
        raise UnsupportedError(
            f"{mode.value} networking on the vz backend is not implemented yet "
            "(it needs a vmnet network object)",
            backend="vz",
            feature=f"network:{mode.value}",
        )
    raise ConfigError(f"network mode {mode.value!r} has no attachment")


def create_network_device(config: NetworkConfig, *, mac_address: str | None = None) -> Any:
    """A ``VZVirtioNetworkDeviceConfiguration`` with a random locally administered MAC (or
    ``mac_address``)."""
    v = vz()
    device = v.VZVirtioNetworkDeviceConfiguration.alloc().init()
    device.setAttachment_(create_network_attachment(config))
    if mac_address is None:
        mac = v.VZMACAddress.randomLocallyAdministeredAddress()
    else:
        mac = v.VZMACAddress.alloc().initWithString_(mac_address)
        if mac is None:
            raise ConfigError(f"invalid MAC address {mac_address!r}")
    device.setMACAddress_(mac)
    return device


def network_to_vz(cfg: LinuxVMConfig | MacVMConfig, state_dir: Path | None) -> list[Any]:
    """The NICs: ``network`` (none for ``none``), then each of ``networks``, every one with its
    MAC kept in ``state_dir`` across boots (``mac-address``, ``mac-address-1``, ...)."""
    devices = network_devices_to_vz(cfg.network, state_dir)
    for index, network in enumerate(cfg.networks, start=1):
        devices += network_devices_to_vz(network, state_dir, index)
    return devices


def network_devices_to_vz(
    network: NetworkConfig, state_dir: Path | None, index: int = 0
) -> list[Any]:
    """The NIC number ``index`` (0: the first) for a :class:`~vzkit.NetworkConfig`."""
    if network.mode is NetworkMode.NONE:
        return []
    device = create_network_device(network, mac_address=read_mac(state_dir, index))
    if state_dir is not None and not (state_dir / mac_file(index)).exists():
        save_mac(state_dir, str(device.MACAddress().string()), index)
    return [device]


# -- small devices -----------------------------------------------------------------------------


def entropy_to_vz(cfg: LinuxVMConfig) -> list[Any]:
    return [vz().VZVirtioEntropyDeviceConfiguration.alloc().init()] if cfg.entropy else []


def sound_to_vz(cfg: LinuxVMConfig | MacVMConfig) -> list[Any]:
    """Virtio sound with one output stream to the host's speakers (macOS 12+), if asked."""
    if not cfg.sound:
        return []
    require_macos("12.0", "virtio sound (VZVirtioSoundDeviceConfiguration)")
    v = vz()
    stream = v.VZVirtioSoundDeviceOutputStreamConfiguration.alloc().init()
    stream.setSink_(v.VZHostAudioOutputStreamSink.alloc().init())
    device = v.VZVirtioSoundDeviceConfiguration.alloc().init()
    device.setStreams_([stream])
    return [device]


def balloon_to_vz(cfg: LinuxVMConfig) -> list[Any]:
    if not cfg.balloon:
        return []
    return [vz().VZVirtioTraditionalMemoryBalloonDeviceConfiguration.alloc().init()]


def add_memory_balloon_device(config: Any) -> None:
    """Add a traditional memory balloon to a ``VZVirtualMachineConfiguration`` (once)."""
    v = vz()
    devices = list(config.memoryBalloonDevices() or ())
    cls = v.VZVirtioTraditionalMemoryBalloonDeviceConfiguration
    if any(d.isKindOfClass_(cls) for d in devices):
        return
    devices.append(cls.alloc().init())
    config.setMemoryBalloonDevices_(devices)


def vsock_to_vz(cfg: LinuxVMConfig) -> list[Any]:
    if not cfg.vsock:
        return []
    if cfg.vsock_cid != 3:
        raise UnsupportedError(
            f"the vz backend's guest vsock CID is always 3 (config asks for {cfg.vsock_cid})",
            backend="vz",
            feature="vsock_cid",
        )
    return [vz().VZVirtioSocketDeviceConfiguration.alloc().init()]


# -- serial console ----------------------------------------------------------------------------


def _serial_port(attachment: Any) -> Any:
    port = vz().VZVirtioConsoleDeviceSerialPortConfiguration.alloc().init()
    port.setAttachment_(attachment)
    return port


def create_serial_console(read_fd: int, write_fd: int) -> Any:
    """A virtio console (``hvc0``) reading from ``read_fd`` and writing to ``write_fd``.

    The descriptors stay the caller's: they are not closed when the configuration goes away.
    """
    f = foundation()
    reader = f.NSFileHandle.alloc().initWithFileDescriptor_closeOnDealloc_(read_fd, False)
    writer = f.NSFileHandle.alloc().initWithFileDescriptor_closeOnDealloc_(write_fd, False)
    attachment = vz().VZFileHandleSerialPortAttachment.alloc()
    return _serial_port(
        attachment.initWithFileHandleForReading_fileHandleForWriting_(reader, writer)
    )


def create_stdio_serial_console() -> Any:
    """A virtio console on this process's stdin/stdout."""
    return create_serial_console(0, 1)


def create_file_serial_console(path: str | os.PathLike[str], *, append: bool = True) -> Any:
    """A virtio console whose output is written to ``path`` (guest input: none)."""
    attachment, error = (
        vz()
        .VZFileSerialPortAttachment.alloc()
        .initWithURL_append_error_(file_url(path), append, None)
    )
    if attachment is None:
        raise nserror_to_exception(error, f"cannot open console log {os.fspath(path)!r}")
    return _serial_port(attachment)


def serial_to_vz(
    cfg: LinuxVMConfig, state_dir: Path, console_fds: tuple[int, int] | None
) -> list[Any]:
    if console_fds is not None:
        return [create_serial_console(*console_fds)]
    if cfg.console is ConsoleMode.NONE:
        return []
    if cfg.console is ConsoleMode.STDIO:
        return [create_stdio_serial_console()]
    if cfg.console is ConsoleMode.PTY:
        raise ConfigError("a pty console needs the machine to open the pty (console_fds)")
    return [create_file_serial_console(cfg.console_log_path or state_dir / "console.log")]


# -- shares ------------------------------------------------------------------------------------


def create_directory_share(path: str | os.PathLike[str], read_only: bool = False) -> Any:
    """A ``VZSingleDirectoryShare`` of a host directory."""
    require_macos("12.0", "directory sharing (VZSharedDirectory)")
    target = Path(path)
    if not target.is_dir():
        raise ConfigError(f"shared directory {str(target)!r} does not exist")
    v = vz()
    directory = v.VZSharedDirectory.alloc().initWithURL_readOnly_(file_url(target), read_only)
    return v.VZSingleDirectoryShare.alloc().initWithDirectory_(directory)


def create_virtiofs_devices(mounts: Iterable[VolumeMount]) -> list[Any]:
    """One ``VZVirtioFileSystemDeviceConfiguration`` per mount, tags made unique first."""
    require_macos("12.0", "VirtioFS (VZVirtioFileSystemDeviceConfiguration)")
    cls = vz().VZVirtioFileSystemDeviceConfiguration
    devices = []
    for mount in assign_volume_tags(mounts):
        ok, error = cls.validateTag_error_(mount.tag, None)
        if not ok:
            raise ConfigError(
                f"VirtioFS tag {mount.tag!r} is not valid: {extract_nserror_message(error)}"
            )
        device = cls.alloc().initWithTag_(mount.tag)
        device.setShare_(create_directory_share(mount.host_path, mount.read_only))
        devices.append(device)
    return devices


# -- graphics ----------------------------------------------------------------------------------


def create_virtio_graphics_config(displays: Sequence[DisplayConfig]) -> Any:
    """A Virtio GPU with one scanout per display (Linux guests; macOS 13+)."""
    require_macos("13.0", "Virtio graphics (VZVirtioGraphicsDeviceConfiguration)")
    v = vz()
    shown = list(displays) or [default_linux_display_config()]
    scanouts = [
        v.VZVirtioGraphicsScanoutConfiguration.alloc().initWithWidthInPixels_heightInPixels_(
            d.width, d.height
        )
        for d in shown
    ]
    device = v.VZVirtioGraphicsDeviceConfiguration.alloc().init()
    device.setScanouts_(scanouts)
    return device


def create_mac_graphics_config(displays: Sequence[DisplayConfig]) -> Any:
    """A Mac graphics device with the given displays (macOS guests; macOS 12+); none given:
    the seed's default Mac display (1920x1200 at 144 PPI)."""
    require_macos("12.0", "Mac graphics (VZMacGraphicsDeviceConfiguration)")
    v = vz()
    shown = list(displays) or [default_display_config()]
    cls = v.VZMacGraphicsDisplayConfiguration
    device = v.VZMacGraphicsDeviceConfiguration.alloc().init()
    device.setDisplays_(
        [
            cls.alloc().initWithWidthInPixels_heightInPixels_pixelsPerInch_(
                d.width, d.height, d.ppi
            )
            for d in shown
        ]
    )
    return device


def graphics_to_vz(cfg: LinuxVMConfig) -> tuple[list[Any], list[Any], list[Any]]:
    """Graphics, keyboards and pointing devices (all empty when headless)."""
    if cfg.headless:
        return [], [], []
    v = vz()
    return (
        [create_virtio_graphics_config(cfg.displays)],
        [v.VZUSBKeyboardConfiguration.alloc().init()],
        [v.VZUSBScreenCoordinatePointingDeviceConfiguration.alloc().init()],
    )
