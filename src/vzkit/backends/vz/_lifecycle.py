"""The seed's VM functions: create, start/stop/pause/resume, state, balloon, save/restore.

Every call on a ``VZVirtualMachine`` (and on the devices it owns) runs on the VM's serial
:class:`~._objc.Queue`. Operations with a completion handler dispatch synchronously to issue
the call and return an :class:`~._objc.ErrorCompletionHandler` that fires asynchronously; an
optional ``completion`` callback receives ``None`` or the vzkit error for the ``NSError``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..._state import VMState
from ...errors import ConfigError, UnsupportedError, VMTimeoutError
from .._protocol import BalloonInfo
from ._nserror import nserror_to_exception
from ._objc import ErrorCompletionHandler, Queue, foundation, require_arm64, require_macos, vz

__all__ = [
    "Completion",
    "can_pause",
    "can_request_stop",
    "can_resume",
    "can_start",
    "can_stop",
    "create_vm",
    "get_balloon_info",
    "handler_error",
    "pause_vm",
    "request_stop_vm",
    "restore_machine_state",
    "resume_vm",
    "save_machine_state",
    "set_balloon_target",
    "start_vm",
    "stop_vm",
    "validate_save_restore_support",
    "vm_state",
]

Completion = Callable[[Exception | None], object]
MIB = 1 << 20
GIB = 1 << 30


def handler_error(handler: ErrorCompletionHandler) -> Exception | None:
    """The vzkit error for what a completed handler received (``None`` on success)."""
    if handler.error is None:
        return None
    return nserror_to_exception(handler.error, handler.what)


def _issue(
    queue: Queue,
    what: str,
    send: Callable[[Callable[[Any], None]], object],
    completion: Completion | None,
) -> ErrorCompletionHandler:
    handler = ErrorCompletionHandler(what)
    if completion is not None:
        handler.add_done_callback(lambda h: completion(handler_error(h)))
    queue.sync(lambda: send(handler.block))
    return handler


def create_vm(config: Any, queue: Queue) -> Any:
    """A ``VZVirtualMachine`` for ``config`` bound to ``queue`` (created on it)."""
    return queue.sync(
        lambda: vz().VZVirtualMachine.alloc().initWithConfiguration_queue_(config, queue.queue)
    )


def start_vm(queue: Queue, vm: Any, completion: Completion | None = None) -> ErrorCompletionHandler:
    """Start the VM; the handler (and ``completion``) fire once it runs or failed to."""
    return _issue(queue, "start the VM", vm.startWithCompletionHandler_, completion)


def stop_vm(queue: Queue, vm: Any, completion: Completion | None = None) -> ErrorCompletionHandler:
    """Stop the VM at once, without the guest's cooperation (macOS 12+)."""
    require_macos("12.0", "stopping a VM (stopWithCompletionHandler:)")
    return _issue(queue, "stop the VM", vm.stopWithCompletionHandler_, completion)


def pause_vm(queue: Queue, vm: Any, completion: Completion | None = None) -> ErrorCompletionHandler:
    return _issue(queue, "pause the VM", vm.pauseWithCompletionHandler_, completion)


def resume_vm(
    queue: Queue, vm: Any, completion: Completion | None = None
) -> ErrorCompletionHandler:
    return _issue(queue, "resume the VM", vm.resumeWithCompletionHandler_, completion)


def request_stop_vm(queue: Queue, vm: Any) -> None:
    """Ask the guest to power off (``requestStopWithError:``); returns at once."""
    ok, error = queue.sync(lambda: vm.requestStopWithError_(None))
    if not ok:
        raise nserror_to_exception(error, "ask the guest to stop")


def vm_state(queue: Queue, vm: Any) -> VMState:
    """The VM's ``VZVirtualMachineState`` as a :class:`~vzkit.VMState`."""
    return VMState.from_vz_value(int(queue.sync(vm.state)))


def can_start(queue: Queue, vm: Any) -> bool:
    return bool(queue.sync(vm.canStart))


def can_stop(queue: Queue, vm: Any) -> bool:
    require_macos("12.0", "canStop")
    return bool(queue.sync(vm.canStop))


def can_pause(queue: Queue, vm: Any) -> bool:
    return bool(queue.sync(vm.canPause))


def can_resume(queue: Queue, vm: Any) -> bool:
    return bool(queue.sync(vm.canResume))


def can_request_stop(queue: Queue, vm: Any) -> bool:
    return bool(queue.sync(vm.canRequestStop))


# -- memory balloon ----------------------------------------------------------------------------


def _balloon(vm: Any) -> Any:
    cls = vz().VZVirtioTraditionalMemoryBalloonDevice
    for device in vm.memoryBalloonDevices() or ():
        if device.isKindOfClass_(cls):
            return device
    return None


def set_balloon_target(queue: Queue, vm: Any, size_gb: float) -> None:
    """Ask the guest to give memory back down to ``size_gb`` (rounded down to 1 MiB).

    As the seed, a target below the framework's ``minimumAllowedMemorySize`` is refused
    (:class:`~vzkit.ConfigError`, also a ``ValueError``) before the device is touched."""
    if size_gb <= 0:
        raise ValueError(f"balloon target must be positive, got {size_gb!r}")
    target = int(size_gb * GIB) // MIB * MIB
    minimum = int(vz().VZVirtualMachineConfiguration.minimumAllowedMemorySize())
    if target < minimum:
        raise ConfigError(
            f"balloon target {target // MIB} MiB is below the smallest memory size this Mac "
            f"allows a VM ({minimum // MIB} MiB): ask for {minimum // MIB} MiB or more"
        )

    def work() -> None:
        device = _balloon(vm)
        if device is None:
            raise UnsupportedError("this VM has no memory balloon", backend="vz", feature="balloon")
        device.setTargetVirtualMachineMemorySize_(target)

    queue.sync(work)


def get_balloon_info(queue: Queue, vm: Any) -> BalloonInfo:
    """Whether the VM has a balloon, its target, and the smallest target allowed."""
    minimum_mb = int(vz().VZVirtualMachineConfiguration.minimumAllowedMemorySize()) // MIB

    def work() -> BalloonInfo:
        device = _balloon(vm)
        if device is None:
            return BalloonInfo(False, 0.0, minimum_mb)
        return BalloonInfo(True, int(device.targetVirtualMachineMemorySize()) / GIB, minimum_mb)

    return queue.sync(work)


# -- machine state (snapshots) -----------------------------------------------------------------


def validate_save_restore_support(config: Any) -> None:
    """Raise unless ``config``'s machine state can be saved (macOS 14+, Apple silicon)."""
    require_arm64("saving VM state (validateSaveRestoreSupportWithError:)", "14.0")
    ok, error = config.validateSaveRestoreSupportWithError_(None)
    if not ok:
        exc = nserror_to_exception(error, "this VM's state cannot be saved")
        if isinstance(exc, UnsupportedError):
            raise exc
        raise UnsupportedError(str(exc), backend="vz", feature="snapshots") from exc.__cause__


def save_machine_state(
    queue: Queue, vm: Any, path: str | os.PathLike[str], completion: Completion | None = None
) -> ErrorCompletionHandler:
    """Write the paused VM's state to ``path`` (macOS 14+, Apple silicon)."""
    require_arm64("saving VM state (saveMachineStateToURL:)", "14.0")
    url = foundation().NSURL.fileURLWithPath_(os.fspath(path))
    return _issue(
        queue,
        "save the VM state",
        lambda block: vm.saveMachineStateToURL_completionHandler_(url, block),
        completion,
    )


def restore_machine_state(
    queue: Queue, vm: Any, path: str | os.PathLike[str], completion: Completion | None = None
) -> ErrorCompletionHandler:
    """Restore a stopped VM from ``path``; it ends paused. The VM must have been built from
    the identical configuration (share paths included) the state was saved with."""
    require_arm64("restoring VM state (restoreMachineStateFromURL:)", "14.0")
    url = foundation().NSURL.fileURLWithPath_(os.fspath(path))
    return _issue(
        queue,
        "restore the VM state",
        lambda block: vm.restoreMachineStateFromURL_completionHandler_(url, block),
        completion,
    )


def wait_handler(handler: ErrorCompletionHandler, timeout: float | None) -> None:
    """Block until ``handler`` fired; raise its error, or :class:`VMTimeoutError`."""
    if not handler.wait(timeout):
        raise VMTimeoutError(f"{handler.what} did not finish within {timeout} s")
    error = handler_error(handler)
    if error is not None:
        raise error
