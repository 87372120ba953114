"""The lifecycle core shared by ``vzkit.VirtualMachine`` and ``vzkit.aio.VirtualMachine``.

It owns every guard: one table (:data:`_GUARDS`) says in which states each operation may run
(start, pause, resume, stop, request_stop, the balloon, vsock, the guest agent, snapshot save
and restore) and what the refusal says; every refusal is a :class:`~vzkit.errors.StateError`
with the same sentence on every backend, raised before the backend is called. Features are
guarded the same way: the backend declares them (:attr:`~vzkit.backends.Backend.features`)
and its machine implements the matching optional protocol (:class:`~vzkit.backends.
VsockCapable`, :class:`~vzkit.backends.BalloonCapable`, :class:`~vzkit.backends.
SnapshotCapable`, :class:`~vzkit.backends.AgentStream`), tested with ``isinstance``; a
missing one is an :class:`~vzkit.errors.UnsupportedError`. A backend's machine therefore
implements the lifecycle (:class:`~vzkit.backends.Machine`) and any capabilities it offers,
and no guards (see :mod:`vzkit.backends._protocol`).

It also applies timeouts and runs the stop ladder, and owns the guest agent connection
(``core.agent``, :mod:`vzkit._guestcore`): the stop ladder asks the agent to power off, a
resume (and a host sleep, :mod:`vzkit._hostsleep`) steps the guest clock, the first resume
after a restore also reseeds its RNG, whichever facade drives the VM. The ports the machine's
network does not publish are forwarded through the agent (``core.ports``,
:mod:`vzkit._portfwd`): bound before a run, served while it lasts, closed when it ends.

All coroutines here run on vzkit's shared loop (:mod:`vzkit._loop`); the facades only
delegate (:func:`core_of` is the seam for code that acts on a facade's VM, like snapshots:
it uses ``require``, ``require_feature`` and ``snapshot_machine``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import socket
import warnings
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ._config import LinuxVMConfig
from ._guestcore import AgentLink
from ._hostsleep import SleepWatch
from ._macconfig import MacVMConfig
from ._network import PortForward
from ._portfwd import PortForwarder
from ._state import VMState
from .backends import (
    AgentStream,
    Backend,
    BalloonCapable,
    BalloonInfo,
    Feature,
    Machine,
    PortPublisher,
    SnapshotCapable,
    StateListener,
    VsockCapable,
    VsockListenerLike,
    choose_backend,
)
from .backends._protocol import MacBackend, notify_state
from .errors import ConfigError, StateError, UnsupportedError, VMTimeoutError, VzkitError

__all__ = ["VMCore", "VMView", "core_of"]

log = logging.getLogger("vzkit.vm")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Guard:
    """When an operation may run, and the sentence that refuses it otherwise (``{state}`` is
    the VM's state, or ``closed``). ``closed``: a sentence of its own for a closed VM."""

    allowed: frozenset[VMState]
    refusal: str
    closed: str | None = None


_S = VMState
_STOPPED = frozenset({_S.STOPPED, _S.ERROR})
_RUNNING = frozenset({_S.RUNNING})
_LIVE = frozenset({_S.RUNNING, _S.PAUSED})
#: Every state guard of every operation, for every backend (one error class: StateError).
_GUARDS: dict[str, Guard] = {
    "start": Guard(_STOPPED, "VM is already {state}", "cannot start: the VM has been closed"),
    "pause": Guard(
        _RUNNING, "cannot pause a VM that is {state}", "cannot pause: the VM has been closed"
    ),
    "resume": Guard(
        frozenset({_S.PAUSED}),
        "cannot resume a VM that is {state} (only a paused VM resumes)",
        "cannot resume: the VM has been closed",
    ),
    "stop": Guard(
        frozenset({_S.RUNNING, _S.PAUSED, _S.STARTING, _S.STOPPING}),
        "cannot stop a VM that is {state}",
        "cannot stop: the VM has been closed",
    ),
    "request_stop": Guard(
        _RUNNING,
        "cannot ask a VM that is {state} to stop (it must be running)",
        "cannot request stop: the VM has been closed",
    ),
    "balloon": Guard(_LIVE, "the balloon needs a running VM (it is {state})"),
    "vsock_connect": Guard(_RUNNING, "vsock connect needs a running VM (it is {state})"),
    "vsock_listen": Guard(_RUNNING, "vsock listen needs a running VM (it is {state})"),
    "agent": Guard(_LIVE, "the guest agent needs a running VM (it is {state})"),
    "snapshot_save": Guard(
        _LIVE,
        "cannot save a VM that is {state} (it must be running or paused)",
        "cannot save or restore a snapshot: the VM has been closed",
    ),
    "snapshot_restore": Guard(
        _STOPPED,
        "restoring a snapshot needs a stopped VM (it is {state})",
        "cannot save or restore a snapshot: the VM has been closed",
    ),
}
#: Part of ``stop(timeout=)`` given to the guest before the VM is forced off.
GRACEFUL_SHARE = 0.5


async def _within(timeout: float | None, what: str, aw: Awaitable[T]) -> T:
    if timeout is None:
        return await aw
    if timeout < 0 or math.isnan(timeout):
        if inspect.iscoroutine(aw):
            aw.close()
        raise ValueError(f"timeout must be >= 0, got {timeout}")
    try:
        async with asyncio.timeout(timeout):
            return await aw
    except VMTimeoutError:
        raise  # a bound of its own ran out first (e.g. QEMU did not answer QMP): say that one
    except TimeoutError:
        raise VMTimeoutError(f"{what} did not finish within {timeout:g} s") from None


class VMCore:
    """State guards, timeouts and the stop ladder over one backend machine."""

    def __init__(
        self,
        config: LinuxVMConfig | MacVMConfig,
        backend: str | Backend = "auto",
        listener: StateListener | None = None,
    ) -> None:
        if not isinstance(config, LinuxVMConfig | MacVMConfig):
            raise TypeError(
                f"config must be a LinuxVMConfig or MacVMConfig, got {type(config).__name__}"
            )
        self.config = config
        self.listener = listener  # told of every transition (a named VM's supervisor)
        #: A named VM's name (``vzkit.named``); ``None`` for a VM of this process alone.
        self.name: str | None = None
        if isinstance(config, MacVMConfig):
            if backend == "auto":
                backend = "vz"  # the only one: say why it cannot run here, if it cannot
            self.backend = choose_backend(backend) if isinstance(backend, str) else backend
            mac = self.backend
            if Feature.MACOS_GUESTS not in mac.features or not isinstance(mac, MacBackend):
                raise UnsupportedError(
                    f"macOS guests need the vz backend; the {mac.name} backend cannot boot them",
                    backend=mac.name,
                    feature=Feature.MACOS_GUESTS.value,
                )
            self.machine: Machine = mac.create_mac_machine(config, self._on_state)
        else:
            self.backend = choose_backend(backend) if isinstance(backend, str) else backend
            if config.rosetta and Feature.ROSETTA not in self.backend.features:
                raise UnsupportedError(
                    f"rosetta is Apple's (the vz backend on Apple silicon, macOS 13 and "
                    f"later); the {self.backend.name} backend cannot offer it: drop rosetta",
                    backend=self.backend.name,
                    feature=Feature.ROSETTA.value,
                )
            self.machine = self.backend.create_machine(config, self._on_state)
        self.closed = False
        self.generation = 0  # counts successful starts; the guest agent reconnects on change
        self.restored_from: Path | None = None  # the snapshot state file of this run
        self.clock_step_pending = False  # step the clock and reseed the RNG at the next resume
        self.agent = AgentLink(self)
        self.ports = PortForwarder(self)  # -p where the machine's network does not publish
        self.sleep_watch = SleepWatch(self.host_woke)
        self._loop: asyncio.AbstractEventLoop | None = None  # the shared loop, seen at start
        self._run_ports = 0  # counts open_ports(): an end seen late closes no newer run's

    def _on_state(self, old: VMState, new: VMState) -> None:
        log.info("VM %s: %s -> %s", self.backend.name, old.value, new.value)
        if new in _STOPPED and self._loop is not None:  # the run ended, however: its ports go
            self._loop.call_soon_threadsafe(self._run_ended, self._run_ports)
        if self.listener is not None:
            notify_state(self.listener, old, new)

    def _run_ended(self, run: int) -> None:
        if run == self._run_ports and self.machine.state in _STOPPED:
            self.ports.close_now()
            self.sleep_watch.stop()

    # -- predicates ------------------------------------------------------------------------

    @property
    def state(self) -> VMState:
        return self.machine.state

    def can(self, op: str) -> bool:
        return not self.closed and self.machine.state in _GUARDS[op].allowed

    def require(self, op: str) -> None:
        """Refuse ``op`` (a key of :data:`_GUARDS`) unless the VM's state allows it."""
        guard = _GUARDS[op]
        if self.closed:
            raise StateError(guard.closed or guard.refusal.format(state="closed"))
        if self.machine.state not in guard.allowed:
            raise StateError(guard.refusal.format(state=self.machine.state.value))

    def require_feature(self, feature: Feature) -> None:
        """Refuse what the backend does not declare, whatever its machine has."""
        if feature not in self.backend.features:
            raise UnsupportedError(
                f"the {self.backend.name} backend does not support {feature.value}",
                backend=self.backend.name,
                feature=feature.value,
            )

    def _lacks(self, feature: str, protocol: type, what: str = "") -> UnsupportedError:
        """A capability the machine does not implement (whatever the backend declares)."""
        return UnsupportedError(
            f"the {self.backend.name} backend's machine does not implement {what or feature} "
            f"({protocol.__name__})",
            backend=self.backend.name,
            feature=feature,
        )

    # -- capabilities: declared as a feature, implemented as a protocol ----------------------

    def snapshot_machine(self) -> SnapshotCapable:
        """The machine's snapshot methods (:mod:`vzkit.snapshots` drives them)."""
        self.require_feature(Feature.SNAPSHOTS)
        machine = self.machine
        if not isinstance(machine, SnapshotCapable):
            raise self._lacks(Feature.SNAPSHOTS.value, SnapshotCapable)
        return machine

    def balloon_machine(self) -> BalloonCapable:
        self.require_feature(Feature.BALLOON)
        machine = self.machine
        if not isinstance(machine, BalloonCapable):
            raise self._lacks(Feature.BALLOON.value, BalloonCapable)
        return machine

    def vsock_machine(self) -> VsockCapable:
        self.require_feature(Feature.VSOCK)
        machine = self.machine
        if not isinstance(machine, VsockCapable):
            raise self._lacks(Feature.VSOCK.value, VsockCapable)
        return machine

    def agent_stream(self) -> AgentStream:
        """How the guest agent is reached (:mod:`vzkit._guestcore` connects through it)."""
        machine = self.machine
        if not isinstance(machine, AgentStream):
            raise self._lacks("agent", AgentStream, "the guest agent")
        return machine

    def agent_forwards(self) -> tuple[PortForward, ...]:
        """The published ports the core forwards through the agent: those the machine's
        network does not publish itself (:class:`~vzkit.backends.PortPublisher`)."""
        publish: tuple[PortForward, ...] = getattr(self.config, "publish", ())
        machine = self.machine
        native = machine.published_ports() if isinstance(machine, PortPublisher) else ()
        rest = tuple(fwd for fwd in publish if fwd not in native)
        if rest and not isinstance(machine, AgentStream):
            raise UnsupportedError(
                f"publishing {rest[0]} needs the guest agent, and the {self.backend.name} "
                "backend's machine offers no way to reach it (AgentStream): use a network "
                "that publishes ports itself (qemu: nat), or leave the port out",
                backend=self.backend.name,
                feature="network:publish",
            )
        return rest

    def open_ports(self) -> None:
        """Before a run: bind the ports the core forwards (a VMError names one in use)."""
        self._loop = asyncio.get_running_loop()
        self._run_ports += 1
        self.ports.open(self.agent_forwards())

    async def run_began(self) -> None:
        """A run exists (started, or restored and paused): serve its ports, watch the host's
        sleep."""
        await self.ports.serve()
        self.sleep_watch.start()

    def restored(self, state_file: Path, *, clock_step: bool) -> None:
        """A snapshot was restored into the machine: a new run, paused."""
        self.generation += 1
        self.restored_from = state_file
        self.clock_step_pending = clock_step

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, timeout: float | None) -> None:
        """Start the machine; the ports the core forwards are bound first (a port in use
        fails here, before anything runs) and served once it runs."""
        self.require("start")
        self.open_ports()
        try:
            await _within(timeout, "start", self.machine.start())
        except BaseException:
            await self.ports.aclose()
            raise
        self.generation += 1
        self.restored_from = None
        self.clock_step_pending = False
        await self.run_began()

    async def pause(self, timeout: float | None) -> None:
        self.require("pause")
        await _within(timeout, "pause", self.machine.pause())

    async def resume(self, timeout: float | None) -> None:
        """Run a paused VM and step its clock, which stood still meanwhile, through an open
        agent session. The first resume after a restore also reseeds the guest's RNG
        (bounded on its own, not by ``timeout``)."""
        self.require("resume")
        await _within(timeout, "resume", self.machine.resume())
        if self.clock_step_pending:
            self.clock_step_pending = False
            await self.agent.after_restore()
        else:  # the guest's clock stood still while it was paused
            await self.agent.sync_clock("a resume", connect=False)

    async def host_woke(self, slept_s: float) -> None:
        """The host slept ``slept_s`` seconds (:class:`~vzkit._hostsleep.SleepWatch`; a wake
        notification may call this too): step a running guest's clock through the agent."""
        if self.state is VMState.RUNNING:
            await self.agent.sync_clock(f"a host sleep of {slept_s:.0f} s", connect=False)

    async def request_stop(self) -> None:
        """Press the power button, and ask the agent too where it is connected."""
        self.require("request_stop")
        await self.machine.request_stop()
        await self.agent.ask_poweroff()

    async def stop(self, timeout: float | None) -> None:
        """Ask the guest (agent, power button), wait up to half the timeout, then force the VM
        off. The agent connection of the run is closed in any case."""
        try:
            await self._stop(timeout)
        finally:
            self.sleep_watch.stop()
            await self.ports.aclose()
            await self.agent.close()

    async def _stop(self, timeout: float | None) -> None:
        if self.machine.state in (VMState.STOPPED, VMState.ERROR):
            return
        self.require("stop")
        budget = 30.0 if timeout is None else timeout
        if self.machine.state is VMState.RUNNING:
            try:  # asking is bounded too: a wedged VMM may not answer the request
                await asyncio.wait_for(self._ask_to_stop(), budget * GRACEFUL_SHARE)
                return
            except VzkitError as err:
                log.info("could not ask the guest to power off (%s); forcing the VM off", err)
            except TimeoutError:
                log.info(
                    "guest did not power off within %.1f s; forcing the VM off",
                    budget * GRACEFUL_SHARE,
                )
        await _within(max(budget * (1 - GRACEFUL_SHARE), 5.0), "stop", self.machine.force_stop())

    async def _ask_to_stop(self) -> None:
        # The agent first: a guest without a power button (aarch64 virt without firmware)
        # ignores the request below, and would wait for force otherwise.
        await self.agent.ask_poweroff()
        await self.machine.request_stop()
        await self.machine.wait_stopped()

    async def wait(self, timeout: float | None) -> VMState:
        return await _within(timeout, "wait", self.machine.wait_stopped())

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.sleep_watch.stop()
        try:
            await self.ports.aclose()
            await self.agent.close()
        finally:
            await self.machine.close()

    # -- balloon ---------------------------------------------------------------------------

    async def set_balloon_target_gb(self, gb: float) -> None:
        machine = self.balloon_machine()
        self.require("balloon")
        target_mb = int(gb * 1024)  # rounded down to a 1 MiB boundary, as the seed does
        info = await machine.balloon_info()
        if not info.has_balloon:
            raise UnsupportedError(
                "this VM has no memory balloon", backend=self.backend.name, feature="balloon"
            )
        if not info.minimum_allowed_mb <= target_mb <= self.config.memory_mb:
            raise ConfigError(
                f"balloon target {gb:g} GB is outside {info.minimum_allowed_mb} MiB.."
                f"{self.config.memory_mb} MiB"
            )
        await machine.set_balloon_target(target_mb)

    async def balloon_info(self) -> BalloonInfo:
        return await self.balloon_machine().balloon_info()

    # -- vsock -----------------------------------------------------------------------------

    def _vsock_ready(self, op: str) -> VsockCapable:
        machine = self.vsock_machine()
        if not self.config.vsock:
            raise UnsupportedError(
                "this VM has no vsock device (config vsock=False)",
                backend=self.backend.name,
                feature="vsock",
            )
        self.require(op)
        return machine

    async def vsock_connect(self, port: int, timeout: float | None) -> socket.socket:
        machine = self._vsock_ready("vsock_connect")
        # _within turns any TimeoutError (also the socket's own) into VMTimeoutError
        return await _within(
            timeout, f"vsock connect to port {port}", machine.vsock_connect(port, timeout)
        )

    async def vsock_listen(self, port: int) -> VsockListenerLike:
        return await self._vsock_ready("vsock_listen").vsock_listen(port)

    @property
    def console_log_path(self) -> Path | None:
        return self.machine.console_log_path


def core_of(vm: VMView) -> VMCore:
    """The core behind a facade's VM (either facade): the seam for code that acts on a VM
    (snapshot operations) without reaching into the facade."""
    if not isinstance(vm, VMView):
        raise TypeError(f"expected a vzkit VirtualMachine, got {type(vm).__name__}")
    return vm._core


class VMView:
    """The read-only side both facades share: state, the ``can_*`` predicates, identity."""

    _core: VMCore

    @property
    def config(self) -> LinuxVMConfig | MacVMConfig:
        return self._core.config

    @property
    def backend(self) -> str:
        return self._core.backend.name

    @property
    def name(self) -> str | None:
        """A named VM's name (``vzkit.create``, ``vzkit.connect``); ``None`` for a VM that
        lives and dies with this process."""
        return self._core.name

    @property
    def state(self) -> VMState:
        return self._core.state

    @property
    def can_start(self) -> bool:
        return self._core.can("start")

    @property
    def can_pause(self) -> bool:
        return self._core.can("pause")

    @property
    def can_resume(self) -> bool:
        return self._core.can("resume")

    @property
    def can_stop(self) -> bool:
        return self._core.can("stop")

    @property
    def can_request_stop(self) -> bool:
        return self._core.can("request_stop")

    @property
    def last_error(self) -> VzkitError | None:
        """Why the VM last ended in :attr:`VMState.ERROR` (a :class:`~vzkit.VMError` saying,
        e.g., that the guest kernel panicked or a share's virtiofsd died), ``None`` before.
        Cleared by the next start or restore."""
        return self._core.machine.last_error

    @property
    def pid(self) -> int | None:
        """The VMM's process id while it runs (``None`` for in-process backends)."""
        return self._core.machine.pid

    @property
    def console_log_path(self) -> Path | None:
        return self._core.console_log_path

    @property
    def console_pty(self) -> str | None:
        return self._core.machine.console_pty

    @property
    def display_address(self) -> str | None:
        """Where the VM's display is shown while it runs: ``vnc+unix:///PATH`` (qemu: a VNC
        server on a Unix socket, e.g. for ``gui=True``), ``window`` (vz, ``gui=True``), or
        ``None`` (headless)."""
        return self._core.machine.display_address

    @property
    def state_dir(self) -> Path:
        return self._core.machine.state_dir

    def __del__(self) -> None:
        core = getattr(self, "_core", None)
        if core is not None and not core.closed and core.machine.pid is not None:
            warnings.warn(
                f"unclosed {type(self).__name__} {self!r}; call close() or use 'with'",
                ResourceWarning,
                stacklevel=2,
            )
