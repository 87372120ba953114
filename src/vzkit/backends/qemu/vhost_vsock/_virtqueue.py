"""The device side of a split virtqueue (virtio 1.2, section 2.7).

Layout, all little-endian, in guest memory::

    descriptor table  N x {le64 addr, le32 len, le16 flags, le16 next}
    available ring    le16 flags, le16 idx, le16 ring[N], le16 used_event
    used ring         le16 flags, le16 idx, {le32 id, le32 len}[N], le16 avail_event

:meth:`Virtqueue.pop` walks one descriptor chain (direct or, when negotiated, indirect) and
returns views of its device-readable and device-writable buffers. A chain is rejected, never
followed, when a descriptor points outside guest memory, a ``next`` index is out of range, the
chain is longer than the queue (a loop), an indirect table is malformed or nested, or a
readable descriptor follows a writable one. :meth:`push` returns a chain to the driver,
:meth:`publish` makes a batch of them visible (one used-index store) and :meth:`need_notify`
applies the driver's notification suppression (flags or ``used_event``).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

from ....errors import VMError
from ._memory import GuestMemory, GuestMemoryError

__all__ = [
    "F_EVENT_IDX",
    "F_INDIRECT_DESC",
    "Chain",
    "ChainError",
    "RingError",
    "Virtqueue",
    "gather",
    "scatter",
]

log = logging.getLogger(__name__)

F_INDIRECT_DESC = 28
F_EVENT_IDX = 29

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class RingError(VMError):
    """The ring itself is unusable (bad size, addresses outside memory, index jumped)."""


class ChainError(VMError):
    """One descriptor chain is malformed. ``head`` is its head index when that is valid."""

    def __init__(self, message: str, head: int | None) -> None:
        super().__init__(message)
        self.head = head


@dataclass(slots=True)
class Chain:
    """One popped descriptor chain: gather from ``readable``, scatter into ``writable``."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    readable_len: int = 0
    writable_len: int = 0


def gather(views: list[memoryview], offset: int, length: int) -> list[memoryview]:
    """Sub-views covering ``[offset, offset + length)`` of the concatenation of ``views``."""
    out: list[memoryview] = []
    for view in views:
        size = len(view)
        if offset >= size:
            offset -= size
            continue
        take = min(size - offset, length)
        if take <= 0:
            break
        out.append(view[offset : offset + take])
        length -= take
        offset = 0
        if length == 0:
            break
    return out


def scatter(views: list[memoryview], offset: int, data: bytes | memoryview) -> int:
    """Copy ``data`` into the concatenation of ``views`` at ``offset``; return bytes copied."""
    done = 0
    total = len(data)
    for view in views:
        size = len(view)
        if offset >= size:
            offset -= size
            continue
        take = min(size - offset, total - done)
        view[offset : offset + take] = data[done : done + take]
        done += take
        offset = 0
        if done == total:
            break
    return done


class Virtqueue:
    """One started split virtqueue over ``memory``. Ring addresses are front-end user addresses.

    ``last_avail`` is the index of the next available entry to pop (``VHOST_USER_SET_VRING_BASE``
    / ``GET_VRING_BASE``). Not thread safe: the device loop is its only user.
    """

    def __init__(
        self,
        memory: GuestMemory,
        *,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        last_avail: int = 0,
        event_idx: bool = False,
        indirect: bool = False,
        name: str = "vq",
    ) -> None:
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise RingError(f"{name}: queue size {size} is not a power of two <= 32768")
        self.name = name
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.memory = memory
        extra = 2 if event_idx else 0
        try:
            self._desc = memory.user_view(desc_addr, 16 * size)
            self._avail = memory.user_view(avail_addr, 4 + 2 * size + extra)
            self._used = memory.user_view(used_addr, 4 + 8 * size + extra)
        except GuestMemoryError as err:
            raise RingError(f"{name}: ring outside guest memory: {err}") from err
        self.last_avail = last_avail & 0xFFFF
        self._used_idx = _U16.unpack_from(self._used, 2)[0]
        self._signalled_used = self._used_idx
        self._published = self._used_idx
        self._used_event_off = 4 + 2 * size
        self._avail_event_off = 4 + 8 * size
        self.broken = False

    def release(self) -> None:
        """Drop the views into guest memory (before the memory is unmapped)."""
        for view in (self._desc, self._avail, self._used):
            view.release()

    # -- driver -> device ------------------------------------------------------------------

    def avail_idx(self) -> int:
        value: int = _U16.unpack_from(self._avail, 2)[0]
        return value

    def pending(self) -> int:
        """How many chains the driver made available that were not popped yet.

        Raises RingError once if the driver's index is impossible; the ring is then broken
        (0 from now on) until it is started again.
        """
        if self.broken:
            return 0
        count = (self.avail_idx() - self.last_avail) & 0xFFFF
        if count > self.size:
            self.broken = True
            raise RingError(
                f"{self.name}: available index jumped by {count} (queue size {self.size})"
            )
        return count

    def pop(self) -> Chain | None:
        """The next available chain, or None. Raises ChainError (consumed) if it is malformed."""
        if self.pending() == 0:
            return None
        slot = self.last_avail % self.size
        head: int = _U16.unpack_from(self._avail, 4 + 2 * slot)[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= self.size:
            raise ChainError(f"{self.name}: head index {head} out of range", None)
        chain = Chain(head)
        self._walk(chain)
        return chain

    def unpop(self) -> None:
        """Give back the chain just popped (it was not used; nothing was written)."""
        self.last_avail = (self.last_avail - 1) & 0xFFFF

    def _walk(self, chain: Chain) -> None:
        memory = self.memory
        table = self._desc
        count = self.size
        index = chain.head
        seen = 0
        indirect_done = False
        while True:
            seen += 1
            if seen > count:
                raise ChainError(f"{self.name}: chain longer than {count} (a loop?)", chain.head)
            addr, length, flags, nxt = _DESC.unpack_from(table, 16 * index)
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise ChainError(f"{self.name}: indirect descriptor not negotiated", chain.head)
                if indirect_done or table is not self._desc:
                    raise ChainError(f"{self.name}: nested indirect descriptor", chain.head)
                if flags & DESC_F_NEXT:
                    raise ChainError(f"{self.name}: indirect descriptor with NEXT", chain.head)
                if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
                    raise ChainError(f"{self.name}: indirect table length {length}", chain.head)
                try:
                    table = memory.guest_view(addr, length)
                except GuestMemoryError as err:
                    raise ChainError(f"{self.name}: indirect table: {err}", chain.head) from err
                indirect_done = True
                count = length // 16
                index = 0
                seen = 0
                continue
            try:
                views = memory.guest_views(addr, length)
            except GuestMemoryError as err:
                raise ChainError(f"{self.name}: descriptor {index}: {err}", chain.head) from err
            if flags & DESC_F_WRITE:
                chain.writable.extend(views)
                chain.writable_len += length
            else:
                if chain.writable:
                    raise ChainError(
                        f"{self.name}: readable descriptor after a writable one", chain.head
                    )
                chain.readable.extend(views)
                chain.readable_len += length
            if not flags & DESC_F_NEXT:
                return
            if nxt >= count:
                raise ChainError(f"{self.name}: next index {nxt} out of range", chain.head)
            index = nxt

    # -- device -> driver ------------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes written into it.

        The element is written at once, but the driver sees it only at :meth:`publish`.
        """
        slot = self._used_idx % self.size
        _USED_ELEM.pack_into(self._used, 4 + 8 * slot, head, written)
        self._used_idx = (self._used_idx + 1) & 0xFFFF

    def publish(self) -> None:
        """Make every pushed chain visible to the driver (one used-index store per batch).

        A driver polling the used ring then finds a batch, not a trickle of single
        buffers: fewer wake-ups and credit updates on its side per byte.
        """
        if self._published != self._used_idx:
            self._published = self._used_idx
            _U16.pack_into(self._used, 2, self._used_idx)

    @property
    def unpublished(self) -> int:
        """Chains pushed since the last :meth:`publish`."""
        count: int = (self._used_idx - self._published) & 0xFFFF
        return count

    @property
    def unsignalled(self) -> int:
        """Chains pushed since the driver was last considered for an interrupt."""
        count: int = (self._used_idx - self._signalled_used) & 0xFFFF
        return count

    def need_notify(self) -> bool:
        """Publish, then whether the driver wants an interrupt for the chains pushed since
        the last one."""
        self.publish()
        old, new = self._signalled_used, self._used_idx
        if old == new:
            return False
        self._signalled_used = new
        if self.event_idx:
            event: int = _U16.unpack_from(self._avail, self._used_event_off)[0]
            return bool(((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF))
        flags: int = _U16.unpack_from(self._avail, 0)[0]
        return not flags & AVAIL_F_NO_INTERRUPT

    def arm_kick(self) -> bool:
        """Ask for a kick on the next buffer; True if buffers arrived meanwhile (pop again)."""
        if self.event_idx:
            _U16.pack_into(self._used, self._avail_event_off, self.last_avail)
        return not self.broken and self.avail_idx() != self.last_avail
