"""The agent's peer checks, run natively: only the host's CID, and the per-boot key first.

The guest's binary cannot open vsock on this host, so these run a test-only build of the same
sources linked with ``agent_fake_vsock.c`` (``-Wl,--wrap``): its vsock listener is a unix
socket and ``accept()`` reports a peer CID the test picks. Everything after ``accept()`` is
the agent's own code.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzkit.agent import AgentClient, AgentError, authenticate
from vzkit.agent._protocol import (
    HEADER_SIZE,
    KEY_SIZE,
    ErrorInfo,
    ExecRequest,
    Frame,
    MsgType,
    decode_header,
    encode_auth,
    encode_frame,
    encode_hello_request,
)
from vzkit.backends.qemu._discover import user_cache_dir
from vzkit.image._agent_build import AGENT_TARGETS, agent_sources, build_agent, zig_command

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="runs the x86_64 Linux agent binary on the host",
)

SHIM = Path(__file__).with_name("agent_fake_vsock.c")
HOST_CID = 2


@pytest.fixture(scope="session")
def agent() -> Path:
    """The agent as shipped."""
    zig_command()
    root = user_cache_dir()
    return build_agent("x86_64", root / "agent-build", cache_dir=root / "zig")


@pytest.fixture(scope="session")
def fake_vsock_agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent's sources plus the shim, built like the real one (``_agent_build``)."""
    work = tmp_path_factory.mktemp("agent-fake-vsock")
    for name, data in agent_sources().items():
        (work / name).write_bytes(data)
    (work / SHIM.name).write_bytes(SHIM.read_bytes())
    cache = user_cache_dir() / "zig"
    env = {
        **os.environ,
        "ZIG_GLOBAL_CACHE_DIR": str(cache / "global"),
        "ZIG_LOCAL_CACHE_DIR": str(cache / "local"),
    }
    sources = sorted(p.name for p in work.glob("*.c"))
    argv = [*zig_command(), "cc", "-target", AGENT_TARGETS["x86_64"], "-std=c11",
            "-D_GNU_SOURCE", "-Os", "-static", "-Wall", "-Wextra", "-Werror",
            "-Wl,--wrap=socket,--wrap=bind,--wrap=accept4", "-o", "agent", *sources]  # fmt: skip
    done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return work / "agent"


class FakeVsockAgent:
    """``vzkit-agent serve`` whose vsock peers all come from ``cid``."""

    def __init__(self, binary: Path, root: Path, cid: int, *extra: str) -> None:
        self.root = root
        self.path = root / "vsock.sock"
        self.log = root / "agent.log"
        self.marker = root / "ran"
        env = {**os.environ, "FAKE_VSOCK_PATH": str(self.path), "FAKE_VSOCK_PEER_CID": str(cid)}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [binary, "serve", "--no-console", "--vsock-port", "1024", *extra],
                env=env, stderr=log, cwd=root,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self.path.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the agent did not listen"
            time.sleep(0.01)  # poll interval

    def connect(self) -> socket.socket:
        sock = _connect_when_listening(self.path)
        sock.settimeout(10)
        return sock

    def attack(self, *, auth: bytes | None) -> list[Frame]:
        """A raw connection: AUTH (when given), HELLO and an EXEC that would create
        ``marker``; returns every frame the agent sent before it hung up."""
        run = ExecRequest((b"touch", os.fsencode(self.marker))).encode()
        data = (encode_auth(auth) if auth is not None else b"") + b"".join(
            (
                encode_frame(MsgType.HELLO, 0, encode_hello_request()),
                encode_frame(MsgType.EXEC, 1, run),
            )
        )
        with self.connect() as sock:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(data)
            buf = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    buf += chunk
                    if any(f.type == MsgType.EXIT for f in _frames(buf)):
                        break
        return _frames(buf)

    def ran_something(self) -> bool:
        """Whether an EXEC got through. Once the agent hung up, it had acted on every frame
        before that (one thread, frames in order): an EXEC it accepted had forked its child,
        which is still the agent's child (alive or a zombie), or was reaped after ``touch``
        created the marker. Children first: one reaped in between left the marker behind."""
        pid = self.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return bool(children) or self.marker.exists()

    def client(self, key: bytes | None) -> AgentClient:
        sock = self.connect()
        sock.settimeout(None)
        if key is not None:
            try:
                authenticate(sock, key)  # what the core (AgentLink) does on vsock
            except BaseException:
                sock.close()
                raise
        return AgentClient(sock, timeout=10)

    def close(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)
        return self.log.read_text()


def _connect_when_listening(path: Path) -> socket.socket:
    deadline = time.monotonic() + 10
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))  # blocking: waits out a full backlog
            return sock
        except (FileNotFoundError, ConnectionRefusedError):  # the agent is starting
            sock.close()
            assert time.monotonic() < deadline, "the agent does not listen"
            time.sleep(0.01)  # poll interval


def _frames(buf: bytes) -> list[Frame]:
    frames = []
    while len(buf) >= HEADER_SIZE:
        length, kind, channel = decode_header(buf[:HEADER_SIZE])
        if len(buf) < HEADER_SIZE + length:
            break
        frames.append(Frame(kind, channel, buf[HEADER_SIZE : HEADER_SIZE + length]))
        buf = buf[HEADER_SIZE + length :]
    return frames


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    path.write_bytes(os.urandom(KEY_SIZE))
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def _agent(binary: Path, cid: int, *extra: str) -> Iterator[FakeVsockAgent]:
    with tempfile.TemporaryDirectory(prefix="agent-", dir="/tmp") as tmp:  # short socket path
        agent = FakeVsockAgent(binary, Path(tmp), cid, *extra)
        try:
            yield agent
        finally:
            agent.close()


@pytest.mark.parametrize("cid", [1, 4, 3])  # the guest itself (loopback, own CID), another VM
def test_vsock_peers_other_than_the_host_are_refused(
    fake_vsock_agent: Path, key_file: Path, cid: int
) -> None:
    with _agent(fake_vsock_agent, cid, "--key-file", str(key_file)) as agent:
        frames = agent.attack(auth=key_file.read_bytes())  # even with the right key
        assert frames == []  # closed at accept: not even a HELLO back
        assert not agent.ran_something()
        log = agent.close()
    assert f"refused a vsock connection from CID {cid} port 4321" in log


def test_the_host_with_the_key_is_served(fake_vsock_agent: Path, key_file: Path) -> None:
    with _agent(fake_vsock_agent, HOST_CID, "--key-file", str(key_file)) as agent:
        with agent.client(key_file.read_bytes()) as client:
            assert client.run(["touch", str(agent.marker)]).returncode == 0
        assert agent.marker.exists()


def test_without_a_key_file_the_host_needs_no_key_but_others_stay_out(
    fake_vsock_agent: Path,
) -> None:
    """vz: its vsock device is private to the vzkit process, the guest boots with no key."""
    with _agent(fake_vsock_agent, HOST_CID) as agent, agent.client(None) as client:
        assert client.run(["true"]).returncode == 0
    with _agent(fake_vsock_agent, 4) as agent:
        assert agent.attack(auth=None) == []
        assert not agent.ran_something()


def _session_error(frames: list[Frame]) -> str:
    assert [(f.type, f.channel) for f in frames] == [(MsgType.ERROR, 0)], frames
    return ErrorInfo.decode(frames[0].payload).message


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        (None, "authentication required (AUTH before message type 0x01)"),
        (b"\0" * KEY_SIZE, "authentication failed"),
        (b"x", "authentication failed"),
        (b"k" * 64, "authentication failed"),
    ],
    ids=["no-auth", "wrong-key", "short-key", "long-key"],
)
def test_a_host_connection_without_the_key_runs_nothing(
    fake_vsock_agent: Path, key_file: Path, auth: bytes | None, message: str
) -> None:
    with _agent(fake_vsock_agent, HOST_CID, "--key-file", str(key_file)) as agent:
        assert _session_error(agent.attack(auth=auth)) == message
        assert not agent.ran_something()
        prefix = key_file.read_bytes()[:-1]  # all but the last byte is still wrong
        assert _session_error(agent.attack(auth=prefix)) == "authentication failed"
        assert not agent.ran_something()
        with agent.client(key_file.read_bytes()) as client:  # the agent serves on
            assert client.ping() == "0.1.0"


def test_the_key_is_read_at_every_connection(fake_vsock_agent: Path, key_file: Path) -> None:
    """What a snapshot restore does: the host serves a new key; the old one stops working."""
    with _agent(fake_vsock_agent, HOST_CID, "--key-file", str(key_file)) as agent:
        old = key_file.read_bytes()
        with agent.client(old) as client:
            assert client.ping() == "0.1.0"
        new = os.urandom(KEY_SIZE)
        key_file.write_bytes(new)
        with pytest.raises(AgentError, match="authentication failed"):
            agent.client(old)
        with agent.client(new) as client:
            assert client.ping() == "0.1.0"
        key_file.unlink()  # no key to be had: nobody gets in
        with pytest.raises(AgentError, match="authentication failed"):
            agent.client(new)
        assert "no usable key in" in agent.close()


def test_idle_unauthenticated_connections_cannot_lock_the_host_out(
    fake_vsock_agent: Path, key_file: Path
) -> None:
    with _agent(fake_vsock_agent, HOST_CID, "--key-file", str(key_file)) as agent:
        idle = [agent.connect() for _ in range(40)]
        try:
            with agent.client(key_file.read_bytes()) as client:
                assert client.ping() == "0.1.0"
            closed = 0
            for sock in idle:
                sock.setblocking(False)  # the agent closed them before it served the client
                with contextlib.suppress(ConnectionResetError, BlockingIOError):
                    closed += sock.recv(1) == b""
            assert closed == 40 - 15  # 15 still wait for their AUTH, besides the client
        finally:
            for sock in idle:
                sock.close()


def test_the_console_and_stdio_need_no_key(agent: Path, key_file: Path) -> None:
    """The console port's host end is a socketpair private to the vzkit process (stdio
    stands in for it here): no key there, even when the agent has one."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [agent, "serve", "--stdio", "--key-file", str(key_file)],
        stdin=theirs, stdout=theirs, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    theirs.close()
    try:
        with AgentClient(ours, timeout=10) as client:
            assert client.run(["echo", "hi"]).stdout == b"hi\n"
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_unix_listener_with_a_key_file_needs_the_key(agent: Path, key_file: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="agent-", dir="/tmp") as tmp:
        path = Path(tmp) / "a.sock"
        proc = subprocess.Popen(
            [agent, "serve", "--key-file", str(key_file), "--unix", str(path)],
            stderr=subprocess.DEVNULL,
        )
        try:
            sock = _connect_when_listening(path)
            with pytest.raises(AgentError, match="authentication required"):
                AgentClient(sock, timeout=10)
            sock = _connect_when_listening(path)
            authenticate(sock, key_file.read_bytes())
            with AgentClient(sock, timeout=10) as client:
                assert client.ping() == "0.1.0"
        finally:
            proc.terminate()
            proc.wait(10)
