"""The supervisor: the process that owns a named VM while no user process does.

``python -m vzkit.named._supervisor DIR READY_FD`` is started by :func:`~vzkit.named._remote.
start_supervisor` in a new session, detached (it forks once, so it is nobody's child to reap).
It takes the VM's ``supervisor.lock`` for its whole life, boots the VM through a
:class:`~vzkit._vmcore.VMCore` (on vz the ``VZVirtualMachine`` lives here), writes one line to
``READY_FD`` (the VM runs, or why it could not start) and serves the control socket
(:mod:`._control`) to any number of clients. Lifecycle requests go to its core, so the guards
hold across clients; vsock streams (the agent's too) are opened here and passed to the client
as descriptors, so the data path does not go through this process.

It exits once the VM has stopped, by any route: a client's stop, the guest's power-off, QEMU
dying (the state is then ERROR with the reason), SIGTERM (a graceful stop first). Before it
exits it closes the core, so every process of the VM is reaped, records the final state and
closes its clients' connections (their ``wait_stopped`` returns then). Killed with SIGKILL, its
children die with it (``PR_SET_PDEATHSIG``) and the lock is released; readers see the record
say "running" with no lock held, which they report as ERROR (:mod:`._home`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import queue
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from .._config import LinuxVMConfig
from .._disk import DiskFormat
from .._loop import get_loop, run_sync
from .._state import VMState
from .._vmcore import VMCore
from ..agent._channel import StrOrBytes
from ..agent._process import GuestProcess
from ..backends import VsockListenerLike
from ..backends._protocol import CapturedDisk
from ..errors import SpecError, StateError, VzkitError
from ._control import FrameReader, peer_uid, send_frame, short_path
from ._home import VMDir

__all__ = ["main"]

log = logging.getLogger("vzkit.named")

#: How long the VM may take to reach RUNNING (the agent is awaited by clients, not here).
START_TIMEOUT_S = 120.0
#: A graceful stop on SIGTERM before the VM is forced off.
STOP_TIMEOUT_S = 30.0
_ENDED = (VMState.STOPPED, VMState.ERROR)


class _Client:
    """One control connection: a reader thread, and a writer thread fed by a queue so a slow
    client never blocks the loop that broadcasts state."""

    def __init__(self, sock: socket.socket, supervisor: Supervisor) -> None:
        self.sock = sock
        self.sup = supervisor
        self.out: queue.Queue[tuple[dict[str, Any], list[int]] | None] = queue.Queue()
        self.listeners: dict[int, VsockListenerLike] = {}
        self.processes: set[GuestProcess] = set()  # its exec requests' commands
        self.gone = threading.Event()  # the client hung up: its commands are killed
        threading.Thread(target=self._write, name="vzkit-ctl-w", daemon=True).start()
        threading.Thread(target=self._read, name="vzkit-ctl-r", daemon=True).start()

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        self.out.put((message, fds or []))

    def close(self) -> None:
        self.out.put(None)

    def _write(self) -> None:
        try:
            while (item := self.out.get()) is not None:
                message, fds = item
                try:
                    send_frame(self.sock, message, fds)
                finally:
                    for fd in fds:
                        os.close(fd)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()

    def _read(self) -> None:
        reader = FrameReader(self.sock)
        try:
            while (frame := reader.read()) is not None:
                message, fds = frame  # an exec's stdio; closed once it is answered
                # each request on its own thread: a long one (a save, a vsock connect that
                # waits, an exec) does not hold up the client's others
                threading.Thread(
                    target=self._answer, args=(message, fds), name="vzkit-ctl-op", daemon=True
                ).start()
        except (OSError, VzkitError) as err:
            log.debug("control client dropped: %s", err)
        finally:
            reader.close()
            for listener in self.listeners.values():
                listener.close()
            self.gone.set()
            try:
                for process in list(self.processes):  # the client went (Ctrl-C, killed)
                    with contextlib.suppress(Exception):
                        process.kill()
            finally:
                self.sup.forget(self)

    def _answer(self, message: dict[str, Any], given: list[int]) -> None:
        ident = message.get("id")
        try:
            result, fds = self.sup.handle(self, message, given)
        except BaseException as err:
            if not isinstance(err, Exception):
                raise
            self.send({"id": ident, "ok": False, "error": _error_json(err)})
            return
        finally:
            for fd in given:
                os.close(fd)
        self.send({"id": ident, "ok": True, "result": result}, fds)


def _error_json(err: BaseException) -> dict[str, Any]:
    return {"type": type(err).__name__, "message": str(err)}


class Supervisor:
    def __init__(
        self, vmdir: VMDir, record: dict[str, Any], restore: dict[str, Any] | None = None
    ) -> None:
        self.vmdir = vmdir
        self.record = record
        self.restore = restore
        self.config = LinuxVMConfig.from_dict(record["config"])
        self.core = VMCore(self.config, record["backend"], listener=self._on_state)
        self.core.name = vmdir.name
        self.clients: set[_Client] = set()
        self.lock = threading.Lock()
        self.ended = threading.Event()
        self.exit_code: int | None = None
        self._listener_ids = 0

    # -- state -----------------------------------------------------------------------------

    def _state_event(self) -> dict[str, Any]:
        machine = self.core.machine
        error = machine.last_error
        return {
            "event": "state",
            "state": machine.state.value,
            "error": None if error is None else str(error),
            "vmm_pid": machine.pid,
            "display": machine.display_address,
            "agent": self._agent_offer(),
        }

    def _agent_offer(self) -> dict[str, Any] | None:
        try:
            offer = self.core.agent_stream().agent_vsock()
        except VzkitError:
            return None
        if offer is None:
            return None
        return {"key": None if offer.key is None else offer.key.hex()}

    def _on_state(self, old: VMState, new: VMState) -> None:
        event = self._state_event()
        if new not in _ENDED:
            with contextlib.suppress(OSError, VzkitError):
                self.vmdir.write_state(
                    state=new.value, vmm_pid=event["vmm_pid"], display=event["display"]
                )
        self.broadcast(event)
        if new in _ENDED:
            self.ended.set()

    def broadcast(self, message: dict[str, Any]) -> None:
        with self.lock:
            clients = list(self.clients)
        for client in clients:
            client.send(message)

    def forget(self, client: _Client) -> None:
        with self.lock:
            self.clients.discard(client)
        client.close()

    # -- requests --------------------------------------------------------------------------

    def handle(
        self, client: _Client, message: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        op = message.get("op")
        core = self.core
        if op == "hello":
            return self._hello(), []
        if self.ended.is_set():
            raise StateError(f"VM {self.vmdir.name!r} has stopped")
        if op == "exec":
            return {"returncode": self._exec(client, message, fds)}, []
        if op == "pause":
            return self._run(core.pause(None)), []
        if op == "resume":
            return self._run(core.resume(None)), []
        if op == "request_stop":
            return self._run(core.machine.request_stop()), []
        if op == "force_stop":
            return self._run(core.machine.force_stop()), []
        if op == "vsock_connect":
            port, timeout = int(message["port"]), message.get("timeout")
            sock = self._run(core.vsock_connect(port, timeout))
            fd = os.dup(sock.fileno())
            sock.close()
            return None, [fd]
        if op == "vsock_listen":
            return self._listen(client, int(message["port"])), []
        if op == "vsock_unlisten":
            listener = client.listeners.pop(int(message["listener"]), None)
            if listener is not None:
                listener.close()
            return None, []
        if op in ("prepare_save", "finish_save"):
            snap = core.snapshot_machine()
            step = snap.prepare_save() if op == "prepare_save" else snap.finish_save()
            try:
                return self._run(step), []
            finally:  # the agent's vsock offer changed (set aside, brought back): say so
                self.broadcast(self._state_event())
        if op == "save_state":
            core.require("snapshot_save")
            return self._run(core.snapshot_machine().save_state(Path(message["path"]), None)), []
        if op == "capture_disks":
            disks = self._run(
                core.snapshot_machine().capture_disks(
                    Path(message["directory"]), str(message["prefix"])
                )
            )
            return [
                {"role": d.role, "source": str(d.source), "path": str(d.path),
                 "format": d.format.value}
                for d in disks
            ], []  # fmt: skip
        if op == "balloon_info":
            return dataclasses.asdict(self._run(core.balloon_info())), []
        if op == "set_balloon_target":
            machine = core.balloon_machine()
            core.require("balloon")
            return self._run(machine.set_balloon_target(int(message["mb"]))), []
        raise StateError(f"the supervisor does not know the request {op!r}")

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return run_sync(coro)

    def _hello(self) -> dict[str, Any]:
        machine = self.core.machine
        log_path = machine.console_log_path
        return {
            **self._state_event(),
            "backend": self.core.backend.name,
            "features": sorted(f.value for f in self.core.backend.features),
            "console_log_path": None if log_path is None else str(log_path),
            "console_pty": machine.console_pty,
            "display_address": machine.display_address,
            "state_dir": str(machine.state_dir),
            "supervisor_pid": os.getpid(),
            **self._snapshot_facts(),
        }

    def _snapshot_facts(self) -> dict[str, Any]:
        try:
            snap = self.core.snapshot_machine()
        except VzkitError:
            return {}
        return {
            "snapshot_blockers": snap.snapshot_blockers(),
            "snapshot_info": snap.snapshot_info(),
        }

    def _exec(self, client: _Client, message: dict[str, Any], fds: list[int]) -> int:
        """:func:`vzkit.exec_call`: a command with the client's descriptors as its stdio
        (``[stdout, stderr]``, then stdin if it forwards one), pumped from here; its
        returncode. Killed if the client goes before it ends."""
        stdin = bool(message.get("stdin"))
        if len(fds) != 2 + stdin:
            raise SpecError("an exec request comes with its stdout, stderr (and stdin)")
        state = self.core.state
        if state is not VMState.RUNNING:
            name = self.vmdir.name
            raise StateError(
                f"the VM {name!r} is {state.value}, not running: try again when it runs"
            )
        argv = message.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise SpecError("an exec request's argv is a non-empty list of strings")
        user, cwd, timeout = message.get("user"), message.get("cwd"), message.get("timeout")
        if not all(isinstance(v, str | None) for v in (user, cwd)) or not isinstance(
            timeout, int | float | None
        ):
            raise SpecError("an exec request's user and cwd are strings, its timeout a number")
        env = self.config.process.command_environment(
            tuple(str(item) for item in message.get("env") or ()), user
        )
        channel = run_sync(
            self.core.agent.exec(argv, stdin=stdin, env=env, cwd=cwd, user=user, timeout=timeout)
        )
        process = GuestProcess(channel, stdin=stdin)
        client.processes.add(process)
        if client.gone.is_set():  # it hung up while the command started
            with contextlib.suppress(VzkitError):
                process.kill()
        try:
            return process.attach(fds[2] if stdin else None, fds[0], fds[1])
        finally:
            client.processes.discard(process)

    def _listen(self, client: _Client, port: int) -> int:
        listener = run_sync(self.core.vsock_listen(port))
        with self.lock:
            self._listener_ids += 1
            ident = self._listener_ids
        client.listeners[ident] = listener

        def accept() -> None:
            while True:
                try:
                    sock, guest_port = listener.accept()
                except VzkitError:
                    return  # closed (by the client, or the VM stopped)
                fd = os.dup(sock.fileno())
                sock.close()
                client.send(
                    {"event": "vsock_accept", "listener": ident, "guest_port": guest_port}, [fd]
                )

        threading.Thread(target=accept, name="vzkit-ctl-accept", daemon=True).start()
        return ident

    # -- the run ---------------------------------------------------------------------------

    def serve(self, server: socket.socket) -> None:
        """Accept clients until the server socket is closed."""
        me = os.geteuid()
        while True:
            try:
                sock, _ = server.accept()
            except OSError:
                return
            if peer_uid(sock) not in (me, None):
                log.warning("refused a control connection from another user")
                sock.close()
                continue
            client = _Client(sock, self)
            with self.lock:
                self.clients.add(client)

    def run(self, ready: int) -> int:
        vmdir = self.vmdir
        vmdir.write_state(
            state=VMState.STARTING.value, supervisor_pid=os.getpid(), vmm_pid=None,
            error=None, exit_code=None, started=None, stopped=None,
        )  # fmt: skip
        with contextlib.suppress(FileNotFoundError):
            vmdir.control.unlink()  # a killed supervisor's
        try:
            if self.restore is None:
                run_sync(self.core.start(START_TIMEOUT_S))
            else:
                run_sync(self._restore(self.restore))
        except Exception as err:
            with contextlib.suppress(Exception):
                run_sync(self.core.close())
            vmdir.write_state(
                state=VMState.ERROR.value, error=f"it did not start: {err}",
                supervisor_pid=None, vmm_pid=None, stopped=time.time(),
            )  # fmt: skip
            _report(ready, {"ok": False, "error": _error_json(err)})
            return 1
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with short_path(vmdir.control) as name:
            old = os.umask(0o177)
            try:
                server.bind(name)
            finally:
                os.umask(old)
        os.chmod(vmdir.control, 0o600)
        server.listen(16)
        vmdir.write_state(
            state=self.core.state.value,
            vmm_pid=self.core.machine.pid,
            display=self.core.machine.display_address,
            started=time.time(),
        )
        threading.Thread(target=self.serve, args=(server,), name="vzkit-ctl", daemon=True).start()
        _report(ready, {"ok": True, "state": self.core.state.value})
        if self.record.get("command"):
            asyncio.run_coroutine_threadsafe(self._main_command(), get_loop())
        stop_asked = threading.Event()

        def on_signal() -> None:
            stop_asked.set()
            self.ended.set()

        _on_signals(on_signal)
        if self.core.state in _ENDED:
            self.ended.set()
        self.ended.wait()
        if stop_asked.is_set() and self.core.state not in _ENDED:
            with contextlib.suppress(Exception):
                run_sync(self.core.stop(STOP_TIMEOUT_S))
        return self._finish(server)

    def _finish(self, server: socket.socket) -> int:
        vmdir = self.vmdir
        server.close()
        with contextlib.suppress(FileNotFoundError):
            vmdir.control.unlink()
        final = self.core.state
        error = self.core.machine.last_error
        if final not in _ENDED:  # a stop asked by a signal that could not finish
            final = VMState.ERROR
        with contextlib.suppress(Exception):
            run_sync(self.core.close())
        fields: dict[str, Any] = {
            "state": final.value, "error": None if error is None else str(error),
            "supervisor_pid": None, "vmm_pid": None, "display": None, "stopped": time.time(),
        }  # fmt: skip
        if self.exit_code is not None:
            fields["exit_code"] = self.exit_code
        vmdir.write_state(**fields)
        last = {
            **self._state_event(), "state": final.value, "vmm_pid": None, "display": None,
            "agent": None,
        }  # fmt: skip
        with self.lock:
            clients = list(self.clients)
            self.clients.clear()
        for client in clients:
            client.send(last)
            client.close()
        if self.record.get("auto_remove"):  # run -d --rm: nothing of it stays
            shutil.rmtree(vmdir.path, ignore_errors=True)
        return 0

    async def _restore(self, spec: dict[str, Any]) -> None:
        """Load a snapshot's files, checked by the client that started this supervisor (the
        state file by the descriptor it checksummed, inherited): the VM ends PAUSED."""
        core = self.core
        core.require("snapshot_restore")
        state = spec["state"]
        path = Path(f"/proc/self/fd/{int(state['fd'])}") if "fd" in state else Path(state["path"])
        disks = [
            CapturedDisk(d["role"], Path(d["source"]), Path(d["path"]), DiskFormat(d["format"]))
            for d in spec["disks"]
        ]
        core.open_ports()  # the ports this core forwards: one in use fails before the load
        try:
            await asyncio.wait_for(
                core.snapshot_machine().restore_state(path, disks, None), START_TIMEOUT_S
            )
        except BaseException:
            await core.ports.aclose()
            raise
        core.restored(path, clock_step=False)  # the client's core steps the clock at resume
        await core.run_began()
        if "fd" in state:
            os.close(int(state["fd"]))

    async def _main_command(self) -> None:
        """``run -d -- CMD``: run the main command once the agent answers, its output into
        command.log, its exit code recorded; the VM is stopped when it ends."""
        from .._private import open_private

        spec = self.record["command"]
        code = 125
        try:
            channel = await self.core.agent.exec(
                list(spec["argv"]), stdin=False, env=_env(spec.get("env") or ()),
                cwd=spec.get("cwd"), user=spec.get("user"),
            )  # fmt: skip
            with open_private(self.vmdir.command_log) as out:

                async def pump(stream: Any) -> None:
                    while chunk := await stream.read(65536):
                        out.write(chunk)
                        out.flush()

                await asyncio.gather(pump(channel.stdout), pump(channel.stderr))
                code = (await channel.wait()).returncode
        except VzkitError as err:
            with open_private(self.vmdir.command_log) as out:
                out.write(f"vzkit: the main command did not run: {err}\n".encode())
        self.exit_code = 128 - code if code < 0 else code
        with contextlib.suppress(Exception):
            self.vmdir.write_state(exit_code=self.exit_code)
        with contextlib.suppress(Exception):
            await self.core.stop(STOP_TIMEOUT_S)


def _env(items: Any) -> dict[StrOrBytes, StrOrBytes] | None:
    out: dict[StrOrBytes, StrOrBytes] = {}
    for item in items:
        name, _, value = str(item).partition("=")
        out[name] = value
    return out or None


def _report(fd: int, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, json.dumps(message).encode() + b"\n")
    with contextlib.suppress(OSError):
        os.close(fd)


def _on_signals(action: Callable[[], object]) -> None:
    def handler(signum: int, frame: object) -> None:
        action()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)


def main(argv: list[str]) -> int:
    directory, ready = Path(argv[0]), int(argv[1])
    restore = json.loads(argv[2]) if len(argv) > 2 else None
    if os.fork() > 0:  # detach: the starter reaps this parent at once; the child lives on
        os._exit(0)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )  # fmt: skip
    vmdir = VMDir(directory.name, directory)
    try:
        lock = vmdir.hold_supervisor_lock()
    except VzkitError as err:
        _report(ready, {"ok": False, "error": _error_json(err)})
        return 1
    try:
        record = vmdir.read_vm()
        supervisor = Supervisor(vmdir, record, restore)
    except Exception as err:
        vmdir.write_state(state=VMState.ERROR.value, error=str(err), supervisor_pid=None)
        _report(ready, {"ok": False, "error": _error_json(err)})
        return 1
    del lock  # held until the process has exited: its release says "no supervisor" truly
    return supervisor.run(ready)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
