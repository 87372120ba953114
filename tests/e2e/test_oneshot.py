"""The one-line API on the real default guest under QEMU: ``vzkit.run`` and
``vzkit.aio.start`` boot it, talk to its agent and leave nothing behind."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

import vzkit
import vzkit.aio
from vzkit._process import live_children
from vzkit.image import GuestImage


@pytest.fixture(autouse=True)
def built_image(guest_images: dict[str, GuestImage]) -> None:
    """The default guest image is built (cached) before the clock of a test starts."""


def test_run_echo_hi_in_one_line() -> None:
    before = set(live_children())
    t0 = time.monotonic()
    result = vzkit.run(["sh", "-c", "echo hi; uname -s >&2"], text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert isinstance(result, subprocess.CompletedProcess)
    assert (result.returncode, result.stdout, result.stderr) == (0, "hi\n", "Linux\n")
    assert set(live_children()) <= before, "QEMU and its helpers are gone"
    print(f"vzkit.run: boot, command and power-off in {elapsed:.1f} s")


def test_aio_start_runs_commands_in_a_booted_guest() -> None:
    async def main() -> tuple[vzkit.aio.VirtualMachine, str, str]:
        async with vzkit.aio.start(timeout=120) as vm:
            assert vm.state is vzkit.VMState.RUNNING
            assert vm.guest.connected
            kernel = (await vm.guest.run("uname -r", shell=True, text=True, check=True)).stdout
            with pytest.raises(vzkit.ArgumentError, match="shell=True"):
                await vm.guest.run("uname -r")
            piped = await vm.guest.run(["tr", "a-z", "A-Z"], input="quiet\n", text=True)
        return vm, kernel, piped.stdout

    before = set(live_children())
    vm, kernel, shouted = asyncio.run(main())
    assert kernel.strip()
    assert shouted == "QUIET\n"
    assert vm.state is vzkit.VMState.STOPPED
    assert set(live_children()) <= before
