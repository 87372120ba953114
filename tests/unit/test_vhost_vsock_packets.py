"""virtio-vsock packet protocol of the vhost-user-vsock device, driven by the fake driver.

Each test plays the guest (the fake driver) and the host (real Unix sockets in the Firecracker
hybrid convention) against a device running on its thread.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzkit.backends.qemu.vhost_vsock import (
    VhostUserVsockDevice,
    connect_hybrid,
    peer_port_from_address,
)
from vzkit.backends.qemu.vhost_vsock._credit import BUF_ALLOC
from vzkit.backends.qemu.vhost_vsock._device import TX_CALL_BATCH
from vzkit.backends.qemu.vhost_vsock._packet import (
    HOST_CID,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    Op,
)

from ..support.polling import wait_until
from ..support.vhost_vsock.fakedriver import DriverQueue, FakeDriver
from ..support.vhost_vsock.fakeguest import GuestConn, attached

BUF = BUF_ALLOC  # what the device advertises
GUEST_BUF = 256 * 1024  # what a Linux guest advertises by default
_SOCKETS: list[socket.socket] = []


@pytest.fixture(autouse=True)
def close_sockets() -> Iterator[None]:
    """Sockets the helpers below make are closed when the test ends."""
    yield
    while _SOCKETS:
        _SOCKETS.pop().close()


def tracked(sock: socket.socket) -> socket.socket:
    _SOCKETS.append(sock)
    return sock


@pytest.fixture
def uds(tmp_path: Path) -> Path:
    return tmp_path / "v.sock"


@pytest.fixture
def pair(uds: Path) -> Iterator[tuple[VhostUserVsockDevice, FakeDriver]]:
    with attached(uds, connect_timeout_s=1.0) as pair:
        yield pair


def host_listen(uds: Path, port: int) -> socket.socket:
    sock = tracked(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    sock.bind(f"{uds}_{port}")
    sock.listen(128)
    sock.settimeout(5)
    return sock


def start_host_connect(uds: Path, port: int) -> socket.socket:
    sock = tracked(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    sock.settimeout(5)
    sock.connect(str(uds))
    sock.sendall(b"CONNECT %d\n" % port)
    return sock


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            return line
        line += byte
    return line


def host_connection(
    uds: Path, fake: FakeDriver, port: int, guest_buf: int = BUF
) -> tuple[socket.socket, GuestConn]:
    """Host connects to guest ``port``; the fake guest accepts."""
    sock = start_host_connect(uds, port)
    (req,) = fake.recv(ops=[Op.REQUEST])
    conn = GuestConn(fake, port, req.src_port, guest_buf)
    conn.peer_buf_alloc, conn.peer_fwd_cnt = req.buf_alloc, req.fwd_cnt
    conn.control(Op.RESPONSE)
    line = read_line(sock)
    assert line == b"OK %d\n" % req.src_port
    return sock, conn


def guest_connection(
    uds: Path,
    fake: FakeDriver,
    port: int,
    guest_port: int = 1024,
    listener: socket.socket | None = None,
    buf_alloc: int = GUEST_BUF,
) -> tuple[socket.socket, GuestConn]:
    """The fake guest connects to host ``port``; the host accepts."""
    lst = listener or host_listen(uds, port)
    conn = GuestConn(fake, guest_port, port, buf_alloc)
    conn.control(Op.REQUEST)
    conn.wait(lambda: any(p.op == Op.RESPONSE for p in conn.packets))
    sock, _ = lst.accept()
    tracked(sock).settimeout(5)
    if listener is None:
        lst.close()
    return sock, conn


def used_idx(q: DriverQueue) -> int:
    """The used ring's index, as the device last wrote it."""
    return int.from_bytes(q.driver.read(q.used + 2, 2), "little")


def recv_all(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


# -- host-initiated ------------------------------------------------------------------------


def test_host_connect_sends_request_with_our_credit(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    _dev, fake = pair
    sock = start_host_connect(uds, 52)
    (req,) = fake.recv(ops=[Op.REQUEST])
    assert (req.src_cid, req.dst_cid, req.dst_port, req.type) == (HOST_CID, 3, 52, TYPE_STREAM)
    assert req.src_port >= 1 << 30
    assert req.buf_alloc == BUF
    assert (req.fwd_cnt, req.len) == (0, 0)
    fake.send(Op.RESPONSE, 52, req.src_port)
    assert read_line(sock) == b"OK %d\n" % req.src_port
    sock.close()


def test_host_connect_then_data_both_ways(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    _dev, fake = pair
    sock, conn = host_connection(uds, fake, 52)
    sock.sendall(b"ping from host")
    assert conn.recv_exactly(14) == b"ping from host"
    conn.send(b"pong from guest")
    assert recv_all(sock, 15) == b"pong from guest"
    sock.close()


def test_host_connect_to_port_nobody_listens_on_is_refused_promptly(uds: Path) -> None:
    # no connect timeout in reach: the refusal can only come from the guest's RST
    with attached(uds, connect_timeout_s=3600.0) as (dev, fake):
        _refused_by_rst(uds, dev, fake)


def _refused_by_rst(uds: Path, dev: VhostUserVsockDevice, fake: FakeDriver) -> None:
    result: list[BaseException] = []

    def client() -> None:
        try:
            connect_hybrid(uds, 99, timeout=5)
        except BaseException as err:
            result.append(err)

    thread = threading.Thread(target=client)
    thread.start()
    (req,) = fake.recv(ops=[Op.REQUEST])
    fake.send(Op.RST, 99, req.src_port)
    thread.join(5)
    assert len(result) == 1  # (waiting for an answer would raise TimeoutError)
    assert isinstance(result[0], ConnectionRefusedError)
    assert dev.connections == 0
    assert dev.stats.connections_refused == 1


def test_host_connect_times_out_when_guest_never_answers(uds: Path) -> None:
    with attached(uds, connect_timeout_s=0.3) as (dev, fake):
        sock = start_host_connect(uds, 52)
        (req,) = fake.recv(ops=[Op.REQUEST])
        assert sock.recv(10) == b""  # closed after the timeout, no OK
        (rst,) = fake.recv(ops=[Op.RST])
        assert (rst.src_port, rst.dst_port) == (req.src_port, 52)
        assert dev.connections == 0


def test_host_connect_waits_for_the_guest_driver(uds: Path) -> None:
    with attached(uds, setup=False) as (dev, fake):
        sock = start_host_connect(uds, 52)
        wait_until(lambda: dev.pending_handshakes == 0, "the device to take the request line")
        fake.setup()
        fake.post_rx()
        (req,) = fake.recv(ops=[Op.REQUEST])
        fake.send(Op.RESPONSE, 52, req.src_port)
        assert read_line(sock).startswith(b"OK ")


def test_host_data_sent_before_ok_reaches_the_guest_after_response(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    _dev, fake = pair
    sock = tracked(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    sock.settimeout(5)
    sock.connect(str(uds))
    sock.sendall(b"CONNECT 52\nearly bytes")
    (req,) = fake.recv(ops=[Op.REQUEST])
    conn = GuestConn(fake, 52, req.src_port)
    assert fake.expect_silence() == []  # nothing before the guest accepts
    conn.control(Op.RESPONSE)
    assert read_line(sock) == b"OK %d\n" % req.src_port
    assert conn.recv_exactly(11) == b"early bytes"


def test_response_for_an_established_connection_resets_it(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    _dev, fake = pair
    sock, conn = host_connection(uds, fake, 52)
    conn.control(Op.RESPONSE)
    conn.wait(lambda: conn.reset)
    assert recv_all(sock, 1) == b""


# -- guest-initiated -----------------------------------------------------------------------


def test_guest_connect_reaches_host_listener(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    _dev, fake = pair
    sock, conn = guest_connection(uds, fake, 7000)
    resp = next(p for p in conn.packets if p.op == Op.RESPONSE)
    assert (resp.src_cid, resp.dst_cid, resp.src_port, resp.dst_port) == (2, 3, 7000, 1024)
    conn.send(b"hello host")
    assert recv_all(sock, 10) == b"hello host"
    sock.sendall(b"hello guest")
    assert conn.recv_exactly(11) == b"hello guest"


def test_guest_connection_peer_address_names_the_guest_port(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    _dev, fake = pair
    lst = host_listen(uds, 7001)
    conns = [GuestConn(fake, guest_port, 7001) for guest_port in (5000, 5000 + 1, 4294967295)]
    ports = []
    for conn in conns:
        conn.control(Op.REQUEST)
        conn.wait(lambda c=conn: any(p.op == Op.RESPONSE for p in c.packets))
        sock, address = lst.accept()
        tracked(sock)
        ports.append(peer_port_from_address(address))
    lst.close()
    assert ports == [5000, 5001, 4294967295]
    assert peer_port_from_address("/some/path") is None
    assert peer_port_from_address(b"\0vzkit-vsock:3:x:1:1") is None


def test_guest_connect_to_port_without_listener_gets_rst(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    dev, fake = pair
    fake.send(Op.REQUEST, 1024, 7001)
    (rst,) = fake.recv(ops=[Op.RST, Op.RESPONSE])
    assert rst.op == Op.RST
    assert (rst.src_port, rst.dst_port) == (7001, 1024)
    assert dev.connections == 0


def test_duplicate_request_resets_the_connection(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    dev, fake = pair
    sock, conn = guest_connection(uds, fake, 7000)
    conn.control(Op.REQUEST)
    conn.wait(lambda: conn.reset)
    assert recv_all(sock, 1) == b""
    assert dev.connections == 0


def test_guest_rst_closes_the_host_stream(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    _dev, fake = pair
    sock, conn = host_connection(uds, fake, 52)
    conn.control(Op.RST)
    assert recv_all(sock, 1) == b""
    assert fake.expect_silence() == []  # no RST answers an RST


# -- bad packets ---------------------------------------------------------------------------


def test_rw_for_unknown_connection_gets_rst(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    dev, fake = pair
    fake.send(Op.RW, 1030, 52, b"data")
    (rst,) = fake.recv(ops=[Op.RST])
    assert (rst.src_port, rst.dst_port) == (52, 1030)
    assert dev.stats.dropped_packets == 1


def test_rst_for_unknown_connection_is_ignored(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    _dev, fake = pair
    fake.send(Op.RST, 1030, 52)
    fake.wait_tx_done()
    assert fake.expect_silence() == []


@pytest.mark.parametrize("op", [0, 8, 99, 0xFFFF])
def test_unknown_op_gets_rst(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver], op: int
) -> None:
    _dev, fake = pair
    sock, conn = guest_connection(uds, fake, 7000)
    fake.send(op, 1024, 7000)
    conn.wait(lambda: conn.reset)
    assert recv_all(sock, 1) == b""


def test_seqpacket_type_gets_rst(uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]) -> None:
    _dev, fake = pair
    host_listen(uds, 7000)
    fake.send(Op.REQUEST, 1024, 7000, type_=2)
    (rst,) = fake.recv(ops=[Op.RST, Op.RESPONSE])
    assert rst.op == Op.RST


@pytest.mark.parametrize(("src_cid", "dst_cid"), [(4, 2), (3, 3), (3, 1), (2, 2)])
def test_wrong_cids_are_dropped_silently(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver], src_cid: int, dst_cid: int
) -> None:
    dev, fake = pair
    lst = host_listen(uds, 7000)
    fake.send(Op.REQUEST, 1024, 7000, src_cid=src_cid, dst_cid=dst_cid)
    fake.wait_tx_done()
    assert dev.stats.dropped_packets == 1  # (before the barrier's probes, dropped too)
    assert fake.expect_silence() == []
    lst.setblocking(False)
    with pytest.raises(BlockingIOError):  # the device has acted on the REQUEST: no connect
        lst.accept()


def test_rw_longer_than_its_chain_is_dropped_and_resets(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    _dev, fake = pair
    sock, conn = guest_connection(uds, fake, 7000)
    fake.send(Op.RW, 1024, 7000, b"short", length=4096, buf_alloc=BUF)
    conn.wait(lambda: conn.reset)
    sock.settimeout(2)
    assert recv_all(sock, 1) == b""  # nothing of the bad packet was forwarded


def test_rw_over_64k_is_rejected(uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]) -> None:
    _dev, _fake = pair
    with attached(uds.with_name("w.sock"), buf_alloc=1 << 20) as (dev2, fake2):
        sock, conn = guest_connection(dev2.uds_path, fake2, 7000)
        conn.peer_buf_alloc = 1 << 20
        fake2.send(Op.RW, 1024, 7000, b"x" * (64 * 1024 + 1))
        conn.wait(lambda: conn.reset)
        assert recv_all(sock, 1) == b""


def test_short_packet_without_full_header_is_dropped(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    dev, fake = pair
    fake.tx.add(readable=[b"\x01" * 20])
    fake.wait_tx_done()
    assert dev.stats.dropped_packets == 1  # (before the barrier's probes, dropped too)
    assert fake.expect_silence() == []


def test_rw_before_connect_resets(uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]) -> None:
    _dev, fake = pair
    sock = start_host_connect(uds, 52)
    (req,) = fake.recv(ops=[Op.REQUEST])
    fake.send(Op.RW, 52, req.src_port, b"too early")
    (rst,) = fake.recv(ops=[Op.RST])
    assert rst.dst_port == 52
    assert recv_all(sock, 1) == b""


# -- credit --------------------------------------------------------------------------------


def test_device_never_exceeds_guest_credit_and_resumes_on_update(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    _dev, fake = pair
    sock, conn = host_connection(uds, fake, 52, guest_buf=16 * 1024)
    conn.reading = False  # the guest application stops reading
    sock.setblocking(False)
    sent = 0
    payload = os.urandom(1 << 20)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # flood until the host socket pushes back
        try:
            sent += sock.send(payload[sent % len(payload) :][: 64 * 1024])
        except BlockingIOError:
            fake.poll_rx()
            time.sleep(0.01)  # poll interval (the loop runs for its whole second)
    fake.poll_rx()
    assert len(conn.received) == 16 * 1024  # exactly the credit, not a byte more
    assert sent > len(conn.received)  # the rest waits in the host socket, not in the device
    assert any(p.op == Op.CREDIT_REQUEST for p in conn.packets)
    conn.reading = True
    conn.consume()
    conn.credit_update()
    conn.wait(lambda: len(conn.received) >= 32 * 1024)


def test_credit_request_is_answered_with_credit_update(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    _dev, fake = pair
    sock, conn = guest_connection(uds, fake, 7000)
    conn.send(b"x" * 1000)
    assert recv_all(sock, 1000) == b"x" * 1000
    conn.control(Op.CREDIT_REQUEST)
    conn.wait(lambda: any(p.op == Op.CREDIT_UPDATE for p in conn.packets))
    update = next(p for p in conn.packets if p.op == Op.CREDIT_UPDATE)
    assert update.buf_alloc == BUF
    assert update.fwd_cnt == 1000


def test_guest_exceeding_credit_is_reset(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    dev, fake = pair
    _sock, conn = guest_connection(uds, fake, 7000)
    chunk = b"y" * (64 * 1024)
    for _ in range(BUF // len(chunk) + 10):  # more than the credit plus what the socket absorbs
        fake.send(Op.RW, 1024, 7000, chunk)
    conn.wait(lambda: conn.reset)
    assert dev.stats.credit_violations == 1


def test_host_not_reading_bounds_device_memory_and_updates_follow_reads(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    dev, fake = pair
    sock, conn = guest_connection(uds, fake, 7000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data = os.urandom(2 << 20)
    sender = threading.Thread(target=conn.send, args=(data, 30.0))
    sender.start()

    def held_back() -> bool:  # out of credit, the host socket full, every packet taken in
        return (
            conn.credit() <= 0
            and dev.buffered_bytes > 0
            and used_idx(fake.tx) == fake.tx.avail_idx
            and used_idx(fake.rx) == fake.rx.last_used
        )

    wait_until(held_back, "the guest to be held back by credit")
    stuck, updates, rx = conn.tx_cnt, dev.stats.credit_updates_sent, used_idx(fake.rx)
    assert stuck < len(data)  # the guest is held back by credit
    fake.settle()  # the device had the chance to forward and grant more: it may not
    assert (dev.stats.credit_updates_sent, used_idx(fake.rx)) == (updates, rx)
    assert conn.tx_cnt == stuck  # and stays held back while the host does not read
    assert stuck - conn.peer_fwd_cnt <= BUF
    got = recv_all(sock, len(data))
    sender.join(10)
    assert got == data


def test_credit_update_when_host_drains(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    _dev, fake = pair
    sock, conn = guest_connection(uds, fake, 7000)
    data = os.urandom(BUF * 4)
    sender = threading.Thread(target=conn.send, args=(data,))
    sender.start()
    assert recv_all(sock, len(data)) == data
    sender.join(10)
    assert sum(p.op == Op.CREDIT_UPDATE for p in conn.packets) >= 4


@pytest.mark.parametrize("window", [4096, 16 * 1024, 100_000])
@pytest.mark.parametrize("slow_host", [False, True])
def test_guest_using_a_smaller_window_never_stalls(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver], window: int, slow_host: bool
) -> None:
    """Linux bounds its send window by its own buffer size: updates must not wait for more."""
    _dev, fake = pair
    sock, conn = guest_connection(uds, fake, 7000)
    conn.window = window
    data = os.urandom(1 << 20)
    sender = threading.Thread(target=conn.send, args=(data, 20.0, 8192))
    sender.start()
    if slow_host:  # everything the guest may send waits in the device first
        time.sleep(0.2)  # a slow host, not synchronisation: passes whatever the guest did
    assert recv_all(sock, len(data)) == data
    sender.join(20)
    assert not sender.is_alive()


@pytest.mark.parametrize(("window", "late_updates_needed"), [(4096, True), (100_000, False)])
def test_deferred_credit_updates_never_stall_a_smaller_window(
    uds: Path, window: int, late_updates_needed: bool
) -> None:
    """With ``update_delay_s`` the update owed at the end of a tx batch waits for the guest to
    go quiet; a guest out of credit goes quiet, so it is unblocked after the delay.

    Below the step (a quarter of the guest's 256 KiB buf_alloc) only late updates help: with a
    2 ms delay the guest gets through, and it needed them. At or above the step, the step
    updates alone must carry the stream: the late update is pushed out of the test's reach (an
    hour), so a guest that needed one stalls and the send times out. (Counting late updates
    under a 2 ms delay instead measured the scheduler: a guest thread descheduled for 2 ms
    on a loaded machine goes quiet, and a late update is then correct.)
    """
    delay = 0.002 if late_updates_needed else 3600.0
    # (tx interrupts at once: coalesced ones would make the guest go quiet now and then)
    with attached(
        uds, buf_alloc=1 << 20, credit_step=256 * 1024, update_delay_s=delay, tx_call_delay_s=0
    ) as (dev, fake):
        sock, conn = guest_connection(uds, fake, 7000)
        conn.window = window
        data = os.urandom(1 << 20)
        errors: list[BaseException] = []

        def send() -> None:
            try:
                conn.send(data, 20.0, 8192)
            except BaseException as err:  # reported below, not lost in the thread
                errors.append(err)

        sender = threading.Thread(target=send)
        sender.start()
        received = recv_all(sock, len(data))
        sender.join(30)
        assert not sender.is_alive()
        assert not errors, errors
        assert received == data
        assert (dev.stats.late_credit_updates > 0) == late_updates_needed


def test_deferred_credit_updates_follow_the_step_while_the_guest_streams(uds: Path) -> None:
    """A guest that keeps sending hears our fwd_cnt every ``credit_step`` bytes, not after
    every tx batch; the deferred update still tells it where the stream ended."""
    step = 128 * 1024
    with attached(uds, buf_alloc=1 << 20, credit_step=step, update_delay_s=0.2) as (_dev, fake):
        sock, conn = guest_connection(uds, fake, 7000, buf_alloc=1 << 20)
        data = os.urandom(2 << 20)
        reader = threading.Thread(target=lambda: recv_all(sock, len(data)))
        reader.start()
        for offset in range(0, len(data), 64 * 1024):  # one packet per tx batch
            conn.send(data[offset : offset + 64 * 1024], 20.0)
            fake.wait_tx_done()  # the device ended this batch before the next begins
        reader.join(20)
        conn.wait(lambda: conn.peer_fwd_cnt == len(data))
        updates = sum(p.op == Op.CREDIT_UPDATE for p in conn.packets)
        assert updates <= len(data) // step + 2  # not one per batch (32)


# -- shutdown ------------------------------------------------------------------------------


def test_guest_half_close_then_host_still_sends(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    _dev, fake = pair
    sock, conn = host_connection(uds, fake, 52)
    conn.send(b"request")
    conn.control(Op.SHUTDOWN, SHUTDOWN_SEND)
    assert recv_all(sock, 100) == b"request"  # then EOF
    sock.sendall(b"response")
    assert conn.recv_exactly(8) == b"response"
    sock.close()
    conn.wait(lambda: conn.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND)


def test_host_half_close_then_guest_still_sends(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    _dev, fake = pair
    sock, conn = guest_connection(uds, fake, 7000)
    sock.sendall(b"question")
    sock.shutdown(socket.SHUT_WR)
    conn.wait(lambda: conn.peer_shutdown & SHUTDOWN_SEND != 0)
    assert conn.peer_shutdown == SHUTDOWN_SEND  # half: the host still receives
    assert conn.recv_exactly(8) == b"question"
    conn.send(b"answer")
    assert recv_all(sock, 6) == b"answer"


def test_guest_full_shutdown_is_answered_with_rst(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    dev, fake = pair
    sock, conn = host_connection(uds, fake, 52)
    conn.send(b"bye")
    conn.control(Op.SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
    conn.wait(lambda: conn.reset)
    assert recv_all(sock, 100) == b"bye"
    assert dev.connections == 0


def test_host_close_sends_full_shutdown_and_guest_rst_ends_it(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    dev, fake = pair
    sock, conn = guest_connection(uds, fake, 7000)
    sock.sendall(b"last words")
    sock.close()
    conn.wait(lambda: conn.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND)
    assert bytes(conn.received) == b"last words"
    conn.control(Op.RST)
    deadline = time.monotonic() + 2
    while dev.connections and time.monotonic() < deadline:
        time.sleep(0.01)  # poll interval
    assert dev.connections == 0


def test_host_close_without_guest_rst_is_reset_after_timeout(uds: Path) -> None:
    with attached(uds) as (dev, fake):
        dev._muxer.close_timeout_s = 0.2
        sock, conn = guest_connection(uds, fake, 7000)
        sock.close()
        conn.wait(lambda: conn.reset, timeout=3)
        assert dev.connections == 0


def test_host_close_while_guest_sends_resets(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    _dev, fake = pair
    sock, conn = guest_connection(uds, fake, 7000)
    sock.close()
    conn.wait(lambda: conn.peer_shutdown != 0)
    fake.send(Op.RW, 1024, 7000, b"into the void")
    conn.wait(lambda: conn.reset)


# -- many connections ----------------------------------------------------------------------


def test_64_concurrent_connections_both_ways(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    dev, fake = pair
    lst = host_listen(uds, 7000)
    pairs = [guest_connection(uds, fake, 7000, 2000 + i, listener=lst) for i in range(32)]
    pairs += [host_connection(uds, fake, 52 + i) for i in range(32)]
    payloads = [os.urandom(20_000 + i) for i in range(64)]
    for (sock, _), data in zip(pairs, payloads, strict=True):
        sock.sendall(data)
    for (_, conn), data in zip(pairs, payloads, strict=True):
        conn.send(data[::-1])
    for (sock, conn), data in zip(pairs, payloads, strict=True):
        assert conn.recv_exactly(len(data)) == data
        assert recv_all(sock, len(data)) == data[::-1]
    assert dev.connections == 64


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_connect_close_churn_leaks_nothing(
    uds: Path, pair: tuple[VhostUserVsockDevice, FakeDriver]
) -> None:
    dev, fake = pair
    lst = host_listen(uds, 7000)
    threads = threading.active_count()
    fds = _open_fds()
    for i in range(500):  # guest-initiated: connect, one byte each way, full close
        sock, conn = guest_connection(uds, fake, 7000, 3000 + i, listener=lst)
        conn.send(b"g")
        assert sock.recv(1) == b"g"
        conn.control(Op.SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
        conn.wait(lambda conn=conn: conn.reset)  # type: ignore[misc]
        sock.close()
        conn.close()
    for _ in range(500):  # host-initiated: connect, close from the host, guest RSTs
        sock, conn = host_connection(uds, fake, 52)
        sock.close()
        conn.wait(lambda conn=conn: conn.peer_shutdown == 3)  # type: ignore[misc]
        conn.control(Op.RST)
        conn.close()
    deadline = time.monotonic() + 2
    while dev.connections and time.monotonic() < deadline:
        time.sleep(0.01)  # poll interval
    assert dev.connections == 0
    assert _open_fds() == fds
    assert threading.active_count() == threads
    assert dev.stats.connections_opened == dev.stats.connections_closed == 1000


# -- rx starvation -------------------------------------------------------------------------


def test_control_packets_wait_for_rx_buffers(uds: Path) -> None:
    with attached(uds, post_rx=False) as (_dev, fake):
        for i in range(10):
            fake.send(Op.RW, 1100 + i, 52, b"?")  # each earns an RST
        fake.wait_tx_done()
        assert fake.poll_rx() == []  # the tx was used (above): no rx buffer, no packet
        fake.post_rx(4)
        rsts = fake.recv(10, ops=[Op.RST])
        assert [p.dst_port for p in rsts] == [1100 + i for i in range(10)]


def test_tx_is_held_back_while_control_backlog_is_full(uds: Path) -> None:
    from vzkit.backends.qemu.vhost_vsock._sender import CTRL_LIMIT

    with attached(uds, post_rx=False) as (_dev, fake):
        for i in range(CTRL_LIMIT + 60):
            fake.send(Op.RW, 1100 + i % 60000, 52, b"?")
        wait_until(lambda: used_idx(fake.tx) >= CTRL_LIMIT, "the device to fill its backlog")
        fake.settle()  # it had the chance to take more
        assert used_idx(fake.tx) == CTRL_LIMIT  # the device stopped consuming tx
        assert len(fake.tx.chains) > 0
        fake.post_rx()
        got = len(fake.recv(CTRL_LIMIT + 60, ops=[Op.RST], timeout=20))
        fake.wait_tx_done()
        assert got == CTRL_LIMIT + 60


# -- tx interrupts -----------------------------------------------------------------------------


def _drain_tx_calls(fake: FakeDriver) -> None:
    """Forget what was used and interrupted so far. The device runs beside the test: wait
    until it has used every chain sent (a REQUEST it had not yet handed back showed up as an
    extra used entry in the next step under load), then take the interrupts pending."""
    fake.wait_tx_done(timeout=10.0)  # (re-arms used_event)
    while fake.tx.wait_call(0):
        pass


def test_tx_interrupts_wait_for_the_delay_when_nothing_goes_to_the_guest(uds: Path) -> None:
    """Consumed tx packets are handed back at once but interrupted for only after
    ``tx_call_delay_s`` when no rx interrupt goes out meanwhile; nothing is lost."""
    with attached(uds, tx_call_delay_s=1.0, update_delay_s=30) as (dev, fake):
        sock, _conn = guest_connection(uds, fake, 7000)
        _drain_tx_calls(fake)
        calls = dev.stats.calls_tx
        for i in range(3):
            fake.send(Op.RW, 1024, 7000, bytes([i]) * 100)
        assert recv_all(sock, 300) == b"\0" * 100 + b"\1" * 100 + b"\2" * 100
        assert not fake.tx.wait_call(0.3), "interrupted before the delay"
        assert dev.stats.calls_tx == calls
        assert fake.tx.wait_call(5.0), "never interrupted"
        assert dev.stats.calls_tx == calls + 1  # one interrupt for the three
        assert len(fake.tx.used_entries()) == 3
        assert not fake.tx.chains


def test_tx_interrupts_go_out_with_rx_interrupts_and_after_a_batch(uds: Path) -> None:
    with attached(uds, tx_call_delay_s=30, update_delay_s=30) as (dev, fake):
        sock, conn = guest_connection(uds, fake, 7000)
        _drain_tx_calls(fake)
        # an rx interrupt (the answer to a credit request) brings the tx one along
        conn.control(Op.CREDIT_REQUEST)
        assert fake.tx.wait_call(2.0)
        assert len(fake.tx.used_entries()) == 1
        # TX_CALL_BATCH consumed packets are interrupted for without waiting for the delay
        calls = dev.stats.calls_tx
        for _ in range(TX_CALL_BATCH):
            fake.send(Op.RW, 1024, 7000, b"z" * 10)
        assert recv_all(sock, 10 * TX_CALL_BATCH) == b"z" * 10 * TX_CALL_BATCH
        assert fake.tx.wait_call(2.0)
        assert dev.stats.calls_tx > calls
        fake.wait_tx_done(timeout=2.0)
