"""Resource limits of the vhost-user-vsock device against a hostile guest.

A guest must not be able to kill the device (and with it the agent channel) or make it hoard
host memory: resource errors fail one connection, the connection cap counts every connection
that holds a socket and buffers and sits below the descriptor limit, and a byte budget bounds
the credit (so the buffers) of all connections together. The abuse test runs the helper
process under ``RLIMIT_NOFILE=128``. No timing assertions: waits are polls with deadlines.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vzkit.backends.qemu.vhost_vsock import _vsock as vsock_module
from vzkit.backends.qemu.vhost_vsock import helper_argv, peer_port_from_address
from vzkit.backends.qemu.vhost_vsock._device import FD_RESERVE
from vzkit.backends.qemu.vhost_vsock._packet import SHUTDOWN_RCV, SHUTDOWN_SEND, Op

from ..support.vhost_vsock.fakedriver import FakeDriver
from ..support.vhost_vsock.fakeguest import GuestConn, attached

BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND
GUEST_BUF = 256 * 1024
CHUNK = 64 * 1024
DEADLINE_S = 30.0  # generous: the suite must hold on a loaded 2-core machine


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)  # poll interval


def answered(conn: GuestConn) -> bool:
    return conn.reset or any(p.op == Op.RESPONSE for p in conn.packets)


def established(conn: GuestConn) -> bool:
    return not conn.reset and any(p.op == Op.RESPONSE for p in conn.packets)


def pump_until(fake: FakeDriver, predicate: Callable[[], bool], what: str) -> None:
    """Process the device's packets until ``predicate`` holds."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        fake.poll_rx()
        if predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        fake.rx.wait_call(0.02)


def send_credit(conn: GuestConn, limit: int) -> int:
    """Send what the device's credit allows now (at most ``limit``), without waiting."""
    room = min(conn.credit(), limit)
    sent = 0
    while sent < room:
        n = min(CHUNK, room - sent)
        conn.driver.send(Op.RW, conn.guest_port, conn.host_port, os.urandom(n),
                         buf_alloc=conn.buf_alloc, fwd_cnt=conn.consumed)  # fmt: skip
        conn.tx_cnt = (conn.tx_cnt + n) & 0xFFFFFFFF
        sent += n
    return sent


def unread(sock: socket.socket) -> int:
    buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


def peer_gone(sock: socket.socket) -> bool:
    """Whether the device closed (or shut down writing on) its end of a host stream."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    return bool(poller.poll(0))


def listener(path: str) -> socket.socket:
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(4096)
    lst.setblocking(False)
    return lst


def accept_all(lst: socket.socket) -> dict[int, socket.socket]:
    """Accept every pending stream, keyed by the guest port the device encodes in its name."""
    out: dict[int, socket.socket] = {}
    while True:
        try:
            sock, address = lst.accept()
        except BlockingIOError:
            return out
        port = peer_port_from_address(address)
        if port is None:
            sock.close()
            continue
        out[port] = sock


def exchange_both_ways(uds: Path, fake: FakeDriver, port: int, guest_port: int) -> None:
    """A normal guest-initiated and host-initiated connection, bytes both ways on each."""
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(f"{uds}_{port}")
    lst.listen()
    lst.settimeout(DEADLINE_S)
    try:
        conn = GuestConn(fake, guest_port, port)
        conn.control(Op.REQUEST)
        conn.wait(lambda: answered(conn), DEADLINE_S)
        assert established(conn), "the device refused a normal guest connection"
        host, _ = lst.accept()
        with host:
            host.settimeout(DEADLINE_S)
            conn.send(b"ping from the guest", DEADLINE_S)
            assert host.recv(64) == b"ping from the guest"
            host.sendall(b"pong from the host")
            assert conn.recv_exactly(18, DEADLINE_S) == b"pong from the host"
        conn.control(Op.RST)
        conn.close()
    finally:
        lst.close()
        os.unlink(f"{uds}_{port}")
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with client:
        client.settimeout(DEADLINE_S)
        client.connect(str(uds))
        client.sendall(b"CONNECT 5000\n")
        (req,) = fake.recv(ops=[Op.REQUEST], timeout=DEADLINE_S)
        gconn = GuestConn(fake, 5000, req.src_port)
        gconn.peer_buf_alloc, gconn.peer_fwd_cnt = req.buf_alloc, req.fwd_cnt
        gconn.control(Op.RESPONSE)
        line = b""
        while not line.endswith(b"\n"):
            byte = client.recv(1)
            assert byte, "the device closed a normal host connection"
            line += byte
        assert line == b"OK %d\n" % req.src_port
        client.sendall(b"host to guest")
        assert gconn.recv_exactly(13, DEADLINE_S) == b"host to guest"
        gconn.send(b"guest to host", DEADLINE_S)
        got = b""
        while len(got) < 13:
            chunk = client.recv(13 - len(got))
            assert chunk
            got += chunk
        assert got == b"guest to host"
        gconn.control(Op.RST)
        gconn.close()


# -- resource errors fail one connection -----------------------------------------------------


class _FailingSocketModule:
    """The ``socket`` module as ``_vsock`` sees it, with ``socket()`` failing ``times`` times."""

    def __init__(self, err: int, times: int = 1) -> None:
        self.err = err
        self.times = times

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)

    def socket(self, *args: Any, **kwargs: Any) -> socket.socket:
        if self.times:
            self.times -= 1
            raise OSError(self.err, os.strerror(self.err))
        return socket.socket(*args, **kwargs)


@pytest.mark.parametrize("err", [errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS])
def test_a_host_socket_that_cannot_be_made_fails_one_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    uds = tmp_path / "v.sock"
    lst = listener(f"{uds}_7000")
    with lst, attached(uds, poll_interval_s=0.05) as (dev, fake):
        monkeypatch.setattr(vsock_module, "socket", _FailingSocketModule(err, times=3))
        conns = [GuestConn(fake, 2000 + i, 7000) for i in range(3)]
        for conn in conns:
            conn.control(Op.REQUEST)
        pump_until(fake, lambda: all(c.reset for c in conns), "RST for each failed connection")
        assert dev.stats.resource_errors == 3
        assert dev.open_connections == 0
        monkeypatch.undo()
        lst.close()
        os.unlink(f"{uds}_7000")
        exchange_both_ways(uds, fake, 7001, 3000)  # the device kept serving


def test_a_host_socket_that_cannot_be_watched_fails_one_connection(tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    lst = listener(f"{uds}_7000")
    with lst, attached(uds) as (dev, fake):
        reactor = dev._reactor
        real_register = reactor.register
        failures = [errno.ENOSPC]  # epoll out of watches (max_user_watches)

        def register(fd: int, mask: int, callback: Callable[[int], None]) -> None:
            if failures:
                raise OSError(failures.pop(), "injected")
            real_register(fd, mask, callback)

        reactor.register = register  # type: ignore[method-assign]
        conn = GuestConn(fake, 2000, 7000)
        conn.control(Op.REQUEST)
        pump_until(fake, lambda: conn.reset, "RST")
        assert dev.stats.resource_errors == 1
        assert dev.open_connections == 0
        exchange_both_ways(uds, fake, 7001, 3000)


# -- the cap counts lingering connections ----------------------------------------------------


def test_connections_draining_after_shutdown_count_against_the_cap(tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    lst = listener(f"{uds}_7000")
    with lst, attached(uds, max_connections=4) as (dev, fake):
        assert dev.max_connections == 4
        hosts: dict[int, socket.socket] = {}
        for i in range(4):  # each leaves bytes its host has not read, then shuts down
            conn = GuestConn(fake, 2000 + i, 7000)
            conn.control(Op.REQUEST)
            pump_until(fake, lambda c=conn: answered(c), "an answer")
            assert established(conn)
            hosts.update(accept_all(lst))
            conn.send(os.urandom(768 * 1024))  # more than the host socket takes unread
            conn.control(Op.SHUTDOWN, BOTH)
            pump_until(fake, lambda c=conn: c.reset, "the RST ending the shutdown")
        assert dev.connections == 0
        assert dev.open_connections == 4  # all four still hold their bytes
        assert dev.buffered_bytes > 0
        late = GuestConn(fake, 3000, 7000)
        late.control(Op.REQUEST)
        pump_until(fake, lambda: answered(late), "an answer")
        assert late.reset, "a fifth connection got past the cap of 4"
        for sock in hosts.values():  # the hosts read: the drained connections close
            sock.close()
        wait_for(lambda: dev.open_connections == 0, "the drained connections to close")
        assert dev.buffered_bytes == 0
        exchange_both_ways(uds, fake, 7001, 4000)


# -- the byte budget ---------------------------------------------------------------------------


def test_byte_budget_bounds_credit_and_buffers_and_every_byte_arrives(tmp_path: Path) -> None:
    """Twelve guest connections to hosts that do not read: together they get no more credit
    than the budget (one MiB), so the device holds no more; once the hosts read, connections
    that waited for credit get it and every byte arrives in order."""
    uds = tmp_path / "v.sock"
    budget = 1 << 20
    lst = listener(f"{uds}_7000")
    with lst, attached(uds, byte_budget=budget, connect_timeout_s=DEADLINE_S) as (dev, fake):
        conns = [GuestConn(fake, 2000 + i, 7000, GUEST_BUF) for i in range(12)]
        for conn in conns:  # one by one: the first ones take the budget, the later ones wait
            conn.control(Op.REQUEST)
            pump_until(fake, lambda c=conn: answered(c), "an answer")
        assert all(established(c) for c in conns)
        hosts = accept_all(lst)
        assert sorted(hosts) == [c.guest_port for c in conns]
        total = 512 * 1024
        payload = {c.guest_port: os.urandom(total) for c in conns}
        sent = dict.fromkeys(payload, 0)
        received = {port: bytearray() for port in payload}

        def exposure() -> int:
            """Credit the guest holds plus what the device holds: seen from outside."""
            held = 0
            for c in conns:
                limit = c.peer_fwd_cnt + c.peer_buf_alloc  # what the guest may send up to
                reached = len(received[c.guest_port]) + unread(hosts[c.guest_port])
                held += max(0, limit - reached)
            return held

        def step(read: bool) -> None:
            fake.poll_rx()
            for c in conns:
                port = c.guest_port
                data = payload[port]
                room = min(c.credit(), total - sent[port])
                while room > 0:
                    n = min(CHUNK, room)
                    fake.send(Op.RW, port, 7000, data[sent[port] : sent[port] + n],
                              buf_alloc=c.buf_alloc, fwd_cnt=c.consumed)  # fmt: skip
                    c.tx_cnt += n
                    sent[port] += n
                    room -= n
            fake.wait_tx_done(DEADLINE_S)
            fake.poll_rx()
            assert dev.committed_bytes <= budget
            assert dev.buffered_bytes <= budget
            assert exposure() <= budget, "the guest was granted more than the budget"
            if read:
                for port, sock in hosts.items():
                    sock.setblocking(False)
                    try:
                        received[port] += sock.recv(1 << 20)
                    except BlockingIOError:
                        pass

        for _ in range(5):  # hosts not reading: the budget holds however the guest pushes
            step(read=False)
        deadline = time.monotonic() + DEADLINE_S * 2
        while any(len(received[p]) < total for p in payload):
            assert time.monotonic() < deadline, "a connection starved"
            step(read=True)
            fake.rx.wait_call(0.01)
        for port, data in payload.items():
            assert bytes(received[port]) == data
        assert dev.stats.budget_waits > 0  # connections did wait for budget
        for c in conns:
            c.control(Op.SHUTDOWN, BOTH)
        wait_for(lambda: dev.open_connections == 0, "the connections to close")
        assert dev.committed_bytes == 0
        for sock in hosts.values():
            sock.close()


def test_with_the_budget_spent_new_connections_are_refused_until_one_closes(
    tmp_path: Path,
) -> None:
    """Every connection reserves a floor of credit (so none starves): once the budget cannot
    cover another floor, guest and host connections are refused, and admitted again when a
    connection closes."""
    uds = tmp_path / "v.sock"
    budget = 128 * 1024  # a 32 KiB floor each, half the budget for more than the floor
    lst = listener(f"{uds}_7000")
    with lst, attached(uds, byte_budget=budget) as (dev, fake):
        conns: list[GuestConn] = []
        for i in range(16):
            conn = GuestConn(fake, 2000 + i, 7000, GUEST_BUF)
            conn.control(Op.REQUEST)
            pump_until(fake, lambda c=conn: answered(c), "an answer")
            conns.append(conn)
            assert dev.committed_bytes <= budget
            if conn.reset:
                break
        admitted = [c for c in conns if established(c)]
        assert conns[-1].reset, "connections kept being admitted past the budget"
        assert 2 <= len(admitted) <= budget // (32 * 1024)
        assert all(c.credit() > 0 for c in admitted)  # none admitted without credit
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with client:  # the host side is refused too: the stream closes without OK
            client.settimeout(DEADLINE_S)
            client.connect(str(uds))
            client.sendall(b"CONNECT 5000\n")
            assert client.recv(16) == b""
        admitted[0].control(Op.RST)
        wait_for(lambda: dev.open_connections == len(admitted) - 1, "the reset to land")
        again = GuestConn(fake, 3000, 7000, GUEST_BUF)
        again.control(Op.REQUEST)
        pump_until(fake, lambda: answered(again), "an answer")
        assert established(again)
        for sock in accept_all(lst).values():
            sock.close()


# -- the helper process under RLIMIT_NOFILE=128 --------------------------------------------------

_LIMITED = (
    "import resource, sys\n"
    "soft, hard = int(sys.argv.pop(1)), int(sys.argv.pop(1))\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))\n"
    "from vzkit.backends.qemu.vhost_vsock._helper import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
NOFILE = 128
BUDGET = 4 << 20


class LimitedHelper:
    """The helper process with a given descriptor limit, a fake driver attached."""

    def __init__(self, tmp_path: Path, soft: int, hard: int, extra: tuple[str, ...] = ()) -> None:
        self.uds = tmp_path / "v.sock"
        self.log_path = tmp_path / "helper.log"
        ours, theirs = socket.socketpair()
        ready_r, ready_w = os.pipe()
        args = helper_argv(self.uds, fd=theirs.fileno(), ready_fd=ready_w)[3:]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _LIMITED, str(soft), str(hard), *args, *extra],
                pass_fds=(theirs.fileno(), ready_w),
                stderr=log,
            )
        theirs.close()
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            assert ready.read() == b"READY\n", self.log()
        self.fake = FakeDriver(ours)
        self.fake.setup()
        self.fake.post_rx()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.fake.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[LimitedHelper]:
    helper = LimitedHelper(tmp_path, NOFILE, NOFILE, ("--byte-budget", str(BUDGET)))
    try:
        yield helper
    finally:
        helper.close()


def test_helper_raises_its_descriptor_limit_to_the_hard_limit(tmp_path: Path) -> None:
    helper = LimitedHelper(tmp_path, 128, 256)
    try:
        limits = Path(f"/proc/{helper.proc.pid}/limits").read_text()
        (line,) = [x for x in limits.splitlines() if x.startswith("Max open files")]
        assert line.split()[3:5] == ["256", "256"], line
    finally:
        helper.close()


def test_guest_abuse_under_a_128_descriptor_limit_neither_kills_nor_bloats_the_helper(
    limited: LimitedHelper,
) -> None:
    """Thousands of REQUEST/SHUTDOWN/RST cycles from the guest, to ports nobody listens on,
    with bytes the host never reads, half-open, plus host handshakes left hanging: the helper
    keeps its descriptors below the limit and its buffers within the budget, serves a normal
    connection afterwards, and holds nothing more than before once the abuse ends."""
    helper, fake, uds = limited, limited.fake, limited.uds
    baseline = helper.fds()
    lst = listener(f"{uds}_7000")
    hanging = []  # host streams that never send their CONNECT line
    for _ in range(16):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(uds))
        hanging.append(sock)
    hosts: dict[int, socket.socket] = {}
    hoarders: dict[int, tuple[GuestConn, int, int]] = {}  # guest port -> conn, sent, round
    half_open: dict[int, tuple[GuestConn, int]] = {}
    next_port = 10_000
    requests = max_fds = max_held = 0
    problems: list[str] = []

    def drop(port: int) -> None:
        sock = hosts.pop(port, None)
        if sock is not None:
            sock.close()

    def sample(pushed: dict[GuestConn, int]) -> None:
        nonlocal max_fds, max_held
        max_fds = max(max_fds, helper.fds())
        held = 0  # of the bytes sent to hosts that do not read, what the helper still holds
        streams = [(c, n) for c, n, _ in hoarders.values()] + list(pushed.items())
        for conn, sent in streams:
            sock = hosts.get(conn.guest_port)
            if sock is not None and not peer_gone(sock):
                held += max(0, sent - unread(sock))
        max_held = max(max_held, held)

    def abuse_round(round_: int) -> None:
        nonlocal next_port, requests
        for port, (conn, _, born) in list(hoarders.items()):
            if round_ - born >= 3:  # the host finally goes away: the device lets go
                del hoarders[port]
                conn.close()
                drop(port)
        for port, (conn, born) in list(half_open.items()):
            if round_ - born >= 3:
                del half_open[port]
                conn.control(Op.RST)
                conn.close()
                drop(port)
        batch = []
        for i in range(48):
            next_port += 1
            host_port = 7000 if i % 6 else 8000 + i  # nobody listens on 8000 + i
            conn = GuestConn(fake, next_port, host_port, GUEST_BUF)
            conn.control(Op.REQUEST)
            batch.append(conn)
        requests += len(batch)
        pump_until(fake, lambda: all(answered(c) for c in batch), "answers")
        hosts.update(accept_all(lst))
        pushing = {c: 0 for c in batch if established(c) and c.guest_port % 4 == 0}
        for _ in range(64):  # bytes the host never reads, as long as credit comes back
            moved = 0
            for conn in pushing:
                n = send_credit(conn, (2 << 20) - pushing[conn])
                pushing[conn] += n
                moved += n
            if not moved:
                break
            fake.wait_tx_done(DEADLINE_S)
            fake.poll_rx()
            sample(pushing)
        for conn in batch:
            fate = conn.guest_port % 4
            if not established(conn):
                conn.close()
            elif fate == 0:  # then a full shutdown: the device drains to a host that never
                conn.control(Op.SHUTDOWN, BOTH)  # reads (until it goes away)
                hoarders[conn.guest_port] = (conn, pushing[conn], round_)
            elif fate == 1:
                conn.control(Op.RST)
                conn.close()
                drop(conn.guest_port)
            elif fate == 2:  # half-closed, left open
                conn.control(Op.SHUTDOWN, SHUTDOWN_SEND)
                half_open[conn.guest_port] = (conn, round_)
            else:
                conn.control(Op.SHUTDOWN, BOTH)
                conn.close()
                drop(conn.guest_port)
        fake.wait_tx_done(DEADLINE_S)
        fake.poll_rx()
        fake.inbox.clear()
        sample({})

    try:
        for round_ in range(60):
            try:
                abuse_round(round_)
            except TimeoutError as err:
                problems.append(f"round {round_}: {err}")
                break
            if not helper.alive():
                break
        if not helper.alive():
            problems.append(f"the helper died after {requests} requests:\n{helper.log()}")
        else:
            for conn, _ in half_open.values():
                conn.control(Op.RST)
            for conn, _, _ in hoarders.values():
                conn.close()
            for sock in [*hosts.values(), *hanging]:
                sock.close()
            hosts.clear()
            fake.wait_tx_done(DEADLINE_S)
            try:
                wait_for(lambda: helper.fds() <= baseline, "the helper to let go of every fd")
            except TimeoutError:
                problems.append(f"{helper.fds()} descriptors left open, {baseline} before")
            try:
                exchange_both_ways(uds, fake, 7001, 60_000)
            except (TimeoutError, AssertionError, OSError) as err:
                problems.append(f"no normal connection after the abuse: {err!r}")
            else:
                try:
                    wait_for(lambda: helper.fds() == baseline, "the normal connections to close")
                except TimeoutError:
                    problems.append(f"{helper.fds()} descriptors open after a normal connection "
                                    f"closed, {baseline} before")  # fmt: skip
    finally:
        lst.close()
        for sock in [*hosts.values(), *hanging]:
            sock.close()
    if requests < 2500:
        problems.append(f"the abuse stopped after {requests} requests")
    # The cap leaves FD_RESERVE free below the limit, counted when the device was made; since
    # then it opened its listener and ring eventfds, and one turned-away stream may be in passing.
    if max_fds > NOFILE - FD_RESERVE + 16:
        problems.append(f"{max_fds} descriptors open under a limit of {NOFILE}")
    if max_held > BUDGET:
        problems.append(f"the helper held {max_held} bytes; the budget is {BUDGET}")
    assert not problems, "\n".join(problems)
