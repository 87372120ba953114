"""vzkit-agent end to end on the host: the real binary over a unix socket, socketpair or stdio.

The agent is a static Linux x86_64 binary, so these run without a VM (Linux x86_64 hosts only).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vzkit._loop import run_sync
from vzkit.agent import DEFAULT_WINDOW, AgentClient, AgentError, AsyncAgentClient
from vzkit.agent._protocol import (
    HEADER_SIZE,
    ErrorInfo,
    ExecFlag,
    ExecRequest,
    Frame,
    Hello,
    MsgType,
    decode_header,
    encode_frame,
    encode_hello_request,
)
from vzkit.backends.qemu._discover import user_cache_dir
from vzkit.errors import GuestError
from vzkit.image._agent_build import build_agent, zig_command

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="runs the x86_64 Linux agent binary on the host",
)

MB = 1024 * 1024


@pytest.fixture(scope="session")
def agent() -> Path:
    zig_command()  # ziglang is a dev dependency: a missing zig fails, never skips
    root = user_cache_dir()
    return build_agent("x86_64", root / "agent-build", cache_dir=root / "zig")


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while not path.exists():
        assert proc.poll() is None, "the agent exited early"
        assert time.monotonic() < deadline, "the agent did not listen"
        time.sleep(0.01)  # poll interval


@contextlib.contextmanager
def _serving(agent: Path, path: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run the agent with ``*extra PATH``, in PATH's directory, logging next to it."""
    with (path.parent / f"{path.name}.log").open("wb") as log:
        proc = subprocess.Popen([agent, *extra, str(path)], stderr=log, cwd=path.parent)
    try:
        _wait_for_socket(path, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def server_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agent") / "agent.sock"


@pytest.fixture(scope="module")
def agent_server(agent: Path, server_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with _serving(agent, server_path, "serve", "--unix") as proc:
        yield proc
        assert proc.poll() is None, "the agent survived every test"


@pytest.fixture(scope="module")
def server(agent_server: subprocess.Popen[bytes], server_path: Path) -> Path:
    """The unix socket of an agent shared by the tests of this module."""
    return server_path


def _connect(path: Path) -> socket.socket:
    """Connect, retrying while the socket is bound but not yet listening: its path appears at
    bind(), a moment before listen() (refused in between; seen on a loaded CI machine)."""
    deadline = time.monotonic() + 5
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except ConnectionRefusedError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # poll interval


@pytest.fixture
def client(server: Path) -> Iterator[AgentClient]:
    with AgentClient(_connect(server)) as c:
        yield c


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone, or going
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 5
    while _alive(pid):
        assert time.monotonic() < deadline, f"process {pid} is still alive"
        time.sleep(0.02)  # poll interval


def _vm_hwm_kb(pid: int | str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


# ---- basics ------------------------------------------------------------------------------------


def test_ping_and_version(client: AgentClient) -> None:
    assert client.ping() == "0.1.0"
    assert client.agent_version == "0.1.0"
    assert client.protocol_version == (2, 3)


def test_run_output_and_exit_code(client: AgentClient) -> None:
    done = client.run(["sh", "-c", "echo hi; echo oops >&2; exit 3"])
    assert (done.returncode, done.stdout, done.stderr) == (3, b"hi\n", b"oops\n")
    assert done.args == ["sh", "-c", "echo hi; echo oops >&2; exit 3"]


def test_run_args_env_cwd_stdin(client: AgentClient, tmp_path: Path) -> None:
    done = client.run(
        [
            "sh",
            "-c",
            'printf "%s|" "$@"; printf "%s|%s|" "$GREETING" "$(pwd)"; cat',
            "sh",
            "a b",
            "",
        ],
        input=b"from stdin",
        env={"GREETING": "hello", "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert done.stdout == f"a b||hello|{tmp_path}|from stdin".encode()
    assert client.run(["env"], env={"ONLY": "this"}).stdout == b"ONLY=this\n"


def test_check_raises_called_process_error(client: AgentClient) -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        client.run(["sh", "-c", "echo out; exit 4"], check=True)
    assert (info.value.returncode, info.value.stdout) == (4, b"out\n")
    assert client.run(["true"], check=True).returncode == 0


def test_missing_command_is_127_with_the_guests_message(
    client: AgentClient, tmp_path: Path
) -> None:
    done = client.run(["no-such-command-vzkit", "x"])
    assert done.returncode == 127
    assert done.stderr == b"vzkit-agent: exec no-such-command-vzkit: No such file or directory\n"
    (tmp_path / "data").write_bytes(b"not a program")
    (tmp_path / "junk").write_bytes(b"not a program")
    (tmp_path / "junk").chmod(0o755)
    done = client.run([tmp_path / "data"])
    assert done.returncode == 126
    assert done.stderr == f"vzkit-agent: exec {tmp_path}/data: Permission denied\n".encode()
    done = client.run([tmp_path / "junk"])
    assert done.returncode == 126
    assert done.stderr == f"vzkit-agent: exec {tmp_path}/junk: Exec format error\n".encode()
    done = client.run(["true"], cwd="/no/such/dir")
    assert done.returncode == 126
    assert done.stderr == b"vzkit-agent: chdir /no/such/dir: No such file or directory\n"


def test_signals_are_negative_returncodes(client: AgentClient) -> None:
    assert client.run(["sh", "-c", "kill -TERM $$"]).returncode == -signal.SIGTERM


def test_timeout_kills_the_process_group(client: AgentClient) -> None:
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as info:
        client.run(["sh", "-c", "sleep 60 & echo $!; echo started; wait"], timeout=0.5)
    assert time.monotonic() - started < 30  # killed: `sleep 60` was not waited for
    assert info.value.timeout == 0.5
    assert info.value.stdout is not None
    pid_line, started_line = info.value.stdout.splitlines()
    assert started_line == b"started"
    _wait_gone(int(pid_line))


def test_large_stdin(client: AgentClient) -> None:
    data = os.urandom(5 * MB)
    done = client.run(["sha256sum"], input=data)
    import hashlib

    assert done.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_child_that_ignores_stdin(client: AgentClient) -> None:
    assert client.run(["true"], input=b"x" * (3 * MB)).returncode == 0


# ---- streaming --------------------------------------------------------------------------------


def test_popen_streams_both_ways(client: AgentClient) -> None:
    with client.popen(["cat"]) as proc:
        assert proc.stdin is not None
        for i in range(3):
            proc.stdin.write(b"line %d\n" % i)
            proc.stdin.flush()
            assert proc.stdout.readline() == b"line %d\n" % i
        proc.stdin.close()
        assert proc.stdout.read() == b""
        assert proc.wait(5) == 0
    assert proc.returncode == 0


def test_popen_wait_timeout_and_kill(client: AgentClient) -> None:
    proc = client.popen(["sleep", "60"], stdin=False)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.2)
    assert proc.poll() is None
    proc.kill()
    assert proc.wait(5) == -signal.SIGKILL
    assert proc.poll() == -signal.SIGKILL


def test_popen_communicate(client: AgentClient) -> None:
    proc = client.popen(["sh", "-c", "tr a-z A-Z; echo done >&2"])
    assert proc.communicate(b"hello") == (b"HELLO", b"done\n")
    assert proc.returncode == 0


def test_writing_to_an_exited_process_is_a_broken_pipe(client: AgentClient) -> None:
    proc = client.popen(["true"])
    assert proc.wait(5) == 0
    assert proc.stdin is not None
    proc.stdin.write(b"x")  # buffered
    with pytest.raises(BrokenPipeError):
        proc.stdin.flush()
    proc.stdout.close()
    proc.stderr.close()
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()


def test_100_mb_stdout_streams_with_bounded_memory(
    server: Path, agent_server: subprocess.Popen[bytes], record_property: pytest.RecordProperty
) -> None:
    agent_pid = agent_server.pid
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak RSS
    before_kb = _vm_hwm_kb("self")
    with AgentClient(_connect(server)) as client:
        started = time.monotonic()
        proc = client.popen(["head", "-c", str(100 * MB), "/dev/zero"], stdin=False)
        total = 0
        while chunk := proc.stdout.read(65536):
            total += len(chunk)
        assert proc.wait(10) == 0
        elapsed = time.monotonic() - started
        buffered = proc._channel.stdout.max_buffered
    growth_mb = (_vm_hwm_kb("self") - before_kb) / 1024
    agent_mb = _vm_hwm_kb(agent_pid) / 1024
    record_property("stream_100mb_s", round(elapsed, 2))
    record_property("client_peak_growth_mb", round(growth_mb, 1))
    record_property("agent_peak_rss_mb", round(agent_mb, 1))
    print(f"100 MB in {elapsed:.2f} s; client +{growth_mb:.1f} MB; agent {agent_mb:.1f} MB")
    assert total == 100 * MB
    assert buffered <= DEFAULT_WINDOW, "never more than one window buffered"
    assert growth_mb < 32
    assert agent_mb < 8


def test_a_slow_consumer_stalls_the_producer(client: AgentClient) -> None:
    proc = client.popen(["sh", "-c", "head -c 20000000 /dev/zero; echo finished >&2"], stdin=False)
    stream = proc._channel.stdout
    deadline = time.monotonic() + 10
    while stream.max_buffered < DEFAULT_WINDOW:  # we read nothing: the window fills
        assert time.monotonic() < deadline, "the window never filled"
        time.sleep(0.005)  # poll interval
    assert stream.max_buffered == DEFAULT_WINDOW  # and not a byte more
    # 20 MB cannot fit in a window plus a pipe: the producer is blocked, not finished
    assert proc.poll() is None, "blocked on a full window"
    assert len(proc.stdout.read()) == 20_000_000
    assert proc.stderr.read() == b"finished\n"
    assert proc.wait(5) == 0


def test_concurrent_calls_from_threads_share_one_connection(client: AgentClient) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(5):
                done = client.run(["sh", "-c", f"head -c {n * 10000 + i} /dev/zero; echo {n} >&2"])
                assert len(done.stdout) == n * 10000 + i
                assert done.stderr == f"{n}\n".encode()
                assert client.ping() == "0.1.0"
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_closing_the_connection_kills_its_processes(server: Path) -> None:
    client = AgentClient(_connect(server))
    proc = client.popen(["sh", "-c", "echo $$; exec sleep 60"], stdin=False)
    pid = int(proc.stdout.readline())
    assert _alive(pid)
    client.close()
    _wait_gone(pid)
    with pytest.raises(GuestError, match="closed"):
        client.ping()


# ---- files -----------------------------------------------------------------------------------


def test_write_and_read_files(client: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    data = os.urandom(3 * MB + 123)
    client.write_file(target, data, mode=0o600)
    assert target.read_bytes() == data
    assert target.stat().st_mode & 0o777 == 0o600
    assert client.read_file(target) == data
    client.write_file(str(target), b"", mode=0o755)  # replaces, empty is fine
    assert client.read_file(target) == b""
    assert target.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"], "no temp files left"


def test_file_errors_carry_errno_and_message(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(AgentError, match=f"^read_file {tmp_path}/missing: No such file") as info:
        client.read_file(tmp_path / "missing")
    assert info.value.errno == 2
    with pytest.raises(AgentError, match="Is a directory") as info:
        client.read_file(tmp_path)
    assert info.value.errno == 21
    with pytest.raises(AgentError, match=f"^write_file {tmp_path}/no/x: No such file") as info:
        client.write_file(tmp_path / "no" / "x", b"data")
    assert client.ping() == "0.1.0", "the session goes on"


def test_sync(client: AgentClient) -> None:
    client.sync()


# ---- asyncio twin ------------------------------------------------------------------------------


def test_async_client(server: Path) -> None:
    async def main() -> None:
        async with await AsyncAgentClient.connect(_connect(server)) as client:
            assert await client.ping() == "0.1.0"
            done, text = await asyncio.gather(
                client.run(["sh", "-c", "echo a; exit 2"]), client.read_file("/proc/version")
            )
            assert (done.returncode, done.stdout) == (2, b"a\n")
            assert text.startswith(b"Linux")
            async with await client.popen(["cat"]) as proc:
                assert proc.stdin is not None
                await proc.stdin.write(b"async")
                await proc.stdin.aclose()
                assert await proc.stdout.read() == b"async"
            assert proc.returncode == 0

    asyncio.run(main())


# ---- transports and bad input ------------------------------------------------------------------


def test_stdio_transport_and_poweroff_exits_in_test_mode(agent: Path) -> None:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([agent, "serve", "--stdio"], stdin=theirs, stdout=theirs)
    theirs.close()
    with AgentClient(ours) as client:
        assert client.run(["echo", "stdio"]).stdout == b"stdio\n"
        client.poweroff()
    assert proc.wait(5) == 0


class RawSession:
    """Hand-made frames, to break the protocol on purpose."""

    def __init__(self, path: Path) -> None:
        self.sock = _connect(path)
        self.sock.settimeout(5)

    @classmethod
    def adopt(cls, sock: socket.socket) -> RawSession:
        raw = cls.__new__(cls)
        raw.sock = sock
        return raw

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self) -> Hello:
        self.send(encode_frame(MsgType.HELLO, 0, encode_hello_request()))
        frame = self.recv()
        assert frame is not None
        assert (frame.type, frame.channel) == (MsgType.HELLO, 0)
        return Hello.decode(frame.payload)

    def _exactly(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def recv(self) -> Frame | None:
        header = self._exactly(HEADER_SIZE)
        if header is None:
            return None
        length, kind, channel = decode_header(header)
        payload = self._exactly(length) if length else b""
        assert payload is not None
        return Frame(kind, channel, payload)

    def expect_session_error(self, message: str, *, reset_ok: bool = False) -> None:
        """The agent's ERROR on channel 0 with ``message``, then its hang-up. ``reset_ok``: the
        hang-up may come as a reset, because we sent more than the agent drains before it
        closes (session.c's DRAIN_LIMIT) and a unix socket closed with unread input resets."""
        frame = self.recv()
        while frame is not None and frame.type == MsgType.WINDOW:
            frame = self.recv()
        assert frame is not None
        assert (frame.type, frame.channel) == (MsgType.ERROR, 0)
        assert ErrorInfo.decode(frame.payload).message == message
        try:
            assert self.recv() is None, "then the agent hangs up"
        except ConnectionResetError:
            if not reset_ok:
                raise

    def __enter__(self) -> RawSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (encode_frame(0x7F, 1), "unknown message type 0x7f"),
        (encode_frame(MsgType.STDOUT, 1, b"x"), "unknown message type 0x13"),
        (
            struct.pack("<IB3xI", 1 << 20, MsgType.STDIN, 1),
            "frame of 1048576 bytes exceeds the maximum of 65536",
        ),
        (b"\0\0\0\0\x03\x01\0\0\x01\0\0\0", "malformed frame header (reserved bytes set)"),
        (encode_frame(MsgType.EXEC, 1, b"\0\0"), "malformed message type 0x10 on channel 1"),
        (encode_frame(MsgType.PING, 0), "message type 0x03 on channel 0"),
        (encode_frame(MsgType.HELLO, 0, encode_hello_request()), "duplicate HELLO"),
    ],
)
def test_bad_frames_end_that_session_only(server: Path, frames: bytes, message: str) -> None:
    with AgentClient(_connect(server)) as bystander, RawSession(server) as bad:
        bad.hello()
        bad.send(frames)
        bad.expect_session_error(message)
        assert bystander.run(["echo", "still here"]).stdout == b"still here\n"


def test_truncated_frame_and_frames_before_hello(server: Path) -> None:
    with RawSession(server) as bad:
        bad.hello()
        bad.send(encode_frame(MsgType.PING, 1)[:8])
        bad.sock.shutdown(socket.SHUT_WR)
        bad.expect_session_error("truncated frame (connection closed after 8 of 12 bytes)")
    with RawSession(server) as early:
        early.send(encode_frame(MsgType.PING, 1))
        early.expect_session_error("expected HELLO, got message type 0x03")
    with RawSession(server) as old:
        old.send(encode_frame(MsgType.HELLO, 0, encode_hello_request((1, 0))))
        old.expect_session_error("protocol 1 is not supported (agent speaks 2.3)")
    with AgentClient(_connect(server)) as client:
        assert client.ping() == "0.1.0"


def test_reset_ends_the_session_and_resync_skips_leftovers(server: Path) -> None:
    # What the console looks like after a snapshot restore: a live session, a partial frame,
    # then a new host. The RESET preamble ends the old session; the new client finds its own
    # HELLO behind the old session's output.
    sock = _connect(server)
    with RawSession.adopt(sock) as old:
        old.hello()
        old.send(encode_frame(MsgType.EXEC, 1, ExecRequest((b"sleep", b"60")).encode()))
        old.send(encode_frame(MsgType.PING, 2))
        old.send(encode_frame(MsgType.STDIN, 1, b"partial")[:15])
        with AgentClient(sock.dup(), resync=True, timeout=10) as client:
            assert client.ping() == "0.1.0"
            assert client.run(["echo", "fresh"]).stdout == b"fresh\n"


def test_resync_on_a_fresh_connection(server: Path) -> None:
    with AgentClient(_connect(server), resync=True) as client:
        assert client.ping() == "0.1.0"


# Random frames of every type that cannot start processes, write files or power off.
_SAFE_TYPES = [t for t in range(0x40) if t not in (0x10, 0x21, 0x31)]


@settings(max_examples=150)
@given(
    st.lists(
        st.tuples(st.sampled_from(_SAFE_TYPES), st.integers(0, 4), st.binary(max_size=40)),
        max_size=6,
    ),
    st.integers(0, 12),
)
def test_the_agent_survives_random_frames(
    server: Path, frames: list[tuple[int, int, bytes]], cut: int
) -> None:
    data = b"".join(encode_frame(kind, channel, payload) for kind, channel, payload in frames)
    with RawSession(server) as raw:
        raw.hello()
        raw.send(data[: len(data) - cut])
        raw.sock.shutdown(socket.SHUT_WR)
        while raw.recv() is not None:
            pass
    with AgentClient(_connect(server)) as client:
        assert client.ping() == "0.1.0"


def test_window_overrun_and_channel_reuse_are_protocol_errors(server: Path) -> None:
    sleeper = ExecRequest((b"sleep", b"60"), flags=ExecFlag.STDIN, window=1024).encode()
    with RawSession(server) as raw:
        raw.hello()
        raw.send(encode_frame(MsgType.EXEC, 5, sleeper))
        raw.send(encode_frame(MsgType.EXEC, 5, sleeper))
        raw.expect_session_error("channel 5 is already in use")
    with RawSession(server) as raw:
        hello = raw.hello()
        raw.send(encode_frame(MsgType.EXEC, 1, sleeper))
        # sleep never reads and we ignore every grant: its pipe fills (what it takes is
        # granted back), then the agent holds a window, and the next frame overruns it. The
        # pipe takes at most a window (F_SETPIPE_SZ), so three windows overrun; what we write
        # past the error must stay below what the agent drains before it closes (DRAIN_LIMIT,
        # 4 MiB): unread input makes the close a reset, and we could not read the EOF.
        frame = encode_frame(MsgType.STDIN, 1, b"\0" * 65536)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(3 * hello.window // 65536):
                raw.send(frame)
        raw.expect_session_error("channel 1 overran its window", reset_ok=True)


def test_agent_error_surfaces_in_the_client(server: Path) -> None:
    # The client reports a session error with the agent's words and fails later calls.
    with AgentClient(_connect(server)) as client:
        conn = client._c

        async def poke() -> None:
            conn.send_nowait(0x7F, 1)

        run_sync(poke())
        with pytest.raises(AgentError, match="the agent ended the session: unknown message type"):
            client.ping()
        with pytest.raises(AgentError, match="unknown message type"):
            client.run(["true"])


# ---- relay --------------------------------------------------------------------------------------


def test_relay_listen_half_closes_both_ways(agent: Path, tmp_path: Path) -> None:
    path = tmp_path / "relay.sock"
    with _serving(agent, path, "relay", "--exec", "tr a-z A-Z; echo bye", "--listen-unix"):
        for word in (b"hello", b"again"):  # one connection after another
            with _connect(path) as sock:
                sock.sendall(word)
                sock.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
                assert data == word.upper() + b"bye\n"


def test_relay_connect_exits_with_the_commands_status(agent: Path, tmp_path: Path) -> None:
    path = tmp_path / "listen.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        proc = subprocess.Popen(
            [agent, "relay", "--connect-unix", str(path), "--exec", "read x; echo got $x; exit 7"]
        )
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"ping\n")
            assert conn.makefile("rb").read() == b"got ping\n"
        assert proc.wait(5) == 7


# ---- sizes that matter on vsock ---------------------------------------------------------------


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _written(pid: int) -> int:
    """What process ``pid`` has written so far (``wchar``), 0 once it is gone."""
    try:
        io = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return 0
    return int(next(line for line in io.splitlines() if line.startswith("wchar:")).split()[1])


def test_full_data_frames_are_64_kib_with_their_header(
    server: Path, agent_server: subprocess.Popen[bytes]
) -> None:
    """One virtio-vsock packet per full frame (Linux sends at most 64 KiB per packet)."""
    size = 1 << 20
    # One byte of credit first, so the child fills its pipe before the agent may read it: a
    # reader that races the writer would see short reads, whatever the frame size.
    request = ExecRequest((b"head", b"-c", str(size).encode(), b"/dev/zero"), window=1)
    with RawSession(server) as raw:
        raw.hello()
        raw.send(encode_frame(MsgType.EXEC, 1, request.encode()))
        deadline = time.monotonic() + 10
        while not any(_written(c) >= 256 * 1024 for c in _children(agent_server.pid)):
            assert time.monotonic() < deadline, "the child did not fill its pipe (256 KiB)"
            time.sleep(0.005)  # poll interval
        raw.send(encode_frame(MsgType.WINDOW, 1, struct.pack("<II", 4 * MB, 0)))
        lengths = []
        while (frame := raw.recv()) is not None and frame.type != MsgType.EXIT:
            if frame.type == MsgType.STDOUT:
                lengths.append(len(frame.payload))
    assert sum(lengths) == size
    assert max(lengths) == 65536 - HEADER_SIZE


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["serve", "--stdio", "--vsock-buffer", "lots"], None),
        (["serve", "--stdio", "--vsock-buffer", str(1 << 40)], None),
        (["relay", "--listen-unix", "x", "--exec", "cat", "--vsock-buffer", "-1"], None),
        (["serve", "--stdio"], "2MiB"),
    ],
)
def test_bad_vsock_buffer_sizes_are_refused(
    agent: Path, tmp_path: Path, argv: list[str], env: str | None
) -> None:
    environ = dict(os.environ)
    if env is not None:
        environ["VZKIT_AGENT_VSOCK_BUFFER"] = env
    result = subprocess.run(
        [agent, *argv], env=environ, cwd=tmp_path, capture_output=True, timeout=10, check=False
    )
    assert result.returncode == 2
    assert b"bad vsock buffer size" in result.stderr


def test_a_vsock_buffer_size_is_accepted(agent: Path) -> None:
    ours, theirs = socket.socketpair()
    environ = dict(os.environ, VZKIT_AGENT_VSOCK_BUFFER="1048576")
    argv = [agent, "serve", "--stdio", "--vsock-buffer", "0"]
    proc = subprocess.Popen(argv, stdin=theirs, stdout=theirs, env=environ)
    theirs.close()
    with AgentClient(ours) as client:
        assert client.run(["echo", "ok"]).stdout == b"ok\n"
        client.poweroff()
    assert proc.wait(5) == 0


def _io_bytes(pid: int) -> tuple[int, int]:
    """(rchar, wchar) of ``pid``: bytes it moved with read(2)/write(2)-like calls."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"]), int(fields["wchar"])


def test_stdin_is_spliced_into_the_child_without_passing_through_the_agent(
    agent_server: subprocess.Popen[bytes], client: AgentClient, tmp_path: Path
) -> None:
    # A child that keeps up (each chunk is written once the last one is in the file): the
    # agent moves stdin with splice(2), never reading it in or writing it out itself.
    out = tmp_path / "out"
    chunks = [os.urandom(MB) for _ in range(8)]
    before = _io_bytes(agent_server.pid)
    with client.popen(["sh", "-c", f"cat > {out}"]) as proc:
        assert proc.stdin is not None
        for i, chunk in enumerate(chunks):
            proc.stdin.write(chunk)
            proc.stdin.flush()
            deadline = time.monotonic() + 10
            while not out.exists() or out.stat().st_size < (i + 1) * MB:
                assert time.monotonic() < deadline, "the child did not get its stdin"
                time.sleep(0.005)  # poll interval
        proc.stdin.close()
        assert proc.wait(10) == 0
    after = _io_bytes(agent_server.pid)
    assert out.read_bytes() == b"".join(chunks)
    # (a reaped child's reads are added to its parent's: cat read the data once)
    read, written = after[0] - before[0] - 8 * MB, after[1] - before[1] - 8 * MB
    print(f"agent read {read} and wrote {written} bytes for {8 * MB} of stdin")
    assert read < MB, "stdin was read into the agent"
    assert written < MB, "stdin was written by the agent"


def test_stdin_spliced_and_buffered_in_turns_keeps_order(client: AgentClient) -> None:
    # a consumer that stalls now and then fills its pipe: frames then wait in the agent,
    # and splicing resumes once they have drained
    data = os.urandom(6 * MB)
    script = "for i in 1 2 3 4 5 6; do head -c 1048576; sleep 0.05; done | sha256sum"
    done = client.run(["sh", "-c", script], input=data)
    assert done.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_a_child_closing_stdin_mid_frame_discards_the_rest(client: AgentClient) -> None:
    done = client.run(["head", "-c", "100000"], input=os.urandom(4 * MB))
    assert done.returncode == 0
    assert len(done.stdout) == 100000
    assert client.ping() == "0.1.0"


def _minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def test_output_frames_reuse_their_buffers(
    agent_server: subprocess.Popen[bytes], client: AgentClient
) -> None:
    # Each 64 KiB frame buffer used to be malloc'd and given back to the kernel: 16 page
    # faults (and zeroed pages) per frame, ~16,000 for these 62 MiB. From the pool what is
    # left is a fixed cost (the copy-on-write of pool pages first written after the fork of
    # the child: a few hundred to ~1,500), counted after the first 2 MiB.
    size = 64 * MB
    with client.popen(["head", "-c", str(size), "/dev/zero"], stdin=False) as proc:
        assert len(proc.stdout.read(2 * MB)) == 2 * MB
        before = _minor_faults(agent_server.pid)
        rest = len(proc.stdout.read())
        faults = _minor_faults(agent_server.pid) - before
        assert proc.wait(10) == 0
    print(f"{faults} minor page faults in the agent for {rest} bytes of output")
    assert rest == size - 2 * MB
    assert faults < 4 * (rest // 65536), "page faults for every frame"
