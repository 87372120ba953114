"""Credit flow control guest -> host: the ``buf_alloc`` each connection advertises.

We advertise ``buf_alloc`` and ``fwd_cnt`` (bytes written to the host socket). Bytes the host
socket does not take at once wait in ``Conn.out``, which credit bounds by ``buf_alloc``
(:data:`BUF_ALLOC`). A credit update goes out every ``credit_step`` bytes forwarded
(:data:`CREDIT_STEP`, at most a quarter of either side's buffer: :meth:`CreditBudget.step`),
and, once everything received has been forwarded, when the guest has sent nothing for
``update_delay_s`` (:data:`UPDATE_DELAY_S`).

The credit granted to the guest, summed over all connections, stays within ``byte_budget``
(:data:`BYTE_BUDGET`): a connection's ``buf_alloc`` is what the budget allows, up to
``buf_alloc`` (:meth:`CreditBudget.advertise`). What the device buffers is at most what it
granted, so the budget bounds it. Credit once given is never taken back (Linux 6.1 computes
credit in unsigned arithmetic: a limit below what it has in flight would wrap). Each connection
reserves a floor of credit when admitted (:meth:`CreditBudget.admit`), so none starves (with
the budget spent, new connections are refused); one short of credit beyond that hears a credit
update when budget is freed (:meth:`CreditBudget.wake`).
"""

from __future__ import annotations

from ._conn import U32, Conn, VsockStats

__all__ = [
    "BUF_ALLOC",
    "BYTE_BUDGET",
    "CREDIT_FLOOR",
    "CREDIT_STEP",
    "UPDATE_DELAY_S",
    "CreditBudget",
]

#: Forwarded bytes after which the guest hears our new fwd_cnt. Guests may use less than our
#: buf_alloc (Linux bounds its window by its own buffer size), so this must not depend on it.
BUF_ALLOC = 1024 * 1024  # the receive buffer we advertise per connection
CREDIT_STEP = 256 * 1024
UPDATE_DELAY_S = 0.005
#: Credit granted to the guest (so bytes the device may have to hold for host sockets that do
#: not read), all connections of one VM together.
BYTE_BUDGET = 64 * 1024 * 1024
#: Credit reserved for every connection, so that its window reopens whatever the others hold.
CREDIT_FLOOR = 32 * 1024
_WAKE_MIN = 4096  # budget freed before connections short of credit hear about it


class CreditBudget:
    """The credit granted to the guest by all connections of one device together.

    ``holders`` (an argument of several methods) is the number of connections that hold
    credit: live ones and lingering ones.
    """

    __slots__ = ("_stats", "byte_budget", "committed", "credit_step", "floor", "starved")

    def __init__(
        self, stats: VsockStats, *, byte_budget: int, buf_alloc: int, credit_step: int
    ) -> None:
        self._stats = stats
        self.byte_budget = byte_budget
        self.credit_step = credit_step
        #: Credit every connection holds at least (reserved at admission: none starves).
        self.floor = min(CREDIT_FLOOR, buf_alloc, byte_budget // 4)
        #: Sum of ``Conn.granted``: credit given and not yet known to be used up.
        self.committed = 0
        #: Connections granted less than they want for want of budget.
        self.starved: dict[Conn, None] = {}

    def refusal(self) -> str | None:
        """Why no connection can be admitted for want of budget, if none can."""
        if self.byte_budget - self.committed < self.floor:
            return f"the {self.byte_budget}-byte budget is granted"
        return None

    def admit(self, conn: Conn) -> None:
        """Reserve a new connection's floor of credit (the caller checked it is free)."""
        conn.granted = self.floor
        self.committed += self.floor

    def release(self, conn: Conn) -> None:
        """The connection holds nothing any more: its share of the budget goes back."""
        self.committed -= conn.granted
        conn.granted = 0
        self.starved.pop(conn, None)

    def step(self, conn: Conn) -> int:
        """Forwarded bytes after which ``conn``'s guest hears its new ``fwd_cnt``."""
        # A quarter of either buffer at most: Linux may bound its window by its own buffer.
        return min(self.credit_step, conn.buf_alloc // 4, conn.peer_buf_alloc // 4 or U32,
                   conn.granted // 4 or 1)  # fmt: skip

    def advertise(self, conn: Conn, fwd: int, holders: int) -> int:
        """The ``buf_alloc`` a packet to the guest carries with ``fwd``; sets ``conn.limit``."""
        buf_alloc = conn.granted
        if buf_alloc == conn.buf_alloc and holders * buf_alloc <= self.byte_budget // 2:
            # the budget does not bind: the full window again (what grant would give)
            conn.limit = fwd + buf_alloc
            return buf_alloc
        return self.grant(conn, fwd, holders)

    def grant(self, conn: Conn, fwd: int, holders: int) -> int:
        """The ``buf_alloc`` to advertise with ``fwd``: what the byte budget allows.

        The guest may send until its ``tx_cnt`` reaches ``fwd + buf_alloc``. That limit never
        goes down (credit once given may be in flight already), so a connection keeps what it
        was given and has not used. Every connection holds a floor (:attr:`floor`, reserved
        when it is admitted), so its window reopens once its bytes reached the host: none
        starves. Beyond the floor, credit comes from half the budget, up to ``buf_alloc`` and a
        fair share of that half; the sum of the shares (:attr:`committed`) never exceeds the
        budget, and what the device buffers for a connection never exceeds its share.
        """
        old = conn.granted
        budget, floor = self.byte_budget, self.floor
        target = min(conn.buf_alloc, max(floor, budget // 2 // max(1, holders)))
        free = budget - self.committed + old
        extra_free = budget // 2 - (self.committed - old - floor * (holders - 1))
        grant = max(min(target, free, floor + extra_free), conn.limit - fwd)
        if grant < target:
            self._stats.budget_waits += 1
            self.starved[conn] = None
        self.committed += grant - old
        conn.granted = grant
        conn.limit = fwd + grant
        return grant

    def wake(self, holders: int) -> list[Conn]:
        """Connections short of credit that should hear what they may have now, if any.

        They are only woken once enough budget was freed (:data:`_WAKE_MIN` or a fair share).
        """
        free = self.byte_budget - self.committed
        extra_free = self.byte_budget // 2 - (self.committed - self.floor * holders)
        if min(free, extra_free) < min(_WAKE_MIN, self.byte_budget // 2 // max(1, holders)):
            return []
        starved, self.starved = self.starved, {}
        return list(starved)
