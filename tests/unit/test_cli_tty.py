"""``vzkit run -t`` on a real pseudo-terminal, the guest being the host-run agent.

The test holds the pty's master (the "terminal emulator"); ``vzkit`` runs on its slave, with
``tests/support/tty_cli.py`` giving it :class:`AgentBackend` VMs, so the whole path runs: raw
mode, the initial size, SIGWINCH forwarded as RESIZE, Ctrl-C as a byte, the escape, and the
terminal's settings restored afterwards.
"""

from __future__ import annotations

import fcntl
import os
import platform
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support.agent_vm import host_agent

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="runs the x86_64 Linux agent binary on the host",
)

ROOT = Path(__file__).resolve().parents[2]


class Terminal:
    """A pty whose slave runs ``vzkit``; the test reads and types on the master."""

    def __init__(self, rows: int, cols: int) -> None:
        self.master, self.slave = os.openpty()
        self.resize(rows, cols)
        self.cooked = termios.tcgetattr(self.slave)
        self.seen = b""
        self.proc: subprocess.Popen[bytes] | None = None

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def start(self, *args: str, **env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.tty_cli", "run", *args],
            stdin=self.slave, stdout=self.slave, stderr=self.slave, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", **env},
            start_new_session=True,
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


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[tuple[Terminal, Path]]:
    host_agent()  # built before the clock of a test starts
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    term = Terminal(33, 111)
    try:
        yield term, kernel
    finally:
        term.close()


def test_the_guest_sees_the_size_term_and_a_resize(terminal: tuple[Terminal, Path]) -> None:
    term, kernel = terminal
    script = 'stty size; echo "$TERM"; tty; trap "stty size; exit 3" WINCH; echo ready; read x'
    term.start("--kernel", str(kernel), "-t", "--", "sh", "-c", script, TERM="vt220")
    seen = term.expect(b"ready\r\n")
    assert b"33 111\r\nvt220\r\n/dev/pts/" in seen
    term.resize(40, 120)
    assert term.proc is not None
    term.proc.send_signal(signal.SIGWINCH)  # what the terminal's kernel does for its session
    assert term.expect(b"40 120\r\n")
    assert term.wait() == 3
    assert termios.tcgetattr(term.slave) == term.cooked  # restored


def test_ctrl_c_is_a_byte_for_the_guest(terminal: tuple[Terminal, Path]) -> None:
    term, kernel = terminal
    term.start("--kernel", str(kernel), "-t", "--", "sh", "-c", "echo ready; exec sleep 100")
    term.expect(b"ready\r\n")
    term.type(b"\x03")
    assert term.wait() == 128 + signal.SIGINT  # the guest's sleep got SIGINT, not vzkit
    assert b"interrupted" not in term.seen
    assert termios.tcgetattr(term.slave) == term.cooked


def test_the_escape_ends_the_session(terminal: tuple[Terminal, Path]) -> None:
    term, kernel = terminal
    term.start("--kernel", str(kernel), "-t", "--", "sh", "-c", "echo ready; exec cat")
    term.expect(b"ready\r\n")
    term.type(b"a\x1d\x1db\x1d")  # Ctrl-] twice is one Ctrl-]; one at a read's end waits
    term.type(b"c\r")
    term.expect(b"a\x1db\x1dc")  # cat's echo through the guest's terminal (^] shown raw)
    term.type(b"\x1d.")
    assert term.wait() == 255
    assert b"the session was ended (Ctrl-] .)" in term.seen
    assert termios.tcgetattr(term.slave) == term.cooked


def test_sigterm_restores_the_terminal(terminal: tuple[Terminal, Path]) -> None:
    term, kernel = terminal
    term.start("--kernel", str(kernel), "-t", "--", "sh", "-c", "echo ready; exec sleep 100")
    term.expect(b"ready\r\n")
    assert termios.tcgetattr(term.slave) != term.cooked  # raw while it runs
    assert term.proc is not None
    term.proc.terminate()
    assert term.wait() == 128 + signal.SIGTERM
    assert termios.tcgetattr(term.slave) == term.cooked


def test_tty_without_a_terminal_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.tty_cli", "run", "-t", "--", "true"],
        stdin=subprocess.DEVNULL, capture_output=True, cwd=ROOT, timeout=60,
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert b"vzkit: error: the input device is not a TTY: -t needs a terminal" in done.stderr
