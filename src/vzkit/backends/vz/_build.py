"""Lowering a :class:`~vzkit.LinuxVMConfig` to a ``VZVirtualMachineConfiguration``.

One small ``*_to_vz`` function per device (vfkit's ``toVz()``, in :mod:`._devices`);
:func:`build_linux_vm_config` only concatenates them, in the seed's order: CPUs and memory,
platform (persisted machine identifier, nested virtualization when supported and enabled),
boot loader (Linux kernel or EFI with a persisted variable store), storage (main disk,
read-only ISO, then the config's more disks: :mod:`._storage`), network (every NIC), entropy,
sound output, memory balloon, vsock, serial console, VirtioFS shares, and Virtio graphics
unless headless. This module owns the machine level: sizes, platform, boot
loaders and validation. The seed's ``Create*`` helpers are public under snake_case names
(defined in :mod:`._devices`, re-exported here).

Each API is gated by the macOS version that introduced it (:class:`MacOSVersionError`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from ..._config import ConsoleMode, LinuxVMConfig
from ..._disk import DiskFormat
from ..._fsutil import write_atomic
from ..._kernel import kernel_for_vz
from ..._macconfig import MacVMConfig
from ..._state import host_arch
from ..._volume import share_cmdline
from ...errors import BackendUnavailableError, ConfigError, UnsupportedError
from . import _objc
from ._devices import (
    DiskCaching,
    DiskSync,
    add_memory_balloon_device,
    balloon_to_vz,
    create_block_device,
    create_directory_share,
    create_disk_attachment,
    create_file_serial_console,
    create_mac_graphics_config,
    create_network_attachment,
    create_network_device,
    create_serial_console,
    create_stdio_serial_console,
    create_virtio_graphics_config,
    create_virtiofs_devices,
    entropy_to_vz,
    file_url,
    graphics_to_vz,
    network_devices_to_vz,
    network_to_vz,
    require_raw_disk,
    serial_to_vz,
    sound_to_vz,
    storage_to_vz,
    vsock_to_vz,
)
from ._nserror import NSErrorDetails, nserror_info, nserror_to_exception
from ._objc import is_arm64, require_macos, vz
from ._rosetta import create_rosetta_device, rosetta_cmdline
from ._storage import disks_to_vz

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
    "network_devices_to_vz",
    "require_raw_disk",
    "validate_config",
]

log = logging.getLogger(__name__)

#: The seed's kernel command line when the config names none (virtio console is ``hvc0``).
DEFAULT_CMDLINE = "console=tty0 console=hvc0 root=/dev/vda"
MACHINE_ID_FILE = "linux-machine.id"
NVRAM_FILE = "efi.nvram"
ENTITLEMENT = "com.apple.security.virtualization"
MIB = 1 << 20


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


def vz_cmdline(cfg: LinuxVMConfig) -> str:
    """The config's command line (or the seed's default) with the framework's console last.

    A VZ serial port is a virtio console, ``hvc0``; a command line written for QEMU (the
    default guest's ``console=ttyS0``/``ttyAMA0``) gets ``console=hvc0`` appended, so kernel
    messages and the guest's console shell reach the VM's console."""
    cmdline = cfg.cmdline or DEFAULT_CMDLINE
    if cfg.root_disk is not None:  # vzkit's initramfs mounts it (docs/images.md)
        cmdline += f" {cfg.root_disk.cmdline_words()}"
    if cfg.rosetta:  # vzkit's initramfs registers it with binfmt_misc
        cmdline += f" {rosetta_cmdline()}"
    if cfg.console is not ConsoleMode.NONE and "console=hvc0" not in cmdline.split():
        cmdline += " console=hvc0"
    return cmdline


def linux_boot_loader_to_vz(cfg: LinuxVMConfig, state_dir: Path) -> Any:
    """Direct kernel boot: kernel (decompressed if need be), optional initrd, the command
    line (or the seed's default)."""
    assert cfg.kernel_path is not None
    kernel = kernel_for_vz(cfg.kernel_path, state_dir, arm64=is_arm64())
    loader = vz().VZLinuxBootLoader.alloc().initWithKernelURL_(file_url(kernel))
    if cfg.initrd_path is not None:
        loader.setInitialRamdiskURL_(file_url(cfg.initrd_path))
    shares = share_cmdline(cfg.volumes)  # where vzkit's guests mount them
    cmdline = vz_cmdline(cfg)
    loader.setCommandLine_(f"{cmdline} {shares}" if shares else cmdline)
    return loader


def efi_boot_loader_to_vz(state_dir: Path) -> Any:
    """EFI boot with the variable store in ``state_dir/efi.nvram`` (created once, then reused)."""
    require_macos("13.0", "EFI boot (VZEFIBootLoader)")
    v = vz()
    path = state_dir / NVRAM_FILE
    if path.exists():
        store = v.VZEFIVariableStore.alloc().initWithURL_(file_url(path))
    else:
        state_dir.mkdir(parents=True, exist_ok=True)
        store, error = v.VZEFIVariableStore.alloc().initCreatingVariableStoreAtURL_options_error_(
            file_url(path), v.VZEFIVariableStoreInitializationOptionAllowOverwrite, None
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


# -- the machine -------------------------------------------------------------------------------


def require_root_disk(cfg: LinuxVMConfig, root_layer: Path | None) -> None:
    """A root disk needs a raw base (Virtualization attaches raw only) and this VM's layer."""
    root = cfg.root_disk
    if root is None:
        return
    if root.format is not DiskFormat.RAW:
        raise UnsupportedError(
            f"the vz backend attaches raw images only; the root disk {str(root.base)!r} is "
            f"{root.format.value} (convert it: qemu-img convert -f {root.format.value} -O raw)",
            backend="vz",
            feature=f"disk_format:{root.format.value}",
        )
    if root_layer is None:
        raise ValueError("a root disk needs its per-VM layer (see _rootclone)")


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
    root_layer: Path | None = None,
) -> Any:
    """The ``VZVirtualMachineConfiguration`` for ``cfg`` (not yet validated).

    ``root_layer`` is the VM's writable copy of ``cfg.root_disk``'s base (``_rootclone``),
    attached as the first disk; required exactly when the config has a root disk.

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
    require_root_disk(cfg, root_layer)
    require_raw_disk(cfg)
    cpus, memory = check_sizes(cfg)
    config = vz().VZVirtualMachineConfiguration.alloc().init()
    config.setCPUCount_(cpus)
    config.setMemorySize_(memory)
    config.setPlatform_(platform_to_vz(cfg, sdir))
    config.setBootLoader_(boot_loader_to_vz(cfg, sdir))
    config.setStorageDevices_(storage_to_vz(cfg, root_layer) + disks_to_vz(cfg.disks))
    config.setNetworkDevices_(network_to_vz(cfg, sdir))
    config.setEntropyDevices_(entropy_to_vz(cfg))
    audio = sound_to_vz(cfg)
    if audio:  # the property is left alone without sound, as the seed does
        config.setAudioDevices_(audio)
    config.setMemoryBalloonDevices_(balloon_to_vz(cfg))
    config.setSocketDevices_(vsock_to_vz(cfg))
    config.setSerialPorts_(serial_to_vz(cfg, sdir, console_fds))
    shares = create_virtiofs_devices(cfg.volumes)
    if cfg.rosetta:
        shares.append(create_rosetta_device(cfg.volumes))
    config.setDirectorySharingDevices_(shares)
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
