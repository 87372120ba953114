"""This process's terminal as a console: the escape sequence, and a raw-mode input pump.

Shared by ``vzkit run -t`` (a guest command on this terminal, ``cli/_tty.py``) and the vz
backend's ``stdio`` serial console, which the framework reads from a descriptor itself:
:class:`RawConsoleInput` puts the terminal in raw mode (every key, Ctrl-C included, is a
byte for the guest; the guest echoes) and copies what is typed into a pipe the console
reads, watching for ``Ctrl-]`` ``.``. The terminal's settings come back when it stops, and
at interpreter exit if nothing stopped it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import termios
import threading
import tty
from collections.abc import Callable
from typing import Any

__all__ = ["ESCAPE", "EscapeReader", "RawConsoleInput"]

#: The escape key, Ctrl-] (telnet's): then ``.`` ends the session, a second one sends itself.
ESCAPE = b"\x1d"
_DETACH = b"."


class EscapeReader:
    """Finds ``Ctrl-]`` ``.`` in the typed bytes, across reads; what is not the escape passes."""

    def __init__(self) -> None:
        self._pending = False  # the last byte read was Ctrl-]
        self.detached = False

    def feed(self, data: bytes) -> bytes:
        """The bytes to send on; sets :attr:`detached` (and drops the rest) at ``Ctrl-]`` ``.``."""
        out = bytearray()
        for byte in (data[i : i + 1] for i in range(len(data))):
            if self._pending:
                self._pending = False
                if byte == _DETACH:
                    self.detached = True
                    return bytes(out)
                out += ESCAPE if byte == ESCAPE else ESCAPE + byte
            elif byte == ESCAPE:
                self._pending = True
            else:
                out += byte
        return bytes(out)


class RawConsoleInput:
    """The terminal on ``fd`` in raw mode, what is typed copied to :attr:`read_fd` (a pipe).

    :meth:`start` saves the terminal's settings, makes it raw and starts the copying thread;
    ``Ctrl-]`` ``.`` calls ``on_escape`` (from that thread) and ends the copying; the end of
    input closes the pipe. :meth:`stop` (idempotent) ends the thread and restores the
    terminal; an ``atexit`` hook restores it if the process ends first.
    """

    def __init__(self, fd: int, on_escape: Callable[[], object]) -> None:
        self.fd = fd
        self._on_escape = on_escape
        self._saved: list[Any] | None = None
        self._read_fd = -1
        self._write_fd = -1
        self._wake_r = -1
        self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def read_fd(self) -> int:
        """The pipe's read end, for the console (valid from :meth:`start` to :meth:`stop`)."""
        return self._read_fd

    def start(self) -> None:
        self._saved = termios.tcgetattr(self.fd)
        self._read_fd, self._write_fd = os.pipe2(os.O_CLOEXEC)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        atexit.register(self._restore)
        try:
            tty.setraw(self.fd, termios.TCSANOW)
        except BaseException:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._copy, name="vzkit-console-input", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        escape = EscapeReader()
        with contextlib.suppress(OSError):
            while True:
                ready, _, _ = select.select([self.fd, self._wake_r], [], [])
                if self._wake_r in ready:
                    return
                data = os.read(self.fd, 65536)
                if not data:
                    return  # the terminal is gone: the guest sees the end of input
                out = escape.feed(data)
                if out:
                    os.write(self._write_fd, out)
                if escape.detached:
                    self._on_escape()
                    return

    def _restore(self) -> None:
        with self._lock:
            saved, self._saved = self._saved, None
        if saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)

    def stop(self) -> None:
        """End the copying, restore the terminal, close the pipes (safe to call again)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"q")
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        self._restore()
        atexit.unregister(self._restore)
        for name in ("_read_fd", "_write_fd", "_wake_r", "_wake_w"):
            fd = getattr(self, name)
            setattr(self, name, -1)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
