"""NAT networking on the qemu backend, end to end, without leaving this machine.

One boot: the guest gets its address, route and DNS server by DHCP; a service on the host's
loopback is out of its reach at the NAT gateway (10.0.2.2); a published TCP port on the host's
loopback reaches a service in the guest. A second boot asks for the host's loopback
(``nat:host-loopback``) and reaches it.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

import vzkit
from vzkit.backends.qemu._passt import host_resolvers

from .conftest import VMFactory

GREETER = b"""#!/bin/sh
echo from guest
read -r line
echo "got $line"
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _listening_on(port: int) -> set[str]:
    """Local addresses with a TCP listener on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def _sh(vm: vzkit.VirtualMachine, script: str, timeout: float = 60) -> tuple[int, str]:
    done = vm.guest.run(["sh", "-c", script], timeout=timeout)
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


class LoopbackServer:
    """A service on the host's loopback only; counts the connections it accepted."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.sendall(b"from host\n")

    def close(self) -> None:
        self.sock.close()


def _start_publishing_a_free_port(vms: VMFactory) -> tuple[vzkit.VirtualMachine, int]:
    """A VM with NAT that publishes a free host port on its port 8000, started.

    A port found free can be taken before the VM binds it (anything else on the machine may
    ask the kernel for a port meanwhile): vzkit refuses to start then, saying so, and we
    try another port.
    """
    for _ in range(5):
        published = _free_port()
        vm = vms.create(
            network=vzkit.NetworkConfig(vzkit.NetworkMode.NAT),
            publish=(vzkit.parse_port_spec(f"{published}:8000"),),
        )
        try:
            vm.start(timeout=60)
        except vzkit.VMError as err:
            if "cannot be bound on the host" not in str(err):
                raise
            continue
        return vm, published
    raise AssertionError("five free ports were taken before the VM could bind them")


def test_nat_dhcp_published_port_and_no_host_loopback(vms: VMFactory) -> None:
    server = LoopbackServer()
    vm, published = _start_publishing_a_free_port(vms)
    vm.guest.wait_ready(timeout=120)
    assert _listening_on(published) == {"127.0.0.1"}  # loopback only, by default

    # DHCP configured the NIC, the default route and DNS.
    code, out = _sh(
        vm,
        "for i in $(seq 100); do ip -4 addr show eth0 | grep -q 'inet ' && break; "
        "sleep 0.1; done; ip -4 addr show eth0; ip route; cat /etc/resolv.conf",
    )
    assert code == 0, out
    assert "inet 10.0.2.15/24" in out
    assert "default via 10.0.2.2 dev eth0" in out
    for resolver in host_resolvers():  # the host's own, reached through the NAT
        assert f"nameserver {resolver}" in out

    # The host's loopback services are out of the guest's reach: 10.0.2.2 is not the host.
    t0 = time.monotonic()
    code, out = _sh(vm, f"timeout 10 nc -w 3 10.0.2.2 {server.port} </dev/null")
    assert code != 0, out
    assert "from host" not in out
    assert time.monotonic() - t0 < 30
    assert server.accepted == 0
    server.close()

    # A published host port reaches a service in the guest.
    vm.guest.write_file("/tmp/greet", GREETER)
    code, out = _sh(
        vm, "chmod +x /tmp/greet; nc -l -p 8000 -e /tmp/greet </dev/null >/dev/null 2>&1 &"
    )
    assert code == 0, out
    reply = b""
    deadline = time.monotonic() + 30
    while b"got ping" not in reply and time.monotonic() < deadline:
        # Until the guest listens, the forwarder accepts and then drops the connection.
        try:
            with socket.create_connection(("127.0.0.1", published), timeout=10) as conn:
                conn.sendall(b"ping\n")
                reply = b""
                while chunk := conn.recv(100):
                    reply += chunk
        except (ConnectionResetError, ConnectionRefusedError, TimeoutError):
            pass
        if b"got ping" not in reply:
            time.sleep(0.2)  # poll interval
    assert reply == b"from guest\ngot ping\n"


def test_nat_host_loopback_on_request(vms: VMFactory) -> None:
    """``--network nat:host-loopback``: 10.0.2.2:PORT is the host's 127.0.0.1:PORT."""
    server = LoopbackServer()
    vm = vms.create(network=vzkit.parse_network_mode("nat:host-loopback"))
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=120)
    code, out = _sh(
        vm,
        "for i in $(seq 100); do ip route | grep -q default && break; sleep 0.1; done; "
        f"timeout 10 nc -w 5 10.0.2.2 {server.port} </dev/null",
    )
    # (nc may outlive the host's close by up to the timeout: the data is what counts)
    assert out == "from host\n", (code, vm.state_dir.joinpath("passt.log").read_text())
    assert server.accepted == 1
    server.close()


def test_no_network_means_no_nic(vms: VMFactory) -> None:
    vm = vms.create(network=vzkit.NetworkConfig(vzkit.NetworkMode.NONE))
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=120)
    assert "-netdev" not in vm._core.machine.argv  # type: ignore[attr-defined]
    code, out = _sh(vm, "ls /sys/class/net")
    assert (code, out.split()) == (0, ["lo"])


def test_host_only_reaches_no_host_service(vms: VMFactory) -> None:
    """host-only on Linux (restricted user-mode network) refuses the host's loopback too."""
    server = LoopbackServer()
    vm = vms.create(network=vzkit.parse_network_mode("host-only"))
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=120)
    code, out = _sh(
        vm,
        "for i in $(seq 100); do ip -4 addr show eth0 | grep -q 'inet ' && break; "
        f"sleep 0.1; done; timeout 10 nc -w 3 10.0.2.2 {server.port} </dev/null",
    )
    assert code != 0, out
    assert "from host" not in out
    assert server.accepted == 0
    server.close()


def test_published_port_in_use_fails_the_start_and_leaves_nothing(vms: VMFactory) -> None:
    from vzkit._process import live_children

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        vm = vms.create(
            network=vzkit.NetworkConfig(vzkit.NetworkMode.NAT),
            publish=(vzkit.parse_port_spec(f"{port}:80"),),
        )
        with pytest.raises(vzkit.VMError, match=f"cannot publish 127.0.0.1:{port}:80/tcp"):
            vm.start(timeout=60)
    assert vm.state is vzkit.VMState.STOPPED
    assert live_children() == {}
