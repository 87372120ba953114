"""Real guests under QEMU: a session-wide guest image per arch and a VM factory.

The factory owns every VM a test makes (Firecracker's ``microvm_factory``): it closes them
all at the end of the test and, when the test failed, prints each VM's argv and console log.
"""

from __future__ import annotations

import os
import select
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vzkit
from vzkit.image import GuestImage
from vzkit.image._image import default_image

READY = b"VZKIT-GUEST-READY"
ARCHES = ("x86_64", "aarch64")


@pytest.fixture(scope="session")
def guest_images() -> dict[str, GuestImage]:
    """The default guest images (built on first use, then cached like ``vzkit run`` does)."""
    return {arch: default_image(arch) for arch in ARCHES}


class GuestShell:
    """Drives the shell the test guest runs on its serial console (a QEMU pty)."""

    def __init__(self, vm: vzkit.VirtualMachine) -> None:
        assert vm.console_pty, "the VM needs console='pty'"
        self.vm = vm
        self.fd = os.open(vm.console_pty, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)
        self.buffer = b""
        self.seq = 0
        self.sync()

    def sync(self, timeout: float = 60) -> None:
        """Wait until the guest shell answers: input sent before it reads may be dropped."""
        deadline = time.monotonic() + timeout
        while True:
            self.seq += 1
            self.send(f"printf '@@%s@@\\n' S{self.seq}\n")
            try:
                self.read_until(f"@@S{self.seq}@@".encode(), timeout=1.0)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise

    def close(self) -> None:
        os.close(self.fd)

    def read_until(self, marker: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {marker!r} on the console; got {self.buffer[-500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # the VMM went away
                    chunk = b""
                if not chunk:
                    time.sleep(0.05)  # poll interval (EOF for now: the VMM may reopen)
                self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def run(self, command: str, timeout: float = 30) -> tuple[int, str]:
        """Run ``command`` in the guest shell; return its exit status and output."""
        self.seq += 1
        begin, end = f"@@B{self.seq}@@", f"@@E{self.seq}@@"
        # The markers are assembled by printf so the echoed command line never contains them.
        self.send(
            f"printf '@@%s@@\\n' B{self.seq}; {command}; printf '@@%s@@%s\\n' E{self.seq} $?\n"
        )
        self.read_until(begin.encode() + b"\r\n", timeout)
        out = self.read_until(end.encode(), timeout)
        status = self.read_until(b"\r\n", timeout)
        return int(status.strip()), out.decode(errors="replace").replace("\r\n", "\n")


def wait_for_console(
    vm: vzkit.VirtualMachine, marker: bytes = READY, timeout: float = 90, since: int = 0
) -> float:
    """Wait until ``marker`` shows in the console log after its first ``since`` bytes (the
    log is appended to across boots of one state dir); return how long it took."""
    log = vm.console_log_path
    assert log is not None
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if log.exists() and marker in log.read_bytes()[since:]:
            return time.monotonic() - t0
        if vm.state in (vzkit.VMState.STOPPED, vzkit.VMState.ERROR):
            break
        time.sleep(0.05)  # poll interval
    text = log.read_bytes()[-3000:].decode(errors="replace") if log.exists() else "(no log)"
    raise AssertionError(f"{marker!r} not seen on the console (state {vm.state}):\n{text}")


class VMFactory:
    def __init__(self, images: dict[str, GuestImage]) -> None:
        self.images = images
        self.vms: list[vzkit.VirtualMachine] = []
        self.shells: list[GuestShell] = []

    def config(self, arch: str = "x86_64", **overrides: Any) -> vzkit.LinuxVMConfig:
        image = self.images[arch]
        settings: dict[str, Any] = {
            "arch": arch,
            "cpus": 1,
            "memory_gb": 0.5,
            "kernel_path": image.kernel,
            "initrd_path": image.initrd,
            "cmdline": image.cmdline(),
            "console": vzkit.ConsoleMode.PTY,
            "network": vzkit.NetworkConfig(vzkit.NetworkMode.NONE),
        }
        settings.update(overrides)
        return vzkit.LinuxVMConfig(**settings)

    def create(self, arch: str = "x86_64", **overrides: Any) -> vzkit.VirtualMachine:
        vm = vzkit.VirtualMachine(self.config(arch, **overrides), backend="qemu")
        self.vms.append(vm)
        return vm

    def boot(
        self, arch: str = "x86_64", **overrides: Any
    ) -> tuple[vzkit.VirtualMachine, GuestShell]:
        vm = self.create(arch, **overrides)
        vm.start(timeout=60)
        wait_for_console(vm)
        shell = GuestShell(vm)
        self.shells.append(shell)
        return vm, shell

    def report(self) -> str:
        parts = []
        for vm in self.vms:
            machine: Any = vm._core.machine
            parts.append(f"--- VM {vm!r}\nargv: {' '.join(getattr(machine, 'argv', []))}")
            log = vm.console_log_path
            if log is not None and log.exists():
                parts.append(log.read_bytes()[-4000:].decode(errors="replace"))
        return "\n".join(parts)

    def close(self) -> None:
        for shell in self.shells:
            shell.close()
        for vm in self.vms:
            vm.close()


@pytest.fixture
def vms(guest_images: dict[str, GuestImage], request: pytest.FixtureRequest) -> Iterator[VMFactory]:
    factory = VMFactory(guest_images)
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
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
