"""The guest agent as the VM core sees it: one connection per VM run, async, on the shared loop.

:class:`AgentLink` (``core.agent``) connects to ``vzkit-agent`` on first use and again after
every new run (a start or a snapshot restore bumps ``core.generation``), and offers the agent's
requests as coroutines. The core uses it for what a VM needs of its guest whichever facade
drives it: the power-off request in the stop ladder (a guest without a power button, like
aarch64 ``virt`` without firmware, still shuts down cleanly), the clock step (``SET_CLOCK``)
after a resume, a restore or a host sleep, the RNG reseed at the first resume after a restore,
and the socket channels of published ports (:mod:`vzkit._portfwd`). ``vm.guest`` of both
facades (:mod:`vzkit._guest`) delegates here.

The machine offers what it has (:class:`vzkit.backends.AgentStream`: the host end of the
virtio console port ``org.vzkit.agent.0``, and the vsock device with the run's key); the link
chooses: vsock port :data:`vzkit.agent.DEFAULT_VSOCK_PORT` when offered (sending ``AUTH`` with
the key first), else the console port; ``$VZKIT_AGENT_TRANSPORT`` forces one
(:func:`vzkit._config.agent_transport_override`). The wire protocol is
:mod:`vzkit.agent._connection`'s ``_Connection``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._config import agent_transport_override
from ._state import VMState
from .agent import DEFAULT_VSOCK_PORT
from .agent._connection import DEFAULT_MAX_OUTPUT, authenticate  # the client's output bound
from .errors import StateError, UnsupportedError, VMTimeoutError, VzkitError

if TYPE_CHECKING:
    import socket

    from ._vmcore import VMCore
    from .agent._channel import Args, StrOrBytes, _ExecChannel
    from .agent._connection import _Connection
    from .backends import AgentStream

__all__ = ["DEFAULT_MAX_OUTPUT", "DEFAULT_READY_TIMEOUT", "AgentLink"]

log = logging.getLogger("vzkit.guest")

#: How long a call waits for the agent when no ``wait_ready`` came first.
DEFAULT_READY_TIMEOUT = 120.0
#: Bound of the agent's power-off request (it answers at once, then syncs and powers off).
POWEROFF_ACK_TIMEOUT_S = 5.0
#: Bound of each step after a restore: reaching the agent, stepping the clock, the reseed.
AFTER_RESTORE_TIMEOUT_S = 10.0
#: Host random bytes mixed into a restored guest's entropy pool (the pool hashes with BLAKE2s:
#: 32 bytes would do; twice that costs nothing).
RESEED_BYTES = 64
#: Where the reseed writes in the guest (a write to it mixes the bytes into the input pool).
GUEST_URANDOM = "/dev/urandom"
#: Bound of a vsock connect to the agent's port, and of its answer to ``AUTH``.
VSOCK_CONNECT_TIMEOUT_S = AUTH_TIMEOUT_S = 10.0
_RETRY_S = 0.05
_LIVE = (VMState.RUNNING, VMState.PAUSED)


def host_realtime_ns() -> int:
    """The host's ``CLOCK_REALTIME``, which the guest's clock is stepped to."""
    return time.time_ns()


class AgentLink:
    """The connection to the guest agent of the core's current run; every method is a
    coroutine on vzkit's shared loop."""

    def __init__(self, core: VMCore) -> None:
        self._core = core
        self._conn: _Connection | None = None
        self._generation = -1
        self._transport: str | None = None  # "vsock" or "console", of self._conn
        self._lock: asyncio.Lock | None = None  # made on the loop, at first use

    @property
    def connected(self) -> bool:
        """An agent session of the current run is open (no call needed to reach it)."""
        conn = self._conn
        return (
            conn is not None
            and self._generation == self._core.generation
            and not conn.writer.is_closing()  # _Connection closes its writer when it fails
        )

    @property
    def transport(self) -> str | None:
        """``"vsock"`` or ``"console"``: how the open session reaches the agent (None: none)."""
        return self._transport if self.connected else None

    async def connection(self, timeout: float | None = DEFAULT_READY_TIMEOUT) -> _Connection:
        """The session of the current run, opened (after dropping an older one) if need be."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            conn = self._conn
            if conn is not None and self.connected:
                return conn
            core = self._core
            core.require("agent")
            await self._drop()
            generation = core.generation
            try:
                async with asyncio.timeout(timeout):
                    conn = await self._open()
            except TimeoutError as err:
                raise VMTimeoutError(
                    "the guest agent did not answer"
                    + ("" if timeout is None else f" within {timeout:g} s")
                ) from err
            if core.closed or core.generation != generation:  # closed or restarted meanwhile
                await conn.aclose()
                raise StateError("the VM was closed or restarted while its agent connected")
            self._conn, self._generation = conn, generation
            return conn

    async def _open(self) -> _Connection:
        """A new session, retrying while the agent does not listen yet (early boot)."""
        from .agent._connection import DEFAULT_WINDOW, _Connection

        core = self._core
        machine = core.agent_stream()
        while True:
            try:
                sock, transport = await self._reach(machine)
                try:
                    conn = await _Connection.open(
                        sock, timeout=None, window=DEFAULT_WINDOW, resync=transport == "console"
                    )
                except BaseException:
                    sock.close()
                    raise
                break
            except (ConnectionError, FileNotFoundError):
                # refused: the agent does not listen yet; reset, or a vsock socket gone: the
                # VM is stopping (its streams may go before its state says so). Retry until
                # the agent answers or the VM is seen stopped.
                if core.closed or core.state not in _LIVE:
                    state = "closed" if core.closed else core.state.value
                    raise StateError(
                        f"the VM stopped before its agent answered (it is {state})"
                    ) from None
                await asyncio.sleep(_RETRY_S)
        self._transport = transport
        return conn

    async def _reach(self, machine: AgentStream) -> tuple[socket.socket, str]:
        """A new stream to the agent and its transport: vsock when the machine offers it
        (with ``AUTH`` first when it has a key), else its console port; an override forces
        one. ``ConnectionRefusedError`` while what is wanted is not offered or does not
        listen yet (the caller retries)."""
        forced = agent_transport_override()
        if forced == "vsock" and not self._core.config.vsock:
            raise UnsupportedError(
                "VZKIT_AGENT_TRANSPORT=vsock, but this VM has no vsock device (config "
                "vsock=False): unset the variable or give the VM one",
                feature="vsock",
            )
        offer = machine.agent_vsock() if forced != "console" else None
        if offer is not None:
            vsock = self._core.vsock_machine()
            sock = await vsock.vsock_connect(DEFAULT_VSOCK_PORT, VSOCK_CONNECT_TIMEOUT_S)
            if offer.key is not None:  # the agent serves no vsock peer without the run's key
                try:
                    await asyncio.to_thread(authenticate, sock, offer.key, AUTH_TIMEOUT_S)
                except BaseException:
                    sock.close()
                    raise
            return sock, "vsock"
        console = machine.agent_console() if forced != "vsock" else None
        if console is None:
            raise ConnectionRefusedError("the VM offers no stream to its agent yet")
        return console, "console"

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()

    async def close(self) -> None:
        """Close the session (processes it started in the guest are killed); the VM runs on.

        Does not wait for a connection being opened: that one notices the stop or close that
        comes with this, or is dropped by the next call of a new run."""
        await self._drop()

    # -- requests ----------------------------------------------------------------------------

    async def wait_ready(self, timeout: float | None = DEFAULT_READY_TIMEOUT) -> str:
        return (await self.connection(timeout)).hello.agent_version

    async def run(
        self,
        args: Args,
        *,
        input: bytes | str | None = None,
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        shell: bool = False,
        text: bool = False,
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> subprocess.CompletedProcess[Any]:
        conn = await self.connection()
        env, cwd, user = self._defaults(env, cwd, user)
        return await conn.run(
            args, input=input, timeout=timeout, check=check, env=env, cwd=cwd,
            max_output=max_output, shell=shell, text=text, user=user,
            tty=tty, term=term, size=size,
        )  # fmt: skip

    async def exec(
        self,
        args: Args,
        *,
        stdin: bool = True,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        timeout: float | None = None,
        shell: bool = False,
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> _ExecChannel:
        """A started process's channel (the facades wrap it in ``GuestProcess`` or
        ``AsyncGuestProcess``)."""
        conn = await self.connection()
        env, cwd, user = self._defaults(env, cwd, user)
        return await conn.exec(
            args, stdin=stdin, env=env, cwd=cwd, timeout=timeout, shell=shell, user=user,
            tty=tty, term=term, size=size,
        )  # fmt: skip

    def _defaults(
        self,
        env: Mapping[StrOrBytes, StrOrBytes] | None,
        cwd: StrOrBytes | None,
        user: str | None,
    ) -> tuple[Mapping[StrOrBytes, StrOrBytes] | None, StrOrBytes | None, str | None]:
        """A user's command starts from the config's :class:`ProcessDefaults` (an image's
        env, working directory and user); what the call gives wins. vzkit's own commands
        (the clock step after a restore) go to the connection directly, as root."""
        process = getattr(self._core.config, "process", None)
        if not process:
            return env, cwd, user
        if process.env:
            merged: dict[StrOrBytes, StrOrBytes] = dict(process.env)
            merged.update(env or {})  # the agent takes the later of two equal names
            env = merged
        return env, cwd if cwd is not None else (process.cwd or None), user or process.user or None

    async def read_file(self, path: StrOrBytes, max_size: int | None = DEFAULT_MAX_OUTPUT) -> bytes:
        return await (await self.connection()).read_file(path, max_size)

    async def write_file(self, path: StrOrBytes, data: bytes, mode: int = 0o644) -> None:
        await (await self.connection()).write_file(path, data, mode)

    async def sync(self) -> None:
        from .agent._protocol import MsgType

        await (await self.connection()).request(MsgType.SYNC)

    async def poweroff(self, timeout: float | None = None) -> None:
        from .agent._protocol import MsgType

        await (await self.connection()).request(MsgType.POWEROFF, timeout)

    # -- what the core asks of the guest -----------------------------------------------------

    async def ask_poweroff(self) -> bool:
        """Where a session of this run is open and the VM runs, ask the agent to power the
        guest off; whether it acknowledged. Never connects anew and never raises a vzkit
        error: the stop ladder goes on with the power button and then force."""
        conn = self._conn
        if conn is None or not self.connected or self._core.state is not VMState.RUNNING:
            return False
        from .agent._protocol import MsgType

        try:
            await conn.request(MsgType.POWEROFF, POWEROFF_ACK_TIMEOUT_S)
        except VzkitError as err:
            log.debug("agent power-off request failed: %s", err)
            return False
        return True

    async def after_restore(self) -> None:
        """Bring a guest that was just restored from a snapshot up to date: its clock lives
        at the moment of the save, and its RNG state is the same in every VM restored from
        that snapshot. Steps the clock to the host's and mixes fresh host random bytes into the
        guest's entropy pool (written to ``/dev/urandom``). A write mixes but does not reseed:
        Linux's CRNG takes the bytes up at its next reseed (within a minute; sooner in the
        guest's first two minutes of uptime). An immediate reseed needs a VM generation ID
        device (the kernel reseeds when it changes), which is the backend's to add. Failures
        are logged, not raised: the VM runs either way."""
        try:
            await self.connection(AFTER_RESTORE_TIMEOUT_S)
        except (VzkitError, OSError) as err:
            log.warning(
                "could not reach the guest agent after the restore (the guest clock and RNG "
                "stay as saved): %s",
                err,
            )
            return
        await asyncio.gather(
            self.sync_clock("the restore", connect=False),
            self._fix(
                "reseed the guest RNG",
                ["sh", "-c", 'cat >"$1"', "sh", GUEST_URANDOM],
                os.urandom(RESEED_BYTES),
            ),
        )

    async def sync_clock(self, why: str, *, connect: bool) -> int | None:
        """Step the guest's clock to the host's (``SET_CLOCK``; ``date -s`` with an agent
        older than protocol 2.3) where it is off by more than the agent's threshold (0.5 s);
        the step in ns, ``None`` when nothing was done. Without ``connect`` only an open
        session of this run is used. Failures are logged, not raised: the VM runs either way.
        """
        if not connect and not self.connected:
            log.debug("no agent session open: the guest clock is not stepped after %s", why)
            return None
        from .agent._protocol import SOCKET_MINOR, ClockFlag

        try:
            conn = await self.connection(AFTER_RESTORE_TIMEOUT_S)
            if conn.hello.minor < SOCKET_MINOR:
                await self._fix(
                    "set the guest clock", ["date", "-u", "-s", f"@{round(time.time())}"]
                )
                return None
            step = await conn.set_clock(host_realtime_ns(), timeout=AFTER_RESTORE_TIMEOUT_S)
        except (VzkitError, OSError) as err:
            log.warning("could not set the guest clock after %s: %s", why, err)
            return None
        if step.step_ns:
            dry = " (the agent's dry run: not applied)" if step.flags & ClockFlag.DRY_RUN else ""
            log.info("stepped the guest clock by %+.3f s after %s%s", step.step_ns / 1e9, why, dry)
        return step.step_ns

    async def _fix(self, what: str, args: list[str], input: bytes | None = None) -> None:
        try:
            conn = await self.connection()  # not self.run: as root, whatever the image's user
            proc = await conn.run(
                args, input=input, timeout=AFTER_RESTORE_TIMEOUT_S, check=False, env=None,
                cwd=None, max_output=64 * 1024,
            )  # fmt: skip
        except (VzkitError, OSError, subprocess.SubprocessError) as err:
            log.warning("could not %s after the restore: %s", what, err)
            return
        if proc.returncode != 0:
            detail = proc.stderr.decode(errors="replace").strip()
            log.warning(
                "could not %s after the restore (exit %d): %s", what, proc.returncode, detail
            )
