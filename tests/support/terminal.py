"""A pseudo-terminal for tests of terminal programs: the test holds the master (as a terminal
emulator does) and runs the program on the slave (``tests/unit/test_cli_tty.py``,
``tests/e2e/test_run_cli.py``)."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import termios
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["Terminal"]

ROOT = Path(__file__).resolve().parents[2]


class Terminal:
    """A pty whose slave runs a program; the test reads and types on the master."""

    def __init__(self, rows: int, cols: int) -> None:
        self.master, self.slave = os.openpty()
        self.resize(rows, cols)
        self.cooked = termios.tcgetattr(self.slave)
        self.seen = b""
        self.proc: subprocess.Popen[bytes] | None = None

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def start(self, *argv: str, env: Mapping[str, str] = {}) -> None:
        """Run ``argv`` on the slave (in a session of its own), this environment plus ``env``."""
        self.proc = subprocess.Popen(
            argv, stdin=self.slave, stdout=self.slave, stderr=self.slave, cwd=ROOT,
            env={**os.environ, **env}, start_new_session=True,
        )  # fmt: skip

    def expect(self, marker: bytes, timeout: float = 60) -> bytes:
        """Read until ``marker`` shows; everything read so far."""
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} in {self.seen!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:  # EIO: the slave is closed everywhere
                    break
        assert marker in self.seen, self.seen
        return self.seen

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=60)
        while select.select([self.master], [], [], 0)[0]:  # what it printed last
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                break
            if not chunk:
                break
            self.seen += chunk
        return code

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)
