"""The port table: which connections are open, by ``(host port, guest port)``.

Live connections are keyed by their port pair; a host-initiated connection gets a local port
from ``2**30`` up (:meth:`PortTable.local_port`), never one in use. Connections the guest is
done with but whose bytes have not reached the host yet *linger*: they are out of the table
(a new connection may take their ports) but still hold a host socket, buffers and credit, so
they count against the connection cap.
"""

from __future__ import annotations

from ._conn import U32, Conn

__all__ = ["PortTable"]

_LOCAL_PORT_BASE = 1 << 30


class PortTable:
    __slots__ = ("_local_ports", "_next_port", "lingering", "live")

    def __init__(self) -> None:
        self.live: dict[tuple[int, int], Conn] = {}
        self.lingering: dict[Conn, None] = {}
        self._local_ports: set[int] = set()
        self._next_port = _LOCAL_PORT_BASE

    @property
    def holders(self) -> int:
        """Connections holding a host socket and buffers: live ones and lingering ones."""
        return len(self.live) + len(self.lingering)

    def conns(self) -> list[Conn]:
        """Every connection holding a host socket: live ones, then lingering ones."""
        return [*self.live.values(), *self.lingering]

    def add(self, conn: Conn) -> None:
        self.live[conn.key] = conn
        if conn.host_initiated:
            self._local_ports.add(conn.host_port)

    def forget(self, conn: Conn) -> None:
        """Take ``conn`` out of the table (its ports are free again)."""
        if self.live.get(conn.key) is conn:
            del self.live[conn.key]
        if conn.host_initiated:
            self._local_ports.discard(conn.host_port)

    def local_port(self, guest_port: int) -> int:
        """A free host port for a host-initiated connection to ``guest_port``."""
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < U32 - 1 else _LOCAL_PORT_BASE
            if port not in self._local_ports and (port, guest_port) not in self.live:
                return port
