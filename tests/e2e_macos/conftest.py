"""Real macOS: the e2e suite over every backend that runs here (vz and qemu), marked ``macos``.

Everything here is skipped off macOS, and only there. Guests are vzkit's default image for
this Mac's architecture (built and cached on first use: Debian packages and zig). The vz
backend needs an interpreter signed with ``com.apple.security.virtualization`` (``vzkit
codesign --venv``); the qemu backend needs ``qemu-system-*`` (``brew install qemu``).
Tests of a capability run on the backends that declare it (``BACKEND.features``), so qemu
joins the vsock/shares/snapshot tests the moment it declares them.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vzkit
from vzkit.backends import KNOWN_BACKENDS, Feature
from vzkit.image import GuestImage
from vzkit.image._image import default_image


def backends_with(feature: Feature) -> list[str]:
    """The backends that declare ``feature`` (read from their modules: no PyObjC needed)."""
    found = []
    for name in KNOWN_BACKENDS:
        module = importlib.import_module(f"vzkit.backends.{name}")
        if feature in module.BACKEND.features:
            found.append(name)
    return found


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return default_image(vzkit.host_arch().value)


class MacVMs:
    """Owns every VM a test makes and closes them all; prints their console logs on failure."""

    def __init__(self, image: GuestImage, tmp_path: Path) -> None:
        self.image = image
        self.tmp_path = tmp_path
        self.vms: list[vzkit.VirtualMachine] = []

    def config(self, backend: str, **overrides: Any) -> vzkit.LinuxVMConfig:
        cmdline = self.image.cmdline()
        if backend == "vz":  # the framework's console is the virtio console
            cmdline = re.sub(r"console=\S+", "console=hvc0", cmdline)
        settings: dict[str, Any] = {
            "cpus": 1,
            "memory_gb": 0.5,
            "kernel_path": self.image.kernel,
            "initrd_path": self.image.initrd,
            "cmdline": cmdline,
            "console": vzkit.ConsoleMode.LOG,
            "network": vzkit.NetworkConfig(vzkit.NetworkMode.NONE),
            "state_dir": self.tmp_path / f"{backend}-{len(self.vms)}",
        }
        settings.update(overrides)
        return vzkit.LinuxVMConfig(**settings)

    def create(self, backend: str, **overrides: Any) -> vzkit.VirtualMachine:
        vm = vzkit.VirtualMachine(self.config(backend, **overrides), backend=backend)
        self.vms.append(vm)
        return vm

    def boot(self, backend: str, **overrides: Any) -> vzkit.VirtualMachine:
        vm = self.create(backend, **overrides)
        vm.start(timeout=120)
        assert vm.guest.wait_ready(timeout=180), "the guest agent never answered"
        return vm

    def adopt(self, vm: vzkit.VirtualMachine) -> vzkit.VirtualMachine:
        self.vms.append(vm)
        return vm

    def report(self) -> str:
        parts = []
        for vm in self.vms:
            log = vm.console_log_path
            if log is not None and log.exists():
                text = log.read_bytes()[-4000:].decode(errors="replace")
                parts.append(f"--- {vm!r}\n{text}")
        return "\n".join(parts)

    def close(self) -> None:
        for vm in self.vms:
            vm.close()


@pytest.fixture
def macvms(
    guest_image: GuestImage, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[MacVMs]:
    factory = MacVMs(guest_image, tmp_path)
    yield factory
    report = factory.report()
    factory.close()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(report)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    off_macos = pytest.mark.skip(reason=f"needs macOS (this is {sys.platform})")
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.macos)
            if sys.platform != "darwin":
                item.add_marker(off_macos)
