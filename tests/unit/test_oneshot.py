"""``vzkit.run``/``vzkit.start`` and their ``vzkit.aio`` twins, and ``guest.run``'s ``text`` and
``shell``, against a VM whose guest is the real agent run on the host (tests/support/agent_vm).

``kernel_path`` is given, so :func:`vzkit.default_guest_config` builds no image: the config
is the default guest's all the same (its CPUs, memory, console).
"""

from __future__ import annotations

import asyncio
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import vzkit
import vzkit.aio
import vzkit.image
from vzkit._state import VMState
from vzkit.agent._command import command_argv, decode_output, encode_input

from ..support.agent_vm import AgentBackend, AgentMachine, host_agent

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="runs the x86_64 Linux agent binary on the host",
)


@pytest.fixture(scope="module")
def agent() -> Path:
    return host_agent()


@pytest.fixture
def backend(agent: Path) -> AgentBackend:
    return AgentBackend(agent)


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"k")
    return path


def _only(backend: AgentBackend) -> AgentMachine:
    (machine,) = backend.machines
    return machine


def _torn_down_cleanly(machine: AgentMachine) -> None:
    assert machine.state is VMState.STOPPED
    assert machine.agent_returncode == 0, "the guest powered off through its agent"
    assert machine.power_button_presses == 1  # the stop ladder's clean path ran


# -- vzkit.run ----------------------------------------------------------------------------------


def test_run_returns_a_completed_process_and_tears_the_vm_down(
    backend: AgentBackend, kernel: Path
) -> None:
    script = "echo hi; echo oops >&2; exit 3"
    result = vzkit.run(["sh", "-c", script], text=True, backend=backend, kernel_path=kernel)
    assert isinstance(result, subprocess.CompletedProcess)
    assert (result.args, result.returncode) == (["sh", "-c", script], 3)
    assert (result.stdout, result.stderr) == ("hi\n", "oops\n")
    machine = _only(backend)
    _torn_down_cleanly(machine)
    assert (machine.config.cpus, machine.config.memory_gb) == (1, 0.5)  # the default guest's


def test_run_passes_input_env_cwd_and_config_overrides(
    backend: AgentBackend, kernel: Path, tmp_path: Path
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    result = vzkit.run(
        ["sh", "-c", 'cat; echo "$FOO"; pwd'],
        input="from stdin\n",
        env={"FOO": "bar"},
        cwd="/",
        text=True,
        volumes=[f"{share}:data:ro"],
        backend=backend,
        kernel_path=kernel,
        cpus=2,
    )
    assert result.stdout == "from stdin\nbar\n/\n"
    config = _only(backend).config
    assert config.cpus == 2
    assert [(v.host_path, v.tag, v.read_only) for v in config.volumes] == [(share, "data", True)]


def test_run_without_text_is_bytes(backend: AgentBackend, kernel: Path) -> None:
    result = vzkit.run(["printf", "\\377ok"], backend=backend, kernel_path=kernel)
    assert result.stdout == b"\xffok"


def test_run_check_raises_called_process_error(backend: AgentBackend, kernel: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        vzkit.run(
            "echo out; exit 7", shell=True, check=True, text=True,
            backend=backend, kernel_path=kernel,
        )  # fmt: skip
    assert (info.value.returncode, info.value.output) == (7, "out\n")
    assert not isinstance(info.value, vzkit.VzkitError)  # the command failed, not vzkit
    assert _only(backend).state is VMState.STOPPED


def test_run_timeout_covers_the_command_and_raises_vzkit_timeout(
    backend: AgentBackend, kernel: Path
) -> None:
    t0 = time.monotonic()
    with pytest.raises(vzkit.VMTimeoutError, match="boot and run the command within") as info:
        vzkit.run(["sleep", "30"], timeout=1.5, backend=backend, kernel_path=kernel)
    assert time.monotonic() - t0 < 10
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value.__cause__, subprocess.TimeoutExpired)
    machine = _only(backend)
    assert machine.state is VMState.STOPPED
    assert machine.agent_exited


def test_run_timeout_zero_boots_nothing(backend: AgentBackend, kernel: Path) -> None:
    with pytest.raises(vzkit.VMTimeoutError, match=r"within timeout=0 s"):
        vzkit.run(["true"], timeout=0, backend=backend, kernel_path=kernel)
    assert all(m.agent_exited for m in backend.machines)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"args": "echo hi"}, r"'echo hi' is a string: pass a list .*\['echo', 'hi'\].*shell=True"),
        ({"args": ["cat"], "input": "x"}, "input is a str: pass text=True"),
    ],
)
def test_run_refuses_a_bad_command_before_booting(
    backend: AgentBackend, kernel: Path, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(vzkit.ArgumentError, match=match) as info:
        vzkit.run(backend=backend, kernel_path=kernel, **kwargs)
    assert isinstance(info.value, TypeError)
    assert backend.machines == []


# -- image= -------------------------------------------------------------------------------------


def test_image_goes_to_the_builder_as_given(
    backend: AgentBackend, kernel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``image`` is :func:`vzkit.default_guest_config`'s: the default guest, ``"debian"``, a
    digest; the one-liners pass it on as given."""
    from vzkit import _imagebuild

    seen: list[dict[str, Any]] = []
    real = _imagebuild.default_guest_config

    def recording(arch: Any = None, *, image: str | None = None, **overrides: Any) -> Any:
        seen.append({"image": image, **overrides})
        return real(arch, **overrides)  # the default guest, whatever was asked

    monkeypatch.setattr(_imagebuild, "default_guest_config", recording)
    for image in (None, "default", "debian:bookworm+jq"):
        vzkit.run(["true"], image=image, backend=backend, kernel_path=kernel)
    assert seen == [
        {"image": image, "kernel_path": kernel} for image in (None, "default", "debian:bookworm+jq")
    ]
    assert len(backend.machines) == 3


def test_an_unknown_image_is_refused_before_any_boot(
    backend: AgentBackend, kernel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VZKIT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(vzkit.VzkitError, match="no-such-image"):
        vzkit.run(["true"], image="no-such-image", backend=backend, kernel_path=kernel)
    assert backend.machines == []


# -- vzkit.start ----------------------------------------------------------------------------------


def test_start_yields_a_running_vm_whose_agent_answers(backend: AgentBackend, kernel: Path) -> None:
    with vzkit.start(backend=backend, kernel_path=kernel) as vm:
        assert isinstance(vm, vzkit.VirtualMachine)
        assert vm.state is VMState.RUNNING
        assert vm.guest.connected  # ready before the block ran
        assert vm.guest.run("echo $((6 * 7))", shell=True, text=True).stdout == "42\n"
    _torn_down_cleanly(_only(backend))


def test_start_tears_down_when_the_block_raises(backend: AgentBackend, kernel: Path) -> None:
    def body() -> vzkit.VirtualMachine:
        with vzkit.start(backend=backend, kernel_path=kernel) as vm:
            assert vm.guest.connected
            raise KeyError(vm)

    with pytest.raises(KeyError) as info:
        body()
    (vm,) = info.value.args
    machine = _only(backend)
    assert machine.power_button_presses == 0  # no clean power-off asked: forced off at once
    assert machine.state is VMState.STOPPED
    assert machine.agent_exited
    assert vm.guest.connected is False


def test_start_may_be_stopped_inside_the_block(backend: AgentBackend, kernel: Path) -> None:
    with vzkit.start(backend=backend, kernel_path=kernel) as vm:
        vm.stop(timeout=10)
    _torn_down_cleanly(_only(backend))


# -- vzkit.aio ---------------------------------------------------------------------------------


def test_aio_run_and_start(backend: AgentBackend, kernel: Path) -> None:
    async def main() -> tuple[Any, Any]:
        result = await vzkit.aio.run(
            ["sh", "-c", "cat; exit 2"], input="in", text=True, backend=backend,
            kernel_path=kernel,
        )  # fmt: skip
        async with vzkit.aio.start(backend=backend, kernel_path=kernel) as vm:
            assert isinstance(vm, vzkit.aio.VirtualMachine)
            assert vm.state is VMState.RUNNING
            assert vm.guest.connected
            echoed = await vm.guest.run(["echo $0-$1", "a", "b"], shell=True, text=True)
        return result, echoed

    result, echoed = asyncio.run(main())
    assert (result.returncode, result.stdout) == (2, "in")
    assert echoed.stdout == "a-b\n"
    assert len(backend.machines) == 2
    for machine in backend.machines:
        _torn_down_cleanly(machine)


def test_aio_run_timeout_and_a_raising_block(backend: AgentBackend, kernel: Path) -> None:
    async def main() -> None:
        with pytest.raises(vzkit.VMTimeoutError) as info:
            await vzkit.aio.run(["sleep", "30"], timeout=1.5, backend=backend, kernel_path=kernel)
        assert isinstance(info.value.__cause__, subprocess.TimeoutExpired)
        with pytest.raises(KeyError):
            async with vzkit.aio.start(backend=backend, kernel_path=kernel):
                raise KeyError("boom")
        with pytest.raises(vzkit.ArgumentError):
            await vzkit.aio.run("ls /", backend=backend, kernel_path=kernel)

    asyncio.run(main())
    assert len(backend.machines) == 2
    assert all(m.state is VMState.STOPPED and m.agent_exited for m in backend.machines)


# -- guest.run text= and shell= on both facades ----------------------------------------------------


def test_guest_run_text_and_shell_on_the_blocking_facade(
    backend: AgentBackend, kernel: Path
) -> None:
    with vzkit.start(backend=backend, kernel_path=kernel) as vm:
        with pytest.raises(vzkit.ArgumentError, match="shell=True"):
            vm.guest.run("echo hi")  # was: exec of a program called "echo hi", exit 127
        with pytest.raises(vzkit.ArgumentError, match="shell=True"):
            vm.guest.popen(b"echo hi")
        assert vm.guest.run("echo hi", shell=True).stdout == b"hi\n"
        assert vm.guest.run("cat", shell=True, input="é", text=True).stdout == "é"
        assert vm.guest.run(["cat"], input=b"raw").stdout == b"raw"
        assert vm.guest.run(["printf", "\\377"], text=True).stdout == "\ufffd"
        with pytest.raises(subprocess.CalledProcessError) as info:
            vm.guest.run("echo no >&2; false", shell=True, text=True, check=True)
        assert info.value.stderr == "no\n"
        with vm.guest.popen("read x; echo got $x", shell=True) as proc:
            out, _ = proc.communicate(b"it\n")
        assert out == b"got it\n"


def test_guest_run_text_and_shell_on_the_asyncio_facade(
    backend: AgentBackend, kernel: Path
) -> None:
    async def main() -> None:
        async with vzkit.aio.start(backend=backend, kernel_path=kernel) as vm:
            with pytest.raises(vzkit.ArgumentError, match="shell=True"):
                await vm.guest.run("echo hi")
            with pytest.raises(vzkit.ArgumentError, match="shell=True"):
                await vm.guest.popen("echo hi")
            assert (await vm.guest.run("echo hi", shell=True, text=True)).stdout == "hi\n"
            with pytest.raises(subprocess.TimeoutExpired) as info:
                await vm.guest.run("echo part; sleep 30", shell=True, text=True, timeout=1)
            assert info.value.output == "part\n"
            proc = await vm.guest.popen(["echo $0", "x"], shell=True, stdin=False)
            assert await proc.communicate() == (b"x\n", b"")

    asyncio.run(main())


# -- the command rules, without a VM -----------------------------------------------------------


def test_command_argv() -> None:
    assert command_argv(["ls", "-l"], False) == (b"ls", b"-l")
    assert command_argv(Path("/bin/true"), False) == (b"/bin/true",)
    assert command_argv("ls -l", True) == (b"/bin/sh", b"-c", b"ls -l")
    assert command_argv(b"ls", True) == (b"/bin/sh", b"-c", b"ls")
    assert command_argv(["echo $1", "sh", "x"], True) == (
        b"/bin/sh",
        b"-c",
        b"echo $1",
        b"sh",
        b"x",
    )
    for bad in ("ls", b"ls"):
        with pytest.raises(vzkit.ArgumentError, match="is a string: pass a list"):
            command_argv(bad, False)
    for empty in ([], ()):
        with pytest.raises(ValueError, match="must not be empty"):
            command_argv(empty, False)
        with pytest.raises(ValueError, match="must not be empty"):
            command_argv(empty, True)


def test_input_and_output_encoding() -> None:
    assert encode_input("é", True) == "é".encode()
    assert encode_input(b"x", True) == b"x"
    assert encode_input(None, False) is None
    with pytest.raises(vzkit.ArgumentError, match="input is a str"):
        encode_input("x", False)
    assert decode_output(b"\xc3\xa9\xff", True) == "é\ufffd"
    assert decode_output(b"\xff", False) == b"\xff"
