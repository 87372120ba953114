"""The Firecracker-style ``CONNECT <port>\\n`` handshake on the device's host socket."""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzkit.backends.qemu.vhost_vsock import (
    HandshakeError,
    VhostUserVsockDevice,
    connect_hybrid,
    guest_port_path,
    parse_connect_line,
)
from vzkit.backends.qemu.vhost_vsock._packet import Op

from ..support.polling import unread_by_peer, wait_until
from ..support.vhost_vsock.fakedriver import FakeDriver
from ..support.vhost_vsock.fakeguest import attached


@pytest.fixture
def uds(tmp_path: Path) -> Path:
    return tmp_path / "v.sock"


@pytest.fixture
def pair(uds: Path) -> Iterator[tuple[VhostUserVsockDevice, FakeDriver]]:
    with attached(uds, handshake_timeout_s=5.0) as pair:
        yield pair


@pytest.mark.parametrize(
    ("line", "port"),
    [
        (b"CONNECT 52\n", 52),
        (b"CONNECT 0\n", 0),
        (b"CONNECT 0052\n", 52),
        (b"CONNECT 4294967295\n", 2**32 - 1),
    ],
)
def test_parse_valid_lines(line: bytes, port: int) -> None:
    assert parse_connect_line(line) == port


@pytest.mark.parametrize(
    "line",
    [
        b"connect 52\n",
        b"Connect 52\n",
        b"CONNECT -1\n",
        b"CONNECT +5\n",
        b"CONNECT 4294967296\n",
        b"CONNECT 99999999999\n",
        b"CONNECT abc\n",
        b"CONNECT 5x\n",
        b"CONNECT \n",
        b"CONNECT  52\n",
        b"CONNECT 52 \n",
        b"CONNECT 52\r\n",
        b"CONNECT 52",
        b"CONNECT\t52\n",
        b" CONNECT 52\n",
        b"\n",
        b"LISTEN 52\n",
    ],
)
def test_parse_rejects(line: bytes) -> None:
    with pytest.raises(HandshakeError):
        parse_connect_line(line)


def test_guest_port_path() -> None:
    assert guest_port_path(Path("/run/x/v.sock"), 52) == "/run/x/v.sock_52"


def client(uds: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(uds))
    return sock


def wait_for(predicate: object, timeout: float = 3.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)  # poll interval


def assert_rejected(sock: socket.socket, fake: FakeDriver) -> None:
    """Closed without a reply, and the guest never heard of it."""
    try:
        assert sock.recv(64) == b""
    except ConnectionResetError:
        pass
    sock.close()
    assert [p for p in fake.expect_silence() if p.op == Op.REQUEST] == []


@pytest.mark.parametrize(
    "data",
    [
        b"connect 52\n",
        b"CONNECT -5\n",
        b"CONNECT 4294967296\n",
        b"CONNECT abc\n",
        b"CONNECT " + b"1" * 40,  # over-long, no newline
        b"X" * 100 + b"\n",
        b"GET / HTTP/1.1\r\n\r\n",
    ],
)
def test_bad_request_lines_are_closed_without_reply(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver], data: bytes
) -> None:
    dev, fake = pair
    sock = client(uds)
    sock.sendall(data)
    assert_rejected(sock, fake)
    wait_for(lambda: dev.pending_handshakes == 0)
    assert dev.rejected_handshakes == 1


def test_close_before_sending(uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]) -> None:
    dev, _fake = pair
    client(uds).close()
    wait_for(lambda: dev.rejected_handshakes == 1)
    assert dev.pending_handshakes == 0


def test_no_newline_then_close(uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]) -> None:
    dev, fake = pair
    sock = client(uds)
    sock.sendall(b"CONNECT 52")
    wait_until(lambda: unread_by_peer(sock) == 0, "the device to read the partial line")
    sock.shutdown(socket.SHUT_WR)
    assert_rejected(sock, fake)
    wait_for(lambda: dev.pending_handshakes == 0)


def test_split_write_is_accepted(uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]) -> None:
    dev, fake = pair
    sock = client(uds)
    sock.sendall(b"CONN")
    wait_until(lambda: unread_by_peer(sock) == 0, "the device to read the partial line")
    assert dev.pending_handshakes == 1
    sock.sendall(b"ECT 52\n")
    (req,) = fake.recv(ops=[Op.REQUEST])
    assert req.dst_port == 52
    fake.send(Op.RESPONSE, 52, req.src_port)
    assert sock.recv(64) == b"OK %d\n" % req.src_port
    sock.close()


def test_byte_by_byte_request_line(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    _dev, fake = pair
    sock = client(uds)
    for byte in b"CONNECT 4294967295\n":
        sock.send(bytes([byte]))
        wait_until(lambda: unread_by_peer(sock) == 0, "the device to read the byte")
    try:
        (req,) = fake.recv(ops=[Op.REQUEST])
        assert req.dst_port == 2**32 - 1
    finally:
        sock.close()


def test_silent_client_is_dropped_after_the_handshake_timeout(uds: Path) -> None:
    with attached(uds, handshake_timeout_s=0.2) as (_dev, _fake):
        sock = client(uds)
        t0 = time.monotonic()
        assert sock.recv(1) == b""
        assert time.monotonic() - t0 > 0.15  # the timer, not at once (a timer never fires early)
        sock.close()


def test_connect_hybrid_without_a_guest_is_refused(uds: Path) -> None:
    with attached(uds, setup=False) as (dev, fake):
        fake.sock.close()  # the front-end left: no guest will ever answer
        wait_for(lambda: not dev.attached)
        with pytest.raises(ConnectionRefusedError):
            connect_hybrid(uds, 52, timeout=2)


def test_1024_half_open_handshakes_do_not_block_a_real_one(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    dev, fake = pair
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    fds = len(os.listdir("/proc/self/fd"))
    half_open = []
    try:
        for i in range(1024):
            sock = client(uds)
            if i % 2:
                sock.sendall(b"CONNECT 5")  # half a line
            half_open.append(sock)
        wait_for(lambda: dev.pending_handshakes == 1024, timeout=10)
        real = client(uds)
        real.sendall(b"CONNECT 52\n")
        (req,) = fake.recv(ops=[Op.REQUEST])
        fake.send(Op.RESPONSE, 52, req.src_port)
        assert real.recv(64) == b"OK %d\n" % req.src_port
        real.close()
        fake.recv(ops=[Op.SHUTDOWN])
        fake.send(Op.RST, 52, req.src_port)  # the guest completes the close
    finally:
        for sock in half_open:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    wait_for(lambda: dev.pending_handshakes == 0, timeout=10)
    wait_for(lambda: len(os.listdir("/proc/self/fd")) <= fds, timeout=5)


def test_pending_handshakes_are_capped(uds: Path) -> None:
    with attached(uds) as (dev, _fake):
        dev._listener._max_pending = 8
        socks = [client(uds) for _ in range(12)]
        wait_for(lambda: dev.rejected_handshakes == 4)
        assert dev.pending_handshakes == 8
        for sock in socks:
            sock.close()


def test_stale_socket_file_is_replaced_and_removed_on_close(uds: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(uds))
    stale.close()  # leaves the file behind
    with attached(uds) as (_dev, _fake):
        assert uds.exists()
    assert not uds.exists()


def test_a_regular_file_at_the_socket_path_is_not_clobbered(uds: Path) -> None:
    uds.write_text("precious")
    ours, theirs = socket.socketpair()
    dev = VhostUserVsockDevice(uds, vhost_socket=ours)
    with pytest.raises(OSError, match="in use"):
        dev.start()
    dev.close()
    theirs.close()
    assert uds.read_text() == "precious"
