"""The vz backend: Apple's Virtualization framework through PyObjC (macOS 12+).

``import vzkit.backends.vz`` works anywhere: PyObjC is imported only when a VM is built
(:mod:`._objc` is the one module that imports ``Virtualization``/``Foundation``/``objc``/
``dispatch``). :data:`BACKEND` is what ``VirtualMachine(cfg, backend="vz")`` uses; the seed's
functions and types are re-exported here under snake_case names (see ``docs/vz-parity.md``).
"""

from __future__ import annotations

from ..._config import LinuxVMConfig
from ..._macconfig import MacVMConfig
from ...errors import BackendUnavailableError
from .._protocol import BalloonInfo, Feature, StateListener
from ._build import (
    DEFAULT_CMDLINE,
    DiskCaching,
    DiskSync,
    add_memory_balloon_device,
    build_linux_vm_config,
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
    validate_config,
)
from ._doctor import doctor_checks
from ._entitlements import (
    ENTITLEMENT,
    repoint_venv_aliases,
    restore_venv_python,
    sign_interpreter,
    venv_python,
)
from ._gui import run_windows
from ._lifecycle import (
    can_pause,
    can_request_stop,
    can_resume,
    can_start,
    can_stop,
    create_vm,
    get_balloon_info,
    pause_vm,
    request_stop_vm,
    restore_machine_state,
    resume_vm,
    save_machine_state,
    set_balloon_target,
    start_vm,
    stop_vm,
    validate_save_restore_support,
    vm_state,
)
from ._machine import VzMachine
from ._macos import (
    LatestRestoreImage,
    RestoreImageInfo,
    build_macos_vm_config,
    create_mac_auxiliary_storage,
    create_mac_keyboard,
    create_mac_platform,
    create_mac_pointing_device,
    create_mac_shares,
    fetch_latest_restore_image,
    install_macos,
    load_restore_image,
    mac_start_options,
    restore_image_info,
    start_mac_vm,
)
from ._nserror import (
    NSErrorDetails,
    NSErrorInfo,
    extract_nserror_message,
    format_nserror_detailed,
    print_nserror_detailed,
)
from ._objc import (
    ErrorCompletionHandler,
    MacOSVersionError,
    Queue,
    availability_problem,
    nsdata_from_bytes,
    nsdata_to_bytes,
    release,
    retain,
    run_run_loop_aggressively,
    run_run_loop_once,
    run_run_loop_until_done,
)
from ._rosetta import RosettaAvailability, install_rosetta, rosetta_availability
from ._storage import create_nbd_attachment, create_nvme_device, create_usb_mass_storage_device
from ._vsock import VsockListener, VsockManager, socket_from_connection

__all__ = [
    "BACKEND",
    "DEFAULT_CMDLINE",
    "ENTITLEMENT",
    "RUN_LOOP_RUN_FINISHED",
    "RUN_LOOP_RUN_HANDLED_SOURCE",
    "RUN_LOOP_RUN_STOPPED",
    "RUN_LOOP_RUN_TIMED_OUT",
    "BalloonInfo",
    "DiskCaching",
    "DiskSync",
    "ErrorCompletionHandler",
    "LatestRestoreImage",
    "MacOSVersionError",
    "NSErrorDetails",
    "NSErrorInfo",
    "Queue",
    "RestoreImageInfo",
    "RosettaAvailability",
    "VsockListener",
    "VsockManager",
    "VzBackend",
    "VzMachine",
    "add_memory_balloon_device",
    "build_linux_vm_config",
    "build_macos_vm_config",
    "can_pause",
    "can_request_stop",
    "can_resume",
    "can_start",
    "can_stop",
    "create_block_device",
    "create_directory_share",
    "create_disk_attachment",
    "create_file_serial_console",
    "create_mac_auxiliary_storage",
    "create_mac_graphics_config",
    "create_mac_keyboard",
    "create_mac_platform",
    "create_mac_pointing_device",
    "create_mac_shares",
    "create_nbd_attachment",
    "create_network_attachment",
    "create_network_device",
    "create_nvme_device",
    "create_serial_console",
    "create_stdio_serial_console",
    "create_usb_mass_storage_device",
    "create_virtio_graphics_config",
    "create_virtiofs_devices",
    "create_vm",
    "doctor_checks",
    "extract_nserror_message",
    "fetch_latest_restore_image",
    "format_nserror_detailed",
    "get_balloon_info",
    "install_macos",
    "install_rosetta",
    "load_restore_image",
    "mac_start_options",
    "nsdata_from_bytes",
    "nsdata_to_bytes",
    "pause_vm",
    "print_nserror_detailed",
    "release",
    "repoint_venv_aliases",
    "request_stop_vm",
    "restore_image_info",
    "restore_machine_state",
    "restore_venv_python",
    "resume_vm",
    "retain",
    "rosetta_availability",
    "run_run_loop_aggressively",
    "run_run_loop_once",
    "run_run_loop_until_done",
    "run_windows",
    "save_machine_state",
    "set_balloon_target",
    "sign_interpreter",
    "socket_from_connection",
    "start_mac_vm",
    "start_vm",
    "stop_vm",
    "validate_config",
    "validate_save_restore_support",
    "venv_python",
    "vm_state",
]

#: ``CFRunLoopRunInMode`` results (the seed's ``RunLoopRun*`` constants).
RUN_LOOP_RUN_FINISHED = 1
RUN_LOOP_RUN_STOPPED = 2
RUN_LOOP_RUN_TIMED_OUT = 3
RUN_LOOP_RUN_HANDLED_SOURCE = 4


class VzBackend:
    """``BACKEND``: builds :class:`VzMachine` objects; available on macOS with PyObjC."""

    name = "vz"
    features = frozenset(
        {
            Feature.LIFECYCLE,
            Feature.BALLOON,
            Feature.VSOCK,
            Feature.SHARES,
            Feature.SNAPSHOTS,
            Feature.GRAPHICS,
            Feature.MACOS_GUESTS,
            Feature.ROSETTA,
        }
    )

    def check_available(self) -> None:
        problem = availability_problem()
        if problem is not None:
            raise BackendUnavailableError(problem)

    def create_machine(self, config: LinuxVMConfig, on_state: StateListener) -> VzMachine:
        return VzMachine(config, on_state)

    def create_mac_machine(self, config: MacVMConfig, on_state: StateListener) -> VzMachine:
        return VzMachine(config, on_state)


BACKEND = VzBackend()
