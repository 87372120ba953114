"""What a QEMU run's events and its exit mean for the VM's state (``_machine.py`` keeps the
state machine; this decides the transitions QEMU causes and why a VM ended in ERROR).

A :class:`RunMonitor` gets the machine's state through two callables (read it, set it) and
nothing else of the machine. Per run (:meth:`RunMonitor.new_run`) it keeps whether the exit is
expected (a stop or a teardown), whether the guest powered itself off, and the reason for
ERROR (:attr:`RunMonitor.last_error`): a guest kernel panic (the pvpanic device's
``GUEST_PANICKED``; QEMU then exits by itself), a share's virtiofsd that died under a running
VM (QEMU is killed: the guest would hang on that share), or QEMU exiting on its own (its exit
status and the tail of its log).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..._process import OwnedProcess
from ..._state import VMState
from ...errors import VMError, VzkitError
from ._run import GuestPanic, QemuRun, panic_line, stderr_tail

__all__ = ["RunMonitor"]

log = logging.getLogger(__name__)

#: States in which a VM counts as running (a dead share helper then fails it).
_LIVE = frozenset({VMState.RUNNING, VMState.PAUSED, VMState.PAUSING, VMState.RESUMING})


class RunMonitor:
    """The VM's state as QEMU's events and exit change it (see the module docstring)."""

    def __init__(self, state: Callable[[], VMState], set_state: Callable[[VMState], None]) -> None:
        self._state, self._set_state = state, set_state
        #: Why the VM last ended in ERROR; cleared by the next run.
        self.last_error: VzkitError | None = None
        #: QEMU is being stopped or torn down by vzkit: its exit is no failure.
        self.expect_exit = False
        self._guest_shutdown = False
        self._stopped: asyncio.Event | None = None
        self._console_log: Path | None = None
        self._qemu_log = Path()

    def new_run(self, console_log: Path | None, qemu_log: Path) -> None:
        """A start or restore begins: forget the last run's outcome. ``console_log`` holds
        the guest's panic message, ``qemu_log`` QEMU's last words."""
        self._stopped = asyncio.Event()
        self.expect_exit = self._guest_shutdown = False
        self.last_error = None
        self._console_log, self._qemu_log = console_log, qemu_log

    async def wait_stopped(self) -> None:
        """Until the run's exit has been handled (at once without a run)."""
        if self._stopped is not None:
            await self._stopped.wait()

    def on_event(self, event: Any) -> None:
        """One QMP event of the run."""
        name = event.get("event")
        data = event.get("data")
        data = data if isinstance(data, dict) else {}
        log.debug("QMP event %s %s", name, data)
        state = self._state()
        if name == "GUEST_PANICKED":
            self._guest_panicked()
        elif name == "STOP" and state in (VMState.RUNNING, VMState.PAUSING):
            if not isinstance(self.last_error, GuestPanic):  # QEMU stops a panicked guest
                self._set_state(VMState.PAUSED)
        elif name == "RESUME" and state in (VMState.PAUSED, VMState.RESUMING):
            self._set_state(VMState.RUNNING)
        elif name == "SHUTDOWN":
            self._guest_shutdown = bool(data.get("guest")) and data.get("reason") != "guest-panic"
            if state is not VMState.STOPPED:
                self._set_state(VMState.STOPPING)

    def _guest_panicked(self) -> None:
        if isinstance(self.last_error, GuestPanic):
            return
        console = self._console_log
        line = panic_line(console)
        where = f"; its console log {str(console)!r} has the rest" if line else ""
        self.last_error = GuestPanic(
            f"the guest kernel panicked{': ' + line if line else ''} (reported by the "
            f"pvpanic device; QEMU exits){where}"
        )
        log.error("VM failed: %s", self.last_error)

    def share_died(self, proc: OwnedProcess | None, tag: str, rc: int, tail: str) -> None:
        """A share's virtiofsd exited under the VM: the guest would hang on that share, and
        vhost-user-fs cannot be reconnected, so QEMU (``proc``) is killed and the VM ends in
        ERROR (:meth:`watch_exit` sees the exit)."""
        if self._state() not in _LIVE or self.expect_exit or proc is None or not proc.running:
            return
        if self.last_error is None:
            self.last_error = VMError(
                f"virtiofsd for share {tag!r} exited with {rc}: {tail or '(no output)'}; "
                "the VM was stopped (its guest would hang on that share)"
            )
        log.error("VM failed: %s", self.last_error)
        proc.send_signal(signal.SIGKILL)

    async def watch_exit(
        self, proc: OwnedProcess, run: QemuRun, after_exit: Callable[[], Awaitable[None]]
    ) -> None:
        """Wait for QEMU to exit, take its last events, let the machine release the run
        (``after_exit``) and set STOPPED (an expected exit, or the guest's power-off) or
        ERROR. A start or restore that is still under way sets the state itself."""
        rc = await proc.wait()
        await run.drain_events(self.on_event)
        clean = self.expect_exit or (rc == 0 and self._guest_shutdown)
        if not clean:
            tail = stderr_tail(self._qemu_log)
            log.warning("QEMU (pid %d) exited with %d: %s", proc.pid, rc, tail)
            if self.last_error is None:
                self.last_error = VMError(f"QEMU (pid {proc.pid}) exited with {rc}: {tail}")
        await after_exit()
        if self._state() not in (VMState.STARTING, VMState.RESTORING):
            self._set_state(VMState.STOPPED if clean else VMState.ERROR)
        if self._stopped is not None:
            self._stopped.set()
