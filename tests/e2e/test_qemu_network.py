"""NAT networking on the qemu backend, end to end, without leaving this machine.

One boot: the guest gets its address, route and DNS server by DHCP; it reaches a service on
the host's loopback through the NAT gateway (10.0.2.2); a published TCP port on the host's
loopback reaches a service in the guest.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import vzkit

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


def test_nat_dhcp_host_loopback_and_published_port(vms: VMFactory) -> None:
    # A service on the host's loopback only.
    server = socket.create_server(("127.0.0.1", 0))
    host_port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"from host\n")

    threading.Thread(target=serve, daemon=True).start()

    published = _free_port()
    vm = vms.create(
        network=vzkit.NetworkConfig(vzkit.NetworkMode.NAT),
        publish=(vzkit.parse_port_spec(f"{published}:8000"),),
    )
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=120)
    assert _listening_on(published) == {"127.0.0.1"}  # loopback only, by default

    # DHCP configured the NIC, the default route and DNS (QEMU's user-mode resolver).
    code, out = _sh(
        vm,
        "for i in $(seq 100); do ip -4 addr show eth0 | grep -q 'inet ' && break; "
        "sleep 0.1; done; ip -4 addr show eth0; ip route; cat /etc/resolv.conf",
    )
    assert code == 0, out
    assert "inet 10.0.2.15/24" in out
    assert "default via 10.0.2.2 dev eth0" in out
    assert "nameserver 10.0.2.3" in out

    # The guest reaches the host's loopback service through the NAT gateway.
    code, out = _sh(vm, f"nc -w 10 10.0.2.2 {host_port} </dev/null")
    assert (code, out) == (0, "from host\n")
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
        with socket.create_connection(("127.0.0.1", published), timeout=10) as conn:
            conn.sendall(b"ping\n")
            reply = b""
            try:
                while chunk := conn.recv(100):
                    reply += chunk
            except (ConnectionResetError, TimeoutError):
                pass
        if b"got ping" not in reply:
            time.sleep(0.2)
    assert reply == b"from guest\ngot ping\n"


def test_no_network_means_no_nic(vms: VMFactory) -> None:
    vm = vms.create(network=vzkit.NetworkConfig(vzkit.NetworkMode.NONE))
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=120)
    assert "-netdev" not in vm._core.machine.argv  # type: ignore[attr-defined]
    code, out = _sh(vm, "ls /sys/class/net")
    assert (code, out.split()) == (0, ["lo"])
