"""One ``VZVirtualMachine`` behind the :class:`~vzkit.backends.Machine` protocol.

The VM lives in this process, on its own serial dispatch queue. Completion handlers and
delegate callbacks fire on that queue; they hop onto vzkit's event loop with
``call_soon_threadsafe`` before touching the machine's state:

    STOPPED/ERROR --start--> STARTING --handler--> RUNNING <--pause/resume--> PAUSED
    STOPPED --restore_state--> RESTORING --> PAUSED;  PAUSED --save_state--> SAVING --> PAUSED
    running states --guest power-off (delegate)--> STOPPED;  --framework error--> ERROR
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import tty
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..._config import ConsoleMode, LinuxVMConfig
from ..._display import default_linux_display_config
from ..._macconfig import MacVMConfig
from ..._state import VMState
from ..._terminal import RawConsoleInput
from ...errors import VMError, VzkitError
from .._protocol import (
    AgentVsock,
    BalloonInfo,
    CapturedDisk,
    ProgressFn,
    StateListener,
    notify_state,
)
from . import _build, _lifecycle, _macos, _rootclone, _snapshots
from ._nserror import nserror_to_exception
from ._objc import ErrorCompletionHandler, Queue, vm_delegate
from ._vsock import VsockListener, VsockManager

if TYPE_CHECKING:
    from ._gui import VMWindow

__all__ = ["VzMachine"]

log = logging.getLogger(__name__)
MIB = 1 << 20


def _in_foreground(fd: int) -> bool:
    """False when the terminal on ``fd`` is this process's controlling terminal and another
    process group is in its foreground (changing its settings would stop this process with
    SIGTTOU); a terminal that is not the controlling one has no job control."""
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return True


class VzMachine:
    """A :class:`~vzkit.backends.Machine` backed by Apple's Virtualization framework: a Linux
    guest, or an installed macOS guest (:class:`~vzkit.MacVMConfig`). It also implements
    the vsock, balloon, snapshot and agent-stream capabilities (``backends/_protocol.py``)."""

    def __init__(self, config: LinuxVMConfig | MacVMConfig, on_state: StateListener) -> None:
        self.config = config
        self._on_state = on_state
        self._state = VMState.STOPPED
        self._own_state_dir = config.state_dir is None
        self._root_layer: Path | None = None  # the root disk's copy (a run's, or kept)
        self._state_dir: Path | None = config.state_dir
        self._queue: Queue | None = None
        self._vm: Any = None
        self._vz_config: Any = None
        self._delegate: Any = None  # the VM holds its delegate weakly
        self._vsock: VsockManager | None = None
        self._pty_fds: list[int] = []
        self._console_pty: str | None = None
        self._console_input: RawConsoleInput | None = None  # a stdio console on a terminal
        self._escape_task: asyncio.Task[None] | None = None
        self._window: VMWindow | None = None  # gui=True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self.last_error: VzkitError | None = None

    # -- properties ------------------------------------------------------------------------

    @property
    def state(self) -> VMState:
        return self._state

    @property
    def pid(self) -> int | None:
        return None  # the VM runs inside this process

    @property
    def state_dir(self) -> Path:
        if self._state_dir is None:
            self._state_dir = Path(tempfile.mkdtemp(prefix="vzkit-"))
        return self._state_dir

    @property
    def console_log_path(self) -> Path | None:
        if isinstance(self.config, MacVMConfig) or self.config.console is not ConsoleMode.LOG:
            return None
        return self.config.console_log_path or self.state_dir / "console.log"

    @property
    def console_pty(self) -> str | None:
        return self._console_pty

    @property
    def display_address(self) -> str | None:
        """``window`` while the VM's window is open (``gui=True``); VZ serves no VNC."""
        return "window" if self._window is not None and not self._window.closed else None

    @property
    def queue(self) -> Queue | None:
        """The VM's dispatch queue (``None`` until the VM exists)."""
        return self._queue

    @property
    def vz_vm(self) -> Any:
        """The ``VZVirtualMachine`` (``None`` until started or restored)."""
        return self._vm

    def _set_state(self, new: VMState) -> None:
        old = self._state
        if old is new:
            return
        self._state = new
        notify_state(self._on_state, old, new)

    # -- callbacks from the VM's queue -----------------------------------------------------

    def _from_queue(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _guest_stopped(self) -> None:
        log.info("the guest powered off")
        self._finish(VMState.STOPPED)

    def _vm_failed(self, error: Any) -> None:
        exc = nserror_to_exception(error, "the VM stopped with an error")
        self.last_error = exc if isinstance(exc, VzkitError) else VMError(str(exc))
        log.warning("%s", exc)
        self._finish(VMState.ERROR)

    def _finish(self, state: VMState) -> None:
        self._stop_console_input()
        self._close_window()
        self._set_state(state)
        if self._stopped is not None:
            self._stopped.set()

    def _stop_for_user(self, why: str) -> None:
        """The user ended the VM from its console or window: power it off (loop thread)."""
        log.info("%s: stopping the VM", why)
        self._escape_task = asyncio.ensure_future(self.force_stop())

    def _open_window(self) -> None:
        """``gui=True``: the VM's display in a window; closing it stops the VM."""
        from ._gui import VMWindow  # AppKit only for a VM that shows itself

        cfg = self.config
        display = cfg.displays[0] if cfg.displays else default_linux_display_config()
        kind = "macOS" if isinstance(cfg, MacVMConfig) else "Linux"
        self._window = VMWindow(
            self._vm,
            title=f"vzkit: {kind} VM",
            display=display,
            on_close=lambda: self._from_queue(self._stop_for_user, "its window was closed"),
        )
        self._window.open()

    def _close_window(self) -> None:
        window, self._window = self._window, None
        if window is not None:
            window.close()

    def _stop_console_input(self) -> None:
        console, self._console_input = self._console_input, None
        if console is not None:
            console.stop()  # the terminal's settings are back

    # -- building the VM -------------------------------------------------------------------

    def _stdio_console(self) -> tuple[int, int] | None:
        """A ``stdio`` console on a terminal: raw, Ctrl-] . stops the VM (as vfkit and
        ``qemu -nographic``, every key, Ctrl-C included, goes to the guest). ``None`` when
        stdin is no terminal: the console reads it as it is."""
        if not os.isatty(0) or not _in_foreground(0):
            return None  # a pipe, a file, or a terminal this process may not change
        console = RawConsoleInput(
            0, lambda: self._from_queue(self._stop_for_user, "Ctrl-] . typed on the console")
        )
        console.start()
        self._console_input = console
        return (console.read_fd, 1)

    def _open_pty(self) -> tuple[int, int]:
        master, slave = os.openpty()
        self._pty_fds = [master, slave]
        tty.setraw(slave)
        self._console_pty = os.ttyname(slave)
        return (master, master)

    def _prepare(self) -> None:
        """Build, validate and create the VM (stopped) with its delegate."""
        self.config.check_inputs()
        _build.require_raw_disk(self.config)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(self.config, MacVMConfig):
            vz_config = _macos.build_macos_vm_config(self.config)
        else:
            root = self.config.root_disk
            if root is not None and self._root_layer is None:
                self._root_layer = _rootclone.open_layer(root, self.state_dir)
            self._loop = asyncio.get_running_loop()
            console_fds = None
            if self.config.console is ConsoleMode.PTY:
                console_fds = self._open_pty()
            elif self.config.console is ConsoleMode.STDIO:
                console_fds = self._stdio_console()
            vz_config = _build.build_linux_vm_config(
                self.config,
                state_dir=self.state_dir,
                console_fds=console_fds,
                root_layer=self._root_layer,
            )
        _build.validate_config(vz_config)
        queue = Queue(f"vzkit.vm.{id(self):x}")
        vm = _lifecycle.create_vm(vz_config, queue)
        delegate = vm_delegate(
            lambda: self._from_queue(self._guest_stopped),
            lambda error: self._from_queue(self._vm_failed, error),
        )
        queue.sync(lambda: vm.setDelegate_(delegate))
        self._queue, self._vm, self._vz_config, self._delegate = queue, vm, vz_config, delegate
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self.last_error = None

    async def _await(self, handler: ErrorCompletionHandler) -> None:
        await handler.wait_async()
        error = _lifecycle.handler_error(handler)
        if error is not None:
            raise error

    # -- lifecycle -------------------------------------------------------------------------

    # The core calls each operation only in a state its guard table allows (and refuses the
    # rest itself, the same for every backend): the methods below check no states.

    async def start(self) -> None:
        self._set_state(VMState.STARTING)
        try:
            self._release()
            self._prepare()
            assert self._queue is not None
            if isinstance(self.config, MacVMConfig):  # into Recovery when it says so
                handler = _macos.start_mac_vm(self._queue, self._vm, self.config)
            else:
                handler = _lifecycle.start_vm(self._queue, self._vm)
            await self._await(handler)
            if self.config.gui:
                self._open_window()
        except BaseException:
            await self._abandon()
            raise
        self._set_state(VMState.RUNNING)

    async def restore_state(
        self,
        path: str | os.PathLike[str],
        disks: Sequence[CapturedDisk] = (),
        verified: Awaitable[None] | None = None,
    ) -> None:
        """Build the VM from the config and restore its saved state; it ends PAUSED.

        VZ attaches the config's disk itself, so captured ``disks`` are copied back over it
        first (a new file renamed into place): this machine's disk is the snapshot's again.
        """
        self._set_state(VMState.RESTORING)
        try:
            if verified is not None:  # the disks are copied back only once they check out
                await verified
            root = getattr(self.config, "root_disk", None)  # its layer: the snapshot's, copied
            layer = None if root is None else _rootclone.restore_target(root, self.state_dir)
            await _snapshots.copy_back_disks(self.config, disks, layer)
            self._root_layer = layer
            self._release()
            self._prepare()
            assert self._queue is not None
            await self._await(_lifecycle.restore_machine_state(self._queue, self._vm, path))
            if self.config.gui:
                self._open_window()
        except BaseException:
            await self._abandon()
            raise
        self._set_state(VMState.PAUSED)

    def snapshot_blockers(self) -> list[str]:
        # VZ validates the devices itself (validate_save_restore_support); a root disk's
        # layer is captured like a disk (_snapshots.capture_disks).
        return []

    async def prepare_save(self) -> None:
        return None  # VZ saves every device it supports for save/restore

    async def finish_save(self) -> None:
        return None

    def snapshot_info(self) -> dict[str, str]:
        return _snapshots.snapshot_info(self.config)

    async def hardware_mismatches(self, saved: Mapping[str, str]) -> list[str]:
        return _snapshots.hardware_mismatches(self.config, saved)

    async def capture_disks(self, directory: Path, prefix: str) -> list[CapturedDisk]:
        """A clone/sparse copy of the writable disk (the VM is paused, its writes are done)."""
        return await _snapshots.capture_disks(self.config, directory, prefix, self._root_layer)

    async def save_state(
        self, path: str | os.PathLike[str], progress: ProgressFn | None = None
    ) -> None:
        """Write the paused VM's state to ``path`` (validated for save/restore first).
        VZ reports no progress; ``progress`` is called once when done."""
        queue, vm = self._require_vm()
        _lifecycle.validate_save_restore_support(self._vz_config)
        self._set_state(VMState.SAVING)
        try:
            await self._await(_lifecycle.save_machine_state(queue, vm, path))
        finally:
            self._set_state(_lifecycle.vm_state(queue, vm))  # paused, whatever VZ said
        if progress is not None:
            size = os.stat(path).st_size
            progress(size, size)

    async def _abandon(self) -> None:
        """Undo a failed or cancelled start/restore: force the VM off, release everything."""
        if self._vm is not None and self._queue is not None:
            with contextlib.suppress(Exception):
                if _lifecycle.vm_state(self._queue, self._vm) is not VMState.STOPPED:
                    handler = _lifecycle.stop_vm(self._queue, self._vm)
                    await asyncio.shield(asyncio.wait_for(handler.wait_async(), 10))
        self._release()
        self._set_state(VMState.STOPPED)

    def _require_vm(self) -> tuple[Queue, Any]:
        if self._vm is None or self._queue is None:
            raise VMError(f"the VM is not running (state {self._state.value})")
        return self._queue, self._vm

    async def pause(self) -> None:
        queue, vm = self._require_vm()
        self._set_state(VMState.PAUSING)
        try:
            await self._await(_lifecycle.pause_vm(queue, vm))
        except BaseException:
            self._set_state(_lifecycle.vm_state(queue, vm))
            raise
        self._set_state(VMState.PAUSED)

    async def resume(self) -> None:
        queue, vm = self._require_vm()
        self._set_state(VMState.RESUMING)
        try:
            await self._await(_lifecycle.resume_vm(queue, vm))
        except BaseException:
            self._set_state(_lifecycle.vm_state(queue, vm))
            raise
        self._set_state(VMState.RUNNING)

    async def request_stop(self) -> None:
        queue, vm = self._require_vm()
        _lifecycle.request_stop_vm(queue, vm)

    async def force_stop(self) -> None:
        if self._vm is None or self._queue is None or self._state is VMState.STOPPED:
            return
        queue, vm = self._queue, self._vm
        if _lifecycle.vm_state(queue, vm) is VMState.STOPPED:
            self._finish(VMState.STOPPED)
            return
        self._set_state(VMState.STOPPING)
        handler = _lifecycle.stop_vm(queue, vm)
        await handler.wait_async()
        error = _lifecycle.handler_error(handler)
        if error is not None and _lifecycle.vm_state(queue, vm) is not VMState.STOPPED:
            self._set_state(VMState.ERROR)
            raise error
        self._finish(VMState.STOPPED)

    async def wait_stopped(self) -> VMState:
        if self._stopped is not None and self._state not in (VMState.STOPPED, VMState.ERROR):
            await self._stopped.wait()
        return self._state

    # -- balloon ---------------------------------------------------------------------------

    async def set_balloon_target(self, target_mb: int) -> None:
        queue, vm = self._require_vm()
        _lifecycle.set_balloon_target(queue, vm, target_mb * MIB / (1 << 30))

    async def balloon_info(self) -> BalloonInfo:
        if self._vm is None or self._queue is None:
            if not self.config.balloon:
                return BalloonInfo(False, 0.0, 0)
            return BalloonInfo(True, self.config.memory_gb, 0)
        return _lifecycle.get_balloon_info(self._queue, self._vm)

    # -- vsock -----------------------------------------------------------------------------

    @property
    def vsock(self) -> VsockManager:
        """The VM's vsock device (``connect``/``listen``); the VM must be running."""
        if self._vsock is None:
            queue, vm = self._require_vm()
            self._vsock = VsockManager(vm, queue)
        return self._vsock

    async def vsock_connect(self, port: int, timeout: float | None) -> socket.socket:
        return await asyncio.to_thread(self.vsock.connect, port, timeout)

    async def vsock_listen(self, port: int) -> VsockListener:
        return self.vsock.listen(port)

    def agent_console(self) -> socket.socket | None:
        return None  # the agent of a vz guest listens on vsock only

    def agent_vsock(self) -> AgentVsock | None:
        """Keyless while the VM exists: its vsock device is reachable from this process only
        (docs/agent-protocol.md)."""
        return AgentVsock() if self._vm is not None else None

    # -- teardown --------------------------------------------------------------------------

    def _release(self) -> None:
        """Drop the VM and everything the framework may call back into, close the pty."""
        if self._vsock is not None:
            self._vsock.close()
            self._vsock = None
        self._vm = None
        self._vz_config = None
        self._delegate = None
        self._queue = None
        self._stop_console_input()
        self._close_window()
        fds, self._pty_fds = self._pty_fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._console_pty = None

    async def close(self) -> None:
        try:
            with contextlib.suppress(VzkitError):
                await self.force_stop()
        finally:
            self._release()
            if self._state is not VMState.ERROR:
                self._set_state(VMState.STOPPED)
            if self._stopped is not None:
                self._stopped.set()
            _rootclone.remove_layer(self._root_layer, getattr(self.config, "root_disk", None))
            self._root_layer = None
            if self._own_state_dir and self._state_dir is not None:
                shutil.rmtree(self._state_dir, ignore_errors=True)
                self._state_dir = None
