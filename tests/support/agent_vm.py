r"""A VM whose guest is the vzkit agent run on the host: the fake for code that needs a guest.

:class:`AgentBackend` makes :class:`AgentMachine`\ s: each run starts ``vzkit-agent serve
--stdio`` (the real x86_64 agent binary, :func:`host_agent`) on one end of a socketpair and
hands the other end out as the machine's agent console stream, so the VM core, both facades
and everything over them talk to a real agent with no VMM. In test mode POWEROFF makes the
agent exit, as a guest powering off ends the VM; the power button does nothing, like aarch64
``virt`` without firmware. Only on x86_64 Linux (the agent binary runs on the host).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import vzkit
from vzkit._state import VMState
from vzkit.backends import AgentVsock, BalloonInfo, Feature
from vzkit.backends._protocol import StateListener, notify_state
from vzkit.backends.qemu._discover import user_cache_dir
from vzkit.image._agent_build import build_agent, zig_command

__all__ = ["AgentBackend", "AgentMachine", "host_agent"]


def host_agent() -> Path:
    """The x86_64 agent binary (built once per cache, with the zig the project depends on)."""
    zig_command()  # ziglang is a dev dependency: a missing zig fails, never skips
    root = user_cache_dir()
    return build_agent("x86_64", root / "agent-build", cache_dir=root / "zig")


class AgentMachine:
    """A machine whose guest is the host-run agent; one agent process per run."""

    pid = None
    console_log_path = None
    console_pty = None
    last_error = None

    def __init__(
        self, config: vzkit.LinuxVMConfig, on_state: StateListener, agent: Path, path: str
    ) -> None:
        self.config, self._on_state, self._agent, self._path = config, on_state, agent, path
        self._state = VMState.STOPPED
        self._proc: asyncio.subprocess.Process | None = None
        self._ours: socket.socket | None = None
        self._stopped = asyncio.Event()
        self.power_button_presses = 0
        self.forced = 0
        self.connections = 0
        self.refusals = 0

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

    async def _boot(self, state: VMState) -> None:
        ours, theirs = socket.socketpair()
        env = {"PATH": self._path, "HOME": "/"}
        self._proc = await asyncio.create_subprocess_exec(
            self._agent, "serve", "--stdio", stdin=theirs, stdout=theirs, env=env
        )
        theirs.close()
        if self._ours is not None:  # the last run's stream, never handed out
            self._ours.close()
        self._ours, self._stopped = ours, asyncio.Event()
        self._set(state)
        asyncio.get_running_loop().create_task(self._watch(self._proc))

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        await proc.wait()  # the guest ends the VM by exiting (POWEROFF in test mode)
        if self._state is not VMState.STOPPED:
            self._set(VMState.STOPPED)
        self._stopped.set()

    async def start(self) -> None:
        await self._boot(VMState.RUNNING)

    async def fake_restore(self) -> None:
        """What a restore leaves: a new run, paused."""
        await self._boot(VMState.PAUSED)

    async def pause(self) -> None:
        self._set(VMState.PAUSED)

    async def resume(self) -> None:
        self._set(VMState.RUNNING)

    async def request_stop(self) -> None:
        self.power_button_presses += 1  # and nothing happens: no ACPI, no firmware

    async def force_stop(self) -> None:
        self.forced += 1
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
        await self.wait_stopped()

    @property
    def agent_exited(self) -> bool:
        """The guest (the agent process of the last run) is gone and reaped."""
        return self._proc is None or self._proc.returncode is not None

    @property
    def agent_returncode(self) -> int | None:
        """0 once the guest powered off through its agent, -SIGKILL when forced off."""
        return None if self._proc is None else self._proc.returncode

    async def wait_stopped(self) -> VMState:
        if self._proc is not None:
            await self._stopped.wait()
        return self._state

    def agent_console(self) -> socket.socket | None:
        """The run's one stream, handed out once (later asks count as refusals)."""
        if self._ours is None:
            self.refusals += 1
            return None
        sock, self._ours = self._ours, None
        self.connections += 1
        return sock

    def agent_vsock(self) -> AgentVsock | None:
        return None

    async def set_balloon_target(self, target_mb: int) -> None:
        raise AssertionError("not used")

    async def balloon_info(self) -> BalloonInfo:
        return BalloonInfo(False, 0.0, 0)

    async def close(self) -> None:
        await self.force_stop()
        if self._ours is not None:
            self._ours.close()


class AgentBackend:
    name = "fake"
    features = frozenset({Feature.LIFECYCLE})

    def __init__(self, agent: Path, path: str = "/usr/bin:/bin") -> None:
        self.agent, self.path = agent, path
        self.machines: list[AgentMachine] = []  # every machine made, for tests to inspect

    def check_available(self) -> None:
        pass

    def create_machine(self, config: vzkit.LinuxVMConfig, on_state: StateListener) -> AgentMachine:
        machine = AgentMachine(config, on_state, self.agent, self.path)
        self.machines.append(machine)
        return machine
