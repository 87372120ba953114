"""The host agent client bounds what it buffers: ``run()`` output and ``read_file()``.

A guest controls how much a command prints and how large its files are; without a bound a
``run(["yes"])`` would buffer until the host runs out of memory. The real agent binary serves
over a unix socket on the host, as in ``test_agent_serve`` (whose fixtures these reuse).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
from pathlib import Path

import pytest

from vzkit._guest import DEFAULT_MAX_OUTPUT as FACADE_DEFAULT
from vzkit._guest import Guest
from vzkit.agent import DEFAULT_MAX_OUTPUT, AgentClient, AsyncAgentClient
from vzkit.errors import GuestError

from . import test_agent_serve as serve
from .test_agent_serve import MB, _connect, _vm_hwm_kb, _wait_gone

pytestmark = serve.pytestmark
# the real agent serving on a unix socket, and a client of it (test_agent_serve's fixtures)
agent, agent_server, server_path = serve.agent, serve.agent_server, serve.server_path
server, client = serve.server, serve.client


def test_the_default_limit_is_256_mib_everywhere() -> None:
    assert DEFAULT_MAX_OUTPUT == FACADE_DEFAULT == 256 * MB
    for method, name in [
        (AgentClient.run, "max_output"),
        (AsyncAgentClient.run, "max_output"),
        (Guest.run, "max_output"),
        (AgentClient.read_file, "max_size"),
        (AsyncAgentClient.read_file, "max_size"),
        (Guest.read_file, "max_size"),
    ]:
        assert inspect.signature(method).parameters[name].default == 256 * MB, method


def test_endless_output_raises_and_kills_the_process(client: AgentClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    with pytest.raises(GuestError) as info:
        client.run(["sh", "-c", f"echo $$ > {pidfile}; exec yes"], max_output=MB)
    assert str(info.value) == (
        f"the output of ['sh', '-c', 'echo $$ > {pidfile}; exec yes'] passed "
        "max_output=1048576 bytes; the process was killed (pass a larger max_output, or "
        "stream the output with popen())"
    )
    _wait_gone(int(pidfile.read_text()))  # `yes` is not left running in the guest
    assert client.ping() == "0.1.0", "the session goes on"


def test_output_up_to_the_limit_is_returned(client: AgentClient) -> None:
    done = client.run(["head", "-c", str(MB), "/dev/zero"], max_output=MB)
    assert done.stdout == bytes(MB)
    with pytest.raises(GuestError, match="passed max_output=1048575 bytes"):
        client.run(["head", "-c", str(MB), "/dev/zero"], max_output=MB - 1)
    assert client.run(["true"], max_output=0).returncode == 0
    big = client.run(["head", "-c", str(3 * MB), "/dev/zero"], max_output=None)
    assert len(big.stdout) == 3 * MB, "None: no limit"


def test_stdout_and_stderr_count_together(client: AgentClient) -> None:
    script = "head -c 600000 /dev/zero; head -c 600000 /dev/zero >&2"
    with pytest.raises(GuestError, match="passed max_output=1000000 bytes"):
        client.run(["sh", "-c", script], max_output=1_000_000)
    assert client.run(["sh", "-c", script], max_output=1_200_000).returncode == 0


def test_the_client_never_buffers_much_more_than_the_limit(server: Path) -> None:
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak RSS
    before_kb = _vm_hwm_kb("self")
    with (
        AgentClient(_connect(server)) as one,
        pytest.raises(GuestError, match="passed max_output"),
    ):
        one.run(["head", "-c", str(64 * MB), "/dev/zero"], max_output=MB)
    growth_mb = (_vm_hwm_kb("self") - before_kb) / 1024
    assert growth_mb < 16, f"peak grew by {growth_mb:.1f} MB for a 1 MB limit of 64 MB output"


def test_read_file_is_bounded(client: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "big.bin"
    data = os.urandom(3 * MB)
    target.write_bytes(data)
    assert client.read_file(target, max_size=3 * MB) == data
    with pytest.raises(GuestError) as info:
        client.read_file(target, max_size=MB)
    assert str(info.value) == (
        f"the guest file '{target}' is larger than max_size=1048576 bytes; nothing was "
        "returned (pass a larger max_size, or stream it, e.g. with popen(['cat', path]))"
    )
    assert client.read_file(target, max_size=None) == data
    assert client.ping() == "0.1.0", "the session goes on"


@pytest.mark.parametrize("limit", [-1, 1.5, True, "1"])
def test_bad_limits_are_refused(client: AgentClient, limit: object) -> None:
    with pytest.raises(ValueError, match="max_output must be a number of bytes"):
        client.run(["true"], max_output=limit)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_size must be a number of bytes"):
        client.read_file("/dev/null", max_size=limit)  # type: ignore[arg-type]


def test_async_client_is_bounded_too(server: Path, tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(bytes(2 * MB))

    async def main() -> None:
        async with await AsyncAgentClient.connect(_connect(server)) as aclient:
            with pytest.raises(GuestError, match="passed max_output=65536 bytes"):
                await aclient.run(["yes"], max_output=65536)
            with pytest.raises(GuestError, match="larger than max_size=1048576 bytes"):
                await aclient.read_file(target, max_size=MB)
            assert len(await aclient.read_file(target)) == 2 * MB
            done = await aclient.run(["echo", "ok"], max_output=3)
            assert done.stdout == b"ok\n"

    asyncio.run(main())


def test_timeout_still_wins_over_a_quiet_command(client: AgentClient) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        client.run(["sleep", "30"], timeout=0.3, max_output=MB)
