"""``gui=True`` on a real Mac: the VM's window opens (an ``NSWindow`` holding a
``VZVirtualMachineView``), and closing it stops the VM. Needs a logged-in GUI session."""

from __future__ import annotations

import time

import vzkit
from vzkit.backends.vz import _gui

from .conftest import MacVMs


def _our_window() -> object | None:
    import AppKit

    for window in AppKit.NSApplication.sharedApplication().windows():
        if str(window.title()).startswith("vzkit:"):
            return window
    return None


def test_the_window_opens_and_closing_it_stops_the_vm(macvms: MacVMs) -> None:
    vm = macvms.create("vz", gui=True)
    vm.start(timeout=120)  # the main thread serves the window while start waits
    deadline = time.monotonic() + 30
    window = None
    while window is None or not window.isVisible():
        assert time.monotonic() < deadline, "no visible vzkit window"
        _gui.pump_main_thread(0.1)
        window = _our_window()
    assert vm.display_address == "window"
    assert type(window.contentView()).__name__ == "VZVirtualMachineView"
    window.performClose_(None)  # what the close button does
    assert vm.wait(timeout=60) is vzkit.VMState.STOPPED
    assert _gui.run_windows(timeout=10) is True
    assert vm.display_address is None
