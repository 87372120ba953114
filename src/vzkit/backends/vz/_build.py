"""Lowering a :class:`~vzkit.LinuxVMConfig` to a ``VZVirtualMachineConfiguration``.

One small ``*_to_vz`` function per device (vfkit's ``toVz()``); :func:`build_linux_vm_config`
only concatenates them, in the seed's order: CPUs and memory, platform (persisted machine
identifier, nested virtualization when supported and enabled), boot loader (Linux kernel or
EFI with a persisted variable store), storage (main disk, read-only ISO), network, entropy,
memory balloon, vsock, serial console, VirtioFS shares, and Virtio graphics unless headless.
The seed's ``Create*`` helpers are public here under snake_case names.

Each API is gated by the macOS version that introduced it (:class:`MacOSVersionError`).
"""

from __future__ import annotations

import contextlib
import enum
import gzip
import hashlib
import logging
import os
import shlex
import shutil
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..._config import ConsoleMode, LinuxVMConfig
from ..._disk import DiskFormat
from ..._display import DisplayConfig, default_display_config, default_linux_display_config
from ..._fsutil import write_atomic
from ..._macconfig import MacVMConfig
from ..._network import MAC_FILE, NetworkConfig, NetworkMode, read_mac, save_mac
from ..._state import host_arch
from ..._volume import VolumeMount, assign_volume_tags, share_cmdline
from ...errors import BackendUnavailableError, ConfigError, UnsupportedError
from . import _objc
from ._nserror import NSErrorDetails, extract_nserror_message, nserror_info, nserror_to_exception
from ._objc import foundation, require_macos, vz

__all__ = [
    "DEFAULT_CMDLINE",
    "DiskCaching",
    "DiskSync",
    "add_memory_balloon_device",
    "build_linux_vm_config",
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
    "load_or_create_machine_identifier",
    "validate_config",
]

log = logging.getLogger(__name__)

#: The seed's kernel command line when the config names none (virtio console is ``hvc0``).
DEFAULT_CMDLINE = "console=tty0 console=hvc0 root=/dev/vda"
MACHINE_ID_FILE = "linux-machine.id"
NVRAM_FILE = "efi.nvram"
ENTITLEMENT = "com.apple.security.virtualization"
MIB = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"


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


def _url(path: str | os.PathLike[str]) -> Any:
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
        _url(target),
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


def storage_to_vz(cfg: LinuxVMConfig) -> list[Any]:
    """The main disk (raw only: :func:`require_raw_disk`), then the ISO read-only (the seed's
    order)."""
    require_raw_disk(cfg)
    devices = []
    if cfg.disk_path is not None:
        devices.append(create_block_device(create_disk_attachment(cfg.disk_path, False)))
    if cfg.iso_path is not None:
        devices.append(create_block_device(create_disk_attachment(cfg.iso_path, True)))
    return devices


# -- platform and boot -------------------------------------------------------------------------


def load_or_create_machine_identifier(state_dir: Path) -> Any:
    """The ``VZGenericMachineIdentifier`` kept in ``state_dir/linux-machine.id`` (created and
    saved on first use; an unreadable file is replaced)."""
    require_macos("13.0", "persistent machine identifiers (VZGenericMachineIdentifier)")
    v = vz()
    path = state_dir / MACHINE_ID_FILE
    with contextlib.suppress(FileNotFoundError):
        data = path.read_bytes()
        if data:
            ident = v.VZGenericMachineIdentifier.alloc().initWithDataRepresentation_(
                _objc.nsdata_from_bytes(data)
            )
            if ident is not None:
                return ident
            log.warning("%s is not a machine identifier; creating a new one", path)
    ident = v.VZGenericMachineIdentifier.alloc().init()
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, _objc.nsdata_to_bytes(ident.dataRepresentation()))
    return ident


def platform_to_vz(cfg: LinuxVMConfig, state_dir: Path) -> Any:
    """Generic platform; machine identifier (macOS 13+); nested virtualization when the host
    supports it (macOS 15+, M3 or later) and the config does not disable it."""
    require_macos("12.0", "VZGenericPlatformConfiguration")
    v = vz()
    platform = v.VZGenericPlatformConfiguration.alloc().init()
    version = _objc.macos_version() or (0, 0)
    if version >= (13, 0):
        platform.setMachineIdentifier_(load_or_create_machine_identifier(state_dir))
    if cfg.nested_virtualization and version >= (15, 0):
        if v.VZGenericPlatformConfiguration.isNestedVirtualizationSupported():
            platform.setNestedVirtualizationEnabled_(True)
        else:
            log.info("nested virtualization is not supported on this Mac; leaving it off")
    return platform


def kernel_for_vz(kernel: Path, state_dir: Path) -> Path:
    """The kernel ``VZLinuxBootLoader`` can boot. On Apple silicon it takes only an
    uncompressed arm64 ``Image``; Debian and most distributions ship it gzip-compressed
    (``vmlinuz``), so such a kernel is decompressed once into ``state_dir`` (reused while
    the source is unchanged)."""
    with open(kernel, "rb") as fh:
        if fh.read(2) != GZIP_MAGIC:
            return kernel
    st = kernel.stat()
    key = f"{kernel}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    target = state_dir / f"kernel-{hashlib.sha256(key).hexdigest()[:16]}.img"
    if target.is_file():
        return target
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with gzip.open(kernel, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, target)
    except (OSError, EOFError, zlib.error) as err:
        raise ConfigError(
            f"kernel {str(kernel)!r} is gzip-compressed but cannot be decompressed: {err}"
        ) from err
    finally:
        tmp.unlink(missing_ok=True)
    log.info("decompressed %s into %s for the Virtualization framework", kernel, target)
    return target


def vz_cmdline(cfg: LinuxVMConfig) -> str:
    """The config's command line (or the seed's default) with the framework's console last.

    A VZ serial port is a virtio console, ``hvc0``; a command line written for QEMU (the
    default guest's ``console=ttyS0``/``ttyAMA0``) gets ``console=hvc0`` appended, so kernel
    messages and the guest's console shell reach the VM's console."""
    cmdline = cfg.cmdline or DEFAULT_CMDLINE
    if cfg.console is not ConsoleMode.NONE and "console=hvc0" not in cmdline.split():
        cmdline += " console=hvc0"
    return cmdline


def linux_boot_loader_to_vz(cfg: LinuxVMConfig, state_dir: Path) -> Any:
    """Direct kernel boot: kernel (decompressed if need be), optional initrd, the command
    line (or the seed's default)."""
    assert cfg.kernel_path is not None
    kernel = kernel_for_vz(cfg.kernel_path, state_dir)
    loader = vz().VZLinuxBootLoader.alloc().initWithKernelURL_(_url(kernel))
    if cfg.initrd_path is not None:
        loader.setInitialRamdiskURL_(_url(cfg.initrd_path))
    shares = share_cmdline(cfg.volumes)  # the default guest mounts them at /mnt/<tag>
    cmdline = vz_cmdline(cfg)
    loader.setCommandLine_(f"{cmdline} {shares}" if shares else cmdline)
    return loader


def efi_boot_loader_to_vz(state_dir: Path) -> Any:
    """EFI boot with the variable store in ``state_dir/efi.nvram`` (created once, then reused)."""
    require_macos("13.0", "EFI boot (VZEFIBootLoader)")
    v = vz()
    path = state_dir / NVRAM_FILE
    if path.exists():
        store = v.VZEFIVariableStore.alloc().initWithURL_(_url(path))
    else:
        state_dir.mkdir(parents=True, exist_ok=True)
        store, error = v.VZEFIVariableStore.alloc().initCreatingVariableStoreAtURL_options_error_(
            _url(path), v.VZEFIVariableStoreInitializationOptionAllowOverwrite, None
        )
        if store is None:
            raise nserror_to_exception(error, f"cannot create the EFI variable store {path}")
    loader = v.VZEFIBootLoader.alloc().init()
    loader.setVariableStore_(store)
    return loader


def boot_loader_to_vz(cfg: LinuxVMConfig, state_dir: Path) -> Any:
    if cfg.direct_boot:
        return linux_boot_loader_to_vz(cfg, state_dir)
    return efi_boot_loader_to_vz(state_dir)


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


def network_to_vz(cfg: LinuxVMConfig, state_dir: Path | None) -> list[Any]:
    """No device for ``none``; else one NIC whose MAC is kept in ``state_dir`` across boots."""
    return network_devices_to_vz(cfg.network, state_dir)


def network_devices_to_vz(network: NetworkConfig, state_dir: Path | None) -> list[Any]:
    """:func:`network_to_vz` for any guest's :class:`~vzkit.NetworkConfig`."""
    if network.mode is NetworkMode.NONE:
        return []
    device = create_network_device(network, mac_address=read_mac(state_dir))
    if state_dir is not None and not (state_dir / MAC_FILE).exists():
        save_mac(state_dir, str(device.MACAddress().string()))
    return [device]


# -- small devices -----------------------------------------------------------------------------


def entropy_to_vz(cfg: LinuxVMConfig) -> list[Any]:
    return [vz().VZVirtioEntropyDeviceConfiguration.alloc().init()] if cfg.entropy else []


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
        vz().VZFileSerialPortAttachment.alloc().initWithURL_append_error_(_url(path), append, None)
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
    directory = v.VZSharedDirectory.alloc().initWithURL_readOnly_(_url(target), read_only)
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


# -- the machine -------------------------------------------------------------------------------


def check_sizes(cfg: LinuxVMConfig | MacVMConfig) -> tuple[int, int]:
    """The CPU count and memory size in bytes, inside what this Mac allows."""
    cls = vz().VZVirtualMachineConfiguration
    memory = cfg.memory_mb * MIB
    low, high = int(cls.minimumAllowedMemorySize()), int(cls.maximumAllowedMemorySize())
    if not low <= memory <= high:
        raise ConfigError(
            f"memory {cfg.memory_mb} MiB is outside what this Mac allows "
            f"({low // MIB}..{high // MIB} MiB)"
        )
    low_cpu, high_cpu = int(cls.minimumAllowedCPUCount()), int(cls.maximumAllowedCPUCount())
    if not low_cpu <= cfg.cpus <= high_cpu:
        raise ConfigError(
            f"cpus={cfg.cpus} is outside what this Mac allows ({low_cpu}..{high_cpu})"
        )
    return cfg.cpus, memory


def build_linux_vm_config(
    cfg: LinuxVMConfig,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    console_fds: tuple[int, int] | None = None,
) -> Any:
    """The ``VZVirtualMachineConfiguration`` for ``cfg`` (not yet validated).

    ``state_dir`` (default ``cfg.state_dir``) keeps ``linux-machine.id``, ``efi.nvram``, the
    MAC address and the console log. ``console_fds`` wires the console to a pair of
    descriptors (a pty) instead of what ``cfg.console`` says.
    """
    require_macos(f"{_objc.MIN_MACOS[0]}.{_objc.MIN_MACOS[1]}", "the vz backend")
    where = state_dir if state_dir is not None else cfg.state_dir
    if where is None:
        raise ConfigError("the vz backend needs a state_dir (machine identifier, EFI store)")
    sdir = Path(where)
    sdir.mkdir(parents=True, exist_ok=True)
    if cfg.arch is not host_arch():
        raise UnsupportedError(
            f"the vz backend runs {host_arch().value} guests on this Mac, not {cfg.arch.value}",
            backend="vz",
            feature="arch",
        )
    if cfg.publish:
        raise UnsupportedError(
            "the vz backend cannot publish ports: Virtualization's NAT has no port forwarding "
            "(reach the guest at its own address, or use the qemu backend)",
            backend="vz",
            feature="network:publish",
        )
    require_raw_disk(cfg)
    cpus, memory = check_sizes(cfg)
    config = vz().VZVirtualMachineConfiguration.alloc().init()
    config.setCPUCount_(cpus)
    config.setMemorySize_(memory)
    config.setPlatform_(platform_to_vz(cfg, sdir))
    config.setBootLoader_(boot_loader_to_vz(cfg, sdir))
    config.setStorageDevices_(storage_to_vz(cfg))
    config.setNetworkDevices_(network_to_vz(cfg, sdir))
    config.setEntropyDevices_(entropy_to_vz(cfg))
    config.setMemoryBalloonDevices_(balloon_to_vz(cfg))
    config.setSocketDevices_(vsock_to_vz(cfg))
    config.setSerialPorts_(serial_to_vz(cfg, sdir, console_fds))
    config.setDirectorySharingDevices_(create_virtiofs_devices(cfg.volumes))
    graphics, keyboards, pointers = graphics_to_vz(cfg)
    if graphics:
        config.setGraphicsDevices_(graphics)
        config.setKeyboards_(keyboards)
        config.setPointingDevices_(pointers)
    return config


def validate_config(config: Any) -> None:
    """Raise :class:`~vzkit.ConfigError` (NSError details as ``__cause__``) unless valid.

    A process without the ``com.apple.security.virtualization`` entitlement fails here too;
    that is a :class:`~vzkit.BackendUnavailableError` naming the fix.
    """
    ok, error = config.validateWithError_(None)
    if ok:
        return
    exc = nserror_to_exception(error, "invalid VM configuration")
    if ENTITLEMENT in str(exc):
        unavailable = BackendUnavailableError(
            f"{exc}; sign the interpreter with the {ENTITLEMENT} entitlement (vzkit codesign)"
        )
        unavailable.__cause__ = exc.__cause__
        raise unavailable
    if not isinstance(exc, ConfigError):
        config_error = ConfigError(str(exc))
        config_error.__cause__ = exc.__cause__
        raise config_error
    raise exc


def describe_error(error: Any) -> NSErrorDetails | None:
    """The ``NSErrorDetails`` for an NSError (``None`` for ``None``)."""
    info = nserror_info(error)
    return None if info is None else NSErrorDetails(info)
