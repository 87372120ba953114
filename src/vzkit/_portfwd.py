"""Published ports through the guest agent: the host side of ``-p`` wherever the machine's
network does not publish them itself (vz always; qemu without the ``nat`` network).

:class:`PortForwarder` (``core.ports``), one per VM core. Before the machine starts (or a
snapshot is restored into it), :meth:`~PortForwarder.open` binds every forward of
``config.publish`` that the machine does not serve (:class:`vzkit.backends.PortPublisher`): a
port that cannot be bound fails the start with a :class:`~vzkit.errors.VMError` naming it,
before anything runs. Once the run exists, :meth:`~PortForwarder.serve` accepts:

* **TCP**: each accepted connection becomes one agent channel (``CONNECT``, protocol 2.3) to
  the guest port on the guest's loopback; bytes are pumped both ways with the channel's flow
  control, a half-close passes through (``SOCK_EOF``), a reset or an abandoned connection
  resets the other side. The guest refusing (nothing listens) resets the host connection.
* **UDP**: each host peer (address, port) gets its own channel, so its own guest socket and
  source port, and the guest's answers go back to that peer only; every datagram keeps its
  boundaries (one frame each). A peer's session ends after :data:`UDP_IDLE_S` without a
  datagram either way, or when the guest refuses (ICMP port unreachable).

When the run ends (a stop, the guest's power-off, a crash: the core calls
:meth:`~PortForwarder.close_now` on the state change) or the core closes, every listening
socket, connection and channel is closed. Everything runs on vzkit's shared loop and needs
nothing of the backend but the agent link (``vsock_connect`` to the agent's port, or its
console port): nothing here blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from ._network import PortForward, PortProtocol
from ._state import VMState
from .agent._protocol import MAX_PAYLOAD, SockProto
from .errors import VMError, VzkitError

if TYPE_CHECKING:
    from ._vmcore import VMCore
    from .agent._channel import _SocketChannel

__all__ = ["UDP_IDLE_S", "PortForwarder"]

log = logging.getLogger("vzkit.ports")

#: How long a connection waits for the guest agent (early boot, a restore) before it is reset.
AGENT_WAIT_S = 120.0
#: Bound of the agent's connect to the guest port.
CONNECT_TIMEOUT_S = 15.0
#: A UDP peer's session (its guest socket) ends after this long without a datagram.
UDP_IDLE_S = 60.0
#: At most this many UDP peers per forward at once; datagrams of more peers are dropped.
UDP_MAX_SESSIONS = 256
#: Datagrams held per UDP peer while its channel opens or the agent's credit is short.
UDP_QUEUE = 256
#: Bytes read from a host connection at a time (four agent frames).
CHUNK = 4 * (MAX_PAYLOAD - 12)
_BACKLOG = 128
_LIVE = (VMState.RUNNING, VMState.PAUSED)


def bind_forward(fwd: PortForward) -> socket.socket:
    """A non-blocking socket bound to ``fwd``'s host address and port (listening for TCP);
    :class:`VMError` saying which port and what to do when it cannot be bound."""
    kind = socket.SOCK_STREAM if fwd.protocol is PortProtocol.TCP else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.setblocking(False)
        if kind == socket.SOCK_STREAM:  # a port in TIME_WAIT from the last run binds again
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((fwd.host_address, fwd.host_port))
        if kind == socket.SOCK_STREAM:
            sock.listen(_BACKLOG)
    except OSError as err:
        sock.close()
        raise VMError(
            f"cannot publish {fwd}: {fwd.host_address}:{fwd.host_port}/{fwd.protocol.value} "
            f"cannot be bound on the host ({err.strerror}); free that port, or publish "
            "another host port (-p OTHER:GUEST)"
        ) from err
    return sock


class PortForwarder:
    """The forwarded ports of one core's runs (see the module's doc)."""

    def __init__(self, core: VMCore) -> None:
        self._core = core
        self._bound: list[tuple[PortForward, socket.socket]] = []
        self._servers: list[asyncio.Server] = []
        self._udp: list[_UdpForward] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned: set[PortForward] = set()

    @property
    def forwards(self) -> tuple[PortForward, ...]:
        """The forwards bound now (served, or about to be)."""
        return tuple(fwd for fwd, _ in self._bound)

    def open(self, forwards: tuple[PortForward, ...]) -> None:
        """Bind every forward (listening sockets; nothing is accepted before :meth:`serve`).
        All or nothing: the first that fails closes the others and raises."""
        self.close_now()
        bound: list[tuple[PortForward, socket.socket]] = []
        try:
            for fwd in forwards:
                bound.append((fwd, bind_forward(fwd)))
        except BaseException:
            for _, sock in bound:
                sock.close()
            raise
        self._bound = bound
        self._warned.clear()

    async def serve(self) -> None:
        """Start accepting on the bound sockets (the run exists now)."""
        loop = asyncio.get_running_loop()
        for fwd, sock in self._bound:
            if fwd.protocol is PortProtocol.TCP:

                async def accepted(
                    reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter,
                    fwd: PortForward = fwd,
                ) -> None:
                    # the connection runs as a task of its own that close_now() cancels; this
                    # one (asyncio's) ends normally then, which its done-callback expects
                    await asyncio.wait([self.spawn(self._tcp(fwd, reader, writer))])

                server = await asyncio.start_server(accepted, sock=sock, backlog=_BACKLOG)
                self._servers.append(server)
            else:
                forward = _UdpForward(self, fwd)
                await loop.create_datagram_endpoint(forward.itself, sock=sock)
                self._udp.append(forward)
        if self._bound:
            log.info("forwarding %s through the guest agent", ", ".join(map(str, self.forwards)))

    def close_now(self) -> None:
        """Close every socket and cancel every connection (their cleanup runs on the loop)."""
        bound, self._bound = self._bound, []
        servers, self._servers = self._servers, []
        udp, self._udp = self._udp, []
        for server in servers:
            server.close()
        for forward in udp:
            forward.close()
        for _, sock in bound:
            sock.close()  # a socket a server or transport owns is closed twice: harmless
        for task in list(self._tasks):
            task.cancel()

    async def aclose(self) -> None:
        """:meth:`close_now`, then wait until every connection has cleaned up."""
        self.close_now()
        tasks = list(self._tasks)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a connection's task, which :meth:`close_now` cancels."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- a channel to the guest --------------------------------------------------------------

    async def channel(self, fwd: PortForward, *, wait: bool = True) -> _SocketChannel | None:
        """A connected channel to ``fwd``'s guest port; ``None`` (logged) when there is none:
        the guest refused, or its agent cannot be reached. ``wait=False``: as soon as CONNECT
        is sent (``channel.connected`` tells the rest)."""
        proto = SockProto.TCP if fwd.protocol is PortProtocol.TCP else SockProto.UDP
        try:
            conn = await self._core.agent.connection(AGENT_WAIT_S)
        except (VzkitError, OSError) as err:
            if self._core.closed or self._core.state not in _LIVE:  # the run is ending
                log.debug("%s: the VM is %s: %s", fwd, self._core.state.value, err)
            elif fwd not in self._warned:
                self._warned.add(fwd)
                log.warning(
                    "cannot forward %s: the guest agent cannot be reached (%s); publishing "
                    "ports here goes through vzkit-agent in the guest, which the default "
                    "guest runs (with another kernel/initramfs, use the nat network on qemu)",
                    fwd,
                    err,
                )
            return None
        try:
            return await conn.connect_socket(
                proto, fwd.guest_port, timeout=CONNECT_TIMEOUT_S, wait=wait
            )
        except (VzkitError, OSError) as err:
            log.info("%s: %s", fwd, err)  # e.g. nothing listens on the guest port yet
            return None

    # -- TCP ---------------------------------------------------------------------------------

    async def _tcp(
        self, fwd: PortForward, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        chan: _SocketChannel | None = None
        upward: asyncio.Task[None] | None = None
        try:
            chan = await self.channel(fwd, wait=False)
            if chan is None:
                _reset(writer)  # the host client sees a reset, as it would from the guest
                return
            # the client's first bytes go with the connect (the agent holds them until it is
            # made): one round trip to the guest less before an answer
            upward = asyncio.get_running_loop().create_task(_host_to_guest(reader, chan))
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await asyncio.shield(chan.connected)
            except (VzkitError, TimeoutError) as err:
                log.info("%s: %s", fwd, err)  # e.g. nothing listens on the guest port yet
                _reset(writer)
                return
            while data := await chan.data.read(CHUNK):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()  # the guest's half-close, passed on
            await upward
            await chan.result  # SOCK_CLOSE: both ways done
        except (VzkitError, OSError) as err:
            log.debug("%s: connection ended: %s", fwd, err)
            _reset(writer)
        finally:
            if upward is not None:
                upward.cancel()
            if chan is not None:
                chan.cancel()  # a channel still open is reset in the guest
            writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort a host connection with a reset (RST), not a clean end of file."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _host_to_guest(reader: asyncio.StreamReader, chan: _SocketChannel) -> None:
    try:
        while data := await reader.read(CHUNK):
            await chan.write(data)
        chan.write_eof()
    except (OSError, VzkitError):  # the host client reset, or the channel ended
        chan.cancel()


# -- UDP -------------------------------------------------------------------------------------


class _UdpForward(asyncio.DatagramProtocol):
    """One published UDP port: a session (a guest socket) per host peer."""

    def __init__(self, owner: PortForwarder, fwd: PortForward) -> None:
        self.owner, self.fwd = owner, fwd
        self.transport: asyncio.DatagramTransport | None = None
        self.sessions: dict[tuple[str, int], _UdpSession] = {}

    def itself(self) -> _UdpForward:
        """The protocol factory ``create_datagram_endpoint`` calls."""
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        session = self.sessions.get(addr)
        if session is None:
            if len(self.sessions) >= UDP_MAX_SESSIONS:
                log.debug("%s: too many peers, dropping a datagram from %s", self.fwd, addr)
                return
            session = self.sessions[addr] = _UdpSession(self, addr)
            self.owner.spawn(session.run())
        session.push(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.sessions.clear()


class _UdpSession:
    def __init__(self, forward: _UdpForward, peer: tuple[str, int]) -> None:
        self.forward, self.peer = forward, peer
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(UDP_QUEUE)
        self.last = time.monotonic()

    def push(self, data: bytes) -> None:
        self.last = time.monotonic()
        with contextlib.suppress(asyncio.QueueFull):  # a network drops too
            self.queue.put_nowait(data)

    async def run(self) -> None:
        chan = await self.forward.owner.channel(self.forward.fwd)
        try:
            if chan is None:
                return
            tasks = [asyncio.create_task(self._up(chan)), asyncio.create_task(self._down(chan))]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            if chan is not None:
                chan.cancel()
            if self.forward.sessions.get(self.peer) is self:
                del self.forward.sessions[self.peer]

    async def _up(self, chan: _SocketChannel) -> None:
        while True:
            left = self.last + UDP_IDLE_S - time.monotonic()
            if left <= 0:
                log.debug("%s: UDP peer %s idle, session closed", self.forward.fwd, self.peer)
                return
            try:
                data = await asyncio.wait_for(self.queue.get(), left)
            except TimeoutError:
                continue
            try:
                await chan.send_datagram(data)
            except (OSError, VzkitError, ValueError):
                return

    async def _down(self, chan: _SocketChannel) -> None:
        try:
            while (data := await chan.data.read_frame()) is not None:
                self.last = time.monotonic()
                transport = self.forward.transport
                if transport is not None and not transport.is_closing():
                    transport.sendto(data, self.peer)
        except (VzkitError, OSError) as err:
            log.debug("%s: UDP peer %s: %s", self.forward.fwd, self.peer, err)
