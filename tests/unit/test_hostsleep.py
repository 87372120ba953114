"""Noticing a host sleep (``vzkit._hostsleep``): fake clocks, the real watch loop."""

from __future__ import annotations

import asyncio
import sys

import pytest

from vzkit._hostsleep import MIN_SLEEP_S, SleepWatch, sleep_clocks

S = 10**9


def _watch_with(ticks: list[tuple[int, int]], fail: bool = False) -> list[float]:
    """Run a watch over ``ticks`` (one reading per check, the first two at start) and return
    the sleeps it reported; ``fail``: the wake handler raises each time."""
    woke: list[float] = []
    readings = iter(ticks)

    async def on_wake(slept: float) -> None:
        woke.append(slept)
        if fail:
            raise RuntimeError("the agent is gone")

    async def main() -> None:
        watch = SleepWatch(on_wake, clocks=lambda: next(readings, None), interval_s=0.001)
        watch.start()
        while watch.running:  # it ends when the fake clocks run out (None)
            await asyncio.sleep(0.001)  # poll interval

    asyncio.run(asyncio.wait_for(main(), 10))
    return woke


def test_a_sleep_is_the_suspend_counting_clock_running_ahead() -> None:
    ticks = [(0, 0), (0, 0), (5 * S, 5 * S), (45 * S, 10 * S), (50 * S, 15 * S)]
    assert _watch_with(ticks) == [35.0]


def test_drift_below_the_threshold_is_not_a_sleep() -> None:
    step = int((MIN_SLEEP_S - 0.5) * S)
    ticks = [(0, 0), (0, 0), (5 * S + step, 5 * S), (10 * S + 2 * step, 10 * S)]
    assert _watch_with(ticks) == []


def test_a_failing_wake_handler_does_not_end_the_watch() -> None:
    ticks = [(0, 0), (0, 0), (10 * S, 0), (20 * S, 0)]
    assert _watch_with(ticks, fail=True) == [10.0, 10.0]


def test_no_clocks_no_watch_and_stop_is_idempotent() -> None:
    async def never(slept: float) -> None:
        raise AssertionError("no wake expected")

    async def main() -> None:
        watch = SleepWatch(never, clocks=lambda: None)
        watch.start()
        assert not watch.running
        watch.stop()
        watch.stop()

    asyncio.run(main())


@pytest.mark.skipif(sys.platform != "linux", reason="CLOCK_BOOTTIME")
def test_the_linux_pair_counts_suspend_in_the_first() -> None:
    pair = sleep_clocks()
    assert pair is not None
    with_sleep, without = pair
    assert with_sleep >= without - 10**6  # boot time counts every suspend, monotonic none
