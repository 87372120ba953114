"""Packets to the guest: rx buffers, the control packets waiting for them, packet headers.

Every packet to the guest goes into an rx buffer the guest posted. Data packets are written
straight from a host socket into one (see :meth:`._host.HostStreams.read`); control packets
(``RESPONSE``, ``SHUTDOWN``, ``RST``, credit updates and requests) wait in a queue until a
buffer is free, at most :data:`CTRL_LIMIT` before the tx queue is left alone (backpressure: a
guest that sends but does not read cannot make the queue grow). Every header carries the
connection's ``fwd_cnt`` and the credit the byte budget allows (:mod:`._credit`).
"""

from __future__ import annotations

import collections

from ._conn import U32, Conn, VsockStats, Warnings
from ._credit import CreditBudget
from ._packet import HEADER, HEADER_SIZE, HOST_CID, TYPE_STREAM, Op
from ._ports import PortTable
from ._virtqueue import Chain, ChainError, RingError, Virtqueue, scatter

__all__ = ["CTRL_LIMIT", "RxSender"]

#: Control packets waiting for rx buffers before the tx queue is left alone (backpressure).
CTRL_LIMIT = 1024

# A control packet waiting for an rx buffer: op, flags, host port, guest port, connection.
_Ctrl = tuple[Op, int, int, int, "Conn | None"]


class RxSender:
    __slots__ = ("_credit", "_stats", "_table", "_warn", "ctrl", "guest_cid", "rxq")

    def __init__(
        self,
        stats: VsockStats,
        warn: Warnings,
        credit: CreditBudget,
        table: PortTable,
        *,
        guest_cid: int,
    ) -> None:
        self._stats = stats
        self._warn = warn
        self._credit = credit
        self._table = table
        self.guest_cid = guest_cid
        self.rxq: Virtqueue | None = None
        self.ctrl: collections.deque[_Ctrl] = collections.deque()

    def queue(self, op: Op, flags: int, conn: Conn) -> None:
        self.ctrl.append((op, flags, conn.host_port, conn.guest_port, conn))

    def queue_rst(self, host_port: int, guest_port: int) -> None:
        self.ctrl.append((Op.RST, 0, host_port, guest_port, None))

    def queue_update(self, conn: Conn) -> None:
        if not conn.update_queued:
            conn.update_queued = True
            self.queue(Op.CREDIT_UPDATE, 0, conn)

    def flush(self) -> bool:
        """Send queued control packets; True when none is left waiting."""
        ctrl = self.ctrl
        stats = self._stats
        while ctrl:
            op, flags, host_port, guest_port, conn = ctrl[0]
            if conn is not None and conn.closed:
                ctrl.popleft()
                continue
            rxq = self.rxq
            chain = self.pop()
            if rxq is None or chain is None:
                return False
            ctrl.popleft()
            if op == Op.CREDIT_UPDATE and conn is not None:
                conn.update_queued = False
                stats.credit_updates_sent += 1
            if op == Op.RST:
                stats.rst_sent += 1
            elif op == Op.CREDIT_REQUEST:
                stats.credit_requests_sent += 1
            self.write_header(chain, op, flags, host_port, guest_port, 0, conn)
            rxq.push(chain.head, HEADER_SIZE)
        return True

    def pop(self) -> Chain | None:
        """The next usable rx buffer, if the guest posted one."""
        rxq = self.rxq
        while rxq is not None:
            try:
                chain = rxq.pop()
            except ChainError as err:
                self.bad_chain(rxq, err)
                continue
            except RingError as err:
                self._warn("ring", "%s", err)
                return None
            if chain is None:
                if rxq.arm_kick():
                    continue
                return None
            if chain.writable_len <= HEADER_SIZE or chain.readable:
                self._stats.bad_chains += 1
                self._warn("rxbuf", "rx buffer of %d writable bytes (%d readable) is unusable",
                           chain.writable_len, chain.readable_len)  # fmt: skip
                rxq.push(chain.head, 0)
                continue
            return chain
        return None

    def available(self) -> bool:
        """Whether rx buffers wait; if none, ask for a kick (someone is waiting for them)."""
        rxq = self.rxq
        if rxq is None:
            return False
        try:
            return rxq.pending() > 0 or rxq.arm_kick()
        except RingError:
            return False

    def bad_chain(self, vq: Virtqueue, err: ChainError) -> None:
        """Drop a malformed descriptor chain of either queue, giving its head back."""
        self._stats.bad_chains += 1
        self._warn("chain", "dropped a malformed descriptor chain: %s", err)
        if err.head is not None:
            vq.push(err.head, 0)

    def write_header(
        self, chain: Chain, op: Op, flags: int, host_port: int, guest_port: int, length: int,
        conn: Conn | None,
    ) -> None:  # fmt: skip
        if conn is not None:
            fwd = conn.fwd_cnt
            buf_alloc = self._credit.advertise(conn, fwd, self._table.holders)
            conn.last_fwd_sent = fwd
            fwd &= U32
        else:
            buf_alloc = fwd = 0
        header = HEADER.pack(HOST_CID, self.guest_cid, host_port, guest_port, length,
                             TYPE_STREAM, op, flags, buf_alloc, fwd)  # fmt: skip
        scatter(chain.writable, 0, header)
        self._stats.packets_to_guest += 1
