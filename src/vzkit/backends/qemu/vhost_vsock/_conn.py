"""One vsock stream connection's state, and the device's counters and warnings."""

from __future__ import annotations

import collections
import enum
import logging
import socket
from dataclasses import dataclass, fields

from ._packet import SHUTDOWN_RCV
from ._reactor import Timer

__all__ = ["U32", "Conn", "ConnState", "VsockStats", "Warnings"]

U32 = 0xFFFFFFFF
_WARN_FIRST = 10


@dataclass(slots=True)
class VsockStats:
    """Counters for tests, benchmarks and logs (read from any thread; written by the loop)."""

    packets_from_guest: int = 0
    packets_to_guest: int = 0
    bytes_from_guest: int = 0
    bytes_to_guest: int = 0
    bad_chains: int = 0
    dropped_packets: int = 0
    rst_sent: int = 0
    credit_violations: int = 0
    connections_opened: int = 0
    connections_closed: int = 0
    connections_refused: int = 0
    resource_errors: int = 0  # connections failed because a host socket could not be made
    budget_waits: int = 0  # credit grants cut short because the byte budget was spent
    kicks_rx: int = 0  # notifications from the driver: rx buffers added
    kicks_tx: int = 0  # ... tx packets added
    calls_rx: int = 0  # interrupts we raised: rx buffers used
    calls_tx: int = 0  # ... tx packets consumed
    credit_updates_sent: int = 0
    credit_updates_received: int = 0
    credit_requests_sent: int = 0
    late_credit_updates: int = 0  # of credit_updates_sent: after the guest's tx went idle
    loop_iterations: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Warnings:
    """Logs what a guest did wrong: the first few of each kind at WARNING, the rest at DEBUG."""

    __slots__ = ("_counts", "_log")

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._counts: collections.Counter[str] = collections.Counter()

    def __call__(self, kind: str, message: str, *args: object) -> None:
        self._counts[kind] += 1
        level = logging.WARNING if self._counts[kind] <= _WARN_FIRST else logging.DEBUG
        self._log.log(level, "vsock: " + message, *args)


class ConnState(enum.Enum):
    CONNECTING = "connecting"  # host-initiated, REQUEST sent or queued, no RESPONSE yet
    ESTABLISHED = "established"
    CLOSING = "closing"  # we sent SHUTDOWN(RCV|SEND) and wait for the guest's RST


class Conn:
    __slots__ = (
        "buf_alloc", "closed", "credit_requested", "fd", "fwd_cnt", "granted", "guest_port",
        "guest_shut", "host_eof", "host_initiated", "host_port", "hup", "last_fwd_sent", "limit",
        "out", "out_uncounted", "parked", "peer_buf_alloc", "peer_fwd_cnt", "rx_cnt",
        "shut_wr_pending", "sock", "state", "timer", "tx_cnt", "update_queued", "update_timer",
    )  # fmt: skip

    def __init__(
        self,
        sock: socket.socket,
        host_port: int,
        guest_port: int,
        state: ConnState,
        *,
        host_initiated: bool,
        buf_alloc: int,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.host_port = host_port
        self.guest_port = guest_port
        self.state = state
        self.host_initiated = host_initiated
        self.buf_alloc = buf_alloc  # the most we advertise (what the byte budget allows is less)
        self.limit = 0  # the guest may send until its tx_cnt reaches this (never lowered)
        self.granted = 0  # this connection's share of the budget: limit - fwd_cnt, as advertised
        self.rx_cnt = 0  # payload bytes received from the guest
        self.fwd_cnt = 0  # of those, written to the host socket
        self.last_fwd_sent = 0  # fwd_cnt as last advertised to the guest
        self.out = bytearray()  # bytes for the host socket that it has not taken yet
        self.out_uncounted = 0  # leading bytes of out that are not guest payload ("OK ...")
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0  # payload bytes sent to the guest
        self.guest_shut = 0
        self.host_eof = False
        self.hup = False
        self.shut_wr_pending = False
        self.parked = False
        self.update_queued = False
        self.credit_requested = False
        self.closed = False
        self.timer: Timer | None = None
        self.update_timer: Timer | None = None  # a deferred credit update (update_delay_s)

    @property
    def key(self) -> tuple[int, int]:
        return self.host_port, self.guest_port

    def peer_credit(self) -> int:
        return self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32)

    def wants_read(self) -> bool:
        return (
            self.state is ConnState.ESTABLISHED
            and not self.host_eof
            and not self.guest_shut & SHUTDOWN_RCV
            and not self.parked
            and self.peer_credit() > 0
        )

    def __repr__(self) -> str:
        return f"<Conn host:{self.host_port} guest:{self.guest_port} {self.state.value}>"
