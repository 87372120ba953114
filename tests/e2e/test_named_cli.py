"""Named VMs end to end, across processes: every step is its own ``vzkit`` process (as a user
types them in several shells), on the default guest under QEMU, with ``$VZKIT_HOME`` in a
temporary directory. One VM (``t1``) made by ``vzkit run -d`` serves the module; the lifecycle
test (stop, exec refused, start, rm, nothing left behind) has its own."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support.polling import wait_until
from ..support.terminal import Terminal

VZKIT = [sys.executable, "-m", "vzkit.cli"]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vzkit-home")


def vzkit(home: Path, *args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    kwargs.setdefault("timeout", 300)
    env = {**os.environ, "VZKIT_HOME": str(home)}
    argv = [*VZKIT, *map(str, args)]
    return subprocess.run(argv, capture_output=True, env=env, **kwargs)  # type: ignore[call-overload, no-any-return]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _processes_under(path: Path) -> list[str]:
    """The command lines of the processes that name ``path`` (a VM's files) in theirs."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.fixture(scope="module")
def t1(home: Path) -> Iterator[str]:
    made = vzkit(home, "run", "-d", "--name", "t1")
    assert made.returncode == 0, made.stderr.decode()
    assert made.stdout == b"t1\n"  # printed once its agent answers
    try:
        yield "t1"
    finally:
        removed = vzkit(home, "rm", "-f", "t1")
        assert removed.returncode == 0, removed.stderr.decode()
        wait_until(lambda: not _processes_under(home), "t1's processes to end", timeout=30)


def test_exec_prints_and_passes_the_exit_code(home: Path, t1: str) -> None:
    proc = vzkit(home, "exec", t1, "--", "sh", "-c", "echo $((6*7))")
    assert (proc.returncode, proc.stdout) == (0, b"42\n"), proc.stderr.decode()
    proc = vzkit(home, "exec", "-e", "X=y", "-w", "/tmp", t1, "--", "sh", "-c",
                 'echo "$X $(pwd)"; echo err >&2; exit 7')  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, b"y /tmp\n", b"err\n")
    piped = vzkit(home, "exec", t1, "--", "tr", "a-z", "A-Z", input=b"piped\n")
    assert (piped.returncode, piped.stdout) == (0, b"PIPED\n")
    other = vzkit(home, "exec", "-u", "1000:1000", t1, "--", "id", "-u")
    assert (other.returncode, other.stdout) == (0, b"1000\n"), other.stderr.decode()


def test_sigterm_ends_the_exec_and_its_command_not_the_vm(home: Path, t1: str) -> None:
    env = {**os.environ, "VZKIT_HOME": str(home)}
    count = "ps | grep -c '[s]leep 4242'"
    proc = subprocess.Popen(
        [*VZKIT, "exec", t1, "--", "sh", "-c", "echo started; exec sleep 4242"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"started\n"
        running = vzkit(home, "exec", t1, "--", "sh", "-c", count)
        assert running.stdout == b"1\n"  # seen from another exec while it runs
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    assert b"terminated; the command was killed, the VM runs on" in err
    wait_until(  # the guest command went with it (killed through the agent); the VM answers
        lambda: vzkit(home, "exec", t1, "--", "sh", "-c", count).stdout == b"0\n",
        "the guest's sleep to end",
        timeout=30,
    )


def test_a_file_written_by_one_exec_is_read_by_the_next(home: Path, t1: str) -> None:
    wrote = vzkit(home, "exec", t1, "--", "sh", "-c", "echo kept > /root/note")
    assert wrote.returncode == 0, wrote.stderr.decode()
    read = vzkit(home, "exec", t1, "--", "cat", "/root/note")
    assert (read.returncode, read.stdout) == (0, b"kept\n")


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        if path.is_symlink():
            what = "-> " + os.readlink(path)
        elif path.is_file():
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = "dir"
        out[str(path.relative_to(root))] = (stat.S_IMODE(mode), what)
    return out


def test_cp_a_20_mib_tree_in_and_back_out_byte_identical(
    home: Path, t1: str, tmp_path: Path
) -> None:
    src = tmp_path / "tree"
    (src / "deep" / "er").mkdir(parents=True)
    (src / "deep" / "er" / "big.bin").write_bytes(os.urandom(16 << 20))
    for n in range(64):
        (src / "deep" / f"small{n}").write_bytes(os.urandom(64 << 10))  # 4 MiB more
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o750)
    (src / "link").symlink_to("deep/er/big.bin")
    copied = vzkit(home, "cp", src, f"{t1}:/root/tree")
    assert copied.returncode == 0, copied.stderr.decode()
    size = vzkit(home, "exec", t1, "--", "du", "-sk", "/root/tree")
    assert int(size.stdout.split()[0]) >= 20 << 10  # KiB: it is in the guest
    back = tmp_path / "back"
    copied = vzkit(home, "cp", f"{t1}:/root/tree", back)
    assert copied.returncode == 0, copied.stderr.decode()
    assert _tree(back) == _tree(src)
    missing = vzkit(home, "cp", src, f"{t1}:/no/such/dir")
    assert missing.returncode == 1
    assert b"the guest has no directory '/no/such'" in missing.stderr


def test_ls_and_inspect_show_t1_running(home: Path, t1: str) -> None:
    listed = vzkit(home, "ls", "--json")
    assert listed.returncode == 0, listed.stderr.decode()
    [entry] = [e for e in json.loads(listed.stdout) if e["name"] == t1]
    assert entry["state"] == "running"
    assert entry["backend"] == "qemu"
    assert _alive(entry["pid"])
    assert _alive(entry["vmm_pid"])
    table = vzkit(home, "ls").stdout.decode().splitlines()
    assert table[0].split() == ["NAME", "STATE", "BACKEND", "ARCH", "CPUS", "MEMORY", "CREATED"]
    assert any(line.split()[:3] == [t1, "running", "qemu"] for line in table[1:])
    inspected = json.loads(vzkit(home, "inspect", "--json", t1).stdout)
    assert {k: v for k, v in inspected.items() if k != "config"} == entry
    assert inspected["config"]["cpus"] == entry["cpus"]
    logs = vzkit(home, "logs", t1)
    assert b"VZKIT-GUEST-READY" in logs.stdout  # the guest's console, from its boot


def test_exec_t_under_a_pty_sees_the_size_and_a_resize(home: Path, t1: str) -> None:
    script = 'stty size; echo "$TERM"; trap "stty size; exit 3" WINCH; echo ready; read x'
    term = Terminal(33, 111)
    try:
        term.start(*VZKIT, "exec", "-t", t1, "--", "sh", "-c", script,
                   env={"TERM": "vt220", "VZKIT_HOME": str(home)})  # fmt: skip
        seen = term.expect(b"ready\r\n", timeout=120)
        assert b"33 111\r\nvt220\r\n" in seen
        term.resize(40, 120)
        assert term.proc is not None
        term.proc.send_signal(signal.SIGWINCH)
        term.expect(b"40 120\r\n", timeout=60)
        assert term.wait() == 3, term.seen
        assert termios.tcgetattr(term.slave) == term.cooked  # this terminal is itself again
    finally:
        term.close()


def test_shell_is_a_login_shell_of_the_user_on_a_pty(home: Path, t1: str) -> None:
    term = Terminal(24, 80)
    try:
        term.start(*VZKIT, "shell", "-u", "1000:1000", "-w", "/tmp", t1,
                   env={"VZKIT_HOME": str(home)})  # fmt: skip
        term.type(b"echo $(id -u)X $(pwd)Y; exit 4\r")
        term.expect(b"1000X /tmpY", timeout=120)
        assert term.wait() == 4, term.seen
    finally:
        term.close()


def test_stop_start_and_rm_leave_nothing_behind(home: Path) -> None:
    made = vzkit(home, "run", "-d", "--name", "t2", "--gui")  # qemu: a VNC display
    assert made.returncode == 0, made.stderr.decode()
    info = json.loads(vzkit(home, "inspect", "--json", "t2").stdout)
    pids = [info["pid"], info["vmm_pid"]]
    directory = Path(info["directory"])
    assert info["display"].startswith("vnc+unix:///"), info
    assert Path(info["display"].removeprefix("vnc+unix://")).is_socket()

    stopped = vzkit(home, "stop", "t2")
    assert (stopped.returncode, stopped.stdout) == (0, b"t2\n"), stopped.stderr.decode()
    wait_until(lambda: not any(map(_alive, pids)), "the supervisor and QEMU to end", timeout=30)
    assert _processes_under(directory) == []
    [entry] = [e for e in json.loads(vzkit(home, "ls", "-a", "--json").stdout) if e["name"] == "t2"]
    assert (entry["state"], entry["display"]) == ("stopped", None)
    assert "t2" not in [e["name"] for e in json.loads(vzkit(home, "ls", "--json").stdout)]
    refused = vzkit(home, "exec", "t2", "--", "true")
    assert refused.returncode == 125
    assert b"'vzkit start t2'" in refused.stderr
    unknown = vzkit(home, "exec", "nope", "--", "true")
    assert unknown.returncode == 125
    assert b"no VM named 'nope'" in unknown.stderr

    started = vzkit(home, "start", "t2")
    assert (started.returncode, started.stdout) == (0, b"t2\n"), started.stderr.decode()
    again = vzkit(home, "exec", "t2", "--", "echo", "back")
    assert (again.returncode, again.stdout) == (0, b"back\n"), again.stderr.decode()
    pids = [
        json.loads(vzkit(home, "inspect", "--json", "t2").stdout)[k] for k in ("pid", "vmm_pid")
    ]

    stopped = vzkit(home, "stop", "t2")
    assert stopped.returncode == 0, stopped.stderr.decode()
    removed = vzkit(home, "rm", "t2")
    assert (removed.returncode, removed.stdout) == (0, b"t2\n"), removed.stderr.decode()
    assert not directory.exists()
    wait_until(lambda: not any(map(_alive, pids)), "the second run's processes to end")
    assert _processes_under(directory) == []
    gone = vzkit(home, "inspect", "t2")
    assert gone.returncode == 1
    assert b"no VM named 't2'" in gone.stderr


def test_a_python_process_that_did_not_make_t1_runs_commands_in_it(home: Path, t1: str) -> None:
    script = (
        "import vzkit\n"
        "vm = vzkit.connect('t1')\n"
        "print(vm.guest.run(['cat', '/proc/sys/kernel/hostname'], text=True).stdout.strip())\n"
        "vm.close()\n"
    )
    env = {**os.environ, "VZKIT_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    hostname = vzkit(home, "exec", t1, "--", "cat", "/proc/sys/kernel/hostname").stdout
    assert proc.stdout == hostname
    assert json.loads(vzkit(home, "inspect", "--json", t1).stdout)["state"] == "running"


def test_snapshot_save_and_restore_of_a_named_vm_and_run_d_rm(home: Path, tmp_path: Path) -> None:
    made = vzkit(home, "run", "-d", "--name", "s1")
    assert made.returncode == 0, made.stderr.decode()
    assert vzkit(home, "exec", "s1", "--", "sh", "-c", "echo one > /root/v").returncode == 0
    saved = vzkit(home, "snapshot", "save", "--vm", "s1", tmp_path / "snaps", "one")
    assert saved.returncode == 0, saved.stderr.decode()
    assert saved.stdout.startswith(b"saved one of s1")
    assert vzkit(home, "exec", "s1", "--", "sh", "-c", "echo two > /root/v").returncode == 0
    running = vzkit(home, "snapshot", "restore", "--vm", "s1", tmp_path / "snaps", "one")
    assert running.returncode == 1  # the VM runs: a restore needs it stopped
    assert b"stopped" in running.stderr
    refused = vzkit(home, "snapshot", "save", "--vm", "s1", "--cpus", "2", tmp_path / "s", "x")
    assert refused.returncode == 2
    assert b"drop --cpus" in refused.stderr
    assert vzkit(home, "stop", "s1").returncode == 0
    restored = vzkit(home, "snapshot", "restore", "--vm", "s1", tmp_path / "snaps", "one")
    assert restored.returncode == 0, restored.stderr.decode()
    assert vzkit(home, "exec", "s1", "--", "cat", "/root/v").stdout == b"one\n"
    assert vzkit(home, "rm", "-f", "s1").returncode == 0
    # run -d --rm: gone once its main command ends
    gone = vzkit(home, "run", "-d", "--rm", "--name", "r1", "--", "true")
    assert gone.returncode == 0, gone.stderr.decode()
    wait_until(lambda: not (home / "vms" / "r1").exists(), "r1 to remove itself", timeout=60)
    assert b"r1" not in vzkit(home, "ls", "-a").stdout
