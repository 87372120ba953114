"""Owned child processes (QEMU, virtiofsd, ...): started with a logged argv, watched, reaped.

Every process vzkit starts goes through :func:`spawn`. It runs in its own session (a Ctrl-C
at the terminal reaches vzkit, which tears down in order, not the VMM mid-write) and, on Linux,
dies with the thread that started it (``PR_SET_PDEATHSIG``; vzkit spawns from its loop thread,
which lives as long as the process), so a killed vzkit leaves no orphan. Processes are
signalled and reaped by exact pid, never by name; :func:`live_children` lists the ones not yet
reaped, which tests use to prove nothing leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["PREEXEC", "OwnedProcess", "live_children", "log_argv", "pid_alive", "spawn"]

log = logging.getLogger(__name__)

_live: dict[int, str] = {}
_PR_SET_PDEATHSIG = 1


def _pdeathsig_preexec() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return preexec


#: ``preexec_fn`` for children that must die with this process (``None`` off Linux).
PREEXEC = _pdeathsig_preexec()


def log_argv(argv: Sequence[str]) -> None:
    """Log a command line at DEBUG, quoted so it can be pasted into a shell."""
    log.debug("running %s", shlex.join(argv))


def live_children() -> dict[int, str]:
    """Processes started by :func:`spawn` that have not been reaped yet (pid → name)."""
    return dict(_live)


class OwnedProcess:
    """A child process with one owner. :meth:`kill` and :meth:`wait` act on its exact pid."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self._proc = proc
        self.name = name
        self.pid: int = proc.pid
        self.returncode: int | None = None
        self._waiter = asyncio.ensure_future(self._reap())

    async def _reap(self) -> int:
        rc = await self._proc.wait()
        self.returncode = rc
        _live.pop(self.pid, None)
        log.debug("%s (pid %d) exited with %d", self.name, self.pid, rc)
        return rc

    @property
    def running(self) -> bool:
        return self.returncode is None

    async def wait(self) -> int:
        return await asyncio.shield(self._waiter)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    async def kill(self, grace: float = 0.0) -> int:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; returns the exit status."""
        if self.returncode is not None:
            return self.returncode
        if grace > 0:
            self.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    return await self.wait()
        self.send_signal(signal.SIGKILL)
        return await self.wait()


async def spawn(
    argv: Sequence[str],
    *,
    name: str,
    pass_fds: Sequence[int] = (),
    stdin: int | IO[Any] | None = asyncio.subprocess.DEVNULL,
    stdout: int | IO[Any] | None = asyncio.subprocess.DEVNULL,
    stderr: int | IO[Any] | None = asyncio.subprocess.DEVNULL,
    cwd: str | Path | None = None,
    new_session: bool = True,
) -> OwnedProcess:
    """Start ``argv`` as an owned child (see the module docstring)."""
    log.debug("starting %s: %s", name, shlex.join(argv))
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        pass_fds=tuple(pass_fds),
        cwd=cwd,
        start_new_session=new_session,
        preexec_fn=PREEXEC,
        close_fds=True,
    )
    _live[proc.pid] = name
    log.debug("%s started as pid %d", name, proc.pid)
    return OwnedProcess(proc, name)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (and is not a zombie, on Linux)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        with contextlib.suppress(OSError):
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True
