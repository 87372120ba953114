"""``vzkit run -t`` on a real pseudo-terminal, the guest being the host-run agent.

The test holds the pty's master (the "terminal emulator"); ``vzkit`` runs on its slave, with
``tests/support/tty_cli.py`` giving it :class:`AgentBackend` VMs, so the whole path runs: raw
mode, the initial size, SIGWINCH forwarded as RESIZE, Ctrl-C as a byte, the escape, and the
terminal's settings restored afterwards.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support.agent_vm import host_agent
from ..support.terminal import Terminal

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="runs the x86_64 Linux agent binary on the host",
)

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "tests.support.tty_cli"]
ENV = {"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}


def run_t(term: Terminal, kernel: Path, script: str, **env: str) -> None:
    """``vzkit run --kernel KERNEL -t -- sh -c SCRIPT`` on the terminal's slave."""
    argv = [*CLI, "run", "--kernel", str(kernel), "-t", "--", "sh", "-c", script]
    term.start(*argv, env={**ENV, **env})


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
    run_t(term, kernel, script, TERM="vt220")
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
    run_t(term, kernel, "echo ready; exec sleep 100")
    term.expect(b"ready\r\n")
    term.type(b"\x03")
    assert term.wait() == 128 + signal.SIGINT  # the guest's sleep got SIGINT, not vzkit
    assert b"interrupted" not in term.seen
    assert termios.tcgetattr(term.slave) == term.cooked


def test_the_escape_ends_the_session(terminal: tuple[Terminal, Path]) -> None:
    term, kernel = terminal
    run_t(term, kernel, "echo ready; exec cat")
    term.expect(b"ready\r\n")
    term.type(b"a\x1d\x1db\x1d")  # Ctrl-] twice is one Ctrl-]; one at a read's end waits
    term.type(b"c\r")
    term.expect(b"a\x1db\x1dc")  # cat's echo through the guest's terminal (^] shown raw)
    term.type(b"\x1d.")
    assert term.wait() == 255
    assert b"the session was ended (Ctrl-] .)" in term.seen
    assert termios.tcgetattr(term.slave) == term.cooked


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_restore_the_terminal(
    terminal: tuple[Terminal, Path], sig: signal.Signals
) -> None:
    term, kernel = terminal
    run_t(term, kernel, "echo ready; exec sleep 100")
    term.expect(b"ready\r\n")
    assert termios.tcgetattr(term.slave) != term.cooked  # raw while it runs
    assert term.proc is not None
    term.proc.send_signal(sig)
    assert term.wait() == 128 + signal.SIGTERM  # both end it as a termination
    assert b"terminated; the VM was torn down" in term.seen
    assert termios.tcgetattr(term.slave) == term.cooked


def test_tty_without_a_terminal_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [*CLI, "run", "-t", "--", "true"],
        stdin=subprocess.DEVNULL, capture_output=True, cwd=ROOT, timeout=60,
        env={**os.environ, **ENV},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert b"vzkit: error: the input device is not a TTY: -t needs a terminal" in done.stderr
