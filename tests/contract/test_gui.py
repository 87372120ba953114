"""``gui=True`` on the vz backend: the VM's display in a window (``NSWindow`` holding a
``VZVirtualMachineView``), made and served on the main thread, which vzkit's sync calls keep
serving while they wait; closing the window stops the VM, the VM stopping closes it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import vzkit
from vzkit import _loop
from vzkit.backends import vz as vzb
from vzkit.backends.vz import _gui

from ._graph import render
from ._support import ARM64_IMAGE, take_violations
from .fakeobjc import FakeRuntime, guest_power_off
from .fakeobjc._appkit import user_closes

pytestmark = pytest.mark.contract


@pytest.fixture
def cfg(tmp_path: Path) -> vzkit.LinuxVMConfig:
    kernel = tmp_path / "Image"
    kernel.write_bytes(ARM64_IMAGE)
    return vzkit.LinuxVMConfig(
        kernel_path=kernel,
        gui=True,
        displays=(vzkit.DisplayConfig(1024, 768),),
        state_dir=tmp_path / "state",
    )


def serve_until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """The main thread's loop, as a program's own would run it, until ``predicate()``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out serving the main thread"
        _gui.pump_main_thread(0.01)


def shown(fake: FakeRuntime) -> Any:
    serve_until(lambda: fake.windows and fake.prop(fake.windows[-1], "isVisible"))
    return fake.windows[-1]


def test_the_window_shows_the_vm_and_closing_it_stops_the_vm(
    fake: FakeRuntime, cfg: vzkit.LinuxVMConfig
) -> None:
    assert cfg.headless is False  # gui implies a display
    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
        vm.start(timeout=5)
        window = shown(fake)
        tree = render(fake, window)
        assert tree["title"] == "vzkit: Linux VM"
        assert tree["frame"] == [[0.0, 0.0], [1024.0, 768.0]]
        view = tree["contentView"]
        assert view["class"] == "VZVirtualMachineView"
        assert view["virtualMachine"]["class"] == "VZVirtualMachine"
        assert view["capturesSystemKeys"] is True
        assert _gui.open_windows() == 1
        assert vm.display_address == "window"
        user_closes(fake, window)
        assert vm.wait(timeout=5) is vzkit.VMState.STOPPED  # served the close while waiting
        assert fake.prop(window, "isVisible") is False
        assert vm.display_address is None
    assert _gui.open_windows() == 0
    assert _loop._main_pump is None  # sync calls block plainly again
    assert fake.violations == []


def test_the_guest_powering_off_closes_the_window(
    fake: FakeRuntime, cfg: vzkit.LinuxVMConfig
) -> None:
    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
        vm.start(timeout=5)
        window = shown(fake)
        guest_power_off(fake, fake.vms[-1])
        assert vm.wait(timeout=5) is vzkit.VMState.STOPPED
        serve_until(lambda: not fake.prop(window, "isVisible"))
        assert _gui.run_windows(timeout=5) is True  # nothing left to serve
        assert fake.prop(window, "contentView").__class__.__name__ == "VZVirtualMachineView"
    assert _loop._main_pump is None
    assert fake.violations == []


def test_a_vm_started_from_another_thread_still_makes_its_window_on_the_main_thread(
    fake: FakeRuntime, cfg: vzkit.LinuxVMConfig
) -> None:
    vm = vzkit.VirtualMachine(cfg, backend=vzb.BACKEND)
    starter = threading.Thread(target=vm.start, kwargs={"timeout": 5})
    starter.start()
    starter.join(10)
    window = shown(fake)  # made by the main thread's loop, not the starting thread
    vm.stop(timeout=5)
    assert _gui.run_windows(timeout=5) is True
    assert fake.prop(window, "isVisible") is False
    vm.close()
    assert fake.violations == []


def test_appkit_off_the_main_thread_is_refused(fake: FakeRuntime) -> None:
    import AppKit  # the stand-in's

    errors: list[BaseException] = []

    def elsewhere() -> None:
        try:
            AppKit.NSApplication.sharedApplication()
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert errors
    assert "off the main thread" in str(errors[0])
    assert any("off the main thread" in v for v in take_violations(fake))


def test_without_gui_there_is_no_window(fake: FakeRuntime, cfg: vzkit.LinuxVMConfig) -> None:
    with vzkit.VirtualMachine(cfg.replace(gui=False), backend=vzb.BACKEND) as vm:
        vm.start(timeout=5)
        assert _loop._main_pump is None
    assert fake.windows == []
