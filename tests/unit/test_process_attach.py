"""``GuestProcess.attach`` and its twin ``AsyncGuestProcess.attach``: a guest process's
streams copied to and from host file descriptors (what a named VM's supervisor does for
``vzkit.exec_call``, and ``vzkit run`` for its command), with the real agent on the host."""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

import vzkit
import vzkit.aio

from ..support.agent_vm import AgentBackend, host_agent

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="runs the x86_64 Linux agent binary on the host",
)

SCRIPT = "tr a-z A-Z; echo to-stderr >&2; exit 5"


def _kernel(tmp_path: Path) -> Path:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    return kernel


def test_attach_copies_stdin_and_the_outputs_and_returns_the_code(tmp_path: Path) -> None:
    payload = os.urandom(300_000).hex().encode()  # many windows' worth, both ways
    src, out, err = tmp_path / "in", tmp_path / "out", tmp_path / "err"
    src.write_bytes(payload)
    with vzkit.start(backend=AgentBackend(host_agent()), kernel_path=_kernel(tmp_path)) as vm:
        proc = vm.guest.popen(["sh", "-c", SCRIPT])
        with src.open("rb") as i, out.open("wb") as o, err.open("wb") as e:
            assert proc.attach(i.fileno(), o.fileno(), e.fileno()) == 5
        assert out.read_bytes() == payload.upper()
        assert err.read_bytes() == b"to-stderr\n"
        # no stdin given: the process's stdin is closed at once (it does not wait for one)
        proc = vm.guest.popen(["sh", "-c", "cat; echo done"])
        with out.open("wb") as o:
            assert proc.attach(None, o.fileno(), o.fileno()) == 0
        assert out.read_bytes() == b"done\n"


def test_a_stdin_that_stays_open_is_let_go_when_the_process_ends(tmp_path: Path) -> None:
    """A terminal (here a pipe whose writer stays open) is no end of file: the copy stops
    with the process, and attach returns."""
    read_end, write_end = os.pipe()
    out = tmp_path / "out"
    try:
        with vzkit.start(backend=AgentBackend(host_agent()), kernel_path=_kernel(tmp_path)) as vm:
            proc = vm.guest.popen(["head", "-n", "1"])
            os.write(write_end, b"first\nsecond\n")
            threads = threading.active_count()
            with out.open("wb") as o:
                started = time.monotonic()
                assert proc.attach(read_end, o.fileno(), o.fileno()) == 0
                assert time.monotonic() - started < 4  # not the 5 s of a join that gave up
            assert out.read_bytes() == b"first\n"
            assert threading.active_count() == threads  # its copy threads are gone

            async def main() -> bytes:
                async with vzkit.aio.start(
                    backend=AgentBackend(host_agent()), kernel_path=_kernel(tmp_path)
                ) as avm:
                    aproc = await avm.guest.popen(["head", "-n", "1"])
                    os.write(write_end, b"third\nfourth\n")
                    with out.open("wb") as o:
                        started = time.monotonic()
                        code = await asyncio.wait_for(
                            aproc.attach(read_end, o.fileno(), o.fileno()), 30
                        )
                        assert time.monotonic() - started < 4
                    assert code == 0
                    return out.read_bytes()

            assert asyncio.run(main()) == b"third\n"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_the_asyncio_twin_copies_both_ways(tmp_path: Path) -> None:
    payload = os.urandom(200_000).hex().encode()
    src, out, err = tmp_path / "in", tmp_path / "out", tmp_path / "err"
    src.write_bytes(payload)

    async def main() -> int:
        async with vzkit.aio.start(
            backend=AgentBackend(host_agent()), kernel_path=_kernel(tmp_path)
        ) as vm:
            proc = await vm.guest.popen(["sh", "-c", SCRIPT])
            with src.open("rb") as i, out.open("wb") as o, err.open("wb") as e:
                return await proc.attach(i.fileno(), o.fileno(), e.fileno())

    assert asyncio.run(main()) == 5
    assert out.read_bytes() == payload.upper()
    assert err.read_bytes() == b"to-stderr\n"


def test_an_interrupted_attach_kills_the_process(tmp_path: Path) -> None:
    out = tmp_path / "out"

    async def main() -> None:
        async with vzkit.aio.start(
            backend=AgentBackend(host_agent()), kernel_path=_kernel(tmp_path)
        ) as vm:
            proc = await vm.guest.popen(["sleep", "100"], stdin=False)
            with out.open("wb") as o, pytest.raises(TimeoutError):
                await asyncio.wait_for(proc.attach(None, o.fileno(), o.fileno()), 0.5)
            assert await proc.wait(timeout=30) < 0  # killed, not left running

    asyncio.run(main())


def test_a_reader_that_went_away_sends_sigpipe_and_a_non_blocking_one_gets_everything(
    tmp_path: Path,
) -> None:
    """``vzkit exec VM -- yes | head -1``: the output's reader goes, the process gets SIGPIPE
    (as in a shell pipeline) instead of stalling on a full window. A caller's stdout that is
    non-blocking (a shared file description) still gets every byte."""
    with vzkit.start(backend=AgentBackend(host_agent()), kernel_path=_kernel(tmp_path)) as vm:
        read_end, write_end = os.pipe()
        os.close(read_end)
        proc = vm.guest.popen(["yes"], stdin=False)
        try:
            assert proc.attach(None, write_end, write_end) == -signal.SIGPIPE
        finally:
            os.close(write_end)

        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        got = bytearray()

        def drain() -> None:
            while chunk := os.read(read_end, 4096):
                got.extend(chunk)
                time.sleep(0.001)  # a slow reader: the pipe fills, writes would block

        reader = threading.Thread(target=drain)
        reader.start()
        proc = vm.guest.popen(["head", "-c", "3000000", "/dev/zero"], stdin=False)
        try:
            assert proc.attach(None, write_end, write_end) == 0
        finally:
            os.close(write_end)
        reader.join(timeout=60)
        os.close(read_end)
        assert len(got) == 3_000_000
