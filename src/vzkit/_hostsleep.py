"""Noticing that the host slept: while it sleeps, a guest's clock stands still.

The guest's ``CLOCK_REALTIME`` goes on from where it was when the host (and with it the VMM)
was suspended, so after a wake it is behind by the length of the sleep. :class:`SleepWatch`
compares, every :data:`CHECK_INTERVAL_S`, a clock that counts sleep with one that does not
(Linux: ``CLOCK_BOOTTIME`` and ``CLOCK_MONOTONIC``; macOS: ``CLOCK_MONOTONIC`` and
``CLOCK_UPTIME_RAW``); when the first ran ahead by more than :data:`MIN_SLEEP_S`, the host
slept, and it calls its ``on_wake`` coroutine with the seconds slept. The core's
``VMCore.host_woke`` is that coroutine (it steps the guest clock through the agent); a wake
notification (macOS ``NSWorkspaceDidWakeNotification``) may call it directly.

A check costs two ``clock_gettime`` calls; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable

__all__ = ["CHECK_INTERVAL_S", "MIN_SLEEP_S", "SleepWatch", "sleep_clocks"]

log = logging.getLogger("vzkit.vm")

CHECK_INTERVAL_S = 5.0
MIN_SLEEP_S = 2.0


def sleep_clocks() -> tuple[int, int] | None:
    """``(with_sleep_ns, without_sleep_ns)`` now, or ``None`` where the host has no such pair."""
    if sys.platform == "linux":
        return time.clock_gettime_ns(time.CLOCK_BOOTTIME), time.clock_gettime_ns(
            time.CLOCK_MONOTONIC
        )
    uptime = getattr(time, "CLOCK_UPTIME_RAW", None)  # macOS: stops while asleep
    if sys.platform == "darwin" and uptime is not None:
        return time.clock_gettime_ns(time.CLOCK_MONOTONIC), time.clock_gettime_ns(uptime)
    return None


class SleepWatch:
    """Call ``on_wake(seconds_slept)`` after the host slept (see the module's doc)."""

    def __init__(
        self,
        on_wake: Callable[[float], Awaitable[None]],
        clocks: Callable[[], tuple[int, int] | None] = sleep_clocks,
        interval_s: float = CHECK_INTERVAL_S,
    ) -> None:
        self._on_wake, self._clocks, self._interval = on_wake, clocks, interval_s
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Watch from now on (on the running loop); a no-op where the host has no clocks."""
        if self.running or self._clocks() is None:
            return
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    async def _watch(self) -> None:
        last = self._clocks()
        while last is not None:
            await asyncio.sleep(self._interval)
            now = self._clocks()
            if now is None:
                return
            slept = ((now[0] - last[0]) - (now[1] - last[1])) / 1e9
            last = now
            if slept > MIN_SLEEP_S:
                log.info("the host slept for %.0f s", slept)
                try:
                    await self._on_wake(slept)
                except Exception as err:  # never end the watch: the next wake tries again
                    log.warning("after the host slept: %s", err)
