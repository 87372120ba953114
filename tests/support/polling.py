"""Waiting for a condition with a deadline, the one way tests synchronise with a thread or
process they do not control (fixed sleeps are not synchronisation: a loaded machine outlasts
any of them)."""

from __future__ import annotations

import array
import fcntl
import socket
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

POLL_S = 0.005


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Return as soon as ``predicate()`` is true; raise TimeoutError naming ``what`` if it is
    still false after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL_S)  # poll interval


def unread_by_peer(sock: socket.socket) -> int:
    """What of our writes on a Unix stream socket the peer has not read yet (``SIOCOUTQ``: the
    bytes stay charged to the sender until the receiver takes them), so a test can wait until
    the other side has read something before it sends more."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
    return buf[0]


def blocked_in_poll(thread: threading.Thread) -> bool:
    """Whether ``thread`` sleeps in ``select``/``poll`` (its kernel wait channel, Linux): the
    positive signal that it reached a blocking wait, where a sleep only guessed it."""
    tid = thread.native_id
    try:
        wchan = Path(f"/proc/self/task/{tid}/wchan").read_text()
    except OSError:
        return False
    return "poll" in wchan or "select" in wchan
