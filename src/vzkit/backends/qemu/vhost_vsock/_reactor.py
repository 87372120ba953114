"""A minimal single-threaded epoll loop: fd callbacks, timers and a cross-thread wake-up.

The device runs everything on one thread (or in one helper process): no locks around device
state, no callbacks on other threads. Level-triggered epoll; callbacks get the raw event mask,
so hang-ups (``EPOLLHUP``) are visible, which :mod:`selectors` hides. ``wake()`` is the only
method safe to call from another thread.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import time
from collections.abc import Callable

__all__ = ["EPOLLERR", "EPOLLHUP", "EPOLLIN", "EPOLLOUT", "Reactor", "Timer"]

log = logging.getLogger(__name__)

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLHUP = select.EPOLLHUP
EPOLLERR = select.EPOLLERR

FdCallback = Callable[[int], None]


class Timer:
    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, FdCallback] = {}
        self._masks: dict[int, int] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.register(self._wake_fd, EPOLLIN, self._drain_wake)
        self.closed = False

    # -- fds -------------------------------------------------------------------------------

    def register(self, fd: int, mask: int, callback: FdCallback) -> None:
        """Watch ``fd`` for ``mask``; ``mask == 0`` unregisters it (no hang-up reports)."""
        old = self._masks.get(fd)
        if mask == 0:
            self.unregister(fd)
            return
        self._callbacks[fd] = callback
        if old is None:
            self._epoll.register(fd, mask)
        elif old != mask:
            self._epoll.modify(fd, mask)
        self._masks[fd] = mask

    def unregister(self, fd: int) -> None:
        if self._masks.pop(fd, None) is not None:
            self._callbacks.pop(fd, None)
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def registered(self, fd: int) -> int:
        return self._masks.get(fd, 0)

    @property
    def watched(self) -> int:
        return len(self._masks)

    # -- timers ----------------------------------------------------------------------------

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.deadline, next(self._seq), timer))
        return timer

    def _next_timeout(self, limit: float | None) -> float | None:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return limit
        delay = max(0.0, self._timers[0][0] - time.monotonic())
        return delay if limit is None else min(delay, limit)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.cancelled = True
                try:
                    timer.callback()
                except Exception:
                    log.exception("vsock device: timer callback failed")

    # -- loop ------------------------------------------------------------------------------

    def wake(self) -> None:
        """Interrupt a blocking :meth:`run_once` (thread safe)."""
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake_fd, 1)

    def _drain_wake(self, mask: int) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_read(self._wake_fd)

    def run_once(self, timeout: float | None = None) -> None:
        """Wait for events (at most ``timeout`` seconds) and dispatch them, then due timers."""
        wait = self._next_timeout(timeout)
        try:
            events = self._epoll.poll(-1 if wait is None else wait)
        except InterruptedError:
            events = []
        for fd, mask in events:
            callback = self._callbacks.get(fd)
            if callback is not None:  # an earlier callback of this batch may have dropped it
                try:
                    callback(mask)
                except Exception:  # a bug must not take every other connection down with it
                    log.exception("vsock device: callback for fd %d failed", fd)
        self._run_timers()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._callbacks.clear()
        self._masks.clear()
        self._timers.clear()
        self._epoll.close()
        with contextlib.suppress(OSError):
            os.close(self._wake_fd)
