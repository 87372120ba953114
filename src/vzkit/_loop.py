"""The one background event loop that runs every VM's asynchronous core.

Backends are written once, as asyncio code (QMP is asyncio, process watching is asyncio).
The sync facade submits coroutines here and blocks on the result; the asyncio facade awaits
the same coroutines from its own loop through :func:`wrap`. The loop thread is a daemon that
lives as long as the process, so child processes that tie their lifetime to the thread that
spawned them (``PR_SET_PDEATHSIG``) die with this process, not earlier.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["get_loop", "run_sync", "wrap"]

T = TypeVar("T")
log = logging.getLogger(__name__)

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    """The shared loop, started on first use."""
    global _loop, _thread
    if sys.is_finalizing():  # a new thread would never start: fail instead of hanging
        raise RuntimeError("vzkit's event loop is gone: the interpreter is shutting down")
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            thread = threading.Thread(target=run, name="vzkit-loop", daemon=True)
            thread.start()
            ready.wait()
            _loop, _thread = loop, thread
        return _loop


def in_loop_thread() -> bool:
    return _thread is not None and threading.current_thread() is _thread


#: What a sync call on the main thread runs while it waits, when set (``pump(seconds)``): the
#: vz backend's windows, whose events and main dispatch queue only the main thread serves.
_main_pump: Callable[[float], object] | None = None
_PUMP_S = 0.05


def set_main_thread_pump(pump: Callable[[float], object] | None) -> None:
    """Have sync calls made on the main thread run ``pump(seconds)`` while they wait (``None``:
    block as usual). The one owner is the vz backend's window code."""
    global _main_pump
    _main_pump = pump


def _wait(future: concurrent.futures.Future[T]) -> T:
    if threading.current_thread() is not threading.main_thread():
        return future.result()
    while True:  # the main thread: a window may open (and need serving) while it waits
        pump = _main_pump
        if pump is None:
            try:
                return future.result(timeout=_PUMP_S)
            except concurrent.futures.TimeoutError:
                if future.done():  # the call's own TimeoutError (VMTimeoutError is one)
                    raise
                continue
        if future.done():
            return future.result()
        try:
            pump(_PUMP_S)
        except Exception:  # a window's trouble must not lose the call's result
            log.exception("the main thread's event pump failed; waiting without it")
            return future.result()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the shared loop and block until it finishes.

    On the main thread, while a pump is set (:func:`set_main_thread_pump`), the wait runs it.
    ``KeyboardInterrupt`` while waiting cancels the coroutine (so its cleanup runs) and then
    propagates.
    """
    if in_loop_thread():
        coro.close()
        raise RuntimeError("vzkit's sync API cannot be called from its own event loop thread")
    try:
        loop = get_loop()
    except RuntimeError:
        coro.close()
        raise
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return _wait(future)
    except KeyboardInterrupt:
        future.cancel()
        try:
            future.result(timeout=30)
        except (concurrent.futures.CancelledError, Exception):
            pass
        raise


async def wrap(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` (running on the shared loop) from any other event loop."""
    future = asyncio.run_coroutine_threadsafe(coro, get_loop())
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.cancel()
        raise
