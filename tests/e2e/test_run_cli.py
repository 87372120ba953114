"""The main job, end to end: ``vzkit run -- CMD`` on the default guest."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from vzkit._cache import user_cache_dir
from vzkit.image import _image

from ..support.terminal import Terminal
from .conftest import ARCHES

VZKIT = [sys.executable, "-m", "vzkit.cli"]


def vzkit_run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    kwargs.setdefault("timeout", 300)
    argv = [*VZKIT, "run", *map(str, args)]
    return subprocess.run(argv, capture_output=True, **kwargs)  # type: ignore[call-overload, no-any-return]


@pytest.mark.parametrize("arch", ARCHES)
def test_run_prints_and_exits_with_the_commands_code(arch: str) -> None:
    proc = vzkit_run("--arch", arch, "--", "sh", "-c", "echo hi; uname -m; exit 3")
    assert proc.returncode == 3, proc.stderr.decode()
    assert proc.stdout.decode().split() == ["hi", arch]


def test_run_pipes_stdin_and_reports_signals() -> None:
    proc = vzkit_run("--", "sh", "-c", "tr a-z A-Z; kill -TERM $$", input=b"piped input\n")
    assert proc.stdout == b"PIPED INPUT\n"
    assert proc.returncode == 128 + signal.SIGTERM


def test_run_missing_command_is_127_with_the_guests_message() -> None:
    proc = vzkit_run("--", "no-such-command")
    assert proc.returncode == 127
    assert b"no-such-command" in proc.stderr


def test_run_env_workdir_and_boot_timeout(tmp_path: Path) -> None:
    env_file = tmp_path / "job.env"
    env_file.write_text("# from a file\nFROM_FILE=file value\nHOST_ONLY\n")
    proc = vzkit_run(
        "-e", "GREETING=hello there", "--env", "EMPTY=", "-e", "FROM_SHELL", "-e", "UNSET_HERE",
        "--env-file", env_file, "-w", "/tmp", "--boot-timeout", "120",
        "--", "sh", "-c",
        'echo "$GREETING|$EMPTY|$PATH|$FROM_SHELL|$FROM_FILE|$HOST_ONLY|${UNSET_HERE-unset}"; pwd',
        env={**os.environ, "FROM_SHELL": "shell value", "HOST_ONLY": "h"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().splitlines() == [
        # with -e, a plain environment; NAME alone passes this shell's value, or nothing
        "hello there||/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        "|shell value|file value|h|unset",
        "/tmp",
    ]
    too_short = vzkit_run("--boot-timeout", "0.01", "--", "true")
    assert too_short.returncode == 125  # the VM did not come up in time: torn down
    assert b"0.01 s" in too_short.stderr


def test_run_user_runs_the_command_as_that_guest_user() -> None:
    """``-u UID:GID`` on the busybox guest, which has no /etc/passwd: numeric ids need no
    entry, HOME is /, and what the command makes in -w is the user's."""
    script = 'id -u; id -g; id -G; echo "$HOME|$USER"; pwd; touch mine; stat -c %u:%g mine'
    proc = vzkit_run("-u", "1000:1000", "-w", "/tmp", "--", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    assert lines == ["1000", "1000", "1000", "/|1000", "/tmp", "1000:1000"]
    unknown = vzkit_run("-u", "nobody", "--", "id")
    assert unknown.returncode == 125  # the guest has no such user: vzkit's failure, not id's
    assert b'no user "nobody" in the guest\'s /etc/passwd' in unknown.stderr


def test_run_interactive_forwards_a_terminals_input() -> None:
    """Stdin that is a terminal goes to the command only with ``-i``."""
    outputs, codes = [], []
    for flags in (["-i"], []):
        master, slave = os.openpty()
        try:
            os.write(master, b"typed line\n")
            proc = vzkit_run(*flags, "--", "head", "-n", "1", stdin=slave)
        finally:
            os.close(slave)
            os.close(master)
        outputs.append(proc.stdout)
        codes.append((proc.returncode, proc.stderr.decode()))
    assert outputs == [b"typed line\n", b""]
    assert [code for code, _ in codes] == [0, 0], codes


def test_run_tty_sees_the_terminals_size_and_a_resize() -> None:
    """``vzkit run -t`` under a real pty (the test holds its master): the guest's ``stty size``
    prints the size set on it, its TERM is this one's, and a resize (TIOCSWINSZ, then the
    SIGWINCH a terminal's kernel sends) reaches the guest's foreground program as SIGWINCH with
    the new size."""
    script = 'stty size; echo "$TERM"; tty; trap "stty size; exit 3" WINCH; echo ready; read x'
    term = Terminal(33, 111)
    try:
        term.start(*VZKIT, "run", "-t", "--", "sh", "-c", script, env={"TERM": "vt220"})
        seen = term.expect(b"ready\r\n", timeout=300)
        assert b"33 111\r\nvt220\r\n/dev/pts/" in seen
        term.resize(40, 120)
        assert term.proc is not None
        term.proc.send_signal(signal.SIGWINCH)
        term.expect(b"40 120\r\n", timeout=60)
        assert term.wait() == 3, term.seen
        assert termios.tcgetattr(term.slave) == term.cooked  # this terminal is itself again
    finally:
        term.close()


def test_run_tty_ctrl_c_reaches_the_guest_program_and_the_escape_ends_it() -> None:
    """Under ``-t`` Ctrl-C is a byte for the guest: its terminal makes it SIGINT for the
    foreground program (exit 130, the VM torn down as after any command); ``Ctrl-]`` ``.``
    ends a session whose program ignores it (exit 255)."""
    for keys, script, code in [
        (b"\x03", "echo ready; exec sleep 100", 128 + signal.SIGINT),
        (b"\x1d.", "trap '' INT; echo ready; exec sleep 100", 255),
    ]:
        term = Terminal(24, 80)
        try:
            term.start(*VZKIT, "run", "-t", "--", "sh", "-c", script)
            term.expect(b"ready\r\n", timeout=300)
            term.type(keys)
            assert term.wait() == code, term.seen
            assert termios.tcgetattr(term.slave) == term.cooked
        finally:
            term.close()


def test_run_without_a_command_is_the_guests_console_without_vzkits_marker() -> None:
    """``vzkit run`` without COMMAND: this terminal is the guest's console, the shell on it
    answers, and vzkit's readiness marker does not show on it (issue 18 item 8)."""
    with subprocess.Popen(
        [*VZKIT, "run"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        seen = b""
        deadline = time.monotonic() + 120
        while b"hello-42" not in seen and time.monotonic() < deadline:
            proc.stdin.write(b"echo hello-$((40+2))\n")
            proc.stdin.flush()
            time.sleep(0.5)  # poll interval: say hello again until the shell answers
            seen += proc.stdout.read() or b""
        assert b"hello-42" in seen, seen[-2000:]
        proc.stdin.write(b"poweroff -f\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
        seen += proc.stdout.read() or b""
    assert b"VZKIT-GUEST-READY" not in seen


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def test_run_streams_100mb_of_stdout_with_bounded_memory() -> None:
    size = 100 * 1000 * 1000
    with subprocess.Popen(
        [*VZKIT, "run", "--", "sh", "-c", f"head -c {size} /dev/urandom"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None
        digest, total, peak_kb = hashlib.sha256(), 0, 0
        while chunk := proc.stdout.read(1 << 20):
            digest.update(chunk)
            total += len(chunk)
            if proc.poll() is None:
                peak_kb = max(peak_kb, _vm_hwm_kb(proc.pid))
        assert proc.wait(timeout=300) == 0
    assert total == size
    # The whole output went through; the host side never held more than a small window.
    assert peak_kb < 200 * 1024, f"vzkit run peaked at {peak_kb} kB for a {size} byte stream"


def test_ctrl_c_tears_the_vm_down() -> None:
    with subprocess.Popen(
        [*VZKIT, "run", "--", "sh", "-c", "echo started; sleep 300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"started\n"
        children = _children(proc.pid)
        assert children, "the VMM should be a child of vzkit run"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)  # poll interval
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                out.append(int(entry.name))
    return out


def test_image_build_is_reproducible(tmp_path: Path) -> None:
    debs = user_cache_dir() / "debs" / "x86_64"
    first = _image.default_image("x86_64", cache_dir=tmp_path / "a", deb_dir=debs)
    second = _image.default_image("x86_64", cache_dir=tmp_path / "b", deb_dir=debs)
    assert first.initrd.read_bytes() == second.initrd.read_bytes()
    assert first.kernel.read_bytes() == second.kernel.read_bytes()


def test_vzkit_run_without_args_prints_help() -> None:
    proc = subprocess.run([*VZKIT, "--help"], capture_output=True, timeout=60, check=True)
    assert b"run" in proc.stdout
    assert (
        b"Boot a fresh VM"
        in subprocess.run(
            [*VZKIT, "run", "--help"], capture_output=True, timeout=60, check=True
        ).stdout
    )
