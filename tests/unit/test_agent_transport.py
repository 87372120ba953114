"""The core chooses how the guest agent is reached (``vzkit._guestcore``), from what the machine
offers (``AgentStream``): vsock with the run's key when offered, else the console port, and
``$VZKIT_AGENT_TRANSPORT`` forces one. The agent here is the shipped binary run on the host:
a unix listener that asks the key stands in for vsock, ``--stdio`` for the console port.
"""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import vzkit
from vzkit._state import VMState
from vzkit._vmcore import core_of
from vzkit.agent import DEFAULT_VSOCK_PORT, KEY_SIZE, AgentError
from vzkit.backends import AgentVsock, BalloonInfo, Feature, VsockListenerLike
from vzkit.backends._protocol import StateListener, notify_state

from ..support.agent_vm import host_agent

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="runs the x86_64 Linux agent binary on the host",
)


@pytest.fixture(scope="module")
def agent() -> Path:
    return host_agent()


class TwoWayMachine:
    """A running "guest" whose agent listens on both transports: ``listen`` (the vsock
    stand-in, key required) and a stdio stream (the console port)."""

    pid = None
    console_log_path = None
    console_pty = None
    last_error = None

    def __init__(self, config: vzkit.LinuxVMConfig, on_state: StateListener, env: Env) -> None:
        self.config, self._on_state, self._env = config, on_state, env
        self._state = VMState.STOPPED
        self.offer: AgentVsock | None = AgentVsock(env.key)
        self.vsock_ports: list[int] = []

    @property
    def state(self) -> VMState:
        return self._state

    @property
    def state_dir(self) -> Path:
        assert self.config.state_dir is not None
        return self.config.state_dir

    def _set(self, new: VMState) -> None:
        old, self._state = self._state, new
        notify_state(self._on_state, old, new)

    async def start(self) -> None:
        self._set(VMState.RUNNING)

    async def pause(self) -> None:
        self._set(VMState.PAUSED)

    async def resume(self) -> None:
        self._set(VMState.RUNNING)

    async def request_stop(self) -> None:
        self._set(VMState.STOPPED)

    async def force_stop(self) -> None:
        self._set(VMState.STOPPED)

    async def wait_stopped(self) -> VMState:
        return self._state

    async def close(self) -> None:
        self._set(VMState.STOPPED)

    async def balloon_info(self) -> BalloonInfo:
        return BalloonInfo(False, 0.0, 0)

    def agent_console(self) -> socket.socket | None:
        return self._env.console.dup()

    def agent_vsock(self) -> AgentVsock | None:
        return self.offer

    async def vsock_connect(self, port: int, timeout: float | None) -> socket.socket:
        self.vsock_ports.append(port)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await asyncio.to_thread(sock.connect, str(self._env.listen))
        return sock

    async def vsock_listen(self, port: int) -> VsockListenerLike:
        raise AssertionError("not used")


class Env:
    """The agent's two processes (one per transport) and the key the listener asks."""

    def __init__(self, agent: Path, root: Path) -> None:
        self.key = os.urandom(KEY_SIZE)
        key_file = root / "key"
        key_file.write_bytes(self.key)
        key_file.chmod(0o600)
        self.listen = root / "a.sock"
        self.listener = subprocess.Popen(
            [agent, "serve", "--key-file", str(key_file), "--unix", str(self.listen)],
            stderr=subprocess.DEVNULL,
        )
        self.console, theirs = socket.socketpair()
        self.stdio = subprocess.Popen(
            [agent, "serve", "--stdio"], stdin=theirs, stdout=theirs, stderr=subprocess.DEVNULL
        )
        theirs.close()

    def close(self) -> None:
        for proc in (self.listener, self.stdio):
            proc.terminate()
            proc.wait(10)
        self.console.close()


class TwoWayBackend:
    name = "two-way"
    features = frozenset({Feature.LIFECYCLE, Feature.VSOCK})

    def __init__(self, env: Env) -> None:
        self.env = env

    def check_available(self) -> None:
        pass

    def create_machine(self, config: vzkit.LinuxVMConfig, on_state: StateListener) -> TwoWayMachine:
        return TwoWayMachine(config, on_state, self.env)


@pytest.fixture
def env(agent: Path) -> Iterator[Env]:
    with tempfile.TemporaryDirectory(prefix="agent-", dir="/tmp") as tmp:  # short socket path
        env = Env(agent, Path(tmp))
        try:
            yield env
        finally:
            env.close()


@pytest.fixture
def vm(env: Env, tmp_path: Path) -> Iterator[vzkit.VirtualMachine]:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, state_dir=tmp_path / "state")
    with vzkit.VirtualMachine(cfg, backend=TwoWayBackend(env)) as vm:
        vm.start()
        yield vm


def _machine(vm: vzkit.VirtualMachine) -> TwoWayMachine:
    machine = core_of(vm).machine
    assert isinstance(machine, TwoWayMachine)
    return machine


def test_vsock_is_chosen_when_offered_and_opened_with_the_key(
    vm: vzkit.VirtualMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VZKIT_AGENT_TRANSPORT", raising=False)
    assert vm.guest.run(["echo", "hi"]).stdout == b"hi\n"  # the listener serves none keyless
    assert core_of(vm).agent.transport == "vsock"
    assert _machine(vm).vsock_ports == [DEFAULT_VSOCK_PORT]


def test_without_a_vsock_offer_the_console_is_used(
    vm: vzkit.VirtualMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VZKIT_AGENT_TRANSPORT", raising=False)
    _machine(vm).offer = None
    assert vm.guest.run(["echo", "hi"]).stdout == b"hi\n"
    assert core_of(vm).agent.transport == "console"
    assert _machine(vm).vsock_ports == []


def test_the_environment_forces_a_transport_at_each_connect(
    vm: vzkit.VirtualMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VZKIT_AGENT_TRANSPORT", "console")
    assert vm.guest.run(["echo", "one"]).stdout == b"one\n"
    assert core_of(vm).agent.transport == "console"
    vm.guest.close()
    monkeypatch.setenv("VZKIT_AGENT_TRANSPORT", "vsock")
    assert vm.guest.run(["echo", "two"]).stdout == b"two\n"
    assert core_of(vm).agent.transport == "vsock"


def test_a_wrong_key_is_refused_by_the_agent(
    vm: vzkit.VirtualMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VZKIT_AGENT_TRANSPORT", raising=False)
    _machine(vm).offer = AgentVsock(bytes(KEY_SIZE))
    with pytest.raises(AgentError, match="authentication failed"):
        vm.guest.run(["true"])
