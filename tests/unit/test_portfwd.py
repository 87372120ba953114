"""Published ports through the guest agent (``vzkit._portfwd``), driven by the VM core.

The VM is :mod:`tests.support.agent_vm`'s fake: its "guest" is the real agent run on the host,
so a guest service is a socket on the host's loopback at the guest port, and the forwarded
host port is another port of the same loopback. The machine publishes nothing itself (like
vz, or qemu without ``nat``): the core forwards every ``publish`` entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import socket
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import vzkit
import vzkit.aio
from vzkit import _portfwd
from vzkit._loop import run_sync
from vzkit._state import VMState
from vzkit._vmcore import core_of

from ..support.agent_vm import AgentBackend, AgentMachine, host_agent
from ..support.polling import wait_until

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="runs the x86_64 Linux agent binary on the host",
)
STOP_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def agent() -> Path:
    return host_agent()


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path: Path, *specs: str) -> vzkit.LinuxVMConfig:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    return vzkit.LinuxVMConfig(
        kernel_path=kernel,
        state_dir=tmp_path / "state",
        network=vzkit.NetworkConfig(vzkit.NetworkMode.NONE),
        publish=tuple(vzkit.parse_port_spec(s) for s in specs),
    )


@contextlib.contextmanager
def _tcp_service(handler: object) -> Iterator[int]:
    """A "guest" TCP service on the loopback: ``handler(conn)`` per connection, in a thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(30)
            threading.Thread(target=handler, args=(conn,), daemon=True).start()  # type: ignore[arg-type]

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _answer_after_eof(conn: socket.socket) -> None:
    with conn:
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.sendall(b"echo:" + data)


def _listening(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    """Whether something holds ``port`` on the loopback (a bind fails). A TCP probe takes
    SO_REUSEADDR, as the forwarder's listener does: a closed connection's TIME_WAIT on the
    port is not a listener."""
    with socket.socket(socket.AF_INET, kind) as s:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_tcp_through_the_agent_both_ways_with_half_close(agent: Path, tmp_path: Path) -> None:
    host = _free_port()
    with _tcp_service(_answer_after_eof) as guest:
        cfg = _config(tmp_path, f"{host}:{guest}")
        with vzkit.VirtualMachine(cfg, backend=AgentBackend(agent)) as vm:
            vm.start()
            payload = os.urandom(3 * 1024 * 1024)  # several windows' worth
            with socket.create_connection(("127.0.0.1", host), timeout=30) as client:
                client.sendall(payload)
                client.shutdown(socket.SHUT_WR)  # the guest service reads to EOF first
                answer = b""
                while chunk := client.recv(1 << 20):
                    answer += chunk
            assert answer == b"echo:" + payload
            vm.stop(timeout=STOP_TIMEOUT)
        assert not _listening(host)  # the host port is free again


def test_a_refused_guest_port_resets_the_host_connection(agent: Path, tmp_path: Path) -> None:
    host, guest = _free_port(), _free_port()  # nothing listens on the guest port
    with vzkit.VirtualMachine(
        _config(tmp_path, f"{host}:{guest}"), backend=AgentBackend(agent)
    ) as vm:
        vm.start()
        with (
            socket.create_connection(("127.0.0.1", host), timeout=30) as client,
            pytest.raises(ConnectionResetError),  # aborted: a reset, not a clean end
        ):
            client.recv(1)  # (sending first could meet the reset and take its error)
        vm.stop(timeout=STOP_TIMEOUT)


def test_udp_datagrams_per_peer_and_idle_sessions_expire(
    agent: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_portfwd, "UDP_IDLE_S", 1.0)
    host = _free_port(socket.SOCK_DGRAM)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as service:
        service.bind(("127.0.0.1", 0))
        service.settimeout(0.2)
        guest = service.getsockname()[1]
        stop = threading.Event()

        def echo() -> None:  # answers "<source port>:<datagram>" to the sender
            while not stop.is_set():
                try:
                    data, peer = service.recvfrom(65536)
                except TimeoutError:
                    continue
                service.sendto(f"{peer[1]}:".encode() + data, peer)

        thread = threading.Thread(target=echo, daemon=True)
        thread.start()
        cfg = _config(tmp_path, f"{host}:{guest}/udp")
        try:
            with vzkit.VirtualMachine(cfg, backend=AgentBackend(agent)) as vm:
                vm.start()
                a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                with a, b:
                    for s in (a, b):
                        s.settimeout(30)
                        s.connect(("127.0.0.1", host))
                    a.send(b"first")
                    b.send(b"x" * 50000)
                    a.send(b"")
                    got_a = [a.recv(65536), a.recv(65536)]
                    got_b = b.recv(65536)
                    port_a = got_a[0].split(b":")[0]
                    assert got_a == [port_a + b":first", port_a + b":"]
                    port_b, _, body = got_b.partition(b":")
                    assert body == b"x" * 50000
                    assert port_a != port_b  # one guest socket per host peer
                    forward = core_of(vm).ports._udp[0]
                    assert len(forward.sessions) == 2
                    wait_until(lambda: not forward.sessions, timeout=10, what="idle expiry")
                    a.send(b"again")  # a new session, a new guest socket
                    assert a.recv(65536).endswith(b":again")
                vm.stop(timeout=STOP_TIMEOUT)
            assert not _listening(host, socket.SOCK_DGRAM)
        finally:
            stop.set()
            thread.join(5)


def test_a_port_in_use_fails_the_start_before_the_vm_runs(agent: Path, tmp_path: Path) -> None:
    free = _free_port()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        backend = AgentBackend(agent)
        cfg = _config(tmp_path, f"{free}:80", f"{port}:80")
        with vzkit.VirtualMachine(cfg, backend=backend) as vm:
            with pytest.raises(vzkit.VMError) as info:
                vm.start()
            assert str(info.value).startswith(
                f"cannot publish 127.0.0.1:{port}:80/tcp: 127.0.0.1:{port}/tcp cannot be bound "
                "on the host (Address already in use); free that port, or publish another"
            )
            assert vm.state is VMState.STOPPED
            assert backend.machines[0].agent_exited  # never started
            assert not _listening(free)  # the first forward was let go


def test_ports_close_when_the_guest_ends_the_run(agent: Path, tmp_path: Path) -> None:
    """A run that ends without stop() (the guest powers off, the VMM dies) frees its ports."""
    host = _free_port()
    with vzkit.VirtualMachine(_config(tmp_path, f"{host}:80"), backend=AgentBackend(agent)) as vm:
        vm.start()
        assert _listening(host)
        run_sync(_poweroff_from_the_guest(core_of(vm).machine))
        wait_until(lambda: vm.state is VMState.STOPPED, timeout=10, what="the VM to stop")
        wait_until(lambda: not _listening(host), timeout=10, what="the port to be freed")
        vm.start()  # and bound again for the next run
        assert _listening(host)
        vm.stop(timeout=STOP_TIMEOUT)
    assert not _listening(host)


async def _poweroff_from_the_guest(machine: object) -> None:
    assert isinstance(machine, AgentMachine)
    await machine.force_stop()


def test_ports_the_machine_publishes_are_left_to_it(agent: Path, tmp_path: Path) -> None:
    class Publishing(AgentMachine):
        def published_ports(self) -> tuple[vzkit.PortForward, ...]:
            return self.config.publish[:1]

    class Backend(AgentBackend):
        def create_machine(self, config: vzkit.LinuxVMConfig, on_state: object) -> AgentMachine:
            return Publishing(config, on_state, self.agent, self.path)  # type: ignore[arg-type]

    native, forwarded = _free_port(), _free_port()
    cfg = _config(tmp_path, f"{native}:80", f"{forwarded}:81")
    with vzkit.VirtualMachine(cfg, backend=Backend(agent)) as vm:
        vm.start()
        assert core_of(vm).ports.forwards == (vzkit.parse_port_spec(f"{forwarded}:81"),)
        assert not _listening(native)
        vm.stop(timeout=STOP_TIMEOUT)


def test_async_facade_forwards_too(agent: Path, tmp_path: Path) -> None:
    host = _free_port()
    with _tcp_service(_answer_after_eof) as guest:

        async def main() -> bytes:
            cfg = _config(tmp_path, f"{host}:{guest}")
            async with vzkit.aio.VirtualMachine(cfg, backend=AgentBackend(agent)) as vm:
                await vm.start()
                reader, writer = await asyncio.open_connection("127.0.0.1", host)
                writer.write(b"async")
                writer.write_eof()
                answer = await reader.read()
                writer.close()
                await vm.stop(timeout=STOP_TIMEOUT)
                return answer

        assert asyncio.run(main()) == b"echo:async"


def test_a_stop_with_connections_open_cleans_up_quietly(
    agent: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Connections still open at the stop are cancelled; nothing is logged as an error (the
    asyncio server's own task ends normally) and the host clients see the end."""
    host = _free_port()

    def hold(conn: socket.socket) -> None:
        with conn, contextlib.suppress(ConnectionResetError):  # the stop resets it
            conn.recv(1)  # until the forwarder goes

    with _tcp_service(hold) as guest:
        cfg = _config(tmp_path, f"{host}:{guest}")
        with vzkit.VirtualMachine(cfg, backend=AgentBackend(agent)) as vm:
            vm.start()
            clients = [socket.create_connection(("127.0.0.1", host), timeout=30) for _ in range(3)]
            for c in clients:
                c.sendall(b"x")
            core = core_of(vm)
            wait_until(lambda: len(core.ports._tasks) == 3, timeout=10, what="3 connections")
            vm.stop(timeout=STOP_TIMEOUT)
            assert not core.ports._tasks
            for c in clients:
                with c:
                    try:
                        assert c.recv(10) == b""
                    except ConnectionResetError:
                        pass  # a reset is an end too
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_start_that_fails_leaves_no_port_bound(agent: Path, tmp_path: Path) -> None:
    class Failing(AgentMachine):
        async def start(self) -> None:
            raise vzkit.VMError("the VMM would not start")

    class Backend(AgentBackend):
        def create_machine(self, config: vzkit.LinuxVMConfig, on_state: object) -> AgentMachine:
            return Failing(config, on_state, self.agent, self.path)  # type: ignore[arg-type]

    tcp, udp = _free_port(), _free_port(socket.SOCK_DGRAM)
    cfg = _config(tmp_path, f"{tcp}:80", f"{udp}:53/udp")
    with vzkit.VirtualMachine(cfg, backend=Backend(agent)) as vm:
        with pytest.raises(vzkit.VMError, match="would not start"):
            vm.start()
        assert not _listening(tcp)
        assert not _listening(udp, socket.SOCK_DGRAM)


def test_ports_without_any_way_to_the_agent_are_refused_at_start(
    agent: Path, tmp_path: Path
) -> None:
    class NoAgent(AgentMachine):
        agent_console = None  # type: ignore[assignment]  # not an AgentStream
        agent_vsock = None  # type: ignore[assignment]

    class Backend(AgentBackend):
        def create_machine(self, config: vzkit.LinuxVMConfig, on_state: object) -> AgentMachine:
            return NoAgent(config, on_state, self.agent, self.path)  # type: ignore[arg-type]

    port = _free_port()
    with vzkit.VirtualMachine(_config(tmp_path, f"{port}:80"), backend=Backend(agent)) as vm:
        with pytest.raises(vzkit.UnsupportedError) as info:
            vm.start()
        assert str(info.value).startswith(
            f"publishing 127.0.0.1:{port}:80/tcp needs the guest agent, and the fake backend's "
            "machine offers no way to reach it"
        )
        assert info.value.feature == "network:publish"
        assert vm.state is VMState.STOPPED
        assert not _listening(port)


def test_many_connections_at_once_stay_apart(agent: Path, tmp_path: Path) -> None:
    """32 connections at once over the one agent session, each its own bytes, each intact."""
    host = _free_port()
    with _tcp_service(_answer_after_eof) as guest:
        cfg = _config(tmp_path, f"{host}:{guest}")
        with vzkit.VirtualMachine(cfg, backend=AgentBackend(agent)) as vm:
            vm.start()

            def one(i: int) -> bool:
                payload = bytes([i]) * (256 * 1024 + i)
                with socket.create_connection(("127.0.0.1", host), timeout=60) as client:
                    client.sendall(payload)
                    client.shutdown(socket.SHUT_WR)
                    answer = b""
                    while chunk := client.recv(1 << 20):
                        answer += chunk
                return answer == b"echo:" + payload

            with ThreadPoolExecutor(32) as pool:
                assert all(pool.map(one, range(32)))
            vm.stop(timeout=STOP_TIMEOUT)


def test_an_unreachable_agent_resets_connections_and_warns_once(
    agent: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A guest whose agent never answers (another kernel and initramfs): each connection
    waits AGENT_WAIT_S, is reset, and the log says why, once per port."""
    monkeypatch.setattr(_portfwd, "AGENT_WAIT_S", 0.5)

    class Silent(AgentMachine):
        def agent_console(self) -> socket.socket | None:
            return None  # no agent stream, ever

    class Backend(AgentBackend):
        def create_machine(self, config: vzkit.LinuxVMConfig, on_state: object) -> AgentMachine:
            return Silent(config, on_state, self.agent, self.path)  # type: ignore[arg-type]

    host = _free_port()
    with vzkit.VirtualMachine(_config(tmp_path, f"{host}:80"), backend=Backend(agent)) as vm:
        vm.start()
        for _ in range(2):
            with (
                socket.create_connection(("127.0.0.1", host), timeout=30) as client,
                pytest.raises(ConnectionResetError),
            ):
                client.recv(1)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith(
            f"cannot forward 127.0.0.1:{host}:80/tcp: the guest agent cannot be reached"
        )  # (close() forces the VM off: no agent to ask)
    assert not _listening(host)
