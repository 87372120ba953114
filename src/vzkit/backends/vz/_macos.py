"""macOS guests: restore images, the Mac platform and devices, and the installer.

A :class:`~vzkit.MacVMConfig` names a VM directory. :func:`install_macos` fills it from a local
``.ipsw`` restore image: the image's most featureful configuration this Mac supports gives the
hardware model; the auxiliary storage is created for that model; a new machine identifier is
made; all three are persisted next to the disk and, once ``VZMacOSInstaller`` finished,
``install.json`` records the build. Every later boot (:func:`build_macos_vm_config`, used by
``VirtualMachine(MacVMConfig(...), backend="vz")``) reloads the same three, so the guest sees
the same Mac each time. All of it needs Apple silicon (``#ifdef __arm64__`` in the headers).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..._disk import create_disk_image
from ..._fsutil import write_atomic
from ..._macconfig import MacKeyboard, MacPointer, MacVMConfig
from ..._network import mac_file
from ..._volume import VolumeMount
from ...errors import ConfigError, StateError, UnsupportedError, VMTimeoutError
from ...snapshots._record import format_rfc3339
from . import _build, _lifecycle, _objc
from ._devices import network_to_vz, sound_to_vz
from ._nserror import nserror_to_exception
from ._objc import Queue, foundation, macos_version, require_arm64, require_macos, vz
from ._storage import disks_to_vz

__all__ = [
    "LatestRestoreImage",
    "RestoreImageInfo",
    "build_macos_vm_config",
    "create_mac_auxiliary_storage",
    "create_mac_keyboard",
    "create_mac_platform",
    "create_mac_pointing_device",
    "create_mac_shares",
    "fetch_latest_restore_image",
    "install_macos",
    "load_restore_image",
    "mac_start_options",
    "restore_image_info",
    "start_mac_vm",
]

log = logging.getLogger(__name__)
MIB = 1 << 20
ProgressCallback = Callable[[float], object]


@dataclass(frozen=True, slots=True)
class RestoreImageInfo:
    """What a restore image offers this Mac (``VZMacOSConfigurationRequirements``)."""

    path: Path
    build_version: str
    macos_version: str
    min_cpus: int
    min_memory_mb: int
    hardware_model: bytes


def _host() -> tuple[int, int]:
    return macos_version() or (0, 0)


def _url(path: str | os.PathLike[str]) -> Any:
    return foundation().NSURL.fileURLWithPath_(os.fspath(path))


def _wait(done: threading.Event, timeout: float | None, what: str) -> None:
    """Wait for a completion block. On the main thread the run loop is pumped meanwhile: the
    framework may deliver the block through the main queue."""
    if threading.current_thread() is threading.main_thread():
        finished = _objc.run_run_loop_until_done(done.is_set, timeout=timeout)
    else:
        finished = done.wait(timeout)
    if not finished:
        raise VMTimeoutError(f"{what} did not finish within {timeout} s")


# -- restore images ----------------------------------------------------------------------------


def load_restore_image(path: str | os.PathLike[str], *, timeout: float | None = 300.0) -> Any:
    """Load a local ``.ipsw`` as a ``VZMacOSRestoreImage`` (``loadFileURL:completionHandler:``)."""
    require_arm64("macOS restore images (VZMacOSRestoreImage)", "12.0")
    source = Path(path).expanduser().absolute()
    if not source.is_file():
        raise ConfigError(f"restore image {str(source)!r} does not exist")
    what = f"loading the restore image {str(source)!r}"
    image, error = _restore_image(
        lambda block: vz().VZMacOSRestoreImage.loadFileURL_completionHandler_(_url(source), block),
        timeout,
        what,
    )
    if image is None:
        raise nserror_to_exception(error, f"cannot load restore image {str(source)!r}")
    return image


def _restore_image(
    send: Callable[[Callable[[Any, Any], None]], object], timeout: float | None, what: str
) -> tuple[Any, Any]:
    """Call ``send(block)`` and wait for the ``void (^)(VZMacOSRestoreImage *, NSError *)``
    block the framework calls: ``(image, error)``."""
    done = threading.Event()
    box: dict[str, Any] = {}

    def block(image: Any, error: Any) -> None:
        try:
            box["image"], box["error"] = image, error
        except BaseException:  # never into Objective-C
            log.exception("restore image completion failed")
        finally:
            done.set()

    send(block)
    _wait(done, timeout, what)
    return box.get("image"), box.get("error")


def _version_text(version: Any) -> str:
    """``NSOperatingSystemVersion`` (a struct: fields or a 3-tuple in PyObjC) as ``14.4.1``."""
    try:
        parts = [int(version.majorVersion), int(version.minorVersion), int(version.patchVersion)]
    except AttributeError:
        parts = [int(p) for p in tuple(version)[:3]]
    return ".".join(str(p) for p in parts)


def requirements(image: Any) -> Any:
    """The image's most featureful configuration this Mac supports, or UnsupportedError."""
    build = str(image.buildVersion())
    if _host() >= (13, 0) and not image.isSupported():
        raise UnsupportedError(
            f"restore image {build} cannot be installed on this Mac",
            backend="vz",
            feature="macos-guests",
        )
    found = image.mostFeaturefulSupportedConfiguration()
    if found is None or not found.hardwareModel().isSupported():
        raise UnsupportedError(
            f"restore image {build} has no configuration this Mac supports "
            "(a newer macOS on the host may be needed)",
            backend="vz",
            feature="macos-guests",
        )
    return found


def restore_image_info(image: Any) -> RestoreImageInfo:
    """Plain data about a loaded restore image and what it requires here."""
    found = requirements(image)
    return RestoreImageInfo(
        path=Path(str(image.URL().path())),
        build_version=str(image.buildVersion()),
        macos_version=_version_text(image.operatingSystemVersion()),
        min_cpus=int(found.minimumSupportedCPUCount()),
        min_memory_mb=int(found.minimumSupportedMemorySize()) // MIB,
        hardware_model=_objc.nsdata_to_bytes(found.hardwareModel().dataRepresentation()),
    )


@dataclass(frozen=True, slots=True)
class LatestRestoreImage:
    """The newest restore image this Mac supports, as Apple's catalogue says: where to
    download it (``url``, an ``.ipsw`` for :func:`install_macos` once downloaded) and what it
    needs."""

    url: str
    build_version: str
    macos_version: str
    min_cpus: int
    min_memory_mb: int


def fetch_latest_restore_image(*, timeout: float | None = 60.0) -> LatestRestoreImage:
    """Ask Apple's catalogue for the latest restore image this Mac supports
    (``+[VZMacOSRestoreImage fetchLatestSupportedWithCompletionHandler:]``; needs the
    network). Nothing is downloaded: fetch ``url`` yourself, then install from the file."""
    require_arm64("macOS restore images (VZMacOSRestoreImage)", "12.0")
    image, error = _restore_image(
        vz().VZMacOSRestoreImage.fetchLatestSupportedWithCompletionHandler_,
        timeout,
        "fetching the latest restore image's details",
    )
    if image is None:
        raise nserror_to_exception(
            error, "cannot fetch the latest macOS restore image (is the Mac online?)"
        )
    found = requirements(image)
    return LatestRestoreImage(
        url=str(image.URL().absoluteString()),
        build_version=str(image.buildVersion()),
        macos_version=_version_text(image.operatingSystemVersion()),
        min_cpus=int(found.minimumSupportedCPUCount()),
        min_memory_mb=int(found.minimumSupportedMemorySize()) // MIB,
    )


# -- the Mac platform --------------------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read the {what} {str(path)!r}: {err.strerror}") from err
    if not data:
        raise ConfigError(f"the {what} {str(path)!r} is empty")
    return data


def load_hardware_model(path: Path) -> Any:
    """The ``VZMacHardwareModel`` saved at install time; it must be supported on this Mac."""
    model = (
        vz()
        .VZMacHardwareModel.alloc()
        .initWithDataRepresentation_(_objc.nsdata_from_bytes(_read(path, "hardware model")))
    )
    if model is None:
        raise ConfigError(f"{str(path)!r} is not a Mac hardware model")
    if not model.isSupported():
        raise UnsupportedError(
            f"this Mac cannot run the hardware model in {str(path)!r}",
            backend="vz",
            feature="macos-guests",
        )
    return model


def load_machine_identifier(path: Path) -> Any:
    ident = (
        vz()
        .VZMacMachineIdentifier.alloc()
        .initWithDataRepresentation_(_objc.nsdata_from_bytes(_read(path, "machine identifier")))
    )
    if ident is None:
        raise ConfigError(f"{str(path)!r} is not a Mac machine identifier")
    return ident


def create_mac_auxiliary_storage(path: Path, hardware_model: Any) -> Any:
    """New auxiliary storage for ``hardware_model`` at ``path`` (replacing a leftover one)."""
    v = vz()
    storage, error = (
        v.VZMacAuxiliaryStorage.alloc().initCreatingStorageAtURL_hardwareModel_options_error_(
            _url(path),
            hardware_model,
            v.VZMacAuxiliaryStorageInitializationOptionAllowOverwrite,
            None,
        )
    )
    if storage is None:
        raise nserror_to_exception(error, f"cannot create auxiliary storage {str(path)!r}")
    return storage


def _open_auxiliary_storage(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"auxiliary storage {str(path)!r} does not exist")
    alloc = vz().VZMacAuxiliaryStorage.alloc()
    if _host() >= (13, 0):
        return alloc.initWithURL_(_url(path))
    return alloc.initWithContentsOfURL_(_url(path))  # macOS 12: the older initializer


def create_mac_platform(cfg: MacVMConfig, *, hardware_model: Any = None) -> Any:
    """A ``VZMacPlatformConfiguration``. With ``hardware_model`` (installing) the model is
    saved, auxiliary storage created and a new machine identifier saved; without it (booting)
    all three are loaded from ``cfg.vm_dir``."""
    require_arm64("macOS guests (VZMacPlatformConfiguration)", "12.0")
    v = vz()
    platform = v.VZMacPlatformConfiguration.alloc().init()
    if hardware_model is not None:
        cfg.vm_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(
            cfg.hardware_model_path, _objc.nsdata_to_bytes(hardware_model.dataRepresentation())
        )
        aux = create_mac_auxiliary_storage(cfg.auxiliary_storage_path, hardware_model)
        ident = v.VZMacMachineIdentifier.alloc().init()
        write_atomic(cfg.machine_identifier_path, _objc.nsdata_to_bytes(ident.dataRepresentation()))
        model = hardware_model
    else:
        model = load_hardware_model(cfg.hardware_model_path)
        aux = _open_auxiliary_storage(cfg.auxiliary_storage_path)
        ident = load_machine_identifier(cfg.machine_identifier_path)
    platform.setHardwareModel_(model)
    platform.setAuxiliaryStorage_(aux)
    platform.setMachineIdentifier_(ident)
    return platform


# -- input devices -----------------------------------------------------------------------------


def create_mac_keyboard(kind: MacKeyboard = MacKeyboard.AUTO) -> Any:
    """The Mac keyboard (macOS 14+; ``auto`` falls back to USB on older hosts) or USB."""
    v = vz()
    if kind is MacKeyboard.AUTO:
        kind = MacKeyboard.MAC if _host() >= (14, 0) else MacKeyboard.USB
    if kind is MacKeyboard.MAC:
        require_arm64("the Mac keyboard (VZMacKeyboardConfiguration)", "14.0")
        return v.VZMacKeyboardConfiguration.alloc().init()
    return v.VZUSBKeyboardConfiguration.alloc().init()


def create_mac_pointing_device(kind: MacPointer = MacPointer.AUTO) -> Any:
    """A trackpad (macOS 13+; ``auto`` falls back to a USB pointer on older hosts) or USB."""
    v = vz()
    if kind is MacPointer.AUTO:
        kind = MacPointer.TRACKPAD if _host() >= (13, 0) else MacPointer.USB
    if kind is MacPointer.TRACKPAD:
        require_arm64("the Mac trackpad (VZMacTrackpadConfiguration)", "13.0")
        return v.VZMacTrackpadConfiguration.alloc().init()
    return v.VZUSBScreenCoordinatePointingDeviceConfiguration.alloc().init()


# -- shares ------------------------------------------------------------------------------------


def create_mac_shares(volumes: Sequence[VolumeMount]) -> list[Any]:
    """VirtioFS devices for a macOS guest. Volumes with a tag get a device each (the guest
    mounts them by tag); volumes without one share the automount device (macOS 13+), which
    the guest mounts under ``/Volumes/My Shared Files/<directory name>`` — the seed's
    "empty tag = auto-mount tag"."""
    explicit = [vol for vol in volumes if vol.tag]
    devices = _build.create_virtiofs_devices(explicit)
    auto = [vol for vol in volumes if not vol.tag]
    if not auto:
        return devices
    require_macos("13.0", "automounted shares in macOS guests (macOSGuestAutomountTag)")
    v = vz()
    cls = v.VZVirtioFileSystemDeviceConfiguration
    tag = str(cls.macOSGuestAutomountTag())
    if any(vol.tag == tag for vol in explicit):
        raise ConfigError(f"the tag {tag!r} is the automount tag; leave the tag empty instead")
    directories: dict[str, Any] = {}
    for vol in auto:
        share = _build.create_directory_share(vol.host_path, vol.read_only)
        canonical = v.VZMultipleDirectoryShare.canonicalizedNameFromName_(vol.host_path.name)
        base = "share" if canonical is None else str(canonical)  # nil: it found no valid name
        name, n = base, 0
        while name in directories:
            n += 1
            name = f"{base}-{n}"
        directories[name] = share.directory()
    device = cls.alloc().initWithTag_(tag)
    device.setShare_(v.VZMultipleDirectoryShare.alloc().initWithDirectories_(directories))
    devices.append(device)
    return devices


# -- the machine -------------------------------------------------------------------------------


def build_macos_vm_config(cfg: MacVMConfig, *, hardware_model: Any = None) -> Any:
    """The ``VZVirtualMachineConfiguration`` of a macOS guest (not yet validated).

    Without ``hardware_model`` the VM directory must hold an installed guest; with it (the
    installer's case) the platform files are created.
    """
    require_arm64("macOS guests", "12.0")
    if hardware_model is None:
        cfg.check_inputs()
    cpus, memory = _build.check_sizes(cfg)
    v = vz()
    config = v.VZVirtualMachineConfiguration.alloc().init()
    config.setCPUCount_(cpus)
    config.setMemorySize_(memory)
    config.setPlatform_(create_mac_platform(cfg, hardware_model=hardware_model))
    config.setBootLoader_(v.VZMacOSBootLoader.alloc().init())
    disk = _build.create_disk_attachment(cfg.disk_path, False)
    config.setStorageDevices_([_build.create_block_device(disk), *disks_to_vz(cfg.disks)])
    config.setNetworkDevices_(network_to_vz(cfg, cfg.vm_dir))
    entropy = [v.VZVirtioEntropyDeviceConfiguration.alloc().init()] if cfg.entropy else []
    config.setEntropyDevices_(entropy)
    audio = sound_to_vz(cfg)
    if audio:
        config.setAudioDevices_(audio)
    balloon = v.VZVirtioTraditionalMemoryBalloonDeviceConfiguration
    config.setMemoryBalloonDevices_([balloon.alloc().init()] if cfg.balloon else [])
    vsock = [v.VZVirtioSocketDeviceConfiguration.alloc().init()] if cfg.vsock else []
    config.setSocketDevices_(vsock)
    config.setDirectorySharingDevices_(create_mac_shares(cfg.volumes))
    if not cfg.headless:
        config.setGraphicsDevices_([_build.create_mac_graphics_config(cfg.displays)])
        config.setKeyboards_([create_mac_keyboard(cfg.keyboard)])
        config.setPointingDevices_([create_mac_pointing_device(cfg.pointer)])
    return config


def mac_start_options(cfg: MacVMConfig) -> Any | None:
    """What ``startWithOptions:completionHandler:`` takes for ``cfg``: start options that
    start up in macOS Recovery when ``cfg.recovery`` (macOS 13+), else ``None`` (a plain
    ``startWithCompletionHandler:``)."""
    if not cfg.recovery:
        return None
    require_arm64("starting up in macOS Recovery (VZMacOSVirtualMachineStartOptions)", "13.0")
    options = vz().VZMacOSVirtualMachineStartOptions.alloc().init()
    options.setStartUpFromMacOSRecovery_(True)
    return options


def start_mac_vm(queue: Queue, vm: Any, cfg: MacVMConfig) -> _objc.ErrorCompletionHandler:
    """Start a macOS guest as ``cfg`` says: in macOS Recovery (``startWithOptions:
    completionHandler:`` with :func:`mac_start_options`) when ``cfg.recovery``, else as
    :func:`~._lifecycle.start_vm` does. The handler fires once it runs or failed to."""
    options = mac_start_options(cfg)
    if options is None:
        return _lifecycle.start_vm(queue, vm)
    handler = _objc.ErrorCompletionHandler("start the VM in macOS Recovery")
    queue.sync(lambda: vm.startWithOptions_completionHandler_(options, handler.block))
    return handler


# -- the installer -----------------------------------------------------------------------------


def _check_requirements(cfg: MacVMConfig, info: RestoreImageInfo) -> None:
    if cfg.cpus < info.min_cpus:
        raise ConfigError(
            f"macOS {info.macos_version} ({info.build_version}) needs at least "
            f"{info.min_cpus} CPUs; the config has {cfg.cpus}"
        )
    if cfg.memory_mb < info.min_memory_mb:
        raise ConfigError(
            f"macOS {info.macos_version} ({info.build_version}) needs at least "
            f"{info.min_memory_mb} MiB of memory; the config has {cfg.memory_mb} MiB"
        )


def _vm_files(cfg: MacVMConfig) -> tuple[Path, ...]:
    return (
        cfg.install_record_path,
        cfg.disk_path,
        cfg.auxiliary_storage_path,
        cfg.hardware_model_path,
        cfg.machine_identifier_path,
        *(cfg.vm_dir / mac_file(i) for i in range(1 + len(cfg.networks))),  # new NICs too
    )


def _run_installer(
    queue: Queue,
    vm: Any,
    image_url: Any,
    progress: ProgressCallback | None,
    timeout: float | None,
    poll_s: float,
) -> None:
    """``VZMacOSInstaller`` on the VM's queue; its ``NSProgress`` polled for ``progress``."""
    handler = _objc.ErrorCompletionHandler("install macOS")

    def begin() -> tuple[Any, Any]:
        installer = (
            vz().VZMacOSInstaller.alloc().initWithVirtualMachine_restoreImageURL_(vm, image_url)
        )
        installer.installWithCompletionHandler_(handler.block)
        return installer, installer.progress()

    held = queue.sync(begin)  # the installer must stay referenced until it completed
    ns_progress = held[1]
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while not handler.wait(poll_s):
            if progress is not None:
                progress(float(ns_progress.fractionCompleted()))
            if deadline is not None and time.monotonic() >= deadline:
                raise VMTimeoutError(f"installing macOS did not finish within {timeout} s")
    except BaseException:
        ns_progress.cancel()  # the installer then completes with "operation cancelled"
        if not handler.wait(30) or _lifecycle.can_stop(queue, vm):
            with contextlib.suppress(Exception):
                _lifecycle.stop_vm(queue, vm).wait(30)
        raise
    error = _lifecycle.handler_error(handler)
    if error is not None:
        raise error
    if progress is not None:
        progress(1.0)


def install_macos(
    cfg: MacVMConfig,
    restore_image: str | os.PathLike[str],
    *,
    progress: ProgressCallback | None = None,
    timeout: float | None = None,
    force: bool = False,
    poll_s: float = 0.5,
) -> RestoreImageInfo:
    """Install macOS from a local ``.ipsw`` into ``cfg.vm_dir``.

    ``progress(fraction)`` is called while the installer runs (0.0 .. 1.0). A failed,
    cancelled or timed-out install removes what it created; an existing install is kept
    unless ``force``. Returns what the restore image is.
    """
    require_arm64("installing macOS guests (VZMacOSInstaller)", "12.0")
    if cfg.install_record_path.exists() and not force:
        raise StateError(
            f"{str(cfg.vm_dir)!r} already holds an installed macOS; replace it with force=True "
            "(--force)"
        )
    image = load_restore_image(restore_image)
    info = restore_image_info(image)
    _check_requirements(cfg, info)
    cfg.vm_dir.mkdir(parents=True, exist_ok=True)
    for path in _vm_files(cfg):
        path.unlink(missing_ok=True)
    ok = False
    try:
        create_disk_image(cfg.disk_path, cfg.disk_size_gb)
        model = (
            vz()
            .VZMacHardwareModel.alloc()
            .initWithDataRepresentation_(_objc.nsdata_from_bytes(info.hardware_model))
        )
        config = build_macos_vm_config(cfg, hardware_model=model)
        _build.validate_config(config)
        queue = Queue(f"vzkit.install.{os.getpid()}")
        vm = _lifecycle.create_vm(config, queue)
        log.info(
            "installing macOS %s (%s) into %s", info.macos_version, info.build_version, cfg.vm_dir
        )
        _run_installer(queue, vm, image.URL(), progress, timeout, poll_s)
        record = {
            "build": info.build_version,
            "macos_version": info.macos_version,
            "restore_image": str(info.path),
            "installed": format_rfc3339(datetime.now(UTC)),
        }
        write_atomic(cfg.install_record_path, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
        ok = True
    finally:
        if not ok:
            for path in _vm_files(cfg):
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
    return info
