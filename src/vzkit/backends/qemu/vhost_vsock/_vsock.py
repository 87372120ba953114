"""virtio-vsock stream connections between guest sockets and host Unix sockets.

:class:`VsockMuxer` consumes the guest's tx queue (packets from the guest) and fills its rx
queue (packets to the guest), keyed by ``(host port, guest port)``. Each :class:`~._conn.Conn`
pairs a guest stream with one host Unix stream (see :mod:`._hybrid`) and runs the virtio 1.2
state machine with credit flow control both ways. The muxer handles the guest's half (its
packets, connection requests both ways, the connection cap) and wires the parts that own the
rest:

* :mod:`._credit`: guest -> host credit, within one byte budget for all connections;
* :mod:`._ports`: the port table (live and lingering connections, local ports);
* :mod:`._sender`: packets to the guest (rx buffers, queued control packets, headers);
* :mod:`._host`: the host half (socket events, data both ways, closing, lingering).

Limits (a guest must not be able to kill the device or make it hoard memory):

* at most ``max_connections`` connections hold a host socket and buffers at once, counting
  those that linger after the guest's ``SHUTDOWN`` until their bytes reached the host (the
  device derives the cap from its descriptor limit, see :func:`._device.connection_cap`);
* the credit granted to the guest, summed over all connections, stays within
  ``byte_budget`` (:data:`~._credit.BYTE_BUDGET`, see :mod:`._credit`);
* a host socket that cannot be made, connected or watched (``EMFILE``, ``ENFILE``,
  ``ENOMEM``, ``ENOBUFS``, any ``OSError``) fails that one connection with ``RST``.

Host -> guest data is never buffered (it goes from the socket into guest memory), so the
budget is enforced on the credit the device grants rather than on reading host sockets.
Credit updates owed for what went through go out at the end of each tx batch, or once the
guest has sent nothing for ``update_delay_s`` (:data:`~._credit.UPDATE_DELAY_S`) and no
packet to it carried the new ``fwd_cnt`` — for a guest that bounds its window below ours.

Shutdown: the guest's ``SHUTDOWN`` flags map to ``shutdown(2)`` on the host stream; a full
shutdown from either side ends with ``RST`` (host EOF: see :mod:`._host`). Malformed packets
and packets for unknown connections are dropped or answered with ``RST``, counted in
:class:`~._conn.VsockStats` and logged (the first few of each kind at WARNING).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import socket
from collections.abc import Callable
from pathlib import Path

from ._conn import Conn, ConnState, VsockStats, Warnings
from ._credit import BUF_ALLOC, BYTE_BUDGET, CREDIT_STEP, UPDATE_DELAY_S, CreditBudget
from ._host import HostStreams
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
from ._ports import PortTable
from ._reactor import Reactor
from ._sender import CTRL_LIMIT, RxSender
from ._virtqueue import Chain, ChainError, RingError, Virtqueue, gather

__all__ = ["MAX_CONNECTIONS", "VsockMuxer"]

log = logging.getLogger(__name__)

_SHUT_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND
_TX_BATCH = 256
#: Connections at once when the descriptor limit does not bound them lower.
MAX_CONNECTIONS = 4096
#: errno values of a host socket that could not be made for want of resources.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS,
                              errno.EAGAIN, errno.ENOSPC})  # fmt: skip


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
        self.update_delay_s = update_delay_s
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.buf_alloc = buf_alloc
        self.connect_timeout_s = connect_timeout_s
        self.max_connections = max_connections
        self.stats = VsockStats()
        self._warn = Warnings(log)
        self._credit = CreditBudget(
            self.stats, byte_budget=byte_budget, buf_alloc=buf_alloc, credit_step=credit_step
        )
        self._table = PortTable()
        self._out = RxSender(self.stats, self._warn, self._credit, self._table,
                             guest_cid=guest_cid)  # fmt: skip
        self._host = HostStreams(reactor, self.stats, self._warn, self._credit, self._table,
                                 self._out, close_timeout_s=close_timeout_s)  # fmt: skip
        self.txq: Virtqueue | None = None
        self.online = False  # a front-end is attached: host connections may wait for the guest
        self._touched: dict[Conn, None] = {}  # received data in the current tx batch
        self._tx_throttled = False
        self.tx_more = False  # on_tx_ready stopped early with packets left: call it again
        self._peer_serial = 0
        #: Other descriptors that count against ``max_connections`` (pending host handshakes).
        self.other_fds: Callable[[], int] = lambda: 0

    @property
    def rxq(self) -> Virtqueue | None:
        return self._out.rxq

    @rxq.setter
    def rxq(self, rxq: Virtqueue | None) -> None:
        self._out.rxq = rxq

    @property
    def close_timeout_s(self) -> float:
        return self._host.close_timeout_s

    @close_timeout_s.setter
    def close_timeout_s(self, value: float) -> None:
        self._host.close_timeout_s = value

    @property
    def credit_step(self) -> int:
        return self._credit.credit_step

    @property
    def byte_budget(self) -> int:
        return self._credit.byte_budget

    @property
    def credit_floor(self) -> int:
        """Credit every connection holds at least (reserved at admission: none starves)."""
        return self._credit.floor

    @property
    def connections(self) -> int:
        return len(self._table.live)

    @property
    def open_connections(self) -> int:
        """Connections holding a host socket and buffers: live ones and lingering ones."""
        return self._table.holders

    @property
    def buffered_bytes(self) -> int:
        """Guest bytes held for host sockets that have not taken them yet."""
        return sum(len(c.out) for c in self._table.conns())

    @property
    def committed_bytes(self) -> int:
        """Credit granted and not known to be used up: the bound on :attr:`buffered_bytes`."""
        return self._credit.committed

    # -- lifecycle -------------------------------------------------------------------------

    def reset_all(self, reason: str) -> None:
        """Drop every connection without telling the guest (its driver is gone or reset)."""
        if self._table.live:
            log.info("vsock: closing %d connections: %s", len(self._table.live), reason)
        self._host.drop_all()
        self._tx_throttled = False

    def close(self) -> None:
        self.reset_all("device closed")
        self._host.end_all()

    # -- ring events -----------------------------------------------------------------------

    def on_rx_ready(self) -> None:
        """The guest made rx buffers available (or the rx ring started)."""
        self._host.flush_ctrl()
        if self._tx_throttled and len(self._out.ctrl) < CTRL_LIMIT:
            self.on_tx_ready()

    def flush(self) -> None:
        """Send what waits for rx buffers, if there are any (end of each loop iteration)."""
        if self._credit.starved:  # budget was freed: tell them what they may have now
            for conn in self._credit.wake(self._table.holders):
                if not conn.closed:
                    self._out.queue_update(conn)
        if self._out.ctrl:
            self._host.flush_ctrl()
            if self._tx_throttled and len(self._out.ctrl) < CTRL_LIMIT:
                self.on_tx_ready()

    def on_tx_ready(self) -> None:
        """The guest made tx packets available (or the tx ring started)."""
        self.tx_more = False
        txq = self.txq
        if txq is None:
            return
        ctrl = self._out.ctrl
        done = 0
        while True:
            if len(ctrl) >= CTRL_LIMIT:
                self._host.flush_ctrl()
                if len(ctrl) >= CTRL_LIMIT:
                    self._tx_throttled = True  # resumed by on_rx_ready
                    break
            self._tx_throttled = False
            if done >= _TX_BATCH:
                self.tx_more = True  # let other events in; the device calls again at once
                break
            try:
                chain = txq.pop()
            except ChainError as err:
                self._out.bad_chain(txq, err)
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
                    self._out.queue_update(conn)
                else:  # once the guest has sent nothing for `delay` (it may be out of credit)
                    if conn.update_timer is not None:
                        conn.update_timer.cancel()
                    conn.update_timer = self._reactor.call_later(
                        delay, functools.partial(self._late_update, conn)
                    )
        self._host.flush_ctrl()

    def _late_update(self, conn: Conn) -> None:
        conn.update_timer = None
        if not conn.closed and not conn.out and conn.fwd_cnt != conn.last_fwd_sent:
            self.stats.late_credit_updates += 1
            self._out.queue_update(conn)
            self._host.flush_ctrl()

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
        conn = self._table.live.get(key)
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
                self._out.queue_rst(dst_port, src_port)
            return
        conn.peer_buf_alloc = buf_alloc
        conn.peer_fwd_cnt = fwd_cnt
        if conn.credit_requested and conn.peer_credit() > 0:
            conn.credit_requested = False
        if op == Op.RW:
            self._from_guest(conn, chain, length)
        elif op == Op.CREDIT_REQUEST:
            self._out.queue_update(conn)
        elif op == Op.CREDIT_UPDATE:
            self.stats.credit_updates_received += 1
        elif op == Op.RESPONSE:
            self._on_response(conn)
        elif op == Op.SHUTDOWN:
            self._on_shutdown(conn, flags & _SHUT_BOTH)
        elif op == Op.RST:
            if conn.state is ConnState.CONNECTING:
                self.stats.connections_refused += 1
            self._host.close(conn, rst=False)
        elif op == Op.REQUEST:
            self._warn("dup", "REQUEST for existing connection %s; resetting", key)
            self._host.reset(conn)
        if not conn.closed:
            self._host.update(conn)

    def _reset_key(self, key: tuple[int, int], conn: Conn | None) -> None:
        if conn is not None:
            self._host.reset(conn)
        else:
            self._out.queue_rst(*key)

    def _guest_connect(self, host_port: int, guest_port: int, buf_alloc: int, fwd: int) -> None:
        full = self._full()
        if full is not None:
            self._warn("limit", "%s; refusing guest port %d", full, guest_port)
            self.stats.connections_refused += 1
            self._out.queue_rst(host_port, guest_port)
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
        self._credit.admit(conn)
        self._table.add(conn)
        self.stats.connections_opened += 1
        log.debug("vsock: guest port %d connected to %s", guest_port, path)
        self._out.queue(Op.RESPONSE, 0, conn)
        self._host.update(conn)

    def _refuse_guest(self, host_port: int, guest_port: int, err: OSError) -> None:
        self.stats.connections_refused += 1
        if err.errno in _RESOURCE_ERRNOS:
            self.stats.resource_errors += 1
            self._warn("resource", "cannot connect guest port %d to host port %d: %s",
                       guest_port, host_port, err)  # fmt: skip
        else:
            log.debug("vsock: guest connection to host port %d refused: %s", host_port, err)
        self._out.queue_rst(host_port, guest_port)

    def _on_response(self, conn: Conn) -> None:
        if conn.state is not ConnState.CONNECTING:
            self._warn("resp", "unexpected RESPONSE on %r; resetting", conn)
            self._host.reset(conn)
            return
        conn.state = ConnState.ESTABLISHED
        if conn.timer is not None:
            conn.timer.cancel()
        ok = b"OK %d\n" % conn.host_port
        conn.out[:0] = ok
        conn.out_uncounted += len(ok)
        self._host.flush_out(conn)

    def _on_shutdown(self, conn: Conn, flags: int) -> None:
        conn.guest_shut |= flags
        if conn.guest_shut == _SHUT_BOTH or conn.state is ConnState.CLOSING:
            self._out.queue_rst(*conn.key)  # the peer completes a full shutdown with RST
            if conn.out and not conn.hup:
                self._host.linger(conn)
            else:
                self._host.close(conn, rst=False)
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
            self._host.reset(conn)
            return
        if conn.rx_cnt + length > conn.limit:  # beyond the credit we advertised
            self.stats.credit_violations += 1
            self._warn("credit", "guest exceeded its credit on %r; resetting", conn)
            self._host.reset(conn)
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
                self._host.reset(conn)
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
                self._host.reset(conn)
                return
        self._host.maybe_update(conn)

    # -- host-initiated connections ---------------------------------------------------------

    def host_connect(self, sock: socket.socket, port: int) -> None:
        """A host stream asked for guest ``port`` (its request line already consumed)."""
        why = "no guest attached" if not self.online else self._full()
        if why is not None:
            log.debug("vsock: refusing host connection to port %d: %s", port, why)
            self.stats.connections_refused += 1
            sock.close()
            return
        local = self._table.local_port(port)
        conn = Conn(sock, local, port, ConnState.CONNECTING, host_initiated=True,
                    buf_alloc=self.buf_alloc)  # fmt: skip
        self._credit.admit(conn)
        self._table.add(conn)
        self.stats.connections_opened += 1
        conn.timer = self._reactor.call_later(
            self.connect_timeout_s, functools.partial(self._connect_timeout, conn)
        )
        self._out.queue(Op.REQUEST, 0, conn)
        self._host.flush_ctrl()

    def _connect_timeout(self, conn: Conn) -> None:
        if not conn.closed and conn.state is ConnState.CONNECTING:
            log.debug("vsock: guest port %d did not answer in %.1f s", conn.guest_port,
                     self.connect_timeout_s)  # fmt: skip
            self.stats.connections_refused += 1
            self._host.reset(conn)

    def _full(self) -> str | None:
        """Why no connection can be admitted now, if none can."""
        if self.open_connections + self.other_fds() >= self.max_connections:
            return f"{self.open_connections} connections and {self.other_fds()} handshakes open"
        return self._credit.refusal()
