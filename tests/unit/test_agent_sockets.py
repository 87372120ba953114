"""Socket channels (CONNECT) and SET_CLOCK (protocol 2.3), run by the real agent on the host.

The agent serves a unix socket (``--unix``, its test mode: SET_CLOCK only reports the step it
would make, so the host's clock is never touched); the "guest" services are plain sockets on
the host's loopback, which the agent reaches as the guest's ``127.0.0.1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from vzkit.agent import AgentError
from vzkit.agent._connection import DEFAULT_WINDOW, _Connection
from vzkit.agent._protocol import ClockFlag, MsgType, SockProto

from .test_agent_serve import _connect, _serving, agent  # noqa: F401  (the agent fixture)
from .test_agent_serve import pytestmark as _linux_x86_64

pytestmark = _linux_x86_64
MB = 1024 * 1024


@pytest.fixture(scope="module")
def server(agent: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:  # noqa: F811
    path = tmp_path_factory.mktemp("agent") / "agent.sock"
    with _serving(agent, path, "serve", "--unix"):
        yield path


@contextlib.asynccontextmanager
async def _session(server: Path) -> AsyncIterator[_Connection]:
    conn = await _Connection.open(_connect(server), timeout=10, window=DEFAULT_WINDOW, resync=False)
    try:
        yield conn
    finally:
        await conn.aclose()


def _run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- TCP ----------------------------------------------------------------------------------------


def test_tcp_bytes_both_ways_and_half_close(server: Path) -> None:
    """The guest service reads to EOF (our SOCK_EOF is its FIN), answers, then closes: the
    answer arrives whole, then SOCK_EOF, then the channel ends with SOCK_CLOSE."""

    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read()  # to EOF: the half-close came through
            writer.write(b"got " + data)
            await writer.drain()
            writer.close()

        listener = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        async with listener, _session(server) as conn:
            chan = await conn.connect_socket(SockProto.TCP, port)
            await chan.write(b"hello ")
            await chan.write(b"guest")
            chan.write_eof()
            assert await chan.data.read() == b"got hello guest"
            await asyncio.wait_for(chan.result, 10)  # SOCK_CLOSE
            assert chan.done

    _run(main())


def test_tcp_guest_half_close_keeps_the_other_way_open(server: Path) -> None:
    """The guest shuts its writing first (SOCK_EOF to us) and still reads what we send."""

    async def main() -> None:
        got = asyncio.get_running_loop().create_future()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"banner")
            writer.write_eof()
            got.set_result(await reader.read())
            writer.close()

        listener = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        async with listener, _session(server) as conn:
            chan = await conn.connect_socket(SockProto.TCP, port)
            assert await chan.data.read() == b"banner"  # then EOF, the channel still open
            assert not chan.done
            await chan.write(b"after your EOF")
            chan.write_eof()
            assert await asyncio.wait_for(got, 10) == b"after your EOF"
            await asyncio.wait_for(chan.result, 10)

    _run(main())


def test_tcp_big_transfer_is_intact_both_ways(server: Path) -> None:
    """32 MiB each way at once (an echo service), through the windows of both directions."""
    size = 32 * MB
    blob = os.urandom(MB) * 32

    async def main() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while chunk := await reader.read(256 * 1024):
                writer.write(chunk)
                await writer.drain()
            writer.close()

        listener = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        async with listener, _session(server) as conn:
            chan = await conn.connect_socket(SockProto.TCP, port)

            async def send() -> None:
                for i in range(0, size, 1024 * 1024):
                    await chan.write(blob[i : i + 1024 * 1024])
                chan.write_eof()

            digest = hashlib.sha256()
            received = 0

            async def receive() -> None:
                nonlocal received
                while chunk := await chan.data.read(256 * 1024):
                    digest.update(chunk)
                    received += len(chunk)

            await asyncio.gather(send(), receive())
            assert received == size
            assert digest.hexdigest() == hashlib.sha256(blob).hexdigest()
            await asyncio.wait_for(chan.result, 10)

    _run(main())


def test_data_sent_before_the_connect_is_made_waits_in_the_agent(server: Path) -> None:
    """The host may send right after CONNECT (``wait=False``); the agent holds the data until
    the connection is made. To a refused port the data goes with the channel, and the session
    lives on."""

    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"got " + await reader.read())
            await writer.drain()
            writer.close()

        listener = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        async with listener, _session(server) as conn:
            chan = await conn.connect_socket(SockProto.TCP, port, wait=False)
            await chan.write(b"early")
            chan.write_eof()
            assert await chan.data.read() == b"got early"
            assert chan.connected.done()
            refused = await conn.connect_socket(SockProto.TCP, _free_port(), wait=False)
            with contextlib.suppress(BrokenPipeError):  # the refusal may come first
                await refused.write(b"nobody hears this")
            with pytest.raises(AgentError) as info:
                await asyncio.wait_for(asyncio.shield(refused.connected), 10)
            assert info.value.errno == errno.ECONNREFUSED
            assert (await conn.request(MsgType.PING, 5)).type == MsgType.PONG

    _run(main())


def test_tcp_refused_port_is_an_error_with_errno(server: Path) -> None:
    async def main() -> None:
        async with _session(server) as conn:
            with pytest.raises(AgentError) as info:
                await conn.connect_socket(SockProto.TCP, _free_port())
            assert info.value.errno == errno.ECONNREFUSED
            assert "Connection refused" in str(info.value)
            assert (await conn.request(MsgType.PING, 5)).type == MsgType.PONG  # session lives on

    _run(main())


def test_cancel_resets_the_guest_connection(server: Path) -> None:
    """A host connection that is abandoned (CANCEL) resets the guest's: it reads ECONNRESET,
    not a clean end of file that would pass for a complete request."""

    async def main() -> None:
        outcome = asyncio.get_running_loop().create_future()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                outcome.set_result(await reader.read())
            except ConnectionResetError:
                outcome.set_result("reset")
            writer.close()

        listener = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        async with listener, _session(server) as conn:
            chan = await conn.connect_socket(SockProto.TCP, port)
            await chan.write(b"partial")
            chan.cancel()
            assert await asyncio.wait_for(outcome, 10) == "reset"

    _run(main())


# ---- the guest address --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "code", "words"),
    [
        ("192.0.2.1", errno.EACCES, "not an address of this guest"),
        ("8.8.8.8", errno.EACCES, "not an address of this guest"),
        ("localhost", errno.EINVAL, "not an IPv4 address"),
        ("::1", errno.EINVAL, "not an IPv4 address"),
    ],
)
def test_only_loopback_and_the_guests_own_addresses(
    server: Path, address: str, code: int, words: str
) -> None:
    async def main() -> None:
        async with _session(server) as conn:
            with pytest.raises(AgentError) as info:
                await conn.connect_socket(SockProto.TCP, 80, address)
            assert info.value.errno == code
            assert words in str(info.value)

    _run(main())


def test_an_address_of_the_guests_own_interface_and_any_loopback(server: Path) -> None:
    """127.0.0.2 is loopback; the address of an interface of this "guest" (the host running
    the agent) is its own. Both are allowed (refused here only because nothing listens)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet: picks the address of the default route
            own = probe.getsockname()[0]
        except OSError:
            own = "127.0.0.1"
    port = _free_port()

    async def main() -> None:
        async with _session(server) as conn:
            for address in ("127.0.0.2", own):
                with pytest.raises(AgentError) as info:
                    await conn.connect_socket(SockProto.TCP, port, address)
                assert info.value.errno == errno.ECONNREFUSED, (address, info.value)

    _run(main())


# ---- UDP ----------------------------------------------------------------------------------------


def test_udp_datagrams_keep_their_boundaries_and_peers_stay_apart(server: Path) -> None:
    """An echo service answers each datagram to its sender: two channels (two host peers) get
    their own answers, each datagram whole (an empty one too, and a 60000-byte one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as service:
        service.bind(("127.0.0.1", 0))
        port = service.getsockname()[1]

        async def echo() -> None:
            loop = asyncio.get_running_loop()
            service.setblocking(False)
            while True:
                data, peer = await loop.sock_recvfrom(service, 65536)
                await loop.sock_sendto(service, peer[1].to_bytes(2, "big") + data, peer)

        async def main() -> None:
            server_task = asyncio.create_task(echo())
            try:
                async with _session(server) as conn:
                    a = await conn.connect_socket(SockProto.UDP, port)
                    b = await conn.connect_socket(SockProto.UDP, port)
                    sent = [b"one", b"", b"x" * 60000, b"two"]
                    for data in sent:
                        await a.send_datagram(data)
                        await b.send_datagram(b"b:" + data)
                    got_a = [await a.data.read_frame() for _ in sent]
                    got_b = [await b.data.read_frame() for _ in sent]
                    assert all(g is not None for g in got_a + got_b)
                    ports_a = {g[:2] for g in got_a if g is not None}
                    ports_b = {g[:2] for g in got_b if g is not None}
                    assert len(ports_a) == len(ports_b) == 1
                    assert ports_a != ports_b
                    assert [g[2:] for g in got_a if g is not None] == sent
                    assert [g[2:] for g in got_b if g is not None] == [b"b:" + d for d in sent]
            finally:
                server_task.cancel()

        _run(main())


def test_udp_to_a_closed_port_ends_the_channel_with_econnrefused(server: Path) -> None:
    async def main() -> None:
        async with _session(server) as conn:
            chan = await conn.connect_socket(SockProto.UDP, _free_port(socket.SOCK_DGRAM))
            await chan.send_datagram(b"anyone?")
            with pytest.raises(AgentError) as info:
                await asyncio.wait_for(chan.result, 10)
            assert info.value.errno == errno.ECONNREFUSED

    _run(main())


# ---- SET_CLOCK ----------------------------------------------------------------------------------


def test_set_clock_reports_the_step_and_leaves_the_host_clock_alone(server: Path) -> None:
    """Test mode (``--unix``) never sets the clock: the answer is flagged DRY_RUN."""

    async def main() -> None:
        async with _session(server) as conn:
            ahead = time.time_ns() + 3_600 * 10**9
            step = await conn.set_clock(ahead)
            assert step.flags == ClockFlag.DRY_RUN
            assert abs(step.step_ns - 3_600 * 10**9) < 2 * 10**9
            behind = await conn.set_clock(time.time_ns() - 90 * 10**9)
            assert abs(behind.step_ns + 90 * 10**9) < 2 * 10**9
            same = await conn.set_clock(time.time_ns())  # within the 500 ms default
            assert (same.step_ns, same.flags) == (0, ClockFlag.NONE)
            small = await conn.set_clock(time.time_ns() + 200 * 10**6, threshold_ms=50)
            assert small.flags == ClockFlag.DRY_RUN
            assert small.step_ns > 100 * 10**6
        assert abs(time.time_ns() - ahead + 3_600 * 10**9) < 60 * 10**9  # the host's clock

    _run(main())


def test_set_clock_dry_run_flag_outside_test_mode(agent: Path) -> None:  # noqa: F811
    """``--clock-dry-run`` is the switch itself (the test modes imply it)."""
    ours, theirs = socket.socketpair()
    import subprocess

    proc = subprocess.Popen([agent, "serve", "--stdio", "--clock-dry-run"], stdin=theirs,
                            stdout=theirs)  # fmt: skip
    theirs.close()

    async def main() -> None:
        conn = await _Connection.open(ours, timeout=10, window=DEFAULT_WINDOW, resync=False)
        try:
            step = await conn.set_clock(time.time_ns() + 10 * 10**9)
            assert step.flags == ClockFlag.DRY_RUN
        finally:
            await conn.aclose()

    try:
        _run(main())
    finally:
        proc.wait(10)
