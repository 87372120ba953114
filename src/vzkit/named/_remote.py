"""A named VM seen from any process: the backend ``Machine`` protocol over a control socket.

:class:`RemoteMachine` implements the lifecycle, :class:`~vzkit.backends.VsockCapable`,
:class:`~vzkit.backends.BalloonCapable` and :class:`~vzkit.backends.AgentStream` by asking
the VM's supervisor (:mod:`._supervisor`), so a :class:`~vzkit._vmcore.VMCore` over it gives
the usual guards, timeouts, stop ladder and guest agent (``vm.guest``) unchanged. Its state is
what the supervisor last said (events pushed on every transition) or, with no supervisor,
what the VM's directory records. ``start`` launches a new supervisor (:func:`start_supervisor`);
``close`` only disconnects: the VM runs on. Vsock streams come as descriptors passed by the
supervisor: reads and writes go straight to the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._config import ConsoleMode, LinuxVMConfig
from .._disk import DiskFormat
from .._loop import get_loop
from .._network import PortForward
from .._private import open_private
from .._state import VMState
from .._vmcore import VMCore
from ..backends import (
    AgentVsock,
    Backend,
    BalloonInfo,
    Feature,
    Machine,
    SnapshotCapable,
    StateListener,
    choose_backend,
    load_backend,
)
from ..backends._protocol import CapturedDisk, ProgressFn, notify_state
from ..errors import (
    ConfigError,
    StateError,
    UnsupportedError,
    VMError,
    VMTimeoutError,
    VzkitError,
)
from ._control import FrameReader, remote_error, send_frame, short_path
from ._home import VMDir, make_vm_dir, wait_supervisor_gone

__all__ = ["RemoteBackend", "RemoteMachine", "named_core", "new_named_core", "start_supervisor"]

#: What a VM reached through its supervisor offers (snapshots and graphics stay with it).
REMOTE_FEATURES = frozenset(
    {Feature.LIFECYCLE, Feature.BALLOON, Feature.VSOCK, Feature.SHARES, Feature.SNAPSHOTS}
)
#: How long a new supervisor may take to report that its VM runs (or why it does not).
SUPERVISOR_START_S = 180.0
#: How often a client looks for the control socket of a supervisor that is still starting.
_ATTACH_POLL_S = 0.05


def start_supervisor(
    vmdir: VMDir,
    timeout: float = SUPERVISOR_START_S,
    restore: dict[str, Any] | None = None,
    pass_fds: tuple[int, ...] = (),
) -> None:
    """Launch the VM's supervisor and return once the VM runs (or, with ``restore``, is
    restored from a snapshot's files, paused; ``pass_fds``: descriptors it names); raise why
    it did not. Holds the VM's operation lock meanwhile, so of two racing starts one wins and
    the other is told the VM is running."""
    with vmdir.locked("start"):
        if vmdir.supervisor_alive():
            raise StateError(f"VM {vmdir.name!r} is already running")
        read_end, write_end = os.pipe()
        try:
            with open_private(vmdir.log) as log:
                proc = subprocess.Popen(  # detaches at once (forks); reaped right below
                    [sys.executable, "-m", "vzkit.named._supervisor", str(vmdir.path),
                     str(write_end), json.dumps(restore)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    pass_fds=(write_end, *pass_fds),
                    start_new_session=True, close_fds=True,
                )  # fmt: skip
            os.close(write_end)
            write_end = -1
            proc.wait()
            line = _read_report(read_end, timeout)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
    if line is None:
        raise VMError(
            f"the supervisor of VM {vmdir.name!r} ended before the VM ran: "
            f"{_log_tail(vmdir.log) or 'no message'} (its log: {vmdir.log})"
        )
    report = json.loads(line)
    if not report.get("ok"):
        err = remote_error(vmdir.name, report.get("error") or {})
        if isinstance(err, VzkitError):
            raise err
        raise VMError(f"VM {vmdir.name!r} did not start: {err}")


def _read_report(fd: int, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise VMTimeoutError(f"the VM did not start within {timeout:g} s")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


class _Listener:
    """A vsock listener of the supervisor's, its accepted streams passed here (thread-safe)."""

    def __init__(self, machine: RemoteMachine, port: int, ident: int) -> None:
        self.port = port
        self._machine = machine
        self._ident = ident
        self._queue: queue.Queue[tuple[socket.socket, int] | None] = queue.Queue()
        self._closed = False

    def put(self, item: tuple[socket.socket, int] | None) -> None:
        self._queue.put(item)

    def accept(self, timeout: float | None = None) -> tuple[socket.socket, int]:
        if self._closed:
            raise StateError("the vsock listener is closed")
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise VMTimeoutError(f"no guest connected to port {self.port}") from None
        if item is None:
            self._closed = True
            self._queue.put(None)  # wake any other waiter too
            raise StateError("the vsock listener is closed")
        return item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._machine.unlisten(self._ident)
            self._queue.put(None)


class RemoteMachine:
    """The machine of a named VM, driven through its supervisor (see the module's doc)."""

    def __init__(
        self, vmdir: VMDir, config: LinuxVMConfig, backend: str, on_state: StateListener
    ) -> None:
        self.vmdir = vmdir
        self._config = config
        self._backend = backend
        self._on_state = on_state
        record = vmdir.read_state()
        self._state = VMState(record.get("state", "stopped"))
        self._error: str | None = record.get("error")
        self._pid: int | None = record.get("vmm_pid")
        self._hello: dict[str, Any] = {}
        self._agent: dict[str, Any] | None = None
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._pending: dict[int, asyncio.Future[tuple[Any, list[int]]]] = {}
        self._ids = 0
        self._listeners: dict[int, _Listener] = {}
        self._ended: asyncio.Event | None = None

    # -- the connection --------------------------------------------------------------------

    async def attach(self) -> None:
        """Connect to the supervisor if there is one (a stopped VM has none)."""
        while True:
            if self._sock is not None or not self.vmdir.supervisor_alive():
                return
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with short_path(self.vmdir.control) as name:
                    await asyncio.to_thread(sock.connect, name)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()  # a supervisor still starting its VM: it serves once it runs
                await asyncio.sleep(_ATTACH_POLL_S)
            except OSError:
                sock.close()
                raise
        self._sock = sock
        self._ended = asyncio.Event()
        loop = get_loop()
        threading.Thread(
            target=self._read, args=(sock, loop), name="vzkit-remote", daemon=True
        ).start()
        hello, _ = await self._call("hello")
        self._hello = hello
        self._apply(hello)

    def _read(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        reader = FrameReader(sock)
        try:
            while (frame := reader.read()) is not None:
                loop.call_soon_threadsafe(self._dispatch, *frame)
        except (OSError, VzkitError):
            pass
        finally:
            reader.close()
            loop.call_soon_threadsafe(self._gone, sock)

    def _dispatch(self, message: dict[str, Any], fds: list[int]) -> None:
        event = message.get("event")
        if event == "state":
            self._apply(message)
        elif event == "vsock_accept":
            listener = self._listeners.get(int(message.get("listener", -1)))
            if listener is None or not fds:
                for fd in fds:
                    os.close(fd)
                return
            listener.put((socket.socket(fileno=fds[0]), int(message.get("guest_port", -1))))
        else:
            future = self._pending.pop(int(message.get("id", -1)), None)
            if future is None or future.done():
                for fd in fds:
                    os.close(fd)
            elif message.get("ok"):
                future.set_result((message.get("result"), fds))
            else:
                future.set_exception(remote_error(self.vmdir.name, message.get("error") or {}))

    def _apply(self, message: dict[str, Any]) -> None:
        old = self._state
        self._state = VMState(message.get("state", old.value))
        self._error = message.get("error")
        self._pid = message.get("vmm_pid")
        self._agent = message.get("agent")
        if old is not self._state:
            notify_state(self._on_state, old, self._state)

    def _gone(self, sock: socket.socket) -> None:
        """The supervisor closed the connection (it exits) or died: the record says how the
        VM ended (an ERROR naming the dead supervisor if it was killed)."""
        if self._sock is not sock:
            return
        self._sock = None
        sock.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(VMError(f"the supervisor of VM {self.vmdir.name!r} went away"))
        self._pending.clear()
        for listener in self._listeners.values():
            listener.put(None)
        self._listeners.clear()
        with contextlib.suppress(VzkitError):
            self._apply({**self.vmdir.read_state(), "agent": None})
        if self._state not in (VMState.STOPPED, VMState.ERROR):
            self._apply({"state": VMState.ERROR.value, "error": "its supervisor went away"})
        if self._ended is not None:
            self._ended.set()

    async def _call(self, op: str, **args: Any) -> tuple[Any, list[int]]:
        sock = self._sock
        if sock is None:
            raise StateError(f"VM {self.vmdir.name!r} is {self._state.value}")
        self._ids += 1
        ident = self._ids
        future: asyncio.Future[tuple[Any, list[int]]] = get_loop().create_future()
        self._pending[ident] = future
        try:
            with self._send_lock:
                send_frame(sock, {"id": ident, "op": op, **args})
        except OSError as err:
            self._pending.pop(ident, None)
            raise VMError(f"the supervisor of VM {self.vmdir.name!r} went away") from err
        return await future

    async def _ask(self, op: str, **args: Any) -> Any:
        result, fds = await self._call(op, **args)
        for fd in fds:
            os.close(fd)
        return result

    def unlisten(self, ident: int) -> None:
        self._listeners.pop(ident, None)
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError), self._send_lock:
                send_frame(sock, {"id": 0, "op": "vsock_unlisten", "listener": ident})

    # -- Machine ---------------------------------------------------------------------------

    @property
    def state(self) -> VMState:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def console_log_path(self) -> Path | None:
        value = self._hello.get("console_log_path")
        if value:
            return Path(value)
        return self._config.console_log_path or (self.vmdir.run_dir / "console.log")

    @property
    def console_pty(self) -> str | None:
        value = self._hello.get("console_pty")
        return str(value) if value else None

    @property
    def display_address(self) -> str | None:
        value = self._hello.get("display_address")
        return str(value) if value else None

    @property
    def state_dir(self) -> Path:
        return self.vmdir.run_dir

    @property
    def last_error(self) -> VzkitError | None:
        if self._state is not VMState.ERROR or not self._error:
            return None
        return VMError(f"VM {self.vmdir.name!r}: {self._error}")

    async def start(self) -> None:
        await asyncio.to_thread(start_supervisor, self.vmdir)
        await self.attach()
        if self._sock is None:  # it ran and stopped already, or died: say what the record says
            self._apply(self.vmdir.read_state())
            raise VMError(f"VM {self.vmdir.name!r} stopped right after it started: {self._error}")

    async def pause(self) -> None:
        await self._ask("pause")

    async def resume(self) -> None:
        await self._ask("resume")

    async def request_stop(self) -> None:
        await self._ask("request_stop")

    async def force_stop(self) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(VMError):  # it may exit before it answers
            await self._ask("force_stop")
        await self.wait_stopped()

    async def wait_stopped(self) -> VMState:
        """Wait until the supervisor has stopped the VM, reaped its processes and gone."""
        ended = self._ended
        if self._sock is not None and ended is not None:
            await ended.wait()
            await asyncio.to_thread(wait_supervisor_gone, self.vmdir, 10.0)
        return self._state

    async def close(self) -> None:
        """Disconnect (the VM runs on)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(StateError("the VM's connection was closed"))
        self._pending.clear()
        if self._ended is not None:
            self._ended.set()

    # -- AgentStream -----------------------------------------------------------------------

    def agent_console(self) -> socket.socket | None:
        return None  # one stream per run: it stays with the supervisor

    def agent_vsock(self) -> AgentVsock | None:
        agent = self._agent
        if agent is None or self._sock is None:
            return None
        key = agent.get("key")
        return AgentVsock(key=None if key is None else bytes.fromhex(key))

    # -- PortPublisher ---------------------------------------------------------------------

    def published_ports(self) -> tuple[PortForward, ...]:
        """All of them: the supervisor's core publishes the ports (its forwarder, or its
        machine's network), never a client's."""
        return self._config.publish

    # -- VsockCapable ----------------------------------------------------------------------

    async def vsock_connect(self, port: int, timeout: float | None) -> socket.socket:
        _, fds = await self._call("vsock_connect", port=port, timeout=timeout)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise VMError("the supervisor answered a vsock connect without a stream")
        return socket.socket(fileno=fds[0])

    async def vsock_listen(self, port: int) -> _Listener:
        ident = int(await self._ask("vsock_listen", port=port))
        listener = _Listener(self, port, ident)
        self._listeners[ident] = listener
        return listener

    # -- SnapshotCapable: the supervisor's machine saves; a restore starts a supervisor ------

    def snapshot_blockers(self) -> list[str]:
        return list(self._hello.get("snapshot_blockers") or [])

    def snapshot_info(self) -> dict[str, str]:
        return dict(self._hello.get("snapshot_info") or {})

    async def hardware_mismatches(self, saved: Mapping[str, str]) -> list[str]:
        """Asked of a machine of the VM's backend made here and never started (the answer
        needs no running VM, and a stopped named VM has no supervisor)."""
        machine = load_backend(self._backend).create_machine(self._config, _ignore)
        try:
            if not isinstance(machine, SnapshotCapable):
                raise UnsupportedError(f"the {self._backend} backend cannot restore snapshots")
            return await machine.hardware_mismatches(saved)
        finally:
            await machine.close()

    async def prepare_save(self) -> None:
        await self._ask("prepare_save")

    async def finish_save(self) -> None:
        with contextlib.suppress(VzkitError):  # never raises for a VMM that is gone
            await self._ask("finish_save")

    async def save_state(self, path: Path, progress: ProgressFn | None) -> None:
        await self._ask("save_state", path=str(path))

    async def capture_disks(self, directory: Path, prefix: str) -> list[CapturedDisk]:
        found = await self._ask("capture_disks", directory=str(directory), prefix=prefix)
        return [
            CapturedDisk(d["role"], Path(d["source"]), Path(d["path"]), DiskFormat(d["format"]))
            for d in found
        ]

    async def restore_state(
        self,
        path: Path,
        disks: Sequence[CapturedDisk],
        verified: Awaitable[None] | None = None,
    ) -> None:
        """The snapshot's files are checked here (``verified``), then a new supervisor loads
        them: the state file by the very descriptor that was checksummed, passed on."""
        if verified is not None:
            await verified
        fds: tuple[int, ...] = ()
        state: dict[str, Any] = {"path": str(path)}
        if str(path).startswith("/proc/self/fd/"):
            fd = int(path.name)
            fds, state = (fd,), {"fd": fd}
        spec = {
            "state": state,
            "disks": [
                {"role": d.role, "source": str(d.source), "path": str(d.path),
                 "format": d.format.value}
                for d in disks
            ],
        }  # fmt: skip
        await asyncio.to_thread(start_supervisor, self.vmdir, SUPERVISOR_START_S, spec, fds)
        await self.attach()
        if self._sock is None:
            self._apply(self.vmdir.read_state())
            raise VMError(f"VM {self.vmdir.name!r} ended right after its restore: {self._error}")

    # -- BalloonCapable --------------------------------------------------------------------

    async def set_balloon_target(self, target_mb: int) -> None:
        await self._ask("set_balloon_target", mb=target_mb)

    async def balloon_info(self) -> BalloonInfo:
        if self._sock is None:  # stopped: the config's values, as a local machine says
            return BalloonInfo(self._config.balloon, self._config.memory_gb, 0)
        return BalloonInfo(**await self._ask("balloon_info"))


class RemoteBackend:
    """The backend of a named VM: its real backend's name, the features a client has."""

    def __init__(self, vmdir: VMDir, backend: str, features: frozenset[Feature]) -> None:
        self.name = backend
        self.features = features & REMOTE_FEATURES
        self._vmdir = vmdir

    def check_available(self) -> None:
        return None

    def create_machine(self, config: LinuxVMConfig, on_state: StateListener) -> Machine:
        return RemoteMachine(self._vmdir, config, self.name, on_state)


def _ignore(old: VMState, new: VMState) -> None:
    return None


def named_core(vmdir: VMDir, record: dict[str, Any]) -> VMCore:
    """A core over the named VM recorded in ``vmdir`` (not yet attached)."""
    config = LinuxVMConfig.from_dict(record["config"])
    features = frozenset(Feature(f) for f in record.get("features", ()))
    core = VMCore(config, RemoteBackend(vmdir, str(record["backend"]), features))
    core.name = vmdir.name
    return core


def new_named_core(
    config: LinuxVMConfig,
    name: str,
    backend: str | Backend = "auto",
    command: dict[str, Any] | None = None,
    auto_remove: bool = False,
) -> VMCore:
    """Record a new named VM (stopped; nothing started) and return a core over it.

    Its console goes to its log (``vzkit logs``): a VM that outlives this process has no
    terminal. Its machine state lives in the VM's directory (``run/``) unless the config
    names a ``state_dir``; a root disk's layer is kept there too (``root-layer.*``), so what
    the VM writes survives a stop and a start, until the VM is removed."""
    if not isinstance(config, LinuxVMConfig):
        raise ConfigError(
            f"a named VM takes a LinuxVMConfig, got {type(config).__name__} (macOS guests "
            "run in the process that made them)"
        )
    vmdir = VMDir.of(name)
    if config.console in (ConsoleMode.STDIO, ConsoleMode.PTY):
        raise ConfigError(
            f"a named VM's console goes to its log ('vzkit logs {name}'); console="
            f"{config.console.value} needs the process that made the VM: use console='log'"
        )
    chosen = choose_backend(backend) if isinstance(backend, str) else backend
    if config.gui and chosen.name == "vz":
        raise ConfigError(
            "a named VM runs in its own process, which has no window to show: gui=True on "
            "the vz backend needs the process that made the VM (drop the name, or gui)"
        )
    if config.state_dir is None:
        config = config.replace(state_dir=vmdir.run_dir)
    root = config.root_disk
    if root is not None and root.layer is None:  # what it writes outlives a stop, until rm
        suffix = "qcow2" if chosen.name == "qemu" else "img"  # the backend's layer format
        config = config.replace(
            root_disk=dataclasses.replace(root, layer=vmdir.path / f"root-layer.{suffix}")
        )
    record = {
        "name": vmdir.name,
        "backend": chosen.name,
        "features": sorted(f.value for f in chosen.features),
        "config": config.to_dict(),
        "created": time.time(),
        "command": command,
        "auto_remove": auto_remove,
    }
    make_vm_dir(vmdir, record)
    return named_core(vmdir, record)
