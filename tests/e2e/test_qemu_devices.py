"""Devices on real guests: graphics over VNC, the NAT NIC and its stable MAC, refused modes."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

import vzkit
from vzkit._process import live_children

from .conftest import VMFactory


def test_graphics_serve_vnc_on_a_unix_socket(vms: VMFactory) -> None:
    vm, shell = vms.boot("x86_64", headless=False, displays=(vzkit.parse_display_spec("720p"),))
    machine = vm._core.machine
    sock_path = machine.vnc_socket  # type: ignore[attr-defined]
    assert sock_path is not None
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(sock_path))
        assert sock.recv(12) == b"RFB 003.008\n"
    rc, out = shell.run("cat /sys/bus/pci/devices/*/vendor /sys/bus/pci/devices/*/device")
    assert rc == 0
    assert "0x1050" in out  # virtio-gpu's PCI device id


def test_nat_nic_has_a_stable_locally_administered_mac(vms: VMFactory, tmp_path: Path) -> None:
    state_dir = tmp_path / "vm"
    macs = []
    for _ in range(2):
        vm, shell = vms.boot(
            "x86_64", network=vzkit.NetworkConfig(vzkit.NetworkMode.NAT), state_dir=state_dir
        )
        rc, out = shell.run("cat /sys/class/net/eth0/address")
        assert rc == 0, out
        macs.append(out.strip())
        vm.close()
    assert macs[0] == macs[1] == (state_dir / "mac-address").read_text().strip()
    first_octet = int(macs[0].split(":")[0], 16)
    assert first_octet & 0x02  # locally administered
    assert not first_octet & 0x01  # unicast


def test_bridging_to_a_missing_bridge_is_refused_before_any_process(vms: VMFactory) -> None:
    vm = vms.create("x86_64", network=vzkit.parse_network_mode("bridged:vzkit-nope0"))
    before = live_children()
    with pytest.raises(vzkit.UnsupportedError, match="not a Linux bridge"):
        vm.start(timeout=30)
    assert live_children() == before
    assert vm.state is vzkit.VMState.STOPPED


def test_agent_answers_on_its_console_port_and_after_a_reconnect(
    vms: VMFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VZKIT_AGENT_TRANSPORT", "console")  # vsock is the default
    vm, shell = vms.boot("x86_64")
    rc, out = shell.run("cat /sys/class/virtio-ports/*/name")
    assert rc == 0
    assert "org.vzkit.agent.0" in out.split()
    assert vm.guest.wait_ready(timeout=60)
    assert vm.guest.run(["echo", "one"]).stdout == b"one\n"
    vm.guest.close()  # a new client on the same console stream resynchronises first
    assert vm.guest.run(["echo", "two"]).stdout == b"two\n"


def test_guest_output_and_file_reads_are_bounded(vms: VMFactory) -> None:
    """A guest that prints without end, or a huge file, makes run()/read_file() fail at the
    caller's limit, and the command is not left running in the guest."""
    mib = 1024 * 1024
    vm, _ = vms.boot("x86_64")
    vm.guest.wait_ready(timeout=60)
    with pytest.raises(vzkit.GuestError, match=r"passed max_output=1048576 bytes; the process"):
        vm.guest.run(["sh", "-c", "yes | head -c 10485760"], max_output=mib)
    # the agent killed the process group: neither yes nor head is left
    ps = "for c in /proc/[0-9]*/comm; do cat $c; done 2>/dev/null"
    for _ in range(50):
        left = vm.guest.run(["sh", "-c", ps]).stdout.split()
        if b"yes" not in left and b"head" not in left:
            break
        time.sleep(0.1)  # poll interval
    assert b"yes" not in left, left
    assert b"head" not in left, left
    vm.guest.run(["sh", "-c", "head -c 3145728 /dev/zero > /tmp/big"], check=True)
    with pytest.raises(vzkit.GuestError, match="larger than max_size=1048576 bytes"):
        vm.guest.read_file("/tmp/big", max_size=mib)
    assert vm.guest.read_file("/tmp/big") == bytes(3 * mib)
    assert len(vm.guest.run(["head", "-c", "10485760", "/dev/zero"]).stdout) == 10 * mib
