"""The named-VM commands (``run -d``, ``create``, ``start``, ``exec``, ``shell``, ``ls``,
``stop``, ``rm``, ``cp``, ``logs``, ``inspect``) through ``vzkit.cli:main``, the named-VM API
faked in this process (:mod:`tests.support.named_fake`: each VM's guest is the host-run agent,
so exec and cp run real agent sessions). The real thing across processes, on real guests:
``tests/e2e/test_named_cli.py``."""

from __future__ import annotations

import json
import os
import platform
import signal
import stat
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import vzkit
from vzkit.cli import main
from vzkit.cli._vms import parse_copy_path

from ..support.agent_vm import host_agent
from ..support.named_fake import Named, install
from ..support.polling import wait_until
from ..support.terminal import Terminal

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="runs the x86_64 Linux agent binary on the host",
)

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="vzkit")


def run_fd(capfd: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """The CLI in this process with output on the real file descriptors (``exec`` writes them,
    not ``sys.stdout``): exit code, stdout, stderr."""
    try:
        main([str(a) for a in args], prog_name="vzkit")
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    else:
        code = 0
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture
def named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Named]:
    host_agent()  # built before the clock of a test starts
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    registry = Named(tmp_path / "home")
    install(registry, monkeypatch)
    try:
        yield registry
    finally:
        registry.close()
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"k")  # the fake backend boots nothing
    return path


def test_run_detached_makes_a_named_vm_and_prints_its_name(named: Named, kernel: Path) -> None:
    made = run("run", "-d", "--name", "t1", "--kernel", kernel, "--cpus", "3", "-e", "A=1",
               "-w", "/tmp", "--", "sleep", "60")  # fmt: skip
    assert (made.exit_code, made.stdout) == (0, "t1\n"), made.output
    [(_, (config, name, backend, start, command, _timeout))] = named.calls
    assert (name, backend, start, config.cpus) == ("t1", "auto", True, 3)
    assert command.argv == ("sleep", "60")
    assert command.cwd == "/tmp"
    assert "A=1" in command.env
    assert named.vms["t1"].vm.state is vzkit.VMState.RUNNING
    assert named.disconnects == 1  # the VM runs on: only disconnected

    again = run("run", "-d", "--name", "t1", "--kernel", kernel)
    assert again.exit_code == 125
    assert "a VM named 't1' exists" in again.stderr

    anonymous = run("run", "-d", "--kernel", kernel)
    assert anonymous.exit_code == 0, anonymous.output
    assert anonymous.stdout.strip() in named.vms
    assert named.calls[-1][1][4] is None  # no command: the VM just runs


@pytest.mark.parametrize("ended", [True, False])
def test_run_detached_when_the_agent_does_not_answer(
    named: Named, kernel: Path, monkeypatch: pytest.MonkeyPatch, ended: bool
) -> None:
    """A main command that is over before the agent is asked is fine (its VM stopped, as it
    should); a VM whose agent does not answer otherwise is 125, with its console."""
    real_create = named.create

    def create(*args: object, **kwargs: object) -> object:
        view = real_create(*args, **kwargs)  # type: ignore[arg-type]
        entry = named.vms["t1"]
        entry.vm.stop(timeout=5)
        entry.exit_code = 0 if ended else None
        return view

    monkeypatch.setattr(vzkit, "create", create)
    result = run("run", "-d", "--name", "t1", "--kernel", kernel, "--boot-timeout", "2",
                 "--", "true")  # fmt: skip
    if ended:
        assert (result.exit_code, result.stdout) == (0, "t1\n"), result.output
    else:
        assert result.exit_code == 125
        assert "the guest stopped before its agent answered" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--name", "t1"], "--name names a VM that lives on: add -d"),
        (["-d", "-t"], "-d does not combine with -i or -t"),
        (["-d", "-i"], "-d does not combine with -i or -t"),
        (["-d", "--from-snapshot", "s"], "-d does not combine with --from-snapshot"),
        (["-d", "--name", "a/b"], ""),
    ],
)
def test_run_detached_refuses_what_it_cannot_do(
    named: Named, kernel: Path, flags: list[str], message: str
) -> None:
    if flags[-1] == "a/b":  # a bad name is the core's usage error
        named.create = _refuse_name  # type: ignore[method-assign]
        install(named)
    result = run("run", *flags, "--kernel", kernel, "--", "true")
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not named.vms


def _refuse_name(config: object, name: str, **kwargs: object) -> None:
    raise vzkit.SpecError(f"a VM name is letters, digits, '_', '.' and '-': not {name!r}")


def test_run_detached_with_rm_asks_for_auto_removal(named: Named, kernel: Path) -> None:
    result = run("run", "-d", "--rm", "--name", "t1", "--kernel", kernel, "--", "true")
    assert result.exit_code == 0, result.output
    assert named.auto_remove == {"t1": True}
    assert run("run", "-d", "--name", "t2", "--kernel", kernel).exit_code == 0
    assert named.auto_remove["t2"] is False


def test_run_rm_without_d_is_accepted(kernel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vzkit.cli._run as cli_run

    seen = []
    monkeypatch.setattr(cli_run, "run_and_exit", lambda *a, **k: seen.append(a[0]))
    assert run("run", "--rm", "--kernel", kernel, "--", "true").exit_code == 0
    assert seen == [("true",)]


def test_create_ls_start_stop_and_rm(named: Named, kernel: Path) -> None:
    made = run("create", "--kernel", kernel, "--memory", "768m", "t2")
    assert (made.exit_code, made.stdout) == (0, "t2\n"), made.output
    assert named.calls[0][1][3] is False  # made stopped
    assert run("ls").stdout.splitlines() == [
        "NAME  STATE  BACKEND  ARCH  CPUS  MEMORY  CREATED"  # only the header: it is stopped
    ]
    listed = run("ls", "-a")
    header, row = listed.stdout.splitlines()
    assert header.split() == ["NAME", "STATE", "BACKEND", "ARCH", "CPUS", "MEMORY", "CREATED"]
    assert row.split()[:6] == ["t2", "stopped", "qemu", platform.machine(), "2", "768.0MiB"]
    assert row.endswith("seconds ago")
    assert json.loads(run("ls", "--json").stdout) == []
    [entry] = json.loads(run("ls", "-a", "--json").stdout)
    assert entry == named.info("t2").to_json()

    started = run("start", "--boot-timeout", "30", "t2")
    assert (started.exit_code, started.stdout) == (0, "t2\n"), started.output
    assert named.vms["t2"].vm.state is vzkit.VMState.RUNNING
    [entry] = json.loads(run("ls", "--json").stdout)
    assert (entry["name"], entry["state"]) == ("t2", "running")
    twice = run("start", "t2")
    assert twice.exit_code == 1  # the core's StateError, with the name
    assert "t2: VM is already running" in twice.stderr  # the core's sentence, and which VM

    refused = run("rm", "t2")
    assert refused.exit_code == 1
    assert "'vzkit rm -f t2'" in refused.stderr
    stopped = run("stop", "-t", "5", "t2", "nope", "t2")  # the others go on
    assert stopped.exit_code == 1
    assert stopped.stdout == "t2\nt2\n"  # a stopped VM is left as it is
    assert "no VM named 'nope': 'vzkit ls -a' lists them" in stopped.stderr
    assert named.vms["t2"].vm.state is vzkit.VMState.STOPPED

    assert run("rm", "t2").stdout == "t2\n"
    assert named.vms == {}
    assert json.loads(run("ls", "-a", "--json").stdout) == []


def test_create_takes_runs_backend_and_image_options(named: Named, kernel: Path) -> None:
    import click

    ctx = click.Context(main)
    run_cmd, create = main.get_command(ctx, "run"), main.get_command(ctx, "create")
    assert run_cmd is not None
    assert create is not None
    wanted = ("image", "insecure_registry", "rootfs", "root", "init_mode")
    theirs = {p.name: p for p in create.params}
    assert all(theirs[p.name] is p for p in run_cmd.params if p.name in wanted)  # the very same
    made = run("create", "--backend", "qemu", "--kernel", kernel, "--cmdline", "quiet", "t4")
    assert made.exit_code == 0, made.output
    [(_, (config, name, backend, start, _command, _timeout))] = named.calls
    assert (name, backend, start, config.cmdline) == ("t4", "qemu", False, "quiet")
    bad = run("create", "--init", "image", "--kernel", kernel, "t5")
    assert bad.exit_code == 2
    assert "--init needs --image, --rootfs or --root" in bad.stderr
    bad = run("create", "--insecure-registry", "t5")
    assert bad.exit_code == 2
    assert "--insecure-registry goes with --image REF" in bad.stderr
    taken = run("create", "--kernel", kernel, "t4")
    assert taken.exit_code == 1
    assert "a VM named 't4' exists" in taken.stderr
    assert list(named.vms) == ["t4"]


def test_rm_force_stops_first(named: Named, kernel: Path) -> None:
    assert run("run", "-d", "--name", "t3", "--kernel", kernel).exit_code == 0
    removed = run("rm", "-f", "t3")
    assert (removed.exit_code, removed.stdout) == (0, "t3\n"), removed.output
    assert ("remove_vm", ("t3", True)) in named.calls
    assert named.vms == {}


def test_exec_passes_output_and_exit_code_through(
    named: Named, kernel: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert run("run", "-d", "--name", "t1", "--kernel", kernel).exit_code == 0
    code, out, err = run_fd(
        capfd, "exec", "-e", "GREETING=hello", "-w", "/tmp", "t1", "--",
        "sh", "-c", 'echo "$((6*7)) $GREETING $(pwd)"; echo oops >&2; exit 3',
    )  # fmt: skip
    assert (code, out, err) == (3, "42 hello /tmp\n", "oops\n")
    code, out, _ = run_fd(capfd, "exec", "t1", "sh", "-c", "kill -TERM $$")
    assert code == 128 + signal.SIGTERM
    assert named.vms["t1"].vm.state is vzkit.VMState.RUNNING  # exec leaves it running


def test_exec_on_an_unknown_or_stopped_vm_is_125(
    named: Named, kernel: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_fd(capfd, "exec", "nope", "--", "true")
    assert (code, out) == (125, "")
    assert "no VM named 'nope': 'vzkit ls -a' lists them" in err
    assert run("create", "--kernel", kernel, "t2").exit_code == 0
    code, out, err = run_fd(capfd, "exec", "t2", "--", "true")
    assert (code, out) == (125, "")
    assert "the VM 't2' is stopped: 'vzkit start t2' starts it" in err
    code, _, err = run_fd(capfd, "exec", "-t", "t2", "--", "true")
    assert code == 2  # -t without a terminal: the usage error of run -t
    assert "the input device is not a TTY" in err
    assert run("shell", "t2").exit_code == 2


def test_exec_forwards_piped_stdin_and_a_terminals_with_i(tmp_path: Path) -> None:
    """In a subprocess (the fake VM made there, ``tests.support.named_cli``): a pipe's input
    always goes to the command, a terminal's only with ``-i``; ``--env-file`` sets variables."""
    host_agent()
    cli = [sys.executable, "-m", "tests.support.named_cli"]
    env = {**os.environ, **_env(tmp_path)}
    env_file = tmp_path / "vars.env"
    env_file.write_text("# a comment\nFROM_FILE=file value\n")
    proc = subprocess.run(
        [*cli, "exec", "--env-file", env_file, "t1", "--",
         "sh", "-c", 'tr a-z A-Z; echo "$FROM_FILE"'],
        input=b"piped\n", capture_output=True, cwd=ROOT, timeout=60, env=env,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, b"PIPED\nfile value\n"), proc.stderr
    outputs = []
    for flags in (["-i"], []):
        master, slave = os.openpty()
        try:
            os.write(master, b"typed line\n")
            proc = subprocess.run(
                [*cli, "exec", *flags, "t1", "--", "head", "-n", "1"],
                stdin=slave, capture_output=True, cwd=ROOT, timeout=60, env=env,
            )  # fmt: skip
        finally:
            os.close(slave)
            os.close(master)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert outputs == [b"typed line\n", b""]


def _env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "subhome"
    home.mkdir(exist_ok=True)
    return {"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "VZKIT_HOME": str(home)}


def test_exec_t_sees_the_size_and_a_resize_and_shell_is_a_login_shell(tmp_path: Path) -> None:
    host_agent()
    cli = [sys.executable, "-m", "tests.support.named_cli"]
    script = 'stty size; echo "$TERM"; trap "stty size; exit 3" WINCH; echo ready; read x'
    term = Terminal(33, 111)
    try:
        term.start(*cli, "exec", "-t", "t1", "--", "sh", "-c", script,
                   env={**_env(tmp_path), "TERM": "vt220"})  # fmt: skip
        seen = term.expect(b"ready\r\n")
        assert b"33 111\r\nvt220\r\n" in seen
        term.resize(40, 120)
        assert term.proc is not None
        term.proc.send_signal(signal.SIGWINCH)
        term.expect(b"40 120\r\n")
        assert term.wait() == 3, term.seen
        assert termios.tcgetattr(term.slave) == term.cooked  # this terminal is itself again
    finally:
        term.close()
    term = Terminal(24, 80)
    try:
        term.start(*cli, "shell", "-w", "/tmp", "t1", env=_env(tmp_path))
        term.type(b"echo $((6*7))X $(pwd)Y; exit 5\r")
        term.expect(b"42X /tmpY")
        assert term.wait() == 5, term.seen
    finally:
        term.close()


def test_exec_t_escape_ends_the_session_and_says_the_vm_runs_on(tmp_path: Path) -> None:
    host_agent()
    term = Terminal(24, 80)
    try:
        term.start(sys.executable, "-m", "tests.support.named_cli", "exec", "-t", "t1", "--",
                   "sh", "-c", "echo ready; read x", env=_env(tmp_path))  # fmt: skip
        term.expect(b"ready")
        term.type(b"\x1d.")
        assert term.wait() == 255, term.seen
        assert b"the session was ended (Ctrl-] .); the VM runs on" in term.seen
        assert termios.tcgetattr(term.slave) == term.cooked
    finally:
        term.close()


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    out = {}
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        data = os.readlink(path).encode() if path.is_symlink() else (
            path.read_bytes() if path.is_file() else b"")  # fmt: skip
        out[str(path.relative_to(root))] = (stat.S_IMODE(mode) | stat.S_IFMT(mode), data)
    return out


def test_cp_in_and_out_keeps_the_tree(
    named: Named, kernel: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The host agent's "guest" is this host: copy a tree in, then out again elsewhere."""
    assert run("run", "-d", "--name", "t1", "--kernel", kernel).exit_code == 0
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "data.bin").write_bytes(os.urandom(300_000))
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    (src / "link").symlink_to("sub/data.bin")
    guest = tmp_path / "guest"
    guest.mkdir()
    copied = run("cp", src, f"t1:{guest}/src")
    assert copied.exit_code == 0, copied.output
    back = tmp_path / "back"
    copied = run("cp", f"t1:{guest}/src", back)
    assert copied.exit_code == 0, copied.output
    assert _tree(back) == _tree(src)

    missing = run("cp", src, f"t1:{tmp_path}/no/such/dir/x")
    assert missing.exit_code == 1
    assert "no directory" in missing.stderr
    assert run("cp", tmp_path / "nothing", "t1:/tmp").exit_code == 1
    both = run("cp", "t1:/a", "t1:/b")
    assert both.exit_code == 2
    assert "NAME:PATH on exactly one side" in both.stderr
    assert run("cp", "a", "b").exit_code == 2
    assert run("cp", "a", "t1:").exit_code == 2
    unknown = run("cp", src, "nope:/tmp")
    assert unknown.exit_code == 1
    assert "no VM named 'nope'" in unknown.stderr


@pytest.mark.parametrize(
    ("arg", "parsed"),
    [
        ("t1:/root/x", ("t1", "/root/x")),
        ("my.vm-2_:rel/path", ("my.vm-2_", "rel/path")),
        ("t1:", ("t1", "")),
        ("./a:b", (None, "./a:b")),
        ("/abs:x", (None, "/abs:x")),
        ("dir/a:b", (None, "dir/a:b")),
        ("plain", (None, "plain")),
        (".hidden:x", (None, ".hidden:x")),
    ],
)
def test_cp_paths(arg: str, parsed: tuple[str | None, str]) -> None:
    assert parse_copy_path(arg) == parsed


def test_logs_prints_and_follows_the_console(named: Named, kernel: Path) -> None:
    assert run("run", "-d", "--name", "t1", "--kernel", kernel).exit_code == 0
    log = named.info("t1").console_log
    assert log is not None
    log.write_bytes(b"boot line 1\r\n")
    assert run("logs", "t1").stdout_bytes == b"boot line 1\r\n"

    def later() -> None:  # while 'logs -f' follows: it polls list_vms for the VM's state
        seen = named.listings
        wait_until(lambda: named.listings >= seen + 2, "logs -f to poll", timeout=30)
        with log.open("ab") as fh:
            fh.write(b"boot line 2\r\n")
        seen = named.listings
        wait_until(lambda: named.listings >= seen + 2, "logs -f to poll again", timeout=30)
        named.vms["t1"].vm.stop(timeout=5)

    writer = threading.Thread(target=later)
    writer.start()
    followed = run("logs", "-f", "t1")
    writer.join()
    assert followed.exit_code == 0, followed.output
    assert followed.stdout_bytes == b"boot line 1\r\nboot line 2\r\n"  # and it ended with the VM
    assert run("logs", "nope").exit_code == 1


def test_inspect_shows_the_vm(named: Named, kernel: Path) -> None:
    assert run("run", "-d", "--name", "t1", "--kernel", kernel, "--", "sleep", "9").exit_code == 0
    data = json.loads(run("inspect", "--json", "t1").stdout)
    assert data == {**named.info("t1").to_json(), "config": named.info("t1").config.to_dict()}
    lines = run("inspect", "t1").stdout.splitlines()
    assert "name:         t1" in lines
    assert "state:        running" in lines
    assert "command:      sleep 9" in lines
    assert "exit_code:    -" in lines
    missing = run("inspect", "nope")
    assert missing.exit_code == 1
    assert "no VM named 'nope'" in missing.stderr
