"""Firecracker's hybrid vsock convention on the host side of the device.

Host-initiated: a host program connects to the Unix socket ``<uds>`` and writes
``CONNECT <port>\\n``; once the guest accepts, the device answers ``OK <host port>\\n`` and the
same stream carries the connection. If nobody listens on the guest port, the device closes
the stream without a reply. Guest-initiated connections to host port ``P`` are forwarded to a
Unix socket the host program listens on at ``<uds>_<P>``.

The request line is strict: ``CONNECT``, one space, 1 to 10 decimal digits (at most
``2**32 - 1``), ``\\n``, all within :data:`MAX_LINE` bytes; anything else (lower case, a sign,
an over-long line, end of stream before the newline, no line within the handshake timeout)
closes the stream. The device reads exactly up to the newline, so bytes a client sends after
its request line but before ``OK`` stay in the stream and reach the guest once connected.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

from ....errors import VMError
from ._reactor import EPOLLIN, Reactor, Timer

__all__ = [
    "MAX_LINE",
    "HandshakeError",
    "HybridListener",
    "connect_hybrid",
    "guest_port_path",
    "parse_connect_line",
    "peer_address",
    "peer_port_from_address",
]

log = logging.getLogger(__name__)

MAX_LINE = 32
_LINE = re.compile(rb"CONNECT ([0-9]{1,10})\n")
_PARTIAL = re.compile(rb"CONNECT [0-9]{0,10}")  # a line that may still become valid
_MAX_PORT = 0xFFFFFFFF
_ACCEPT_PAUSE_S = 0.1


class HandshakeError(VMError, ValueError):
    """A ``CONNECT`` request line is malformed."""


def parse_connect_line(line: bytes) -> int:
    """The port of a complete request line ``b"CONNECT <port>\\n"``; HandshakeError if bad."""
    match = _LINE.fullmatch(line)
    if match is None:
        raise HandshakeError(f"malformed request line {line[:MAX_LINE]!r}")
    port = int(match.group(1))
    if port > _MAX_PORT:
        raise HandshakeError(f"port {port} does not fit in 32 bits")
    return port


def guest_port_path(uds_path: Path | str, port: int) -> str:
    """Where host programs listen for guest connections to host port ``port``."""
    return f"{os.fspath(uds_path)}_{port}"


#: Prefix of the abstract Unix address the device binds before connecting to ``<uds>_<P>``:
#: ``\0vzkit-vsock:<guest cid>:<guest port>:<pid>:<n>``, so a listener learns the guest port
#: from ``accept()``'s peer address (Firecracker's listeners ignore it; Linux only).
PEER_PREFIX = "\0vzkit-vsock:"


def peer_address(guest_cid: int, guest_port: int, serial: int) -> str:
    """The abstract address for the ``serial``-th guest-initiated stream of this process."""
    return f"{PEER_PREFIX}{guest_cid}:{guest_port}:{os.getpid()}:{serial}"


def peer_port_from_address(address: object) -> int | None:
    """The guest port encoded in a peer address from :func:`peer_address`, else ``None``."""
    text = address.decode(errors="replace") if isinstance(address, bytes) else address
    if not isinstance(text, str) or not text.startswith(PEER_PREFIX):
        return None
    fields = text[len(PEER_PREFIX) :].split(":")
    if len(fields) != 4 or not fields[1].isdigit():
        return None
    port = int(fields[1])
    return port if port <= _MAX_PORT else None


def connect_hybrid(
    uds_path: Path | str, port: int, timeout: float | None = None
) -> tuple[socket.socket, int]:
    """Connect to guest ``port`` through the device at ``uds_path`` (a client helper).

    Returns the connected stream and the host-side port from the ``OK`` line. Raises
    ConnectionRefusedError when the device closes the stream (nobody listens on ``port``)
    and TimeoutError when no answer comes within ``timeout`` seconds.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        sock.settimeout(timeout)
        sock.connect(os.fspath(uds_path))
        sock.sendall(b"CONNECT %d\n" % port)
        line = b""
        while not line.endswith(b"\n"):
            if deadline is not None:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:  # peek, then take exactly the line: the stream's data stays in the socket
                peek = sock.recv(MAX_LINE, socket.MSG_PEEK)
                newline = peek.find(b"\n")
                chunk = sock.recv(len(peek) if newline < 0 else newline + 1) if peek else b""
            except ConnectionResetError as err:
                raise ConnectionRefusedError(f"vsock port {port} refused the connection") from err
            if not chunk:
                raise ConnectionRefusedError(f"vsock port {port} refused the connection")
            line += chunk
            if len(line) > MAX_LINE:
                raise ConnectionError(f"unexpected answer {line!r}")
        if not line.startswith(b"OK ") or not line[3:-1].isdigit():
            raise ConnectionError(f"unexpected answer {line!r}")
        host_port = int(line[3:-1])
        sock.settimeout(None)
        return sock, host_port
    except BaseException:
        sock.close()
        raise


class _Handshake:
    __slots__ = ("buf", "sock", "timer")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.timer: Timer | None = None


class HybridListener:
    """Accepts host connections on ``<uds>`` and parses their request lines on the reactor.

    ``on_connect(sock, port)`` gets each stream whose request line was valid (the line itself
    consumed, nothing else); it owns the socket from then on. Pending handshakes plus
    ``in_use()`` (the connections that hold a socket) stay below ``max_pending``: each holds a
    descriptor.
    """

    def __init__(
        self,
        reactor: Reactor,
        path: Path,
        on_connect: Callable[[socket.socket, int], None],
        *,
        handshake_timeout_s: float = 10.0,
        max_pending: int = 4096,
        in_use: Callable[[], int] = lambda: 0,
    ) -> None:
        self._reactor = reactor
        self.path = path
        self._on_connect = on_connect
        self._timeout = handshake_timeout_s
        self._max_pending = max_pending
        self._in_use = in_use
        self._pending: dict[int, _Handshake] = {}
        self._sock: socket.socket | None = None
        self._accept_timer: Timer | None = None
        self.rejected = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def open(self) -> None:
        path = os.fspath(self.path)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket of an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(1024)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._reactor.register(sock.fileno(), EPOLLIN, self._on_accept)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if self._accept_timer is not None:
            self._accept_timer.cancel()
        if sock is not None:
            self._reactor.unregister(sock.fileno())
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        for hs in list(self._pending.values()):
            self._drop(hs)

    def _on_accept(self, mask: int) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(64):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment instead of spinning.
                    log.warning("vsock: cannot accept host connection: %s", err)
                    self._reactor.unregister(sock.fileno())
                    self._accept_timer = self._reactor.call_later(
                        _ACCEPT_PAUSE_S, self._resume_accept
                    )
                return
            conn.setblocking(False)
            if len(self._pending) + self._in_use() >= self._max_pending:
                log.warning("vsock: %d handshakes pending and %d connections open, refusing "
                            "another", len(self._pending), self._in_use())  # fmt: skip
                self.rejected += 1
                conn.close()
                continue
            hs = _Handshake(conn)
            hs.timer = self._reactor.call_later(
                self._timeout, functools.partial(self._reject, hs, "no request line in time")
            )
            self._pending[conn.fileno()] = hs
            self._reactor.register(conn.fileno(), EPOLLIN, functools.partial(self._on_data, hs))

    def _resume_accept(self) -> None:
        if self._sock is not None:
            self._reactor.register(self._sock.fileno(), EPOLLIN, self._on_accept)

    def _drop(self, hs: _Handshake) -> None:
        if hs.timer is not None:
            hs.timer.cancel()
        fd = hs.sock.fileno()
        if fd >= 0:
            self._reactor.unregister(fd)
            self._pending.pop(fd, None)
        hs.sock.close()

    def _reject(self, hs: _Handshake, why: str) -> None:
        log.info("vsock: rejected host connection: %s", why)
        self._drop(hs)  # first: a reader that sees the rejection counted sees it not pending
        self.rejected += 1

    def _on_data(self, hs: _Handshake, mask: int) -> None:
        try:
            peek = hs.sock.recv(MAX_LINE - len(hs.buf), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._reject(hs, f"read failed: {err}")
            return
        if not peek:
            self._reject(hs, "closed before a complete request line")
            return
        newline = peek.find(b"\n")
        take = len(peek) if newline < 0 else newline + 1
        try:
            data = hs.sock.recv(take)  # exactly what was peeked: never past the newline
        except OSError as err:
            self._reject(hs, f"read failed: {err}")
            return
        hs.buf += data
        if newline < 0:
            if len(hs.buf) >= MAX_LINE:
                self._reject(hs, f"request line longer than {MAX_LINE} bytes")
            elif not _PARTIAL.fullmatch(hs.buf) and not b"CONNECT ".startswith(hs.buf):
                self._reject(hs, f"malformed request line {hs.buf!r}")
            return
        try:
            port = parse_connect_line(hs.buf)
        except HandshakeError as err:
            self._reject(hs, str(err))
            return
        if hs.timer is not None:
            hs.timer.cancel()
        self._reactor.unregister(hs.sock.fileno())
        del self._pending[hs.sock.fileno()]
        self._on_connect(hs.sock, port)
