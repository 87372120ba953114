"""``vm.guest``: talk to the vzkit agent inside a running VM (run commands, move files).

The agent listens on vsock port 1024 and on the virtio console port ``org.vzkit.agent.0``;
the backend decides which it reaches (:meth:`vzkit.backends.Machine.open_agent_socket`). One
connection per VM run carries every call (the protocol multiplexes channels), so calls from
several threads at once are fine. After a restart the next call reconnects.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ._loop import run_sync
from ._state import VMState
from .errors import GuestError, StateError, VMTimeoutError

DEFAULT_MAX_OUTPUT = 256 * 1024 * 1024  # the agent client's default (vzkit.agent)

if TYPE_CHECKING:
    from ._vmcore import VMCore
    from .agent import AgentClient, Args, GuestProcess, StrOrBytes

__all__ = ["Guest"]

#: How long a first call waits for the agent when no ``wait_ready`` came first.
DEFAULT_READY_TIMEOUT = 120.0
_RETRY_S = 0.05


class Guest:
    """The guest side of a :class:`~vzkit.VirtualMachine`, reached through the vzkit agent."""

    def __init__(self, core: VMCore) -> None:
        self._core = core
        self._lock = threading.Lock()
        self._client: AgentClient | None = None
        self._generation = -1

    def _connect(self, timeout: float | None) -> AgentClient:
        from .agent import AgentClient

        core = self._core
        with self._lock:
            client = self._client
            if client is not None and self._generation == core.generation and not client.broken:
                return client
            if core.state not in (VMState.RUNNING, VMState.PAUSED):
                raise StateError(f"the guest agent needs a running VM (it is {core.state.value})")
            self._drop_locked()
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                sock = self._open(deadline)
                left = None if deadline is None else max(0.001, deadline - time.monotonic())
                client = AgentClient(sock, timeout=left, resync=core.machine.agent_on_console)
            except TimeoutError as err:
                raise VMTimeoutError(
                    f"the guest agent did not answer within {timeout:g} s"
                    if timeout is not None
                    else "the guest agent did not answer"
                ) from err
            self._client, self._generation = client, core.generation
            return client

    def _open(self, deadline: float | None) -> socket.socket:
        """A stream to the agent, retrying while it does not listen yet (early boot)."""
        core = self._core
        while True:
            try:
                return run_sync(core.machine.open_agent_socket())
            except ConnectionRefusedError:
                if core.state not in (VMState.RUNNING, VMState.PAUSED):
                    raise StateError(
                        f"the VM stopped before its agent answered (it is {core.state.value})"
                    ) from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError("the agent's vsock port refused every connection") from None
                time.sleep(_RETRY_S)

    def _drop_locked(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except GuestError:
                pass

    def close(self) -> None:
        """Close the agent connection (the VM keeps running)."""
        with self._lock:
            self._drop_locked()

    # -- API -------------------------------------------------------------------------------

    def wait_ready(self, timeout: float | None = DEFAULT_READY_TIMEOUT) -> str:
        """Wait until the agent answers; returns its version."""
        return self._connect(timeout).agent_version

    def run(
        self,
        args: Args,
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a command in the guest like :func:`subprocess.run` (output captured).

        A string is one program name, not a shell line: use ``["sh", "-c", "..."]`` for that.
        More than ``max_output`` bytes of output (stdout and stderr together, default 256 MiB;
        ``None``: no limit) kill the command and raise :class:`~vzkit.GuestError`: a guest
        cannot make the host buffer without bound. Stream large output with :meth:`popen`.
        """
        client = self._connect(DEFAULT_READY_TIMEOUT)
        return client.run(
            args, input=input, timeout=timeout, check=check, env=env, cwd=cwd,
            max_output=max_output,
        )  # fmt: skip

    def popen(
        self,
        args: Args,
        *,
        stdin: bool = True,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        timeout: float | None = None,
    ) -> GuestProcess:
        """Start a command and stream its stdin/stdout/stderr (a :class:`GuestProcess`)."""
        client = self._connect(DEFAULT_READY_TIMEOUT)
        return client.popen(args, stdin=stdin, env=env, cwd=cwd, timeout=timeout)

    def read_file(self, path: StrOrBytes, *, max_size: int | None = DEFAULT_MAX_OUTPUT) -> bytes:
        """The content of ``path`` in the guest; :class:`~vzkit.GuestError` if it is larger
        than ``max_size`` bytes (default 256 MiB; ``None``: no limit)."""
        return self._connect(DEFAULT_READY_TIMEOUT).read_file(path, max_size=max_size)

    def write_file(self, path: StrOrBytes, data: bytes, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the guest (atomically: a temporary name, then rename)."""
        self._connect(DEFAULT_READY_TIMEOUT).write_file(path, data, mode)

    def sync(self) -> None:
        """Flush the guest's file systems (sync(2))."""
        self._connect(DEFAULT_READY_TIMEOUT).sync()

    def poweroff(self) -> None:
        """Ask the guest to sync and power off; returns once the agent acknowledged."""
        self._connect(DEFAULT_READY_TIMEOUT).poweroff()

    @property
    def connected(self) -> bool:
        client = self._client
        return (
            client is not None and self._generation == self._core.generation and not client.broken
        )
