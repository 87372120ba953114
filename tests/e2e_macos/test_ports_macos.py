"""``-p`` on a real Mac's vz backend, where Virtualization's NAT forwards nothing: a guest
service on its loopback is reached from the host's through the guest agent (vsock)."""

from __future__ import annotations

import socket
import time

import vzkit

from .conftest import MacVMs

GREETER = b'#!/bin/sh\necho from guest\nread -r line\necho "got $line"\n'


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_published_port_reaches_a_guest_service_through_the_agent(macvms: MacVMs) -> None:
    port = _free_port()
    vm = macvms.boot("vz", publish=(vzkit.parse_port_spec(f"{port}:8000"),))
    vm.guest.write_file("/tmp/greet", GREETER, mode=0o755)
    script = "(while :; do nc -l -p 8000 -e /tmp/greet; done) </dev/null >/dev/null 2>&1 &"
    assert vm.guest.run(["sh", "-c", script]).returncode == 0
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
                conn.sendall(b"ping\n")
                reply = b""
                while chunk := conn.recv(100):
                    reply += chunk
            if b"got ping" in reply:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the guest service never answered"
        time.sleep(0.3)  # poll interval: the guest's nc may not listen yet
    assert reply == b"from guest\ngot ping\n"
    vm.stop(timeout=60)
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        raise AssertionError("the port outlived the VM")
    except ConnectionRefusedError:
        pass
