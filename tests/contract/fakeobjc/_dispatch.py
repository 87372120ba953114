"""A stand-in for PyObjC's ``dispatch`` (libdispatch) module.

Each serial queue runs its blocks on a dedicated thread and records, per thread, which queue
is current, so the Virtualization stand-in can check that VM calls happen on the VM's queue.
The main queue has no thread: its blocks run when the main thread pumps the run loop
(``CFRunLoopRunInMode``), as on macOS. Synchronous dispatch onto the queue one is already
running on is a deadlock on macOS; here it is a contract violation.
"""

from __future__ import annotations

import inspect
import queue as _queue
import threading
import time
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._runtime import FakeRuntime

_tls = threading.local()
_STOP = object()

#: libdispatch functions the backend uses that the vendored API data does not list, with the
#: facts the stand-in models (from PyObjC's ``pyobjc-framework-libdispatch`` tests,
#: ``PyObjCTest/test_queueu.py``): extend the data here, deliberately, one function at a time.
EXTRA_LIBDISPATCH = {
    "dispatch_queue_get_label": (
        "argument 0 is a dispatch_queue_t (_C_ID) or DISPATCH_CURRENT_QUEUE_LABEL (None, the "
        "queue the caller runs on); the result is a NUL-terminated C string (bytes), '' for "
        "a queue without a label"
    ),
}

DISPATCH_TIME_NOW = 0
DISPATCH_TIME_FOREVER = 18446744073709551615
NSEC_PER_SEC = 1000000000


def current_queue() -> FakeQueue | None:
    return getattr(_tls, "queue", None)


class FakeQueue:
    """``dispatch_queue_t``: serial, one thread (or the main thread's run loop)."""

    def __init__(self, rt: FakeRuntime, label: bytes | None, *, main: bool = False) -> None:
        self.rt = rt
        self.label = label
        self.main = main
        self._items: _queue.SimpleQueue[Any] = _queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.closed = False

    def __repr__(self) -> str:
        return f"<dispatch_queue_t {self.label!r}>"

    # -- running blocks ----------------------------------------------------------------------

    def _run(self, block: Callable[[], object]) -> None:
        previous = current_queue()
        _tls.queue = self
        try:
            self.rt.call_python(block, what=f"a block dispatched to {self!r}")
        finally:
            _tls.queue = previous

    def _loop(self) -> None:
        while True:
            item = self._items.get()
            if item is _STOP:
                return
            block, done = item
            self._run(block)
            if done is not None:
                done.set()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                name = f"fake-dispatch-{(self.label or b'anon').decode(errors='replace')}"
                self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
                self._thread.start()

    def submit(self, block: Callable[[], object], *, wait: bool) -> None:
        if self.closed:
            raise self.rt.violation(f"block dispatched to {self!r} after the test ended")
        done = threading.Event() if wait else None
        self._items.put((block, done))
        if not self.main:
            self._ensure_thread()
        if done is not None:
            if self.main and threading.current_thread() is threading.main_thread():
                self.drain()
            if not done.wait(10):
                raise self.rt.violation(f"dispatch_sync onto {self!r} never ran (deadlock)")

    def drain(self, max_items: int | None = None) -> int:
        """Main queue only: run pending blocks (called by the run-loop functions)."""
        ran = 0
        while max_items is None or ran < max_items:
            try:
                item = self._items.get_nowait()
            except _queue.Empty:
                break
            if item is _STOP:
                continue
            block, done = item
            self._run(block)
            if done is not None:
                done.set()
            ran += 1
        return ran

    def pending(self) -> bool:
        return not self._items.empty()

    def close(self) -> None:
        self.closed = True
        thread = self._thread
        if thread is not None:
            self._items.put(_STOP)
            thread.join(5)


class FakeSemaphore:
    def __init__(self, value: int) -> None:
        self._sem = threading.Semaphore(value)


def _arity(rt: FakeRuntime, name: str, args: tuple[Any, ...], n: int) -> None:
    if len(args) != n:
        raise rt.violation(f"dispatch.{name}() takes {n} arguments, got {len(args)}")


def _block(rt: FakeRuntime, name: str, block: object) -> Callable[[], object]:
    if not callable(block):
        raise rt.violation(f"dispatch.{name}(): the block must be callable, got {block!r}")
    try:
        sig = inspect.signature(block)
    except (TypeError, ValueError):
        return block
    required = [
        p
        for p in sig.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if required:
        raise rt.violation(f"dispatch.{name}(): dispatch blocks take no arguments ({sig})")
    return block


def make_module(rt: FakeRuntime) -> types.ModuleType:
    from ._runtime import StrictModule

    mod = StrictModule("dispatch", rt)
    allowed = set(rt.api.libdispatch) | set(EXTRA_LIBDISPATCH)

    def export(fn: Callable[..., Any]) -> None:
        if fn.__name__ in allowed:  # only what the API data lists exists
            setattr(mod, fn.__name__, fn)

    def queue_arg(name: str, q: object) -> FakeQueue:
        if not isinstance(q, FakeQueue):
            raise rt.violation(f"dispatch.{name}(): expected a dispatch queue, got {q!r}")
        return q

    def dispatch_queue_create(*args: Any) -> FakeQueue:
        _arity(rt, "dispatch_queue_create", args, 2)
        label, attr = args
        if label is not None and not isinstance(label, bytes):
            raise rt.violation(f"dispatch_queue_create(): label must be bytes or None: {label!r}")
        if attr is not None:
            raise rt.violation("dispatch_queue_create(): only DISPATCH_QUEUE_SERIAL (None)")
        q = FakeQueue(rt, label)
        rt.queues.append(q)
        return q

    def dispatch_sync(*args: Any) -> None:
        _arity(rt, "dispatch_sync", args, 2)
        q = queue_arg("dispatch_sync", args[0])
        block = _block(rt, "dispatch_sync", args[1])
        running_main = q.main and threading.current_thread() is threading.main_thread()
        if current_queue() is q or (running_main and current_queue() is rt.main_queue):
            raise rt.violation(f"dispatch_sync onto {q!r} from a block already on it (deadlock)")
        q.submit(block, wait=True)

    def dispatch_async(*args: Any) -> None:
        _arity(rt, "dispatch_async", args, 2)
        q = queue_arg("dispatch_async", args[0])
        q.submit(_block(rt, "dispatch_async", args[1]), wait=False)

    def dispatch_queue_get_label(*args: Any) -> bytes:
        _arity(rt, "dispatch_queue_get_label", args, 1)
        if args[0] is None:  # DISPATCH_CURRENT_QUEUE_LABEL
            q = current_queue()
            if q is None and threading.current_thread() is threading.main_thread():
                q = rt.main_queue
        else:
            q = queue_arg("dispatch_queue_get_label", args[0])
        return b"" if q is None or q.label is None else q.label

    def dispatch_get_main_queue(*args: Any) -> FakeQueue:
        _arity(rt, "dispatch_get_main_queue", args, 0)
        return rt.main_queue

    def dispatch_get_global_queue(*args: Any) -> FakeQueue:
        _arity(rt, "dispatch_get_global_queue", args, 2)
        return rt.global_queue()

    def dispatch_time(*args: Any) -> int:
        _arity(rt, "dispatch_time", args, 2)
        when, delta = args
        base = time.monotonic_ns() if when == DISPATCH_TIME_NOW else int(when)
        return base + int(delta)

    def dispatch_after(*args: Any) -> None:
        _arity(rt, "dispatch_after", args, 3)
        when, q, block = args
        q = queue_arg("dispatch_after", q)
        block = _block(rt, "dispatch_after", block)
        delay = max(0.0, (int(when) - time.monotonic_ns()) / NSEC_PER_SEC)
        timer = threading.Timer(delay, lambda: q.submit(block, wait=False))
        timer.daemon = True
        rt.timers.append(timer)
        timer.start()

    def dispatch_semaphore_create(*args: Any) -> FakeSemaphore:
        _arity(rt, "dispatch_semaphore_create", args, 1)
        return FakeSemaphore(int(args[0]))

    def dispatch_semaphore_wait(*args: Any) -> int:
        _arity(rt, "dispatch_semaphore_wait", args, 2)
        sem, timeout = args
        if timeout == DISPATCH_TIME_FOREVER:
            wait_s: float | None = None
        else:
            wait_s = max(0.0, (int(timeout) - time.monotonic_ns()) / NSEC_PER_SEC)
        return 0 if sem._sem.acquire(timeout=wait_s) else 1

    def dispatch_semaphore_signal(*args: Any) -> int:
        _arity(rt, "dispatch_semaphore_signal", args, 1)
        args[0]._sem.release()
        return 0

    def dispatch_main(*args: Any) -> None:
        raise rt.violation("dispatch_main() never returns; a library must not call it")

    for fn in (
        dispatch_queue_create,
        dispatch_sync,
        dispatch_async,
        dispatch_queue_get_label,
        dispatch_get_main_queue,
        dispatch_get_global_queue,
        dispatch_time,
        dispatch_after,
        dispatch_semaphore_create,
        dispatch_semaphore_wait,
        dispatch_semaphore_signal,
        dispatch_main,
    ):
        export(fn)
    mod.DISPATCH_QUEUE_SERIAL = None
    mod.DISPATCH_CURRENT_QUEUE_LABEL = None
    mod.DISPATCH_TIME_NOW = DISPATCH_TIME_NOW
    mod.DISPATCH_TIME_FOREVER = DISPATCH_TIME_FOREVER
    mod.NSEC_PER_SEC = NSEC_PER_SEC
    return mod
