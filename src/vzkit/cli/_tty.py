"""``-t``: a guest command on this terminal, as ``docker run -t`` and ``ssh -t`` attach one.

The command runs on a pseudo-terminal in the guest (``tty=True``). This terminal goes raw
(:func:`tty.setraw`): every key, Ctrl-C included, goes to the guest as a byte, and the guest's
terminal does the echoing and the signals. The window size is sent at the start and on every
SIGWINCH. ``Ctrl-]`` then ``.`` ends the session (the command is killed, the VM torn down as
usual, exit 255 as ssh's ``~.``); ``Ctrl-]`` twice sends one ``Ctrl-]``. The terminal's
settings are restored on every way out: the command's end, the escape, an exception, SIGTERM
and SIGHUP (raised in the main thread as the runner's termination).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from typing import Any

from vzkit._terminal import ESCAPE, EscapeReader  # the escape, shared with the vz console
from vzkit.agent import GuestProcess
from vzkit.errors import SpecError, VzkitError

__all__ = [
    "ESCAPE",
    "EXIT_DETACHED",
    "EscapeReader",
    "attach",
    "not_a_tty",
    "terminal_size",
]

#: ``vzkit run -t``'s exit code when the escape ended the session (ssh's for ``~.``).
EXIT_DETACHED = 255
_FALLBACK_SIZE = (24, 80)


def not_a_tty() -> SpecError:
    """The usage error for ``-t`` when stdin is no terminal (docker says the same)."""
    return SpecError(
        "the input device is not a TTY: -t needs a terminal on stdin; drop -t to pipe the "
        "command's input and output, or run vzkit in a terminal"
    )


def terminal_size(fd: int) -> tuple[int, int]:
    """``(rows, cols)`` of the terminal on ``fd`` (24x80 if it says none)."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return _FALLBACK_SIZE
    return (size.lines, size.columns) if size.lines and size.columns else _FALLBACK_SIZE


@contextlib.contextmanager
def _raw(fd: int, terminate: Callable[[int, Any], None]) -> Iterator[tuple[int, int]]:
    """``fd``'s terminal in raw mode, a pipe that SIGWINCH writes ``w`` into (its two ends are
    yielded), SIGHUP handled as ``terminate``; all put back on the way out."""
    saved = termios.tcgetattr(fd)
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def on_winch(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):  # a full pipe has a wake-up in it already
            os.write(wake_w, b"w")

    old_winch = signal.signal(signal.SIGWINCH, on_winch)
    old_hup = signal.signal(signal.SIGHUP, terminate)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield wake_r, wake_w
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, old_winch)
        signal.signal(signal.SIGHUP, old_hup)
        os.close(wake_r)
        os.close(wake_w)


def _forward_input(proc: GuestProcess, fd: int, wake: int, escape: EscapeReader) -> None:
    """The input thread: typed bytes to the command (through the escape), window sizes on
    SIGWINCH; ends at the escape (killing the command), end of input, or ``q`` on ``wake``."""
    stdin = proc.stdin
    assert stdin is not None
    with contextlib.suppress(OSError, ValueError, VzkitError):
        while True:
            ready, _, _ = select.select([fd, wake], [], [])
            if wake in ready:
                signals = os.read(wake, 512)
                if b"q" in signals:
                    return
                proc.resize(*terminal_size(fd))
            if fd in ready:
                data = os.read(fd, 65536)
                if not data:
                    return  # the terminal is gone
                out = escape.feed(data)
                if out:
                    stdin.write(out)
                    stdin.flush()
                if escape.detached:
                    proc.kill()
                    return


def attach(
    proc: GuestProcess,
    pump_output: Callable[[], None],
    terminate: Callable[[int, Any], None],
    fd: int = 0,
) -> tuple[int, bool]:
    """Run ``proc`` (started with ``tty=True``) on the terminal ``fd``: ``pump_output`` copies
    its output to this terminal. Returns its return code and whether the escape ended it."""
    escape = EscapeReader()
    with _raw(fd, terminate) as (wake, wake_w):
        proc.resize(*terminal_size(fd))  # it may have changed while the VM booted
        out = threading.Thread(target=pump_output, daemon=True)
        typed = threading.Thread(target=_forward_input, args=(proc, fd, wake, escape), daemon=True)
        out.start()
        typed.start()
        try:
            returncode = proc.wait()
        except BaseException:
            with contextlib.suppress(VzkitError):
                proc.kill()
            raise
        finally:
            with contextlib.suppress(OSError):
                os.write(wake_w, b"q")
            typed.join(timeout=5)
        out.join(timeout=30)
    return returncode, escape.detached
