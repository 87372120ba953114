"""A VM's display in a window (``gui=True``): an ``NSWindow`` holding a ``VZVirtualMachineView``.

AppKit lives on the main thread: the window is made, shown and closed by blocks on the main
dispatch queue, and its events are served by :func:`pump_main_thread`. While a window is
open, every sync call vzkit's facade makes on the main thread runs that pump while it waits
(:func:`vzkit._loop.set_main_thread_pump`), so ``vm.wait()`` keeps the window alive, as
Code-Hex/vz's ``StartGraphicApplication`` runs ``NSApp``; :func:`run_windows` does it for a
program with nothing else to wait for. Closing the window stops the VM (the machine's
``on_close``); the VM stopping closes the window.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..._display import DisplayConfig
from ..._loop import set_main_thread_pump
from ._objc import appkit, foundation, libdispatch, vz, window_delegate

__all__ = ["VMWindow", "open_windows", "pump_main_thread", "run_windows"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_open: set[VMWindow] = set()
_launched = False


def _on_main(work: Callable[[], object]) -> None:
    def block() -> None:
        try:
            work()
        except Exception:  # never into Objective-C
            log.exception("window work on the main thread failed")

    d = libdispatch()
    d.dispatch_async(d.dispatch_get_main_queue(), block)


def _launch(ak: Any) -> Any:
    """The shared ``NSApplication``, a regular (Dock) app, launched once."""
    global _launched
    app = ak.NSApplication.sharedApplication()
    if not _launched:
        app.setActivationPolicy_(ak.NSApplicationActivationPolicyRegular)
        app.finishLaunching()
        _launched = True
    app.activateIgnoringOtherApps_(True)
    return app


def pump_main_thread(seconds: float) -> None:
    """Serve the main thread for up to ``seconds``: one AppKit event (and the main dispatch
    queue's blocks, which the run loop runs while it waits for one). Main thread only."""
    ak, f = appkit(), foundation()
    app = ak.NSApplication.sharedApplication()
    until = f.NSDate.dateWithTimeIntervalSinceNow_(seconds)
    event = app.nextEventMatchingMask_untilDate_inMode_dequeue_(
        ak.NSEventMaskAny, until, f.NSDefaultRunLoopMode, True
    )
    if event is not None:
        app.sendEvent_(event)
        app.updateWindows()


def open_windows() -> int:
    """How many VM windows are open (or opening)."""
    with _lock:
        return len(_open)


def run_windows(timeout: float | None = None) -> bool:
    """Serve the main thread until every VM window has closed (``True``) or ``timeout``
    seconds passed (``False``): for a program whose main thread has nothing else to do."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("windows are served by the main thread: call run_windows() there")
    deadline = None if timeout is None else time.monotonic() + timeout
    while open_windows():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        pump_main_thread(0.05)
    return True


class VMWindow:
    """One window showing one VM's display; ``on_close`` runs (from the main thread) when the
    user closes it. :meth:`open` and :meth:`close` may be called from any thread."""

    def __init__(
        self, vm: Any, *, title: str, display: DisplayConfig, on_close: Callable[[], object]
    ) -> None:
        self._vm = vm
        self.title = title
        self.display = display
        self._on_close = on_close
        self._window: Any = None
        self._view: Any = None
        self._delegate: Any = None
        self.closed = False

    def open(self) -> None:
        with _lock:
            _open.add(self)
        set_main_thread_pump(pump_main_thread)
        _on_main(self._open_on_main)

    def _open_on_main(self) -> None:
        if self.closed:
            return
        ak = appkit()
        _launch(ak)
        width, height = self.display.width, self.display.height
        view = vz().VZVirtualMachineView.alloc().initWithFrame_(ak.NSMakeRect(0, 0, width, height))
        view.setVirtualMachine_(self._vm)
        view.setCapturesSystemKeys_(True)
        mask = (
            ak.NSWindowStyleMaskTitled
            | ak.NSWindowStyleMaskClosable
            | ak.NSWindowStyleMaskMiniaturizable
            | ak.NSWindowStyleMaskResizable
        )
        window = ak.NSWindow.alloc().initWithContentRect_styleMask_backing_defer_(
            ak.NSMakeRect(0, 0, width, height), mask, ak.NSBackingStoreBuffered, False
        )
        window.setReleasedWhenClosed_(False)  # Python holds it
        window.setContentView_(view)
        window.setTitle_(self.title)
        self._delegate = window_delegate(self._closed_by_user)
        window.setDelegate_(self._delegate)
        window.center()
        window.makeKeyAndOrderFront_(None)
        self._window, self._view = window, view

    def _closed_by_user(self) -> None:
        first = not self.closed
        self._forget()
        if first:
            self._on_close()

    def _forget(self) -> None:
        self.closed = True
        with _lock:
            _open.discard(self)
            last = not _open
        if last:
            set_main_thread_pump(None)

    def close(self) -> None:
        """Close the window (the VM stopped); its ``on_close`` is not called."""
        if self.closed:
            return
        self.closed = True

        def work() -> None:
            window, view = self._window, self._view
            self._window = self._view = None
            if window is not None:
                window.setDelegate_(None)
                window.close()
            if view is not None:
                view.setVirtualMachine_(None)
            self._forget()

        _on_main(work)
