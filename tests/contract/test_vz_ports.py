"""``-p`` on the vz backend, where Virtualization's NAT forwards nothing: the core's forwarder
carries each connection over the VM's vsock device to the guest agent, which connects to the
guest's port. Here the stand-in's vsock device leads to the real agent run on the host
(``vzkit-agent serve --stdio`` per connection to port 1024), whose "guest loopback" is the
host's: a TCP echo service on 127.0.0.1 plays the guest's server. A resume sends the clock
(the stdio agent only reports the step it would make: ``--clock-dry-run``)."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import vzkit
from tests.support.agent_vm import host_agent
from tests.support.polling import wait_until
from vzkit.backends import vz as vzb

from ._support import ARM64_IMAGE
from .fakeobjc import FakeRuntime

pytestmark = pytest.mark.contract
AGENT_PORT = 1024


class HostAgents:
    """Serves the stand-in's vsock port 1024 with one host-run agent per connection."""

    def __init__(self, fake: FakeRuntime, agent: Path) -> None:
        self.fake, self.agent = fake, agent
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self._seen = 0
        fake.guest_ports.add(AGENT_PORT)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.wait(0.01):  # poll interval: the stand-in lists new guest ends
            peers = self.fake.guest_peers.get(AGENT_PORT, [])
            for guest_end in peers[self._seen :]:
                self._seen += 1
                self.procs.append(
                    subprocess.Popen(
                        [str(self.agent), "serve", "--stdio"],
                        stdin=guest_end.fileno(),
                        stdout=guest_end.fileno(),
                        env={"PATH": "/usr/bin:/bin", "HOME": "/"},
                    )
                )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for proc in self.procs:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def agents(fake: FakeRuntime) -> Iterator[HostAgents]:
    serving = HostAgents(fake, host_agent())
    yield serving
    serving.close()


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP echo service on the host's loopback (the guest's server, seen by the agent)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join(5)
    server.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_published_port_reaches_the_guest_through_the_agent_over_vsock(
    fake: FakeRuntime, agents: HostAgents, echo_port: int, tmp_path: Path
) -> None:
    kernel = tmp_path / "Image"
    kernel.write_bytes(ARM64_IMAGE)
    host_port = _free_port()
    cfg = vzkit.LinuxVMConfig(
        kernel_path=kernel,
        state_dir=tmp_path / "state",
        publish=(vzkit.PortForward(host_port, echo_port),),
    )
    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
        vm.start(timeout=10)
        payload = bytes(range(256)) * 4096  # 1 MiB, both ways
        with socket.create_connection(("127.0.0.1", host_port), timeout=10) as conn:
            sender = threading.Thread(target=conn.sendall, args=(payload,))
            sender.start()
            got = bytearray()
            while len(got) < len(payload):
                chunk = conn.recv(65536)
                assert chunk, f"the connection ended after {len(got)} bytes"
                got += chunk
            sender.join(10)
        assert bytes(got) == payload
        assert agents.procs, "the forwarder never reached the agent over vsock"
        vm.pause(timeout=5)
        vm.resume(timeout=5)  # sends the host's clock (the stdio agent reports, sets nothing)
        assert vm.guest.run(["true"]).returncode == 0
    with pytest.raises(ConnectionRefusedError):  # the port went with the VM
        socket.create_connection(("127.0.0.1", host_port), timeout=5).close()
    wait_until(lambda: all(p.poll() is not None for p in agents.procs), "agents to end", 10)
    assert fake.violations == []
