"""The contract between the core (:mod:`vzkit._vmcore`) and a backend: small capabilities.

A backend module (``vzkit.backends.<name>``) exposes ``BACKEND``, an object satisfying
:class:`Backend`. It turns a :class:`~vzkit.LinuxVMConfig` into a machine: one VM instance
with an asynchronous lifecycle that runs on vzkit's shared event loop. The core adds every
state and feature guard, the timeouts and the stop ladder on top, the same for every backend
(like lima's driver interface lets vz and qemu share one lifecycle).

What a new backend must implement:

* :class:`Backend`: ``name``, ``features``, ``check_available()``, ``create_machine()``;
* :class:`Machine`, the lifecycle: ``state``, ``pid``, ``console_log_path``,
  ``console_pty``, ``state_dir``, ``last_error``, ``start``, ``pause``, ``resume``,
  ``request_stop``, ``force_stop``, ``wait_stopped``, ``close``.

What is optional, each a runtime-checkable protocol the core tests with ``isinstance`` (and,
where a :class:`Feature` names it, only when the backend declares that feature):

* :class:`VsockCapable` (:attr:`Feature.VSOCK`): ``vsock_connect``, ``vsock_listen``;
* :class:`BalloonCapable` (:attr:`Feature.BALLOON`): ``set_balloon_target``,
  ``balloon_info``;
* :class:`SnapshotCapable` (:attr:`Feature.SNAPSHOTS`): the methods :mod:`vzkit.snapshots`
  calls to save and load machine state and capture disks;
* :class:`AgentStream`: ``agent_console``, ``agent_vsock`` (``vm.guest``: the core chooses
  the transport and authenticates);
* :class:`PortPublisher`: ``published_ports`` (the ports its network publishes itself; the
  core forwards the others through the guest agent, :mod:`vzkit._portfwd`);
* :class:`MacBackend` (:attr:`Feature.MACOS_GUESTS`), on the backend: ``create_mac_machine``.

A machine writes no state guards: the core calls an operation only in a state its table
allows, and refuses everything else itself with one error class and sentence for every
backend. Asking for a capability the backend lacks raises
:class:`~vzkit.errors.UnsupportedError` (from the core), never a silent no-op. Method names
and signatures are the protocols'; machines satisfy them structurally (no base class).
"""

from __future__ import annotations

import enum
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .._disk import DiskFormat
from .._state import VMState

if TYPE_CHECKING:
    from .._config import LinuxVMConfig
    from .._macconfig import MacVMConfig
    from .._network import PortForward
    from ..errors import VzkitError

__all__ = [
    "AgentStream",
    "AgentVsock",
    "Backend",
    "BalloonCapable",
    "BalloonInfo",
    "CapturedDisk",
    "Feature",
    "MacBackend",
    "Machine",
    "PortPublisher",
    "ProgressFn",
    "SnapshotCapable",
    "StateListener",
    "VsockCapable",
    "VsockListenerLike",
    "notify_state",
]


class Feature(enum.StrEnum):
    """Capabilities a backend may offer."""

    LIFECYCLE = "lifecycle"
    BALLOON = "balloon"
    VSOCK = "vsock"
    SHARES = "shares"
    SNAPSHOTS = "snapshots"
    #: One snapshot restored into several VMs at once (each with its own copy-on-write disk).
    SNAPSHOT_FANOUT = "snapshot-fanout"
    GRAPHICS = "graphics"
    MACOS_GUESTS = "macos-guests"  # MacVMConfig (the backend then also is a MacBackend)
    #: Apple's Rosetta for x86_64 programs in aarch64 Linux guests (``LinuxVMConfig.rosetta``).
    ROSETTA = "rosetta"


@dataclass(frozen=True, slots=True)
class BalloonInfo:
    """Memory balloon status (the seed's ``BalloonInfo``).

    ``target_gb`` is the memory the guest is asked to keep, ``actual_gb`` what it has now
    (``None`` where the backend cannot tell), ``minimum_allowed_mb`` the smallest target allowed.
    """

    has_balloon: bool
    target_gb: float
    minimum_allowed_mb: int
    actual_gb: float | None = None


StateListener = Callable[[VMState, VMState], None]
#: Progress of long work: ``(done, total)`` in bytes (``total`` may grow while it runs).
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class CapturedDisk:
    """A writable disk captured by a snapshot at the instant its machine state was saved.

    ``source`` is the config's disk (canonical path), ``path`` the captured image, which the
    snapshot owns and nothing writes to again.
    """

    role: str  # "disk0": which of the config's disks
    source: Path
    path: Path
    format: DiskFormat


def notify_state(listener: StateListener, old: VMState, new: VMState) -> None:
    """Tell ``listener`` about a transition; a listener's bug never breaks a machine."""
    try:
        listener(old, new)
    except Exception:
        logging.getLogger(__name__).exception("state listener failed on %s -> %s", old, new)


class VsockListenerLike(Protocol):
    """A backend's listener for guest connections to one host vsock port (thread-safe)."""

    port: int

    def accept(self, timeout: float | None = None) -> tuple[socket.socket, int]:
        """Block until a guest connects: ``(stream, guest port)``; ``-1`` if not known.
        ``VMTimeoutError`` after ``timeout``; ``StateError`` once closed (also when
        :meth:`close` is called from another thread while waiting)."""
        ...

    def close(self) -> None: ...


class Machine(Protocol):
    """The lifecycle every backend's machine implements: one VM instance, driven by the core.

    Every coroutine runs on vzkit's shared loop. The core (:mod:`vzkit._vmcore`) calls each
    operation only in a state its table allows (``start`` on STOPPED/ERROR, ``pause`` on
    RUNNING, ...) and raises the refusal itself: a machine writes no state guards of its own.
    """

    @property
    def state(self) -> VMState: ...

    @property
    def pid(self) -> int | None:
        """The VMM process, where there is one."""

    @property
    def console_log_path(self) -> Path | None: ...

    @property
    def console_pty(self) -> str | None:
        """The console's pseudo-terminal, when the console mode is ``pty``."""

    @property
    def display_address(self) -> str | None:
        """Where the running VM's display is shown: ``vnc+unix:///PATH`` (a VNC server on a
        Unix socket), ``window`` (a window of this process), ``None`` (headless)."""

    @property
    def state_dir(self) -> Path: ...

    @property
    def last_error(self) -> VzkitError | None:
        """Why the VM last ended in ERROR (e.g. the guest kernel panicked, a share's server
        died, the VMM crashed); ``None`` until then. Cleared by the next start or restore."""

    async def start(self) -> None:
        """STOPPED/ERROR → RUNNING. Cleans up everything it made if it fails or is cancelled."""

    async def pause(self) -> None:
        """RUNNING → PAUSED."""

    async def resume(self) -> None:
        """PAUSED → RUNNING."""

    async def request_stop(self) -> None:
        """Ask the guest to power off (ACPI power button or equivalent); returns at once."""

    async def force_stop(self) -> None:
        """Stop the VM now, without the guest's cooperation. Ends in STOPPED. Called in any
        state (the stop ladder, a failed restore): a stopped machine returns at once."""

    async def wait_stopped(self) -> VMState:
        """Wait until the VM is STOPPED or ERROR and return which."""

    async def close(self) -> None:
        """Release every process, socket and temporary file. Idempotent."""


@dataclass(frozen=True, slots=True)
class AgentVsock:
    """The guest agent can be reached over the machine's vsock device now: the core connects
    to the agent's port (:data:`vzkit.agent.DEFAULT_VSOCK_PORT`) with
    :meth:`VsockCapable.vsock_connect` and, with a ``key``, opens with ``AUTH``."""

    #: The run's agent key (``docs/agent-protocol.md``); ``None``: the agent asks for none
    #: (vz: its vsock device is reachable from the vzkit process only).
    key: bytes | None = None


@runtime_checkable
class AgentStream(Protocol):
    """Optional: what the machine offers to reach the guest agent (``vm.guest``, the agent's
    power-off in the stop ladder, the clock step after a restore). The core
    (:mod:`vzkit._guestcore`) chooses among the offers, authenticates and speaks the protocol;
    the machine only says what it has. Without this capability those calls raise
    :class:`~vzkit.errors.UnsupportedError`; the stop ladder uses the power button alone.

    Offering nothing while the VM runs (a run that has not made its streams yet, a vsock
    device unplugged for a save) makes the core retry until its timeout.
    """

    def agent_console(self) -> socket.socket | None:
        """The host end of the agent's console stream of this run (the virtio console port
        ``org.vzkit.agent.0``) as a new socket the caller owns (closing it leaves the VM's end
        open); ``None`` without one or while the VMM does not run. One stream per run: a new
        client on it resynchronises first."""

    def agent_vsock(self) -> AgentVsock | None:
        """Whether the agent can be reached over an attached vsock device now, and with
        which key; ``None`` otherwise (no device, not running, unplugged for a save)."""


@runtime_checkable
class PortPublisher(Protocol):
    """Optional: the machine publishes some of its config's ports itself (qemu's user-mode
    network: passt's port options or slirp's ``hostfwd``; a named VM's supervisor publishes
    them all). The core forwards every other port of ``config.publish`` through the guest
    agent (:mod:`vzkit._portfwd`); a machine without this capability publishes none (vz)."""

    def published_ports(self) -> tuple[PortForward, ...]:
        """The forwards of ``config.publish`` this machine serves itself."""


@runtime_checkable
class VsockCapable(Protocol):
    """Optional, with :attr:`Feature.VSOCK`: host ↔ guest vsock streams. The core calls
    these only on a RUNNING machine whose config has ``vsock=True``."""

    async def vsock_connect(self, port: int, timeout: float | None) -> socket.socket:
        """A stream to guest ``port``; ``ConnectionRefusedError`` if nobody listens there."""

    async def vsock_listen(self, port: int) -> VsockListenerLike:
        """Listen for guest connections to host ``port`` (closed when the VM stops)."""


@runtime_checkable
class BalloonCapable(Protocol):
    """Optional, with :attr:`Feature.BALLOON`: the memory balloon. ``balloon_info`` works in
    any state (the config's values while stopped); the core sets a target only on a RUNNING
    or PAUSED machine that has a balloon, within ``minimum_allowed_mb..memory_mb``."""

    async def set_balloon_target(self, target_mb: int) -> None: ...

    async def balloon_info(self) -> BalloonInfo: ...


@runtime_checkable
class SnapshotCapable(Protocol):
    """Optional, with :attr:`Feature.SNAPSHOTS`: what :mod:`vzkit.snapshots` asks of a machine.

    The operations (:mod:`vzkit.snapshots._ops`) check the state through the core, pause and
    resume, and write every file through the one store; the machine only saves/loads its
    state and captures its disks. Order of a save: ``snapshot_blockers`` → ``prepare_save``
    → (pause) → ``save_state`` → ``capture_disks`` → (resume) → ``finish_save``; of a
    restore: ``hardware_mismatches`` → ``restore_state``.
    """

    def snapshot_blockers(self) -> list[str]:
        """Devices whose state cannot be saved (empty: a save may go ahead)."""

    def snapshot_info(self) -> dict[str, str]:
        """What a restore must match beyond the config (e.g. the accelerator); JSON-able."""

    async def hardware_mismatches(self, saved: Mapping[str, str]) -> list[str]:
        """Before a restore, on the stopped machine: how the hardware a restore would build
        (what :meth:`snapshot_info` would then report: machine type, CPU model...) differs
        from ``saved``, a snapshot's record of it; one sentence each, empty when it fits.
        Resolved without starting anything; the caller refuses the restore on a mismatch."""

    async def prepare_save(self) -> None:
        """Before the VM is paused for a save: set aside what cannot be saved (qemu unplugs
        its vsock device, which needs the guest running; a paused VM runs for that moment)."""

    async def finish_save(self) -> None:
        """After a save, whether it worked or not: bring back what :meth:`prepare_save` set
        aside. Never raises for a VMM that is gone."""

    async def save_state(self, path: Path, progress: ProgressFn | None) -> None:
        """Write the PAUSED machine's device and memory state to ``path`` (a new file).

        The machine stays paused. On failure or cancellation the machine is left paused and
        usable; the caller removes ``path``.
        """

    async def capture_disks(self, directory: Path, prefix: str) -> list[CapturedDisk]:
        """Right after :meth:`save_state`, still paused: capture every writable disk into
        ``directory`` as new files named ``prefix + ...`` (fsynced). Read-only disks are not
        captured. The caller renames and removes them."""

    async def restore_state(
        self,
        path: Path,
        disks: Sequence[CapturedDisk],
        verified: Awaitable[None] | None = None,
    ) -> None:
        """STOPPED/ERROR → PAUSED: build the VM, load the state saved at ``path`` and run on
        ``disks``. Cleans up everything it made if it fails or is cancelled.

        ``verified`` (the snapshot's checksums, computed meanwhile) is awaited after the VM
        is built and before anything reads the saved state or the captured disks; if it
        raises, the machine cleans up and the error propagates. A backend that builds its VM
        quickly may await it first."""


@runtime_checkable
class Backend(Protocol):
    """What a backend module exports as ``BACKEND``."""

    name: str
    #: What its machines offer beyond the lifecycle; the core refuses the rest with
    #: :class:`~vzkit.errors.UnsupportedError` before it calls the machine.
    features: frozenset[Feature]

    def check_available(self) -> None:
        """Raise :class:`~vzkit.errors.BackendUnavailableError` if it cannot run here."""

    def create_machine(self, config: LinuxVMConfig, on_state: StateListener) -> Machine:
        """A stopped machine for ``config``; nothing is started, no process spawned."""


@runtime_checkable
class MacBackend(Protocol):
    """Optional, with :attr:`Feature.MACOS_GUESTS`: the backend also boots installed macOS
    guests (:class:`~vzkit.MacVMConfig`)."""

    def create_mac_machine(self, config: MacVMConfig, on_state: StateListener) -> Machine:
        """A stopped machine for the macOS guest installed in ``config.vm_dir``."""
