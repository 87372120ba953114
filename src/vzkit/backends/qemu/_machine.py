"""One QEMU process per running VM, controlled over QMP.

QMP runs over a socketpair created here and handed to QEMU as an inherited fd, so there is no
socket path to collide, to exceed ``sun_path`` (108 bytes on Linux, 104 on macOS) or to clean
up. QEMU starts paused (``-S``); the VM runs once QMP is attached. Run-state events and the
process's exit drive the state machine:

    STOPPED/ERROR --start--> STARTING --cont--> RUNNING <--stop/cont--> PAUSED
    any running state --guest power-off, quit--> STOPPED;  --VMM dies otherwise--> ERROR

Every way into ERROR leaves its reason in :attr:`QemuMachine.last_error` (a guest kernel
panic, a share's virtiofsd that died under a running VM, QEMU exiting on its own): the events
and the exit are read by ``_monitor.RunMonitor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from qemu.qmp import QMPClient

from ..._config import ConsoleMode, LinuxVMConfig
from ..._disk import DiskImage
from ..._network import NetworkMode, PortForward
from ..._private import private_dir, private_file
from ..._process import OwnedProcess
from ..._state import VMState
from ...errors import UnsupportedError, VMError, VzkitError
from .._protocol import (
    AgentVsock,
    BalloonInfo,
    CapturedDisk,
    ProgressFn,
    StateListener,
    notify_state,
)
from . import _argv, _devices, _hostprep, _migrate, _rootlayer, _vsock_plug
from ._balloon import Balloon
from ._bridge import find_bridge_helper, open_bridge_tap
from ._monitor import RunMonitor
from ._passt import Passt
from ._run import QemuRun
from ._virtiofs import ShareDevice, ShareKind, Shares
from ._vsock import VsockListener, VsockTransport, agent_key_fd

__all__ = ["QemuMachine"]

log = logging.getLogger(__name__)

_QUIT_GRACE_S = 2.0
_UNPLUG_TIMEOUT_S = 20.0
#: Longest socket directory that leaves room for "/<name>.sock" within 104 bytes (macOS).
_MAX_SOCKET_DIR = 80


class _RunFds(NamedTuple):
    """The fds a run hands to QEMU, and whether its vsock device is on the command line."""

    qmp: int
    agent: int
    vsock_device: bool
    agent_key: int | None
    passt: int | None
    tap: int | None


class QemuMachine:
    """A :class:`~vzkit.backends.Machine` backed by a QEMU process."""

    def __init__(self, config: LinuxVMConfig, on_state: StateListener) -> None:
        self.config = config
        self._on_state = on_state
        self._state = VMState.STOPPED
        self._run: QemuRun | None = None  # the current (or last) QEMU process and its QMP
        self._monitor = RunMonitor(lambda: self._state, self._set_state)  # events, exit
        self._shares = Shares(self._share_died)  # virtiofsd per share (see _virtiofs)
        self._passt = Passt()  # the nat network on Linux (see _passt)
        self._tasks: list[asyncio.Task[Any]] = []  # event watcher
        self._exit_watch: asyncio.Task[None] | None = None
        self._own_state_dir = config.state_dir is None
        self._state_dir: Path | None = config.state_dir
        self._runtime_dir: Path | None = None
        self._own_runtime_dir = False
        self._console_pty: str | None = None
        self._balloon = Balloon(config, self._execute)
        self._vsock: VsockTransport | None = None
        self.argv: list[str] = []
        # Snapshots (_migrate.py): a restore starts QEMU waiting for the state stream and
        # runs the disk on a copy-on-write overlay of the snapshot's image.
        self._incoming = False
        self.disk_override: Path | None = None
        self.disk_backing: DiskImage | None = None  # the overlay's (set with it)
        #: The root disk's layer (a run's, or the kept one); after a restore: _migrate.prepare_root.
        self.root_layer: Path | None = None
        self.root_backing: DiskImage | None = None
        self.accel = ""
        #: The CPU model and machine type of the current run (resolved at start: see _argv).
        self.cpu = self.machine_type = ""

    # -- properties ------------------------------------------------------------------------

    @property
    def state(self) -> VMState:
        return self._state

    @property
    def _proc(self) -> OwnedProcess | None:
        return self._run.proc if self._run is not None else None

    @property
    def _qmp(self) -> QMPClient | None:
        return self._run.qmp if self._run is not None else None

    @property
    def _agent_sock(self) -> socket.socket | None:
        return self._run.agent_sock if self._run is not None else None

    @property
    def last_error(self) -> VzkitError | None:
        """Why the VM last ended in ERROR; cleared by the next start or restore."""
        return self._monitor.last_error

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.running else None

    @property
    def state_dir(self) -> Path:
        if self._state_dir is None:
            self._state_dir = Path(tempfile.mkdtemp(prefix="vzkit-"))
        return self._state_dir

    @property
    def runtime_dir(self) -> Path:
        """Where sockets live: the state dir when its paths fit a Unix socket address
        (``sun_path`` is 108 bytes on Linux, 104 on macOS), else a short private temp dir."""
        if self._runtime_dir is None:
            if len(os.fsencode(self.state_dir)) <= _MAX_SOCKET_DIR:
                self._runtime_dir = self.state_dir
            else:
                self._runtime_dir = Path(tempfile.mkdtemp(prefix="vzkit-", dir="/tmp"))
                self._own_runtime_dir = True
        return self._runtime_dir

    @property
    def vnc_socket(self) -> Path | None:
        """The VNC display's Unix socket while a VM with graphics runs."""
        if self.config.headless or self._proc is None:
            return None
        return self.runtime_dir / "vnc.sock"

    @property
    def console_log_path(self) -> Path | None:
        if self.config.console in (ConsoleMode.NONE, ConsoleMode.STDIO):
            return None
        return self.config.console_log_path or self.state_dir / "console.log"

    @property
    def console_pty(self) -> str | None:
        return self._console_pty

    @property
    def display_address(self) -> str | None:
        socket_path = self.vnc_socket
        return None if socket_path is None else f"vnc+unix://{socket_path}"

    def agent_console(self) -> socket.socket | None:
        """A duplicate of the host end of the agent's virtio console port
        (``org.vzkit.agent.0``) while QEMU runs; it is private to this process, so the agent
        asks no key on it (docs/agent-protocol.md)."""
        sock = self._agent_sock
        return None if sock is None else sock.dup()

    def agent_vsock(self) -> AgentVsock | None:
        """The run's agent key while the vsock device is plugged in (fw_cfg gave the guest
        the same key: see ``_vsock.agent_key_fd``)."""
        vsock = self._vsock
        if vsock is None or not vsock.attached:
            return None
        return AgentVsock(vsock.agent_key)

    def published_ports(self) -> tuple[PortForward, ...]:  # the core forwards the others
        return _argv.native_ports(self.config, sys.platform)

    # -- vsock -----------------------------------------------------------------------------

    def _require_vsock(self) -> VsockTransport:
        if not self.config.vsock:
            raise UnsupportedError(
                "this VM has no vsock device (config vsock=False)", backend="qemu", feature="vsock"
            )
        if self._vsock is None:
            if sys.platform != "linux":
                raise UnsupportedError(
                    "vsock on the qemu backend needs Linux (vhost-vsock or vhost-user)",
                    backend="qemu",
                    feature="vsock",
                )
            raise VMError(f"the VM is not running (state {self._state.value})")
        return self._vsock

    async def vsock_connect(self, port: int, timeout: float | None) -> socket.socket:
        return await self._require_vsock().connect(port, timeout)

    async def vsock_listen(self, port: int) -> VsockListener:
        return self._require_vsock().listen(port)

    async def detach_vsock(self, timeout: float = _UNPLUG_TIMEOUT_S) -> None:
        """Unplug the vsock device and stop it (QEMU cannot migrate vhost devices)."""
        await _vsock_plug.unplug(self._require_vsock(), self, self.machine_type, timeout)

    async def attach_vsock(self) -> None:
        """Plug a fresh vsock device into its port (after a save, or into a restored VM)."""
        vsock = self._require_vsock()
        if not vsock.attached and self._qmp is not None:
            await _vsock_plug.plug(vsock, self)

    def send_fd(self, fd: int) -> None:
        """Pass ``fd`` to QEMU over QMP (``SCM_RIGHTS``), for a ``getfd`` that follows."""
        if self._qmp is None:
            raise VMError(f"QEMU is not running (state {self._state.value})")
        self._qmp.send_fd_scm(fd)

    @property
    def stderr_path(self) -> Path:
        return self.state_dir / "qemu.log"

    def _set_state(self, new: VMState) -> None:
        old = self._state
        if old is new:
            return
        self._state = new
        notify_state(self._on_state, old, new)

    # -- start -----------------------------------------------------------------------------

    async def _probe(self) -> _hostprep.Host:
        """The host side of a start (see :func:`_hostprep.probe`); a restore's disk is the
        overlay the restore made, the config's a fresh boot's."""
        return await _hostprep.probe(self.config, self.state_dir, self.disk_override is None)

    def _plan(
        self,
        host: _hostprep.Host,
        fds: _RunFds,
        vsock: VsockTransport | None,
        shares: tuple[ShareDevice, ...],
    ) -> _argv.Plan:
        """The run's plan, decided once from what the start prepared. A ``vsock`` transport
        without its device in this plan (a restore plugs it in later) still needs the RAM
        shared when it is the user-space one; so do VirtioFS shares."""
        cfg = self.config
        plugged = vsock if vsock is not None and fds.vsock_device else None
        virtiofs = any(share.kind is ShareKind.VIRTIOFS for share in shares)
        plan = _argv.Plan(
            config=cfg,
            binary=host.binary,
            accel=host.accel,
            qmp_fd=fds.qmp,
            agent_fd=fds.agent,
            console_log=self.console_log_path,
            firmware_code=host.firmware_code,
            nvram=host.nvram,
            mac_address=_hostprep.mac_address(None if self._own_state_dir else self.state_dir),
            nic_macs=_hostprep.nic_macs(cfg, None if self._own_state_dir else self.state_dir),
            vnc_socket=None if cfg.headless else self.runtime_dir / "vnc.sock",
            incoming=self._incoming,
            disk_override=self.disk_override,
            disk_backing=self.disk_backing,
            shared_memory=(vsock is not None and not vsock.kernel) or virtiofs,
            vsock_fd=plugged.qemu_fd if plugged is not None else None,
            vhost_vsock_fd=plugged.kernel_fd if plugged is not None else None,
            vsock_cid=plugged.guest_cid if plugged is not None else 0,
            sandbox=host.sandbox,
            shares=shares,
            agent_key_fd=fds.agent_key,
            passt_fd=fds.passt,
            tap_fd=fds.tap,
            root_layer=self.root_layer,
            root_backing=self.root_backing,
        )
        self.accel, self.cpu, self.machine_type = plan.accel, plan.cpu, plan.machine
        return plan

    async def start(self) -> None:
        """STOPPED/ERROR → RUNNING (the core's guard table refuses the other states)."""
        self.config.check_inputs()
        self._set_state(VMState.STARTING)
        self._monitor.new_run(self.console_log_path, self.stderr_path)
        self.disk_override = self.disk_backing = None  # a fresh boot runs on the config's disk
        try:
            await self._launch()
        except BaseException:
            await self._teardown()
            self._set_state(VMState.STOPPED)
            raise
        self._set_state(VMState.RUNNING)

    async def _launch(self, *, vsock_device: bool = True) -> None:
        """Spawn QEMU paused, attach QMP, run it. ``vsock_device=False`` leaves the vsock
        port empty (a restore plugs the device in once the machine state is loaded)."""
        self._private_state()
        cfg_net = self.config.network
        tap_fd: int | None = None
        run = self._run = QemuRun(self.stderr_path)
        run.incoming = self._incoming
        vsock = None
        key_fd: int | None = None  # the agent's key for QEMU's fw_cfg (a fresh one per run)
        if self.config.vsock and sys.platform == "linux":
            vsock = self._vsock = VsockTransport(
                self.config, self.runtime_dir, private_file(self.state_dir / "vsock.log")
            )
            key_fd = agent_key_fd(vsock.agent_key)
        try:
            if vsock is not None:  # a restore plugs this one in later: it starts meanwhile
                await vsock.prepare()
            host = await self._probe()
            if self.config.root_disk is not None and self.root_layer is None:
                self.root_layer = await _rootlayer.open_layer(
                    self.state_dir, self.config.root_disk, self.stderr_path
                )
            shares = await self._shares.start(
                self.config.tagged_volumes(),
                self.runtime_dir,
                self.state_dir,
                self.config.share_device,
            )
            passt_fd = await self._passt.start_nat(self.config, self.state_dir / "passt.log")
            if cfg_net.mode is NetworkMode.BRIDGED and sys.platform == "linux":
                tap_fd = await open_bridge_tap(
                    find_bridge_helper(), cfg_net.interface, self.state_dir / "bridge-helper.log"
                )
            fds = _RunFds(run.qmp_fd, run.agent_fd, vsock_device, key_fd, passt_fd, tap_fd)
            plan = self._plan(host, fds, vsock, shares)
            self.argv = _devices.build_argv(plan)
            log.info("starting QEMU (%s, accel=%s)", plan.binary.name, plan.accel)
            interactive = self.config.console is ConsoleMode.STDIO
            cfg_log = self.config.console_log_path
            if plan.console_log is not None:  # QEMU appends to it: it must not create it
                try:  # a log path the config names may be a link, a pipe or /dev/null
                    private_file(plan.console_log, follow_links=bool(cfg_log))
                except OSError as err:
                    raise VMError(
                        f"cannot open the console log {str(plan.console_log)!r}: {err}"
                    ) from err
            await run.spawn(
                self.argv,
                f"qemu-system-{self.config.arch.value}",
                _devices.pass_fds(plan),
                interactive=interactive,
            )
        finally:
            if key_fd is not None:
                os.close(key_fd)
            self._shares.qemu_started()
            self._passt.qemu_started()
            if tap_fd is not None:  # QEMU has its copy (or failed to start)
                os.close(tap_fd)
            if vsock is not None and vsock_device:
                vsock.after_spawn()
        assert run.proc is not None
        watch = self._monitor.watch_exit(run.proc, run, self._after_exit)
        self._exit_watch = asyncio.ensure_future(watch)
        await run.attach()
        self._tasks.append(asyncio.ensure_future(run.watch_events(self._monitor.on_event)))
        if self.config.console is ConsoleMode.PTY:
            self._console_pty = await self._find_pty()
        if vsock is not None and vsock_device:
            await vsock.wait_ready()
            vsock.attached = True
        if not self._incoming:  # a restore stays paused (see restore_state)
            await self._execute("cont")

    def _private_state(self) -> None:
        """The state dir (and the runtime dir, when separate) exist as 0700 directories, and
        QEMU's log (which the restore's qemu-img appends to as well) as a 0600 file.

        ``mkdtemp`` makes private dirs already; a state dir named in the config is created
        0700 with any missing parents, and one that exists is the caller's and left alone.
        """
        private_dir(self.state_dir)
        if self.runtime_dir != self.state_dir:
            private_dir(self.runtime_dir)
        private_file(self.stderr_path)

    async def _find_pty(self) -> str | None:
        chardevs: list[dict[str, Any]] = await self._execute("query-chardev")
        for chardev in chardevs:
            if chardev.get("label") == "con0":
                filename = str(chardev.get("filename", ""))
                return filename.removeprefix("pty:") or None
        return None

    # -- monitoring ------------------------------------------------------------------------

    def _share_died(self, tag: str, rc: int, tail: str) -> None:
        self._monitor.share_died(self._proc, tag, rc, tail)

    async def _after_exit(self) -> None:
        """QEMU has exited: release what the run held (the monitor then sets the state)."""
        await self._disconnect()
        await self._close_vsock()
        for task in self._tasks:
            task.cancel()

    async def _disconnect(self) -> None:
        if self._run is not None:
            await self._run.disconnect()

    async def _execute(self, cmd: str, args: dict[str, object] | None = None) -> Any:
        """One QMP command of the current run (see :meth:`QemuRun.execute`)."""
        run = self._run
        if run is None:
            raise VMError(f"QEMU is not running (state {self._state.value})")
        return await run.execute(cmd, args, self._state.value)

    # -- lifecycle -------------------------------------------------------------------------

    async def pause(self) -> None:
        self._set_state(VMState.PAUSING)
        try:
            await self._execute("stop")
        except BaseException:
            self._set_state(VMState.RUNNING)
            raise
        self._set_state(VMState.PAUSED)

    async def resume(self) -> None:
        self._set_state(VMState.RESUMING)
        try:
            await self._execute("cont")
        except BaseException:
            self._set_state(VMState.PAUSED)
            raise
        self._set_state(VMState.RUNNING)

    async def request_stop(self) -> None:
        await self._execute("system_powerdown")

    async def force_stop(self) -> None:
        proc = self._proc
        if proc is None or not proc.running:
            return
        self._monitor.expect_exit = True
        if self._state is not VMState.STOPPED:
            self._set_state(VMState.STOPPING)
        # QEMU may exit before it answers "quit": wait for the exit, not for the reply.
        quit_cmd = asyncio.ensure_future(self._execute("quit"))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_QUIT_GRACE_S):
                await proc.wait()
        quit_cmd.cancel()
        await asyncio.gather(quit_cmd, return_exceptions=True)
        await proc.kill()
        await self.wait_stopped()

    async def wait_stopped(self) -> VMState:
        await self._monitor.wait_stopped()
        return self._state

    # -- balloon ---------------------------------------------------------------------------

    async def set_balloon_target(self, target_mb: int) -> None:
        await self._balloon.set_target(target_mb)

    async def balloon_info(self) -> BalloonInfo:
        return await self._balloon.info(running=self._qmp is not None)

    # -- snapshots (the work is in _migrate.py) ---------------------------------------------

    @property
    def qmp(self) -> QMPClient | None:
        return self._qmp

    async def execute(self, cmd: str, args: dict[str, object] | None = None) -> Any:
        """A QMP command; :class:`VMError` when it fails or QEMU is gone."""
        return await self._execute(cmd, args)

    def snapshot_blockers(self) -> list[str]:
        return _migrate.blockers(self)

    @property
    def vsock_attached(self) -> bool:
        return self._vsock is not None and self._vsock.attached

    @property
    def vsock_transport(self) -> VsockTransport | None:
        """This run's vsock device and host side (None without one, or between runs)."""
        return self._vsock

    async def prepare_save(self) -> None:
        await _migrate.unplug_vsock_for_save(self)

    async def finish_save(self) -> None:
        """Plug a fresh vsock device back in (connections open before the save have ended)."""
        if self._vsock is not None and not self._vsock.attached and self._qmp is not None:
            await self.attach_vsock()

    def snapshot_info(self) -> dict[str, str]:
        """The resolved hardware a restore must match beyond the config: a config's "" picks
        a CPU model per accelerator (and vzkit version), so the model itself is recorded."""
        return _migrate.hardware_info(self.config, self.accel, self.cpu, self.machine_type)

    async def hardware_mismatches(self, saved: Mapping[str, str]) -> list[str]:
        """The run a restore would make (:func:`_migrate.planned_info`, before QEMU starts)
        against a snapshot's ``backendInfo``: QEMU may load a state saved under another CPU
        model or machine type and the guest then fails (e.g. on aarch64 every return signed
        under another pointer-auth algorithm)."""
        planned = await _migrate.planned_info(self.config)
        return _migrate.hardware_diff(saved, cpu=planned["cpu"], machine=planned["machine"])

    async def save_state(self, path: Path, progress: ProgressFn | None) -> None:
        await _migrate.save_state(self, path, progress)

    async def capture_disks(self, directory: Path, prefix: str) -> list[CapturedDisk]:
        return await _migrate.capture_disks(self, directory, prefix)

    async def restore_state(
        self,
        path: Path,
        disks: Sequence[CapturedDisk],
        verified: Awaitable[None] | None = None,
    ) -> None:
        """STOPPED/ERROR → RESTORING → PAUSED: QEMU with ``-incoming defer`` loads ``path``,
        once ``verified`` (the checksums, computed while QEMU starts) has succeeded."""
        self.config.check_inputs()  # the core's guard table allows STOPPED/ERROR only
        self._set_state(VMState.RESTORING)
        self._monitor.new_run(self.console_log_path, self.stderr_path)
        try:
            self._private_state()
            self.disk_override = await _migrate.prepare_disks(self, disks)
            await _migrate.prepare_root(self, disks)
            self._incoming = True
            await self._launch(vsock_device=False)  # the saved state has no vsock device
            if verified is not None:
                await verified  # QEMU reads no saved byte before the checksums match
            await _migrate.load_state(self, path)
            _migrate.keep_restored_root(self)  # a kept root layer is the snapshot's now
            if self._run is not None:
                self._run.incoming = False
            if self._vsock is not None:
                await self.attach_vsock()
        except BaseException:
            await self._teardown()
            overlay, self.disk_override, self.disk_backing = self.disk_override, None, None
            if overlay is not None:  # made for this restore: a failed one leaves none behind
                overlay.unlink(missing_ok=True)
            _migrate.drop_restored_root(self)  # the same for the root disk's layer
            self._set_state(VMState.STOPPED)
            raise
        finally:
            self._incoming = False
        self._set_state(VMState.PAUSED)

    # -- teardown --------------------------------------------------------------------------

    async def _teardown(self) -> None:
        """Kill the VMM (if any) and reap it; close QMP; forget per-run state."""
        proc = self._proc
        if proc is not None:
            self._monitor.expect_exit = True
            await proc.kill()
        watch, self._exit_watch = self._exit_watch, None
        if watch is not None:  # let it finish its bookkeeping (QMP disconnect, state)
            await asyncio.wait({watch}, timeout=5)
            watch.cancel()
        await self._disconnect()
        await self._close_vsock()
        await self._shares.close()  # after QEMU: the virtiofsds outlive no VM
        await self._passt.close()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._run = None
        self._console_pty = None

    async def _close_vsock(self) -> None:
        vsock, self._vsock = self._vsock, None
        if vsock is not None:
            await vsock.close()

    async def close(self) -> None:
        try:
            await self._teardown()
        finally:
            if self._state is not VMState.ERROR:
                self._set_state(VMState.STOPPED)
            if self._own_runtime_dir and self._runtime_dir is not None:
                shutil.rmtree(self._runtime_dir, ignore_errors=True)
            self._runtime_dir, self._own_runtime_dir = None, False
            _rootlayer.remove_layer(self.root_layer, self.config.root_disk)  # never a kept one
            self.root_layer = self.root_backing = None
            if self._own_state_dir and self._state_dir is not None:
                shutil.rmtree(self._state_dir, ignore_errors=True)
                self._state_dir = None
