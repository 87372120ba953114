"""The one adapter to PyObjC: the only module that imports ``Virtualization``, ``Foundation``,
``objc`` and ``dispatch`` — lazily, on first use, so importing the backend needs no PyObjC.

It provides what the rest of the backend builds on (the seed's plumbing):

- the framework modules (:func:`vz`, :func:`foundation`, :func:`objc_module`,
  :func:`libdispatch`) and macOS version gating (re-exported from ``_gating``:
  :func:`require_macos` raising :class:`MacOSVersionError`, which names the version an API
  needs);
- :class:`Queue`, a serial dispatch queue with ``sync``/``async_`` that never lets a Python
  exception cross into Objective-C and runs re-entrant ``sync`` calls inline instead of
  deadlocking;
- run-loop helpers (:func:`run_run_loop_once`, :func:`run_run_loop_until_done`,
  :func:`run_run_loop_aggressively`);
- :class:`ErrorCompletionHandler`, the ``void (^)(NSError *)`` block with ``wait``/``done``/
  ``error`` and an asyncio bridge;
- NSData conversion and :func:`retain` (a strong Python reference for objects the framework
  holds weakly or must outlive a call);
- the delegate classes (``NSObject`` subclasses) for VM state changes and vsock listeners.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from ...errors import BackendUnavailableError
from ._gating import (  # re-exported: the backend's modules take them from here
    MIN_MACOS,
    MacOSVersionError,
    _fmt,
    is_arm64,
    macos_version,
    require_arm64,
    require_macos,
)

__all__ = [
    "MIN_MACOS",
    "ErrorCompletionHandler",
    "MacOSVersionError",
    "Queue",
    "appkit",
    "foundation",
    "is_arm64",
    "libdispatch",
    "listener_delegate",
    "macos_version",
    "nsdata_from_bytes",
    "nsdata_to_bytes",
    "objc_module",
    "release",
    "require_arm64",
    "require_macos",
    "retain",
    "run_run_loop_aggressively",
    "run_run_loop_once",
    "run_run_loop_until_done",
    "vm_delegate",
    "vz",
    "window_delegate",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_INSTALL_HINT = "install the PyObjC bindings with: pip install 'vzkit[vz]'"


# -- the framework modules ---------------------------------------------------------------------


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise BackendUnavailableError(
            f"the vz backend needs PyObjC's {name!r} module ({err}); {_INSTALL_HINT}"
        ) from err


def vz() -> Any:
    """PyObjC's ``Virtualization`` module."""
    return _module("Virtualization")


def foundation() -> Any:
    """PyObjC's ``Foundation`` module (CoreFoundation's run-loop functions included)."""
    return _module("Foundation")


def objc_module() -> Any:
    """PyObjC's ``objc`` module."""
    return _module("objc")


def libdispatch() -> Any:
    """PyObjC's ``dispatch`` (libdispatch) module."""
    return _module("dispatch")


def appkit() -> Any:
    """PyObjC's ``AppKit`` module (a VM's window: :mod:`._gui`)."""
    return _module("AppKit")


# -- dispatch queues ---------------------------------------------------------------------------

_running = threading.local()

#: Queues vzkit created, by their dispatch label (unique: a random suffix). The label of the
#: queue a block runs on (``dispatch_queue_get_label(DISPATCH_CURRENT_QUEUE_LABEL)``) then
#: names the :class:`Queue`, also inside blocks the framework runs there itself.
_own_labels: weakref.WeakValueDictionary[bytes, Queue] = weakref.WeakValueDictionary()


def _running_queues() -> list[Queue]:
    stack: list[Queue] | None = getattr(_running, "stack", None)
    if stack is None:
        stack = []
        _running.stack = stack
    return stack


def _label_bytes(label: Any) -> bytes | None:
    if isinstance(label, bytes):
        return label
    if isinstance(label, str):
        return label.encode()
    return None


class Queue:
    """A serial dispatch queue: every call on a ``VZVirtualMachine`` runs on its queue.

    ``sync`` runs ``work`` on the queue and returns its result; an exception raised by
    ``work`` is caught inside the block and re-raised in the caller, so it never crosses
    into Objective-C. A ``sync`` from code already running on this queue runs inline
    (dispatching synchronously onto the current queue would deadlock): a block this object
    dispatched, and a completion handler or delegate callback the framework runs there.
    """

    def __init__(self, label: str = "vzkit.vm", *, _queue: Any = None) -> None:
        self.label = label
        self._dispatch_label: bytes | None = None
        if _queue is None:
            d = libdispatch()
            unique = f"{label}#{os.urandom(6).hex()}".encode()
            _queue = d.dispatch_queue_create(unique, d.DISPATCH_QUEUE_SERIAL)
            self._dispatch_label = unique
            _own_labels[unique] = self
        else:
            known = _label_bytes(libdispatch().dispatch_queue_get_label(_queue))
            if known is not None and known in _own_labels:
                self._dispatch_label = known  # a queue vzkit made: its label is unique
        self._queue = _queue

    @classmethod
    def wrap(cls, queue: Any, label: str = "wrapped") -> Queue:
        """A :class:`Queue` over an existing ``dispatch_queue_t`` (the seed's ``WrapQueue``).

        Blocks the framework runs on a queue vzkit did not create are not recognised by
        :meth:`is_current` (its label need not be unique): only blocks dispatched through
        a :class:`Queue` are.
        """
        return cls(label, _queue=queue)

    def __repr__(self) -> str:
        return f"<Queue {self.label!r}>"

    @property
    def queue(self) -> Any:
        """The underlying ``dispatch_queue_t`` (the seed's ``Queue()``)."""
        return self._queue

    def is_current(self) -> bool:
        """True when the calling code runs on this queue: inside a block a :class:`Queue`
        dispatched onto it, or (for a queue vzkit created) a completion handler or delegate
        callback the framework runs on it."""
        if self in _running_queues():
            return True
        if self._dispatch_label is None:
            return False
        d = libdispatch()
        current = _label_bytes(d.dispatch_queue_get_label(d.DISPATCH_CURRENT_QUEUE_LABEL))
        return current == self._dispatch_label

    def _wrap(self, work: Callable[[], T], box: dict[str, Any]) -> Callable[[], None]:
        def block() -> None:
            stack = _running_queues()
            stack.append(self)
            try:
                box["value"] = work()
            except BaseException as err:  # handed back to the caller, never to ObjC
                box["error"] = err
            finally:
                stack.pop()

        return block

    def sync(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the queue, wait, and return its result (or raise its exception)."""
        if self.is_current():
            return work()
        box: dict[str, Any] = {}
        libdispatch().dispatch_sync(self._queue, self._wrap(work, box))
        if "error" in box:
            raise box["error"]
        result: T = box["value"]
        return result

    def async_(self, work: Callable[[], object]) -> None:
        """Run ``work`` on the queue later; its exceptions are logged, never propagated."""
        box: dict[str, Any] = {}
        inner = self._wrap(work, box)

        def block() -> None:
            inner()
            if "error" in box:
                log.error("work dispatched to %r failed", self, exc_info=box["error"])

        libdispatch().dispatch_async(self._queue, block)


# -- run loops ---------------------------------------------------------------------------------


def run_run_loop_once(seconds: float = 0.01) -> int:
    """Run the current thread's run loop briefly (one source at most); returns the
    ``kCFRunLoopRun*`` result (``RUN_LOOP_RUN_*`` in :mod:`vzkit.backends.vz`)."""
    f = foundation()
    return int(f.CFRunLoopRunInMode(f.kCFRunLoopDefaultMode, seconds, True))


def run_run_loop_aggressively(iterations: int = 10) -> None:
    """Pump both CFRunLoop and NSRunLoop several times (for slow asynchronous callbacks)."""
    f = foundation()
    loop = f.NSRunLoop.currentRunLoop()
    for _ in range(iterations):
        f.CFRunLoopRunInMode(f.kCFRunLoopDefaultMode, 0.0, True)
        loop.runMode_beforeDate_(
            f.NSDefaultRunLoopMode, f.NSDate.dateWithTimeIntervalSinceNow_(0.001)
        )


def run_run_loop_until_done(
    done: Callable[[], bool],
    progress: Callable[[], object] | None = None,
    *,
    timeout: float | None = None,
    interval: float = 0.01,
) -> bool:
    """Pump the run loop until ``done()`` is true; call ``progress()`` each iteration.

    Returns ``True`` when done, ``False`` when ``timeout`` seconds passed first.
    """
    f = foundation()
    loop = f.NSRunLoop.currentRunLoop()
    deadline = None if timeout is None else time.monotonic() + timeout
    while not done():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        f.CFRunLoopRunInMode(f.kCFRunLoopDefaultMode, interval, True)
        loop.runMode_beforeDate_(
            f.NSDefaultRunLoopMode, f.NSDate.dateWithTimeIntervalSinceNow_(0.0)
        )
        if progress is not None:
            progress()
    return True


# -- completion handlers -----------------------------------------------------------------------


class ErrorCompletionHandler:
    """A ``void (^)(NSError *)`` completion handler: pass :attr:`block` to the framework.

    The block records the error (``None`` on success), wakes :meth:`wait` and runs the done
    callbacks; it catches everything, so no Python exception ever reaches Objective-C.
    """

    def __init__(self, what: str = "operation") -> None:
        self.what = what
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._error: Any = None
        self._callbacks: list[Callable[[ErrorCompletionHandler], object]] = []

        def block(error: Any) -> None:
            try:
                self._complete(error)
            except BaseException:  # never into Objective-C
                log.exception("completion handler for %s failed", self.what)

        self.block: Callable[[Any], None] = block

    def __repr__(self) -> str:
        state = "done" if self.done else "pending"
        return f"<ErrorCompletionHandler {self.what} {state}>"

    def _complete(self, error: Any) -> None:
        with self._lock:
            if self._event.is_set():
                log.warning("completion handler for %s called twice", self.what)
                return
            self._error = error
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("a done callback of %s failed", self.what)

    @property
    def done(self) -> bool:
        """Whether the framework has called the block."""
        return self._event.is_set()

    @property
    def error(self) -> Any:
        """The ``NSError`` received, or ``None`` (also ``None`` while pending)."""
        return self._error

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the handler has been called; ``False`` if ``timeout`` passed first."""
        return self._event.wait(timeout)

    def add_done_callback(self, callback: Callable[[ErrorCompletionHandler], object]) -> None:
        """Call ``callback(self)`` once the block ran (at once if it already has)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    async def wait_async(self) -> None:
        """Await the handler from an asyncio loop (the callback hops threads safely)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def wake(_: ErrorCompletionHandler) -> None:
            def resolve() -> None:
                if not future.done():
                    future.set_result(None)

            loop.call_soon_threadsafe(resolve)

        self.add_done_callback(wake)
        await future


# -- NSData and object lifetimes ---------------------------------------------------------------


def nsdata_from_bytes(data: bytes | bytearray | memoryview) -> Any:
    """An ``NSData`` holding a copy of ``data``."""
    raw = bytes(data)
    return foundation().NSData.dataWithBytes_length_(raw, len(raw))


def nsdata_to_bytes(data: Any) -> bytes:
    """The bytes of an ``NSData`` (``b""`` for ``None`` or empty data)."""
    if data is None:
        return b""
    length = int(data.length())
    if length == 0:
        return b""
    raw = data.bytes()
    return bytes(raw[:length]) if raw is not None else b""


_retained: dict[int, Any] = {}
_retained_lock = threading.Lock()


def retain(obj: T) -> T:
    """Keep ``obj`` alive until :func:`release` (PyObjC manages ObjC retain counts; what a
    Python caller must do is hold a reference to what the framework keeps weakly)."""
    with _retained_lock:
        _retained[id(obj)] = obj
    return obj


def release(obj: object) -> None:
    """Drop the reference :func:`retain` kept (a no-op for objects never retained)."""
    with _retained_lock:
        _retained.pop(id(obj), None)


# -- delegates ---------------------------------------------------------------------------------

_delegate_classes: dict[str, tuple[Any, Any]] = {}
_delegate_lock = threading.Lock()


def _delegate_class(name: str, define: Callable[[Any, Any], Any]) -> Any:
    """Define an ``NSObject`` subclass once per Foundation module (ObjC class names are
    process-global: defining one twice is an error)."""
    f = foundation()
    with _delegate_lock:
        cached = _delegate_classes.get(name)
        if cached is not None and cached[0] is f:
            return cached[1]
        cls = define(f.NSObject, objc_module())
        _delegate_classes[name] = (f, cls)
        return cls


def _python_method(objc: Any) -> Callable[[F], F]:
    decorator: Callable[[F], F] = objc.python_method
    return decorator


def _protocols(objc: Any, name: str) -> list[Any]:
    """``[objc.protocolNamed(name)]``, the framework loaded first (it registers its protocols):
    PyObjC types a Python method from the protocols its class declares, so a delegate's
    ``BOOL`` result does not depend on what happened to be imported before it."""
    vz()
    return [objc.protocolNamed(name)]


def _define_vm_delegate(base: Any, objc: Any) -> Any:
    python_method = _python_method(objc)
    protocols = _protocols(objc, "VZVirtualMachineDelegate")

    class VzkitVirtualMachineDelegate(base, protocols=protocols):  # type: ignore[misc, call-arg]
        """``VZVirtualMachineDelegate``: forwards stops and errors to Python callbacks."""

        @python_method
        def bind(self, on_stop: Callable[[], object], on_error: Callable[[Any], object]) -> None:
            self.on_stop = on_stop
            self.on_error = on_error

        def guestDidStopVirtualMachine_(self, vm: Any) -> None:
            try:
                self.on_stop()
            except BaseException:
                log.exception("guest-stop callback failed")

        def virtualMachine_didStopWithError_(self, vm: Any, error: Any) -> None:
            try:
                self.on_error(error)
            except BaseException:
                log.exception("VM error callback failed")

        def virtualMachine_networkDevice_attachmentWasDisconnectedWithError_(
            self, vm: Any, device: Any, error: Any
        ) -> None:
            try:
                log.warning("a network attachment was disconnected: %s", error)
            except BaseException:
                pass

    return VzkitVirtualMachineDelegate


def vm_delegate(on_stop: Callable[[], object], on_error: Callable[[Any], object]) -> Any:
    """A ``VZVirtualMachineDelegate``; the caller must keep it alive (the VM holds it weakly).

    Callbacks run on the VM's queue.
    """
    delegate = _delegate_class("VzkitVirtualMachineDelegate", _define_vm_delegate)
    obj = delegate.alloc().init()
    obj.bind(on_stop, on_error)
    return obj


def _define_window_delegate(base: Any, objc: Any) -> Any:
    python_method = _python_method(objc)
    appkit()  # AppKit registers NSWindowDelegate
    protocols = [objc.protocolNamed("NSWindowDelegate")]

    class VzkitWindowDelegate(base, protocols=protocols):  # type: ignore[misc, call-arg]
        """``NSWindowDelegate``: tells Python that the window is closing (main thread)."""

        @python_method
        def bind(self, on_close: Callable[[], object]) -> None:
            self.on_close = on_close

        def windowWillClose_(self, notification: Any) -> None:
            try:
                self.on_close()
            except BaseException:
                log.exception("window-close callback failed")

    return VzkitWindowDelegate


def window_delegate(on_close: Callable[[], object]) -> Any:
    """An ``NSWindowDelegate`` calling ``on_close`` when the window closes; keep it alive
    (a window holds its delegate weakly)."""
    delegate = _delegate_class("VzkitWindowDelegate", _define_window_delegate)
    obj = delegate.alloc().init()
    obj.bind(on_close)
    return obj


def _define_listener_delegate(base: Any, objc: Any) -> Any:
    python_method = _python_method(objc)
    protocols = _protocols(objc, "VZVirtioSocketListenerDelegate")

    class VzkitVsockListenerDelegate(base, protocols=protocols):  # type: ignore[misc, call-arg]
        """``VZVirtioSocketListenerDelegate``: hands each new connection to Python."""

        @python_method
        def bind(self, on_connection: Callable[[Any], bool]) -> None:
            self.on_connection = on_connection

        def listener_shouldAcceptNewConnection_fromSocketDevice_(
            self, listener: Any, connection: Any, device: Any
        ) -> bool:
            try:
                return bool(self.on_connection(connection))
            except BaseException:
                log.exception("vsock accept callback failed; refusing the connection")
                return False

    return VzkitVsockListenerDelegate


def listener_delegate(on_connection: Callable[[Any], bool]) -> Any:
    """A ``VZVirtioSocketListenerDelegate``; keep it alive while the listener is installed."""
    delegate = _delegate_class("VzkitVsockListenerDelegate", _define_listener_delegate)
    obj = delegate.alloc().init()
    obj.bind(on_connection)
    return obj


def availability_problem() -> str | None:
    """Why the vz backend cannot run here, or ``None`` when it can: macOS version, PyObjC,
    hardware support, and this interpreter's ``com.apple.security.virtualization``
    entitlement (what ``vzkit doctor`` reports)."""
    if sys.platform != "darwin":
        return f"the vz backend needs macOS (this is {sys.platform})"
    version = macos_version()
    if version is None or version < MIN_MACOS:
        here = _fmt(version) if version else "unknown"
        return f"the vz backend needs macOS {_fmt(MIN_MACOS)} or later (this is {here})"
    try:
        for name in ("Virtualization", "Foundation", "objc", "dispatch"):
            importlib.import_module(name)
    except ImportError as err:
        return f"PyObjC is missing ({err}); {_INSTALL_HINT}"
    if not bool(vz().VZVirtualMachine.isSupported()):
        return "this Mac cannot run virtual machines (VZVirtualMachine.isSupported() is false)"
    from ._entitlements import interpreter_problem

    return interpreter_problem()
