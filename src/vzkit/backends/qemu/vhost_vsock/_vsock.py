"""virtio-vsock stream connections between guest sockets and host Unix sockets.

:class:`VsockMuxer` consumes the guest's tx queue (packets from the guest) and fills its rx
queue (packets to the guest), keyed by ``(host port, guest port)``. Each :class:`Conn` pairs a
guest stream with one host Unix stream (see :mod:`._hybrid`) and runs the virtio 1.2 state
machine with credit flow control both ways:

* guest -> host: we advertise ``buf_alloc`` and ``fwd_cnt`` (bytes written to the host socket).
  Bytes the host socket does not take at once wait in ``Conn.out``, which credit bounds by
  ``buf_alloc`` (:data:`BUF_ALLOC`); a guest that sends beyond its credit is reset. A credit
  update goes out every ``credit_step`` bytes forwarded (:data:`CREDIT_STEP`, at most a
  quarter of either side's buffer), and, once everything received has been forwarded, when the
  guest has sent nothing for ``update_delay_s`` (:data:`UPDATE_DELAY_S`; 0: at the end of each
  tx batch) and no packet to it carried the new ``fwd_cnt`` — for a guest that bounds its
  window below ours. Every update is a packet the guest's vCPU must take in.
* host -> guest: we read the host socket only while the guest's credit
  (``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)``) is positive and an rx buffer is free, straight
  into guest memory, so a guest that does not read holds the host writer back through the
  socket's own buffer, and host memory stays bounded.

Limits (a guest must not be able to kill the device or make it hoard memory):

* at most ``max_connections`` connections hold a host socket and buffers at once, counting
  those that linger after the guest's ``SHUTDOWN`` until their bytes reached the host (the
  device derives the cap from its descriptor limit, see :func:`._device.connection_cap`);
* the credit granted to the guest, summed over all connections, stays within
  ``byte_budget`` (:data:`BYTE_BUDGET`): a connection's ``buf_alloc`` is what the budget
  allows, up to ``buf_alloc`` (:meth:`VsockMuxer._grant`). What the device buffers is at most
  what it granted, so the budget bounds it. Credit once given is never taken back (Linux 6.1
  computes credit in unsigned arithmetic: a limit below what it has in flight would wrap).
  Each connection reserves a floor of credit when admitted, so none starves (with the budget
  spent, new connections are refused); one short of credit beyond that hears a credit update
  when budget is freed;
* a host socket that cannot be made, connected or watched (``EMFILE``, ``ENFILE``,
  ``ENOMEM``, ``ENOBUFS``, any ``OSError``) fails that one connection with ``RST``.

Host -> guest data is never buffered (it goes from the socket into guest memory), so the
budget is enforced on the credit the device grants rather than on reading host sockets.

Shutdown: the guest's ``SHUTDOWN`` flags map to ``shutdown(2)`` on the host stream; host EOF
maps to ``SHUTDOWN(SEND)`` (half-close) or, when the host closed its end entirely (epoll
hang-up), ``SHUTDOWN(RCV|SEND)``; a full shutdown from either side ends with ``RST``.
Malformed packets and packets for unknown connections are dropped or answered with ``RST``,
counted in :class:`VsockStats` and logged (the first few of each kind at WARNING).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import socket
from collections.abc import Callable
from pathlib import Path

from ._conn import Conn, ConnState, VsockStats
from ._hybrid import guest_port_path, peer_address
from ._packet import (
    HEADER,
    HEADER_SIZE,
    HOST_CID,
    MAX_PAYLOAD,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    Op,
)
from ._reactor import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Reactor
from ._virtqueue import Chain, ChainError, RingError, Virtqueue, gather, scatter

__all__ = [
    "BUF_ALLOC",
    "BYTE_BUDGET",
    "CREDIT_STEP",
    "CTRL_LIMIT",
    "MAX_CONNECTIONS",
    "UPDATE_DELAY_S",
    "VsockMuxer",
]

log = logging.getLogger(__name__)

_U32 = 0xFFFFFFFF
_SHUT_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND
#: Control packets waiting for rx buffers before the tx queue is left alone (backpressure).
CTRL_LIMIT = 1024
_READ_BURST = 16
_TX_BATCH = 256
_LOCAL_PORT_BASE = 1 << 30
#: Forwarded bytes after which the guest hears our new fwd_cnt. Guests may use less than our
#: buf_alloc (Linux bounds its window by its own buffer size), so this must not depend on it.
BUF_ALLOC = 1024 * 1024  # the receive buffer we advertise per connection
CREDIT_STEP = 256 * 1024
UPDATE_DELAY_S = 0.005
#: Credit granted to the guest (so bytes the device may have to hold for host sockets that do
#: not read), all connections of one VM together.
BYTE_BUDGET = 64 * 1024 * 1024
#: Connections at once when the descriptor limit does not bound them lower.
MAX_CONNECTIONS = 4096
#: Credit reserved for every connection, so that its window reopens whatever the others hold.
CREDIT_FLOOR = 32 * 1024
_WAKE_MIN = 4096  # budget freed before connections short of credit hear about it
_WARN_FIRST = 10
#: errno values of a host socket that could not be made for want of resources.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS,
                              errno.EAGAIN, errno.ENOSPC})  # fmt: skip


# A control packet waiting for an rx buffer: op, flags, host port, guest port, connection.
_Ctrl = tuple[Op, int, int, int, "Conn | None"]


class VsockMuxer:
    def __init__(
        self,
        reactor: Reactor,
        *,
        guest_cid: int,
        uds_path: Path,
        buf_alloc: int = BUF_ALLOC,
        connect_timeout_s: float = 5.0,
        close_timeout_s: float = 5.0,
        max_connections: int = MAX_CONNECTIONS,
        byte_budget: int = BYTE_BUDGET,
        credit_step: int = CREDIT_STEP,
        update_delay_s: float = UPDATE_DELAY_S,
    ) -> None:
        self._reactor = reactor
        self.credit_step = credit_step
        self.update_delay_s = update_delay_s
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.buf_alloc = buf_alloc
        self.connect_timeout_s = connect_timeout_s
        self.close_timeout_s = close_timeout_s
        self.max_connections = max_connections
        self.byte_budget = byte_budget
        #: Credit every connection holds at least (reserved at admission: none starves).
        self.credit_floor = min(CREDIT_FLOOR, buf_alloc, byte_budget // 4)
        self.stats = VsockStats()
        self.rxq: Virtqueue | None = None
        self.txq: Virtqueue | None = None
        self.online = False  # a front-end is attached: host connections may wait for the guest
        self._conns: dict[tuple[int, int], Conn] = {}
        self._local_ports: set[int] = set()
        self._next_port = _LOCAL_PORT_BASE
        self._ctrl: collections.deque[_Ctrl] = collections.deque()
        self._parked: dict[Conn, None] = {}
        self._lingering: dict[Conn, None] = {}
        self._touched: dict[Conn, None] = {}  # received data in the current tx batch
        self._committed = 0  # sum of Conn.granted: credit given and not yet known to be used up
        self._starved: dict[Conn, None] = {}  # granted less than they want for want of budget
        self._tx_throttled = False
        self.tx_more = False  # on_tx_ready stopped early with packets left: call it again
        self._warned: collections.Counter[str] = collections.Counter()
        self._peer_serial = 0
        #: Other descriptors that count against ``max_connections`` (pending host handshakes).
        self.other_fds: Callable[[], int] = lambda: 0

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def open_connections(self) -> int:
        """Connections holding a host socket and buffers: live ones and lingering ones."""
        return len(self._conns) + len(self._lingering)

    @property
    def buffered_bytes(self) -> int:
        """Guest bytes held for host sockets that have not taken them yet."""
        return sum(len(c.out) for c in [*self._conns.values(), *self._lingering])

    @property
    def committed_bytes(self) -> int:
        """Credit granted and not known to be used up: the bound on :attr:`buffered_bytes`."""
        return self._committed

    def _warn(self, kind: str, message: str, *args: object) -> None:
        self._warned[kind] += 1
        level = logging.WARNING if self._warned[kind] <= _WARN_FIRST else logging.DEBUG
        log.log(level, "vsock: " + message, *args)

    # -- lifecycle -------------------------------------------------------------------------

    def reset_all(self, reason: str) -> None:
        """Drop every connection without telling the guest (its driver is gone or reset)."""
        if self._conns:
            log.info("vsock: closing %d connections: %s", len(self._conns), reason)
        for conn in list(self._conns.values()):
            self._close(conn, rst=False)
        self._ctrl.clear()
        self._parked.clear()
        self._tx_throttled = False

    def close(self) -> None:
        self.reset_all("device closed")
        for conn in list(self._lingering):
            self._end_linger(conn)

    # -- ring events -----------------------------------------------------------------------

    def on_rx_ready(self) -> None:
        """The guest made rx buffers available (or the rx ring started)."""
        self._flush_ctrl()
        if self._tx_throttled and len(self._ctrl) < CTRL_LIMIT:
            self.on_tx_ready()

    def flush(self) -> None:
        """Send what waits for rx buffers, if there are any (end of each loop iteration)."""
        if self._starved:
            self._wake_starved()
        if self._ctrl:
            self._flush_ctrl()
            if self._tx_throttled and len(self._ctrl) < CTRL_LIMIT:
                self.on_tx_ready()

    def on_tx_ready(self) -> None:
        """The guest made tx packets available (or the tx ring started)."""
        self.tx_more = False
        txq = self.txq
        if txq is None:
            return
        done = 0
        while True:
            if len(self._ctrl) >= CTRL_LIMIT:
                self._flush_ctrl()
                if len(self._ctrl) >= CTRL_LIMIT:
                    self._tx_throttled = True  # resumed by on_rx_ready
                    break
            self._tx_throttled = False
            if done >= _TX_BATCH:
                self.tx_more = True  # let other events in; the device calls again at once
                break
            try:
                chain = txq.pop()
            except ChainError as err:
                self._bad_chain(txq, err)
                continue
            except RingError as err:
                self._warn("ring", "%s", err)
                break
            if chain is None:
                if txq.arm_kick():
                    continue
                break
            try:
                self._on_packet(chain)
            finally:
                txq.push(chain.head, 0)
            done += 1
        touched, self._touched = self._touched, {}
        delay = self.update_delay_s
        for conn in touched:  # the guest may be waiting for credit: tell it what went through
            if not conn.closed and not conn.out and conn.fwd_cnt != conn.last_fwd_sent:
                if delay <= 0:
                    self._queue_update(conn)
                else:  # once the guest has sent nothing for `delay` (it may be out of credit)
                    if conn.update_timer is not None:
                        conn.update_timer.cancel()
                    conn.update_timer = self._reactor.call_later(
                        delay, functools.partial(self._late_update, conn)
                    )
        self._flush_ctrl()

    def _late_update(self, conn: Conn) -> None:
        conn.update_timer = None
        if not conn.closed and not conn.out and conn.fwd_cnt != conn.last_fwd_sent:
            self.stats.late_credit_updates += 1
            self._queue_update(conn)
            self._flush_ctrl()

    def _bad_chain(self, vq: Virtqueue, err: ChainError) -> None:
        self.stats.bad_chains += 1
        self._warn("chain", "dropped a malformed descriptor chain: %s", err)
        if err.head is not None:
            vq.push(err.head, 0)

    # -- packets from the guest ------------------------------------------------------------

    def _on_packet(self, chain: Chain) -> None:
        stats = self.stats
        stats.packets_from_guest += 1
        if chain.readable_len < HEADER_SIZE:
            stats.dropped_packets += 1
            self._warn("short", "dropped a %d-byte packet (no header)", chain.readable_len)
            return
        first = chain.readable[0]
        raw = first if len(first) >= HEADER_SIZE else b"".join(gather(chain.readable, 0, 44))
        (src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc,
         fwd_cnt) = HEADER.unpack_from(raw)  # fmt: skip
        if src_cid != self.guest_cid or dst_cid != HOST_CID:
            stats.dropped_packets += 1
            self._warn("cid", "dropped a packet from cid %d to cid %d", src_cid, dst_cid)
            return
        key = (dst_port, src_port)
        conn = self._conns.get(key)
        if type_ != TYPE_STREAM or op > Op.CREDIT_REQUEST or op == Op.INVALID:
            stats.dropped_packets += 1
            self._warn("op", "unsupported packet type %d op %d; resetting", type_, op)
            if op != Op.RST:
                self._reset_key(key, conn)
            return
        if op == Op.RW and (length > MAX_PAYLOAD or HEADER_SIZE + length > chain.readable_len):
            stats.dropped_packets += 1
            self._warn("len", "RW packet claims %d bytes, chain holds %d; resetting", length,
                       chain.readable_len - HEADER_SIZE)  # fmt: skip
            self._reset_key(key, conn)
            return
        if conn is None:
            if op == Op.REQUEST:
                self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            elif op != Op.RST:  # also normal: packets in flight when a connection closed
                stats.dropped_packets += 1
                log.debug("vsock: %s for unknown connection %s; resetting", Op(op).name, key)
                self._queue_rst(dst_port, src_port)
            return
        conn.peer_buf_alloc = buf_alloc
        conn.peer_fwd_cnt = fwd_cnt
        if conn.credit_requested and conn.peer_credit() > 0:
            conn.credit_requested = False
        if op == Op.RW:
            self._from_guest(conn, chain, length)
        elif op == Op.CREDIT_REQUEST:
            self._queue_update(conn)
        elif op == Op.CREDIT_UPDATE:
            self.stats.credit_updates_received += 1
        elif op == Op.RESPONSE:
            self._on_response(conn)
        elif op == Op.SHUTDOWN:
            self._on_shutdown(conn, flags & _SHUT_BOTH)
        elif op == Op.RST:
            if conn.state is ConnState.CONNECTING:
                self.stats.connections_refused += 1
            self._close(conn, rst=False)
        elif op == Op.REQUEST:
            self._warn("dup", "REQUEST for existing connection %s; resetting", key)
            self._reset(conn)
        if not conn.closed:
            self._update(conn)

    def _reset_key(self, key: tuple[int, int], conn: Conn | None) -> None:
        if conn is not None:
            self._reset(conn)
        else:
            self._queue_rst(*key)

    def _guest_connect(self, host_port: int, guest_port: int, buf_alloc: int, fwd: int) -> None:
        full = self._full()
        if full is not None:
            self._warn("limit", "%s; refusing guest port %d", full, guest_port)
            self.stats.connections_refused += 1
            self._queue_rst(host_port, guest_port)
            return
        path = guest_port_path(self.uds_path, host_port)
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as err:  # EMFILE, ENFILE, ENOMEM, ENOBUFS: this connection fails
            self._refuse_guest(host_port, guest_port, err)
            return
        self._peer_serial += 1
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):  # the listener learns the guest port from it
                sock.bind(peer_address(self.guest_cid, guest_port, self._peer_serial))
            sock.connect(path)
        except OSError as err:
            sock.close()
            self._refuse_guest(host_port, guest_port, err)
            return
        conn = Conn(sock, host_port, guest_port, ConnState.ESTABLISHED, host_initiated=False,
                    buf_alloc=self.buf_alloc)  # fmt: skip
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd
        self._admit(conn)
        self._conns[conn.key] = conn
        self.stats.connections_opened += 1
        log.debug("vsock: guest port %d connected to %s", guest_port, path)
        self._queue(Op.RESPONSE, 0, conn)
        self._update(conn)

    def _refuse_guest(self, host_port: int, guest_port: int, err: OSError) -> None:
        self.stats.connections_refused += 1
        if err.errno in _RESOURCE_ERRNOS:
            self.stats.resource_errors += 1
            self._warn("resource", "cannot connect guest port %d to host port %d: %s",
                       guest_port, host_port, err)  # fmt: skip
        else:
            log.debug("vsock: guest connection to host port %d refused: %s", host_port, err)
        self._queue_rst(host_port, guest_port)

    def _on_response(self, conn: Conn) -> None:
        if conn.state is not ConnState.CONNECTING:
            self._warn("resp", "unexpected RESPONSE on %r; resetting", conn)
            self._reset(conn)
            return
        conn.state = ConnState.ESTABLISHED
        if conn.timer is not None:
            conn.timer.cancel()
        ok = b"OK %d\n" % conn.host_port
        conn.out[:0] = ok
        conn.out_uncounted += len(ok)
        self._flush_out(conn)

    def _on_shutdown(self, conn: Conn, flags: int) -> None:
        conn.guest_shut |= flags
        if conn.guest_shut == _SHUT_BOTH or conn.state is ConnState.CLOSING:
            self._queue_rst(*conn.key)  # the peer completes a full shutdown with RST
            if conn.out and not conn.hup:
                self._linger(conn)
            else:
                self._close(conn, rst=False)
            return
        if flags & SHUTDOWN_RCV:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RD)
        if flags & SHUTDOWN_SEND:
            if conn.out:
                conn.shut_wr_pending = True
            else:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_WR)

    def _from_guest(self, conn: Conn, chain: Chain, length: int) -> None:
        if length == 0:
            return
        if conn.state is not ConnState.ESTABLISHED or conn.guest_shut & SHUTDOWN_SEND:
            self._warn("rw", "data on %r after shutdown or before connect; resetting", conn)
            self._reset(conn)
            return
        if conn.rx_cnt + length > conn.limit:  # beyond the credit we advertised
            self.stats.credit_violations += 1
            self._warn("credit", "guest exceeded its credit on %r; resetting", conn)
            self._reset(conn)
            return
        conn.rx_cnt += length
        self._touched[conn] = None
        self.stats.bytes_from_guest += length
        views = gather(chain.readable, HEADER_SIZE, length)
        sent = 0
        if not conn.out:
            try:
                sent = conn.sock.sendmsg(views)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as err:
                log.debug("vsock: host side of %r failed: %s", conn, err)
                self._reset(conn)
                return
            conn.fwd_cnt += sent
        if sent < length:
            rest = gather(views, sent, length - sent)
            try:
                for view in rest:
                    conn.out += view
            except MemoryError:
                self.stats.resource_errors += 1
                self._warn("resource", "out of memory buffering %r; resetting", conn)
                self._reset(conn)
                return
        self._maybe_update(conn)

    # -- host socket events ----------------------------------------------------------------

    def _update(self, conn: Conn) -> None:
        """Set the epoll interest of a connection's host socket from its state."""
        if conn.closed:
            return
        mask = (EPOLLIN if conn.wants_read() else 0) | (EPOLLOUT if conn.out else 0)
        if not mask and not conn.hup and conn.state is not ConnState.CONNECTING:
            mask = EPOLLHUP  # only hang-ups: learn when the host closes its end
        try:
            self._reactor.register(conn.fd, mask, functools.partial(self._on_host_event, conn))
        except OSError as err:  # epoll out of memory (ENOMEM) or of watches (ENOSPC)
            self.stats.resource_errors += 1
            self._warn("resource", "cannot watch %r: %s; resetting", conn, err)
            self._reset(conn)

    def _on_host_event(self, conn: Conn, mask: int) -> None:
        if mask & (EPOLLHUP | EPOLLERR):
            conn.hup = True
        if conn.out and mask & (EPOLLOUT | EPOLLHUP | EPOLLERR):
            self._flush_out(conn)
        if conn.closed:
            return
        if conn.wants_read() and mask & (EPOLLIN | EPOLLHUP | EPOLLERR):
            self._read_host(conn)
        elif conn.hup and conn.host_eof and conn.state is ConnState.ESTABLISHED:
            self._host_closed(conn)  # closed entirely after an earlier half-close
        self._update(conn)

    def _flush_out(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.debug("vsock: host side of %r failed: %s", conn, err)
            if conn in self._lingering:
                self._end_linger(conn)
            else:
                self._reset(conn)
            return
        del conn.out[:sent]
        counted = max(0, sent - conn.out_uncounted)
        conn.out_uncounted = max(0, conn.out_uncounted - sent)
        conn.fwd_cnt += counted
        if conn in self._lingering:
            if not conn.out:
                self._end_linger(conn)
            return
        if not conn.out and conn.shut_wr_pending:
            conn.shut_wr_pending = False
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        if not conn.out and conn.fwd_cnt != conn.last_fwd_sent:
            self._queue_update(conn)  # all caught up: the guest may be waiting for this
            self._flush_ctrl()
        else:
            self._maybe_update(conn)

    def _read_host(self, conn: Conn) -> None:
        for _ in range(_READ_BURST):
            if self._ctrl and not self._flush_ctrl():
                self._park(conn)
                return
            credit = conn.peer_credit()
            if credit <= 0:
                if not conn.credit_requested:
                    conn.credit_requested = True
                    self._queue(Op.CREDIT_REQUEST, 0, conn)
                return
            rxq = self.rxq
            chain = self._pop_rx() if rxq is not None else None
            if rxq is None or chain is None:
                self._park(conn)
                return
            room = chain.writable_len - HEADER_SIZE
            views = gather(chain.writable, HEADER_SIZE, min(credit, room, MAX_PAYLOAD))
            try:
                n = conn.sock.recvmsg_into(views)[0]
            except (BlockingIOError, InterruptedError):
                rxq.unpop()
                return
            except OSError as err:
                rxq.unpop()
                log.debug("vsock: host side of %r failed: %s", conn, err)
                self._reset(conn)
                return
            finally:
                for view in views:
                    view.release()
            if n == 0:
                rxq.unpop()
                conn.host_eof = True
                if conn.hup:
                    self._host_closed(conn)
                else:
                    self._queue(Op.SHUTDOWN, SHUTDOWN_SEND, conn)
                return
            self._write_header(chain, Op.RW, 0, conn.host_port, conn.guest_port, n, conn)
            rxq.push(chain.head, HEADER_SIZE + n)
            conn.tx_cnt = (conn.tx_cnt + n) & _U32
            self.stats.bytes_to_guest += n

    def _host_closed(self, conn: Conn) -> None:
        """The host closed its stream entirely: tell the guest, wait for its RST."""
        conn.host_eof = True
        conn.out.clear()
        conn.out_uncounted = 0
        conn.state = ConnState.CLOSING
        self._queue(Op.SHUTDOWN, _SHUT_BOTH, conn)
        conn.timer = self._reactor.call_later(
            self.close_timeout_s, functools.partial(self._close_timeout, conn)
        )

    def _close_timeout(self, conn: Conn) -> None:
        if not conn.closed:
            log.debug("vsock: no RST for %r in time; resetting", conn)
            self._reset(conn)

    # -- host-initiated connections ---------------------------------------------------------

    def host_connect(self, sock: socket.socket, port: int) -> None:
        """A host stream asked for guest ``port`` (its request line already consumed)."""
        why = "no guest attached" if not self.online else self._full()
        if why is not None:
            log.debug("vsock: refusing host connection to port %d: %s", port, why)
            self.stats.connections_refused += 1
            sock.close()
            return
        local = self._alloc_port(port)
        conn = Conn(sock, local, port, ConnState.CONNECTING, host_initiated=True,
                    buf_alloc=self.buf_alloc)  # fmt: skip
        self._admit(conn)
        self._conns[conn.key] = conn
        self._local_ports.add(local)
        self.stats.connections_opened += 1
        conn.timer = self._reactor.call_later(
            self.connect_timeout_s, functools.partial(self._connect_timeout, conn)
        )
        self._queue(Op.REQUEST, 0, conn)
        self._flush_ctrl()

    def _alloc_port(self, guest_port: int) -> int:
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < _U32 - 1 else _LOCAL_PORT_BASE
            if port not in self._local_ports and (port, guest_port) not in self._conns:
                return port

    def _connect_timeout(self, conn: Conn) -> None:
        if not conn.closed and conn.state is ConnState.CONNECTING:
            log.debug("vsock: guest port %d did not answer in %.1f s", conn.guest_port,
                     self.connect_timeout_s)  # fmt: skip
            self.stats.connections_refused += 1
            self._reset(conn)

    # -- closing ---------------------------------------------------------------------------

    def _reset(self, conn: Conn) -> None:
        self._close(conn, rst=True)

    def _close(self, conn: Conn, *, rst: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        if rst:
            self._queue_rst(*conn.key)
        self._forget(conn)
        self._release(conn)
        self._reactor.unregister(conn.fd)
        conn.sock.close()
        self.stats.connections_closed += 1

    def _release(self, conn: Conn) -> None:
        """The connection holds nothing any more: its share of the budget goes back."""
        self._committed -= conn.granted
        conn.granted = 0
        self._starved.pop(conn, None)

    def _forget(self, conn: Conn) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
        if conn.update_timer is not None:
            conn.update_timer.cancel()
            conn.update_timer = None
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        if conn.host_initiated:
            self._local_ports.discard(conn.host_port)
        self._parked.pop(conn, None)

    def _linger(self, conn: Conn) -> None:
        """The guest is done, but the host has not taken all its bytes yet: drain, then close."""
        conn.closed = True
        self._forget(conn)
        self._lingering[conn] = None  # still counted against the cap and the budget
        try:
            self._reactor.register(conn.fd, EPOLLOUT, functools.partial(self._on_host_event, conn))
        except OSError as err:
            self.stats.resource_errors += 1
            self._warn("resource", "cannot watch %r: %s; dropping it", conn, err)
            self._end_linger(conn)
            return
        conn.timer = self._reactor.call_later(
            self.close_timeout_s, functools.partial(self._end_linger, conn)
        )

    def _end_linger(self, conn: Conn) -> None:
        if conn not in self._lingering:
            return
        del self._lingering[conn]
        if conn.timer is not None:
            conn.timer.cancel()
        self._release(conn)
        self._reactor.unregister(conn.fd)
        conn.sock.close()
        self.stats.connections_closed += 1

    # -- packets to the guest --------------------------------------------------------------

    def _queue(self, op: Op, flags: int, conn: Conn) -> None:
        self._ctrl.append((op, flags, conn.host_port, conn.guest_port, conn))

    def _queue_rst(self, host_port: int, guest_port: int) -> None:
        self._ctrl.append((Op.RST, 0, host_port, guest_port, None))

    def _queue_update(self, conn: Conn) -> None:
        if not conn.update_queued:
            conn.update_queued = True
            self._queue(Op.CREDIT_UPDATE, 0, conn)

    def _maybe_update(self, conn: Conn) -> None:
        # A quarter of either buffer at most: Linux may bound its window by its own buffer.
        step = min(self.credit_step, conn.buf_alloc // 4, conn.peer_buf_alloc // 4 or _U32,
                   conn.granted // 4 or 1)  # fmt: skip
        if conn.fwd_cnt - conn.last_fwd_sent >= step:
            self._queue_update(conn)
            self._flush_ctrl()

    def _pop_rx(self) -> Chain | None:
        rxq = self.rxq
        while rxq is not None:
            try:
                chain = rxq.pop()
            except ChainError as err:
                self._bad_chain(rxq, err)
                continue
            except RingError as err:
                self._warn("ring", "%s", err)
                return None
            if chain is None:
                if rxq.arm_kick():
                    continue
                return None
            if chain.writable_len <= HEADER_SIZE or chain.readable:
                self.stats.bad_chains += 1
                self._warn("rxbuf", "rx buffer of %d writable bytes (%d readable) is unusable",
                           chain.writable_len, chain.readable_len)  # fmt: skip
                rxq.push(chain.head, 0)
                continue
            return chain
        return None

    def _write_header(
        self, chain: Chain, op: Op, flags: int, host_port: int, guest_port: int, length: int,
        conn: Conn | None,
    ) -> None:  # fmt: skip
        if conn is not None:
            fwd = conn.fwd_cnt
            buf_alloc = conn.granted
            if buf_alloc == conn.buf_alloc and (
                (len(self._conns) + len(self._lingering)) * buf_alloc <= self.byte_budget // 2
            ):  # the budget does not bind: the full window again (what _grant would give)
                conn.limit = fwd + buf_alloc
            else:
                buf_alloc = self._grant(conn, fwd)
            conn.last_fwd_sent = fwd
            fwd &= _U32
        else:
            buf_alloc = fwd = 0
        header = HEADER.pack(HOST_CID, self.guest_cid, host_port, guest_port, length,
                             TYPE_STREAM, op, flags, buf_alloc, fwd)  # fmt: skip
        scatter(chain.writable, 0, header)
        self.stats.packets_to_guest += 1

    def _grant(self, conn: Conn, fwd: int) -> int:
        """The ``buf_alloc`` to advertise with ``fwd``: what the byte budget allows.

        The guest may send until its ``tx_cnt`` reaches ``fwd + buf_alloc``. That limit never
        goes down (credit once given may be in flight already), so a connection keeps what it
        was given and has not used. Every connection holds a floor (:attr:`credit_floor`,
        reserved when it is admitted), so its window reopens once its bytes reached the host:
        none starves. Beyond the floor, credit comes from half the budget, up to ``buf_alloc``
        and a fair share of that half; the sum of the shares (:attr:`committed_bytes`) never
        exceeds the budget, and what the device buffers for a connection never exceeds its
        share.
        """
        old = conn.granted
        budget, floor = self.byte_budget, self.credit_floor
        holders = len(self._conns) + len(self._lingering)
        target = min(conn.buf_alloc, max(floor, budget // 2 // max(1, holders)))
        free = budget - self._committed + old
        extra_free = budget // 2 - (self._committed - old - floor * (holders - 1))
        grant = max(min(target, free, floor + extra_free), conn.limit - fwd)
        if grant < target:
            self.stats.budget_waits += 1
            self._starved[conn] = None
        self._committed += grant - old
        conn.granted = grant
        conn.limit = fwd + grant
        return grant

    def _admit(self, conn: Conn) -> None:
        """Reserve a new connection's floor of credit (the caller checked it is free)."""
        conn.granted = self.credit_floor
        self._committed += self.credit_floor

    def _full(self) -> str | None:
        """Why no connection can be admitted now, if none can."""
        if self.open_connections + self.other_fds() >= self.max_connections:
            return f"{self.open_connections} connections and {self.other_fds()} handshakes open"
        if self.byte_budget - self._committed < self.credit_floor:
            return f"the {self.byte_budget}-byte budget is granted"
        return None

    def _wake_starved(self) -> None:
        """Budget was freed: connections short of credit hear what they may have now."""
        holders = self.open_connections
        free = self.byte_budget - self._committed
        extra_free = self.byte_budget // 2 - (self._committed - self.credit_floor * holders)
        if min(free, extra_free) < min(_WAKE_MIN, self.byte_budget // 2 // max(1, holders)):
            return
        starved, self._starved = self._starved, {}
        for conn in starved:
            if not conn.closed:
                self._queue_update(conn)

    def _flush_ctrl(self) -> bool:
        """Send queued control packets; True when none is left waiting."""
        ctrl = self._ctrl
        while ctrl:
            op, flags, host_port, guest_port, conn = ctrl[0]
            if conn is not None and conn.closed:
                ctrl.popleft()
                continue
            rxq = self.rxq
            chain = self._pop_rx()
            if rxq is None or chain is None:
                return False
            ctrl.popleft()
            if op == Op.CREDIT_UPDATE and conn is not None:
                conn.update_queued = False
                self.stats.credit_updates_sent += 1
            if op == Op.RST:
                self.stats.rst_sent += 1
            elif op == Op.CREDIT_REQUEST:
                self.stats.credit_requests_sent += 1
            self._write_header(chain, op, flags, host_port, guest_port, 0, conn)
            rxq.push(chain.head, HEADER_SIZE)
        if self._parked and self._rx_available():
            self._unpark()
        return True

    def _rx_available(self) -> bool:
        """Whether rx buffers wait; if none, ask for a kick (someone is waiting for them)."""
        rxq = self.rxq
        if rxq is None:
            return False
        try:
            return rxq.pending() > 0 or rxq.arm_kick()
        except RingError:
            return False

    def _park(self, conn: Conn) -> None:
        conn.parked = True
        self._parked[conn] = None

    def _unpark(self) -> None:
        parked, self._parked = self._parked, {}
        for conn in parked:
            conn.parked = False
            self._update(conn)
