"""Commands on a pseudo-terminal (``tty=True``, protocol 2.2) run by the real agent on the host.

The agent runs on the host (``vzkit-agent serve --stdio``), so the pty is the host kernel's:
``stty``, ``tty`` and ``test -t`` see exactly what a guest's would. Output comes as a terminal
shows it: ``\\r\\n`` line ends and the input echoed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import platform
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vzkit
import vzkit.aio
from vzkit._loop import run_sync
from vzkit.agent import AgentClient, AgentError, GuestProcess
from vzkit.agent._protocol import ExecFlag, ExecRequest, MsgType, ResizeRequest
from vzkit.errors import ArgumentError

from ..support.agent_vm import AgentBackend, host_agent

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="runs the x86_64 Linux agent binary on the host",
)


@pytest.fixture(scope="module")
def agent() -> Path:
    return host_agent()


@contextlib.contextmanager
def serving(agent: Path) -> Iterator[AgentClient]:
    ours, theirs = socket.socketpair()
    env = {"PATH": "/usr/bin:/bin", "TERM": "agents-own"}
    proc = subprocess.Popen([agent, "serve", "--stdio"], stdin=theirs, stdout=theirs, env=env)
    theirs.close()
    try:
        with AgentClient(ours, timeout=10) as client:
            yield client
    finally:
        ours.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)  # the stdio session is over: the agent exits by itself
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(agent: Path) -> Iterator[AgentClient]:
    with serving(agent) as c:
        assert c.protocol_version == (2, 3)
        yield c


def read_until(proc: GuestProcess, marker: bytes) -> bytes:
    """The terminal's output up to and including ``marker`` (what came so far if it ends)."""
    out = b""
    while marker not in out:
        chunk = proc.stdout.read1(4096)
        if not chunk:
            break
        out += chunk
    return out


def test_stty_sees_the_size_and_follows_a_resize(client: AgentClient) -> None:
    script = "stty size; read x; stty size"
    with client.popen(["sh", "-c", script], tty=True, size=(33, 111)) as proc:
        assert read_until(proc, b"\n") == b"33 111\r\n"
        proc.resize(40, 120)
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        rest = proc.stdout.read()
        assert proc.wait() == 0
    assert rest == b"go\r\n40 120\r\n"  # the line echoed, then the new size


def test_a_resize_sends_sigwinch_to_the_foreground_program(client: AgentClient) -> None:
    script = "trap 'stty size; exit 7' WINCH; echo ready; while :; do sleep 0.05; done"
    with client.popen(["sh", "-c", script], tty=True, size=(10, 20), stdin=False) as proc:
        assert read_until(proc, b"ready\r\n").endswith(b"ready\r\n")
        proc.resize(11, 22)
        assert proc.stdout.read() == b"11 22\r\n"
        assert proc.wait() == 7


def test_the_pty_is_the_controlling_terminal_on_every_stream(client: AgentClient) -> None:
    script = "tty; test -t 0 && test -t 1 && test -t 2 && echo all; echo err >&2; ps -o tty= $$"
    with client.popen(["sh", "-c", script], tty=True, stdin=False) as proc:
        out = proc.stdout.read().decode()
        err = proc.stderr.read()
        assert proc.wait() == 0
    name, check, stderr_line, ctty = out.split("\r\n")[:4]
    assert name.startswith("/dev/pts/")
    assert name.removeprefix("/dev/pts/").isdigit()
    assert check == "all"
    assert stderr_line == "err"
    assert err == b""  # stderr is the terminal too
    assert ctty.strip() == name.removeprefix("/dev/")  # the session's controlling terminal


def test_term_is_passed_and_defaults_to_the_hosts(
    client: AgentClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def term(**kwargs: Any) -> bytes:
        with client.popen(["sh", "-c", 'echo "$TERM"'], tty=True, stdin=False, **kwargs) as p:
            return p.stdout.read()

    assert term(term="vt100") == b"vt100\r\n"
    monkeypatch.setenv("TERM", "screen-256color")
    assert term() == b"screen-256color\r\n"
    monkeypatch.delenv("TERM")
    assert term() == b"xterm-256color\r\n"
    assert term(term="vt100", env={"TERM": "dumb", "PATH": "/usr/bin:/bin"}) == b"dumb\r\n"
    with client.popen(["sh", "-c", 'echo "$TERM"'], stdin=False) as plain:  # no tty: untouched
        assert plain.stdout.read() == b"agents-own\n"


def test_run_on_a_terminal_collects_what_it_shows(client: AgentClient) -> None:
    script = "stty size; test -t 0 && echo T; echo err >&2"
    done = client.run(["sh", "-c", script], tty=True, size=(33, 111))
    assert (done.returncode, done.stdout, done.stderr) == (0, b"33 111\r\nT\r\nerr\r\n", b"")
    typed = client.run(["sh", "-c", 'read x; echo "got $x"'], tty=True, input="hi\n", text=True)
    assert typed.stdout == "hi\r\ngot hi\r\n"  # the terminal echoes what is typed
    ended = client.run(["cat"], tty=True, input=b"line\n\x04", timeout=30)  # ^D: end of file
    assert (ended.returncode, ended.stdout) == (0, b"line\r\nline\r\n")


def test_the_default_size_is_24x80(client: AgentClient) -> None:
    with client.popen(["stty", "size"], tty=True, stdin=False) as proc:
        assert proc.stdout.read() == b"24 80\r\n"


def test_ctrl_c_as_a_byte_interrupts_the_foreground_program(client: AgentClient) -> None:
    with client.popen(["sh", "-c", "echo ready; exec sleep 100"], tty=True) as proc:
        assert read_until(proc, b"ready\r\n").endswith(b"ready\r\n")
        assert proc.stdin is not None
        proc.stdin.write(b"\x03")  # what a terminal sends for Ctrl-C
        proc.stdin.flush()
        assert proc.wait(timeout=20) == -signal.SIGINT
    assert proc.returncode == -signal.SIGINT


def test_a_user_owns_its_terminal(client: AgentClient) -> None:
    if os.geteuid() != 0:
        pytest.fail("the agent changes users only as root (these tests run as root)")
    script = "id -u; stat -c %u $(tty)"
    with client.popen(["sh", "-c", script], tty=True, stdin=False, user="daemon") as proc:
        uid, owner = proc.stdout.read().decode().split()
    assert uid == owner != "0"


def test_without_a_terminal_nothing_changes(client: AgentClient) -> None:
    done = client.run(["sh", "-c", "test -t 0 || echo none; echo err >&2"])
    assert (done.stdout, done.stderr) == (b"none\n", b"err\n")
    with (
        client.popen(["true"], stdin=False) as proc,
        pytest.raises(ArgumentError, match="only a process started with tty=True"),
    ):
        proc.resize(10, 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": (24, 80)}, "term= and size= go with tty=True"),
        ({"term": "vt100"}, "term= and size= go with tty=True"),
        ({"tty": True, "size": (70000, 1)}, r"size must be \(rows, cols\)"),
        ({"tty": True, "size": (-1, 1)}, r"size must be \(rows, cols\)"),
        ({"tty": True, "size": (24,)}, r"size must be \(rows, cols\)"),
        ({"tty": True, "term": "a b"}, "term must be a terminal type"),
        ({"tty": True, "term": ""}, "term must be a terminal type"),
    ],
)
def test_bad_tty_options_are_refused_before_sending(
    client: AgentClient, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ArgumentError, match=message):
        client.popen(["true"], **kwargs)
    assert client.run(["true"]).returncode == 0


def test_a_bad_resize_size_is_refused(client: AgentClient) -> None:
    with client.popen(["cat"], tty=True) as proc:
        with pytest.raises(ArgumentError, match="rows are 0 to 65535"):
            proc.resize(65536, 80)
        proc.kill()


def test_an_agent_older_than_2_2_is_refused_before_the_request(client: AgentClient) -> None:
    conn = client._c
    hello = conn.hello
    conn.hello = dataclasses.replace(hello, minor=1)
    try:
        with pytest.raises(AgentError) as info:
            client.popen(["true"], tty=True)
        assert str(info.value) == (
            f"the guest's agent (vzkit-agent {hello.agent_version}, protocol 2.1) cannot run "
            "commands on a terminal (tty=True): that needs protocol 2.2; boot a guest whose "
            "agent is this vzkit's (a snapshot keeps the agent it was saved with), or run the "
            "command without tty="
        )
        assert client.run(["true"]).returncode == 0  # without tty= it still works
    finally:
        conn.hello = hello


# ---- the wire --------------------------------------------------------------------------------


def test_a_tty_exec_carries_the_user_field_and_the_size() -> None:
    plain = ExecRequest((b"sh",), flags=ExecFlag.STDIN)
    tty = dataclasses.replace(plain, flags=ExecFlag.STDIN | ExecFlag.TTY, size=(33, 111))
    size = ResizeRequest(33, 111).encode()
    assert tty.encode()[4:] == plain.encode()[4:] + b"\0\0\0\0" + size  # flags apart
    assert ExecRequest.decode(tty.encode()) == tty
    named = dataclasses.replace(tty, user=b"daemon")
    assert ExecRequest.decode(named.encode()) == named
    assert ResizeRequest.decode(ResizeRequest(40, 120).encode()) == ResizeRequest(40, 120)
    assert MsgType.RESIZE == 0x17


def test_a_resize_of_a_size_no_pty_has_ends_the_session(agent: Path) -> None:
    with serving(agent) as client:
        conn = client._c
        frame = (70000).to_bytes(4, "little") + (80).to_bytes(4, "little")

        async def send() -> None:
            await conn.send(MsgType.RESIZE, 1, frame)

        run_sync(send())
        with pytest.raises(vzkit.GuestError, match="malformed RESIZE"):
            client.run(["true"], timeout=10)


# ---- every API passes tty= on ------------------------------------------------------------------


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"k")
    return path


def test_tty_through_the_blocking_facade(agent: Path, kernel: Path) -> None:
    script = ["sh", "-c", "stty size; read x; stty size"]
    with (
        vzkit.start(backend=AgentBackend(agent), kernel_path=kernel) as vm,
        vm.guest.popen(script, tty=True, size=(33, 111)) as proc,
    ):
        assert read_until(proc, b"\n") == b"33 111\r\n"
        proc.resize(40, 120)
        assert proc.stdin is not None
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        assert proc.stdout.read() == b"\r\n40 120\r\n"
        assert vm.guest.run(["stty", "size"], tty=True, size=(5, 6)).stdout == b"5 6\r\n"


def test_tty_through_the_asyncio_facade(agent: Path, kernel: Path) -> None:
    async def main() -> bytes:
        async with vzkit.aio.start(backend=AgentBackend(agent), kernel_path=kernel) as vm:
            script = "stty size; read x; stty size"
            proc = await vm.guest.popen(["sh", "-c", script], tty=True, size=(33, 111))
            first = await proc.stdout.read(100)
            await proc.resize(40, 120)
            assert proc.stdin is not None
            await proc.stdin.write(b"\n")
            rest = b""
            while chunk := await proc.stdout.read(100):
                rest += chunk
            await proc.wait()
            ran = await vm.guest.run(["stty", "size"], tty=True, size=(5, 6))
            assert ran.stdout == b"5 6\r\n"
            return first + rest

    assert asyncio.run(main()) == b"33 111\r\n\r\n40 120\r\n"


def test_a_command_that_cannot_start_says_why_on_the_terminal(client: AgentClient) -> None:
    with client.popen(["no-such-command"], tty=True, stdin=False) as proc:
        out = proc.stdout.read()
        assert proc.wait() == 127
    assert out == b"vzkit-agent: exec no-such-command: No such file or directory\r\n"
    with client.popen(["true"], tty=True, stdin=False, cwd="/no/such/dir") as proc:
        out = proc.stdout.read()
        assert proc.wait() == 126
    assert out == b"vzkit-agent: chdir /no/such/dir: No such file or directory\r\n"
