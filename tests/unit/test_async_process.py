"""``AsyncGuestProcess`` does what ``GuestProcess`` does: ``poll`` never waits, ``wait`` and
``communicate`` take a timeout (``subprocess.TimeoutExpired``, the process left running),
``terminate`` sends SIGTERM (the real agent on the host, through ``vzkit.aio``)."""

from __future__ import annotations

import asyncio
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import vzkit.aio

from ..support.agent_vm import AgentBackend, host_agent

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="runs the x86_64 Linux agent binary on the host",
)


def test_poll_wait_communicate_with_timeouts_and_terminate(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")

    async def main() -> None:
        async with vzkit.aio.start(backend=AgentBackend(host_agent()), kernel_path=kernel) as vm:
            proc = await vm.guest.popen(["sleep", "100"], stdin=False)
            assert proc.poll() is None
            with pytest.raises(subprocess.TimeoutExpired):
                await proc.wait(timeout=0.2)
            assert proc.poll() is None  # still running after the timeout
            await proc.terminate()
            code = await proc.wait(timeout=30)
            assert code == -signal.SIGTERM
            assert proc.poll() == code
            chatty = await vm.guest.popen(["sh", "-c", "echo partial; sleep 100"], stdin=False)
            with pytest.raises(subprocess.TimeoutExpired) as raised:
                await chatty.communicate(timeout=1.0)
            assert raised.value.output == b"partial\n"  # what was read before the timeout
            await chatty.kill()
            assert await chatty.wait(timeout=30) == -signal.SIGKILL

    asyncio.run(main())
