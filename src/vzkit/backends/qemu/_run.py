"""One QEMU process of a VM and what lives exactly as long as it.

A :class:`QemuRun` is made per start (or restore): two socketpairs (QMP, and the guest agent's
virtio console port), whose far ends QEMU inherits; the owned process; the QMP client on the
near end. The machine (``_machine.py``) keeps the VM's state machine and directories and asks
its current run for the rest; the run closes everything it holds in :meth:`QemuRun.disconnect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError, Runstate

from ..._private import open_private
from ..._process import OwnedProcess, spawn
from ...errors import VMError, VMTimeoutError

__all__ = ["QMP_TIMEOUT_S", "GuestPanic", "QemuRun", "panic_line", "stderr_tail"]

log = logging.getLogger(__name__)

#: How long one QMP command may take before QEMU counts as wedged. Every command vzkit sends
#: is quick (long work, like a migration, is started by one command and polled with others),
#: so one bound fits them all; a wedged or stopped QEMU then fails the call instead of
#: hanging pause(), stop(), the balloon or a snapshot. Read at each call (tests lower it).
QMP_TIMEOUT_S = 30.0
#: After QEMU exited: how long its QMP stream may take to deliver what QEMU sent last.
_EVENTS_DRAIN_S = 1.0
_STDERR_TAIL = 2000


def stderr_tail(path: Path) -> str:
    """The end of QEMU's log (``(no output)`` when there is none)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _STDERR_TAIL))
            text = fh.read().decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "(no output)"


class GuestPanic(VMError):
    """The guest kernel panicked (QEMU's pvpanic device reported it)."""


def panic_line(console_log: Path | None) -> str:
    """The kernel's "Kernel panic - not syncing: ..." line from the end of the console log."""
    if console_log is None:
        return ""
    try:
        with open(console_log, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    found = [line for line in text.splitlines() if "Kernel panic - not syncing" in line]
    return found[-1].split("]", 1)[-1].strip()[:200] if found else ""


class QemuRun:
    """The process, QMP and sockets of one QEMU run (see the module docstring)."""

    def __init__(self, stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self.qmp_sock, self._qmp_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.agent_sock: socket.socket | None
        self.agent_sock, self._agent_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proc: OwnedProcess | None = None
        self.qmp: QMPClient | None = None
        #: While an incoming state loads (a restore), QMP commands wait without a bound.
        self.incoming = False

    @property
    def qmp_fd(self) -> int:
        """QEMU's end of the QMP socketpair (``-chardev socket,fd=N``)."""
        return self._qmp_theirs.fileno()

    @property
    def agent_fd(self) -> int:
        """QEMU's end of the agent's console port socketpair."""
        return self._agent_theirs.fileno()

    async def spawn(
        self, argv: list[str], name: str, pass_fds: Sequence[int], *, interactive: bool
    ) -> OwnedProcess:
        """Start QEMU inheriting ``pass_fds`` (``_devices.pass_fds``: QMP's end and every
        device's); its stderr goes to the log. Our copies of QEMU's ends are closed whatever
        happens."""
        try:
            with open_private(self.stderr_path) as stderr:
                self.proc = await spawn(
                    argv,
                    name=name,
                    pass_fds=tuple(pass_fds),
                    stdin=None if interactive else asyncio.subprocess.DEVNULL,
                    stdout=None if interactive else asyncio.subprocess.DEVNULL,
                    stderr=stderr,
                    new_session=not interactive,
                )
        finally:
            self._qmp_theirs.close()
            self._agent_theirs.close()
        return self.proc

    async def attach(self) -> QMPClient:
        """Connect QMP (greeting and capabilities), bounded by :data:`QMP_TIMEOUT_S` and by
        the process: a QEMU that exits during start-up fails at once, with its log."""
        proc = self.proc
        assert proc is not None
        qmp = self.qmp = QMPClient(f"vzkit-{proc.pid}")
        connect = asyncio.ensure_future(qmp.connect(self.qmp_sock))
        exited = asyncio.ensure_future(proc.wait())
        bound = QMP_TIMEOUT_S
        try:
            done, _ = await asyncio.wait(
                {connect, exited}, timeout=bound, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (connect, exited):
                if not task.done():
                    task.cancel()
            await asyncio.gather(connect, exited, return_exceptions=True)
        if not done:
            raise VMTimeoutError(
                f"QEMU (pid {proc.pid}) did not answer on QMP within {bound:g} s of "
                f"starting; see its log {str(self.stderr_path)!r}"
            )
        if connect.cancelled() or connect.exception() is not None:
            raise VMError(f"QEMU exited during start-up: {stderr_tail(self.stderr_path)}")
        return qmp

    async def watch_events(self, on_event: Callable[[Any], None]) -> None:
        """Hand every QMP event to ``on_event`` until the stream ends (a task of the run)."""
        qmp = self.qmp
        if qmp is None:
            return
        with contextlib.suppress(asyncio.CancelledError, QMPError):
            async for event in qmp.events:
                on_event(event)

    async def drain_events(self, on_event: Callable[[Any], None]) -> None:
        """QEMU has exited: hand over the events it sent last (GUEST_PANICKED, SHUTDOWN)
        before the stream is closed; its reader reaches the end of the stream within a
        moment."""
        qmp = self.qmp
        if qmp is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_EVENTS_DRAIN_S):
                while qmp.runstate is Runstate.RUNNING:
                    await qmp.runstate_changed()
        for event in qmp.events.clear():  # what the watcher has not taken yet
            on_event(event)

    async def execute(self, cmd: str, args: dict[str, object] | None, state: str) -> Any:
        """Run one QMP command, bounded by :data:`QMP_TIMEOUT_S` (a late reply is dropped).

        While an incoming state loads (a restore), QEMU's main loop reads the state file
        without answering QMP (a regular file never blocks it), for as long as the file takes
        to read: commands then wait without a bound of their own, under the restore's timeout.
        ``state`` names the VM's state for the error when QEMU is gone.
        """
        qmp = self.qmp
        if qmp is None:
            raise VMError(f"QEMU is not running (state {state})")
        log.debug("QMP -> %s %s", cmd, args or "")
        timeout = None if self.incoming else QMP_TIMEOUT_S
        try:
            async with asyncio.timeout(timeout):
                result = await qmp.execute(cmd, args)
        except TimeoutError:
            if timeout is None:
                raise
            pid = self.proc.pid if self.proc is not None and self.proc.running else None
            raise VMTimeoutError(
                f"QEMU (pid {pid}) did not answer the QMP command {cmd!r} within "
                f"{timeout:g} s: it is wedged or overloaded. Stop the VM (vm.stop() or "
                f"vm.close() kills it) and see its log {str(self.stderr_path)!r}"
            ) from None
        except QMPError as err:
            raise VMError(f"QMP {cmd} failed: {err}") from err
        log.debug("QMP <- %s", result)
        return result

    async def disconnect(self) -> None:
        """Close QMP and both sockets (idempotent); the process is the machine's to reap."""
        qmp, self.qmp = self.qmp, None
        if qmp is not None:
            with contextlib.suppress(Exception):
                await qmp.disconnect()
        for sock in (self.qmp_sock, self.agent_sock, self._qmp_theirs, self._agent_theirs):
            if sock is not None:
                sock.close()
        self.agent_sock = None
