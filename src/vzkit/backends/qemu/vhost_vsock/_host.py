"""The host half of each connection: its Unix stream, watched on the device's epoll loop.

:class:`HostStreams` sets each host socket's epoll interest from the connection's state,
writes what the guest sent and the host socket did not take at once (``Conn.out``), reads the
host socket straight into rx buffers while the guest's credit
(``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)``) is positive and an rx buffer is free (so a
guest that does not read holds the host writer back through the socket's own buffer, and host
memory stays bounded), and closes connections.

Host EOF maps to ``SHUTDOWN(SEND)`` (half-close) or, when the host closed its end entirely
(epoll hang-up), ``SHUTDOWN(RCV|SEND)`` followed by waiting ``close_timeout_s`` for the guest's
``RST``. A connection the guest is done with whose bytes have not reached the host yet
lingers until they have (or ``close_timeout_s`` passed). A connection waiting for rx buffers
is *parked* and read again once the guest posts some.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket

from ._conn import U32, Conn, ConnState, VsockStats, Warnings
from ._credit import CreditBudget
from ._packet import HEADER_SIZE, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, Op
from ._ports import PortTable
from ._reactor import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Reactor
from ._sender import RxSender
from ._virtqueue import gather

__all__ = ["HostStreams"]

log = logging.getLogger(__name__)

_SHUT_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND
_READ_BURST = 16


class HostStreams:
    def __init__(
        self,
        reactor: Reactor,
        stats: VsockStats,
        warn: Warnings,
        credit: CreditBudget,
        table: PortTable,
        sender: RxSender,
        *,
        close_timeout_s: float,
    ) -> None:
        self._reactor = reactor
        self._stats = stats
        self._warn = warn
        self._credit = credit
        self._table = table
        self._sender = sender
        self.close_timeout_s = close_timeout_s
        self._parked: dict[Conn, None] = {}

    # -- control packets and rx buffers -----------------------------------------------------

    def flush_ctrl(self) -> bool:
        """Send queued control packets; True when none is left waiting.

        With every control packet out and rx buffers left, parked connections read again.
        """
        if not self._sender.flush():
            return False
        if self._parked and self._sender.available():
            self._unpark()
        return True

    def _park(self, conn: Conn) -> None:
        conn.parked = True
        self._parked[conn] = None

    def _unpark(self) -> None:
        parked, self._parked = self._parked, {}
        for conn in parked:
            conn.parked = False
            self.update(conn)

    def maybe_update(self, conn: Conn) -> None:
        """Send a credit update if the guest has not heard of enough forwarded bytes."""
        if conn.fwd_cnt - conn.last_fwd_sent >= self._credit.step(conn):
            self._sender.queue_update(conn)
            self.flush_ctrl()

    # -- host socket events ----------------------------------------------------------------

    def update(self, conn: Conn) -> None:
        """Set the epoll interest of a connection's host socket from its state."""
        if conn.closed:
            return
        mask = (EPOLLIN if conn.wants_read() else 0) | (EPOLLOUT if conn.out else 0)
        if not mask and not conn.hup and conn.state is not ConnState.CONNECTING:
            mask = EPOLLHUP  # only hang-ups: learn when the host closes its end
        try:
            self._reactor.register(conn.fd, mask, functools.partial(self._on_event, conn))
        except OSError as err:  # epoll out of memory (ENOMEM) or of watches (ENOSPC)
            self._stats.resource_errors += 1
            self._warn("resource", "cannot watch %r: %s; resetting", conn, err)
            self.reset(conn)

    def _on_event(self, conn: Conn, mask: int) -> None:
        if mask & (EPOLLHUP | EPOLLERR):
            conn.hup = True
        if conn.out and mask & (EPOLLOUT | EPOLLHUP | EPOLLERR):
            self.flush_out(conn)
        if conn.closed:
            return
        if conn.wants_read() and mask & (EPOLLIN | EPOLLHUP | EPOLLERR):
            self._read(conn)
        elif conn.hup and conn.host_eof and conn.state is ConnState.ESTABLISHED:
            self._host_closed(conn)  # closed entirely after an earlier half-close
        self.update(conn)

    def flush_out(self, conn: Conn) -> None:
        """Write what waits for the host socket, as much as it takes."""
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.debug("vsock: host side of %r failed: %s", conn, err)
            if conn in self._table.lingering:
                self._end_linger(conn)
            else:
                self.reset(conn)
            return
        del conn.out[:sent]
        counted = max(0, sent - conn.out_uncounted)
        conn.out_uncounted = max(0, conn.out_uncounted - sent)
        conn.fwd_cnt += counted
        if conn in self._table.lingering:
            if not conn.out:
                self._end_linger(conn)
            return
        if not conn.out and conn.shut_wr_pending:
            conn.shut_wr_pending = False
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        if not conn.out and conn.fwd_cnt != conn.last_fwd_sent:
            self._sender.queue_update(conn)  # all caught up: the guest may be waiting for this
            self.flush_ctrl()
        else:
            self.maybe_update(conn)

    def _read(self, conn: Conn) -> None:
        sender, stats = self._sender, self._stats
        for _ in range(_READ_BURST):
            if sender.ctrl and not self.flush_ctrl():
                self._park(conn)
                return
            credit = conn.peer_credit()
            if credit <= 0:
                if not conn.credit_requested:
                    conn.credit_requested = True
                    sender.queue(Op.CREDIT_REQUEST, 0, conn)
                return
            rxq = sender.rxq
            chain = sender.pop() if rxq is not None else None
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
                self.reset(conn)
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
                    sender.queue(Op.SHUTDOWN, SHUTDOWN_SEND, conn)
                return
            sender.write_header(chain, Op.RW, 0, conn.host_port, conn.guest_port, n, conn)
            rxq.push(chain.head, HEADER_SIZE + n)
            conn.tx_cnt = (conn.tx_cnt + n) & U32
            stats.bytes_to_guest += n

    def _host_closed(self, conn: Conn) -> None:
        """The host closed its stream entirely: tell the guest, wait for its RST."""
        conn.host_eof = True
        conn.out.clear()
        conn.out_uncounted = 0
        conn.state = ConnState.CLOSING
        self._sender.queue(Op.SHUTDOWN, _SHUT_BOTH, conn)
        conn.timer = self._reactor.call_later(
            self.close_timeout_s, functools.partial(self._close_timeout, conn)
        )

    def _close_timeout(self, conn: Conn) -> None:
        if not conn.closed:
            log.debug("vsock: no RST for %r in time; resetting", conn)
            self.reset(conn)

    # -- closing ---------------------------------------------------------------------------

    def reset(self, conn: Conn) -> None:
        self.close(conn, rst=True)

    def close(self, conn: Conn, *, rst: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        if rst:
            self._sender.queue_rst(*conn.key)
        self._forget(conn)
        self._credit.release(conn)
        self._reactor.unregister(conn.fd)
        conn.sock.close()
        self._stats.connections_closed += 1

    def drop_all(self) -> None:
        """Close every live connection without telling the guest, forget queued packets."""
        for conn in list(self._table.live.values()):
            self.close(conn, rst=False)
        self._sender.ctrl.clear()
        self._parked.clear()

    def end_all(self) -> None:
        """Close lingering connections too, whatever they still hold."""
        for conn in list(self._table.lingering):
            self._end_linger(conn)

    def _forget(self, conn: Conn) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
        if conn.update_timer is not None:
            conn.update_timer.cancel()
            conn.update_timer = None
        self._table.forget(conn)
        self._parked.pop(conn, None)

    def linger(self, conn: Conn) -> None:
        """The guest is done, but the host has not taken all its bytes yet: drain, then close."""
        conn.closed = True
        self._forget(conn)
        self._table.lingering[conn] = None  # still counted against the cap and the budget
        try:
            self._reactor.register(conn.fd, EPOLLOUT, functools.partial(self._on_event, conn))
        except OSError as err:
            self._stats.resource_errors += 1
            self._warn("resource", "cannot watch %r: %s; dropping it", conn, err)
            self._end_linger(conn)
            return
        conn.timer = self._reactor.call_later(
            self.close_timeout_s, functools.partial(self._end_linger, conn)
        )

    def _end_linger(self, conn: Conn) -> None:
        lingering = self._table.lingering
        if conn not in lingering:
            return
        del lingering[conn]
        if conn.timer is not None:
            conn.timer.cancel()
        self._credit.release(conn)
        self._reactor.unregister(conn.fd)
        conn.sock.close()
        self._stats.connections_closed += 1
