"""``vm.vsock`` on real guests (TCG), through the facade: the user-space vhost-user-vsock
device in its helper process, the guest's ``vzkit-agent relay`` at the other end.

Each test boots one guest and checks several things in it (two shared cores here).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import random
import socket
import time
from pathlib import Path

import pytest

import vzkit
from vzkit._process import live_children
from vzkit._vsock import AsyncVsock
from vzkit.agent import AgentClient, AgentError, authenticate
from vzkit.agent._protocol import (
    ErrorInfo,
    ExecRequest,
    MsgType,
    decode_header,
    encode_frame,
    encode_hello_request,
)

from .conftest import VMFactory

MIB = 1 << 20
RELAY = "/bin/vzkit-agent relay"


def connect_when_listening(
    vm: vzkit.VirtualMachine, port: int, timeout: float = 30
) -> socket.socket:
    """Connect once the guest's relay listens (it starts in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return vm.vsock.connect(port, timeout=10)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # poll interval


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def send_forever(sock: socket.socket) -> None:
    while True:
        sock.sendall(b"\0" * MIB)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_64_mib_each_way_refused_port_and_half_close(vms: VMFactory, arch: str) -> None:
    vm = vms.create(arch)
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=90)
    assert vm._core.agent.transport == "vsock"  # the agent answered over vsock port 1024

    # Nobody listens on 5999: refused at once.
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        vm.vsock.connect(5999, timeout=10)
    assert time.monotonic() - t0 < 3

    # host -> guest: 64 MiB into sha256sum; our half-close (EOF) makes it answer.
    payload = random.Random(arch).randbytes(64 * MIB)
    vm.guest.popen(["sh", "-c", f"{RELAY} --listen-vsock 5000 --exec sha256sum"], stdin=False)
    with connect_when_listening(vm, 5000) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        answer = recv_all(sock)
    assert answer.split()[0].decode() == hashlib.sha256(payload).hexdigest()

    # guest -> host: 64 MiB of the guest's random bytes through a guest-initiated connection.
    vm.guest.run(["sh", "-c", "head -c 67108864 /dev/urandom > /tmp/blob"], check=True)
    want = vm.guest.run(["sha256sum", "/tmp/blob"], check=True).stdout.split()[0].decode()
    with vm.vsock.listen(6000) as listener:
        proc = vm.guest.popen(
            ["sh", "-c", f"{RELAY} --connect-vsock 2:6000 --exec 'cat /tmp/blob'"], stdin=False
        )
        conn, peer = listener.accept(timeout=30)
        with conn:
            got = recv_all(conn)
        assert 1024 <= peer <= 0xFFFFFFFF  # the guest's (ephemeral) port
    assert len(got) == 64 * MIB
    assert hashlib.sha256(got).hexdigest() == want
    assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_64_concurrent_connections_each_way(vms: VMFactory, arch: str) -> None:
    vm = vms.create(arch)
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=90)
    vm.guest.popen(["sh", "-c", f"{RELAY} --listen-vsock 5000 --exec cat"], stdin=False)
    connect_when_listening(vm, 5000).close()

    def echo(i: int) -> bytes:
        data = f"connection {i} ".encode() * (1000 + i)
        with vm.vsock.connect(5000, timeout=30) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # half-close: the echo still comes back
            return recv_all(sock)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        echoes = list(pool.map(echo, range(64)))
    assert echoes == [f"connection {i} ".encode() * (1000 + i) for i in range(64)]

    with vm.vsock.listen(7000) as listener:
        vm.guest.popen(
            ["sh", "-c", "for i in $(seq 64); do "
             f"{RELAY} --connect-vsock 2:7000 --exec \"echo guest-$i\" & done; wait"],
            stdin=False,
        )  # fmt: skip
        accepted = [listener.accept(timeout=60) for _ in range(64)]
        messages = set()
        for conn, _peer in accepted:
            with conn:
                messages.add(recv_all(conn).strip())
        assert len({peer for _conn, peer in accepted}) == 64
    assert messages == {f"guest-{i}".encode() for i in range(1, 65)}


def test_churn_async_twin_and_what_a_stop_does(vms: VMFactory, tmp_path: Path) -> None:
    vm = vms.create("x86_64", state_dir=tmp_path / "vm")
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=90)
    vm.guest.popen(["sh", "-c", f"{RELAY} --listen-vsock 5000 --exec cat"], stdin=False)
    connect_when_listening(vm, 5000).close()

    # Connect/close churn (refused and accepted) leaks no fds in this process.
    fds = fd_count()
    for i in range(300):
        if i % 3:
            with pytest.raises(ConnectionRefusedError):
                vm.vsock.connect(5999, timeout=10)
        else:
            with vm.vsock.connect(5000, timeout=10) as sock:
                sock.sendall(b"x")
                assert sock.recv(1) == b"x"
    assert fd_count() <= fds + 2

    # The asyncio twin drives the same VM's vsock (streams on the caller's loop).
    async def via_aio() -> bytes:
        avsock = AsyncVsock(vm._core)  # what vzkit.aio.VirtualMachine.vsock is, same VM
        reader, writer = await avsock.connect(5000, timeout=10)
        writer.write(b"async hello")
        writer.write_eof()
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        return data

    assert asyncio.run(via_aio()) == b"async hello"

    # A stop ends open connections (EOF or reset) and closes listeners; the helper is reaped.
    sock = vm.vsock.connect(5000, timeout=10)
    listener = vm.vsock.listen(6000)
    helper = vm._core.machine._vsock.helper  # type: ignore[attr-defined]
    assert helper is not None
    assert helper.running
    vm.stop(timeout=10)
    sock.settimeout(10)
    try:
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pass
    sock.close()
    with pytest.raises(vzkit.StateError):
        listener.accept(timeout=1)
    listener.close()
    assert not helper.running
    assert helper.pid not in live_children()
    assert not list((tmp_path / "vm").glob("vsock.sock*"))
    with pytest.raises(vzkit.StateError):
        vm.vsock.connect(5000)


def pushed_until_stalled(sock: socket.socket, stall: float = 3.0) -> int:
    """Bytes the host gets in before the stream stops taking more for ``stall`` seconds."""
    sock.settimeout(stall)
    chunk, total = b"\0" * (64 * 1024), 0
    with contextlib.suppress(TimeoutError):
        while total < 16 * MIB:
            total += sock.send(chunk)
    return total


def test_the_guest_receive_buffer_is_the_window(vms: VMFactory) -> None:
    """The relay's vsock buffer (2 MiB unless --vsock-buffer) is the window the host gets:
    with a guest reader that does not read, the host fills it, the relay's 64 KiB and its
    pipe, and its own Unix socket to the device; with the kernel's 256 KiB (--vsock-buffer
    0) all of that stays under 1 MiB."""
    vm = vms.create("x86_64")
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=90)
    pushed = {}
    for port, extra in ((5000, "--vsock-buffer 0"), (5001, "")):
        vm.guest.popen(["sh", "-c", f"{RELAY} --listen-vsock {port} --exec 'sleep 60' {extra}"],
                       stdin=False)  # fmt: skip
        with connect_when_listening(vm, port) as sock:
            pushed[port] = pushed_until_stalled(sock)
    assert pushed[5000] < MIB, pushed
    assert pushed[5001] > 3 * MIB // 2, pushed


def test_vm_killed_mid_transfer(vms: VMFactory) -> None:
    vm = vms.create("x86_64")
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=90)
    vm.guest.popen(["sh", "-c", f"{RELAY} --listen-vsock 5000 --exec 'cat >/dev/null'"],
                   stdin=False)  # fmt: skip
    sock = connect_when_listening(vm, 5000)
    os.kill(vm.pid or 0, 9)
    sock.settimeout(30)
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        send_forever(sock)  # fails promptly: the device closed our stream
    sock.close()
    assert vm.wait(timeout=30) is vzkit.VMState.ERROR
    vm.close()
    assert not [n for n in live_children().values() if n in ("vzkit-vsock", "qemu-system-x86_64")]


def test_bad_ports_and_vsock_off(vms: VMFactory) -> None:
    vm = vms.create("x86_64", vsock=False)
    with pytest.raises(vzkit.ConfigError, match="vsock port"):
        vm.vsock.connect(-1)
    with pytest.raises(vzkit.ConfigError, match="vsock port"):
        vm.vsock.listen(1 << 32)
    with pytest.raises(vzkit.UnsupportedError, match="no vsock device"):
        vm.vsock.connect(5000)
    vm.start(timeout=60)
    assert vm.guest.run(["true"]).returncode == 0  # the agent over its console port
    assert vm._core.agent.transport == "console"
    assert not any("vhost-user-vsock" in a for a in vm._core.machine.argv)  # type: ignore[attr-defined]


def test_the_default_guest_runs_with_its_throughput_settings(vms: VMFactory) -> None:
    """What docs/vsock.md measured the default guest with: no zeroing of kernel allocations,
    no kernel preemption (x86_64) and a 15 ms wake-up granularity (set by init)."""
    script = (
        "echo $(cat /proc/cmdline);"
        "dmesg | grep -o 'Dynamic Preempt: [a-z]*' | tail -n 1;"
        "mount -t debugfs debugfs /sys/kernel/debug &&"
        " cat /sys/kernel/debug/sched/wakeup_granularity_ns; umount /sys/kernel/debug"
    )
    tuned = vms.create("x86_64")
    stock_cmdline = f"{vms.images['x86_64'].cmdline()} vzkit.sched=stock preempt=voluntary"
    stock = vms.create("x86_64", cmdline=stock_cmdline)
    for vm in (tuned, stock):
        vm.start(timeout=60)
    out = []
    for vm in (tuned, stock):
        vm.guest.wait_ready(timeout=90)
        out.append(vm.guest.run(["sh", "-c", script], check=True).stdout.decode().split("\n"))
    assert {"init_on_alloc=0", "preempt=none"} <= set(out[0][0].split())
    assert out[0][1:3] == ["Dynamic Preempt: none", "15000000"]
    # the last word wins, and init leaves the scheduler alone when asked to
    assert out[1][1] == "Dynamic Preempt: voluntary"
    assert int(out[1][2]) < 15000000


# ---- peer checks (docs/vsock.md, "Peer checks") -----------------------------------------------


def _run_request(path: str) -> bytes:
    """HELLO and an EXEC that would create ``path``: what a stranger on port 1024 sends."""
    run = ExecRequest((b"touch", path.encode())).encode()
    return encode_frame(MsgType.HELLO, 0, encode_hello_request()) + encode_frame(
        MsgType.EXEC, 1, run
    )


def _first_frame(sock: socket.socket) -> tuple[int, bytes]:
    sock.settimeout(30)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    assert len(data) >= 12, data
    length, kind, _ = decode_header(data[:12])
    return kind, data[12 : 12 + length]


def _agent_key(vm: vzkit.VirtualMachine) -> bytes:
    vsock = vm._core.machine._vsock  # type: ignore[attr-defined]
    assert vsock is not None
    return bytes(vsock.agent_key)


def test_the_agent_port_serves_only_the_runs_key(vms: VMFactory) -> None:
    """A host process that reaches vsock port 1024 (with the kernel's vhost-vsock, every
    local user can) runs nothing without the key; vzkit's own client brings it."""
    vm = vms.create("x86_64")
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=90)
    assert vm._core.agent.transport == "vsock"  # the agent answered over vsock, keyed
    key = _agent_key(vm)

    with vm.vsock.connect(1024, timeout=10) as raw:  # no AUTH at all
        raw.sendall(_run_request("/tmp/no-auth"))
        kind, payload = _first_frame(raw)
    assert kind == MsgType.ERROR
    assert ErrorInfo.decode(payload).message.startswith("authentication required")

    wrong = bytes(b ^ 1 for b in key)
    with vm.vsock.connect(1024, timeout=10) as raw:
        with pytest.raises(AgentError, match="authentication failed"):
            authenticate(raw, wrong)
        with contextlib.suppress(OSError):  # the agent hung up: nothing more is read
            raw.sendall(_run_request("/tmp/wrong-key"))
            assert raw.recv(1) == b""  # (or the connection is reset)

    # The agent hung up on both: it had acted on every frame before that (one thread, frames
    # in order), so an EXEC that got through had forked its `touch`, still the agent's child
    # (running or a zombie) or done and reaped, its file made. Children first, then files.
    done = vm.guest.run(
        ["sh", "-c", "for c in $(cat /proc/$PPID/task/$PPID/children); do cat /proc/$c/comm; "
         "done 2>/dev/null; ls /tmp/no-auth /tmp/wrong-key 2>&1"]
    )  # fmt: skip
    assert done.returncode != 0
    assert b"touch" not in done.stdout, done.stdout
    assert done.stdout.count(b"No such file") == 2, done.stdout

    # The key is in fw_cfg for the guest's root alone, and nowhere on QEMU's command line.
    mode = vm.guest.run(["stat", "-c", "%a", f"{FW_CFG_KEY}/raw"], check=True).stdout
    assert mode == b"400\n"
    assert vm.guest.read_file(f"{FW_CFG_KEY}/size") == b"32\n"
    assert vm.guest.read_file(f"{FW_CFG_KEY}/raw") == key
    pid = vm._core.machine.pid  # type: ignore[attr-defined]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert key not in cmdline
    assert key.hex().encode() not in cmdline
    assert b"vzkit.agent_key=fw_cfg" in cmdline

    with vm.vsock.connect(1024, timeout=10) as ok:  # the right key: served
        authenticate(ok, key)
        with AgentClient(ok.dup(), timeout=30) as client:
            assert client.run(["echo", "keyed"]).stdout == b"keyed\n"


FW_CFG_KEY = "/sys/firmware/qemu_fw_cfg/by_name/opt/org.vzkit/agent-key"


def test_a_restored_guest_has_a_key_of_its_own(vms: VMFactory, tmp_path: Path) -> None:
    """fw_cfg is not in the saved state: each restored guest gets its own QEMU's key, and
    the snapshot's key (its origin's) opens nothing there."""
    vzkit.create_disk_image(tmp_path / "disk.raw", 1)
    manager = vzkit.SnapshotManager(tmp_path / "snaps")
    common = {"console": vzkit.ConsoleMode.LOG, "disk_path": tmp_path / "disk.raw"}
    origin = vms.create("x86_64", state_dir=tmp_path / "origin", **common)
    origin.start(timeout=60)
    origin.guest.wait_ready(timeout=90)
    old = _agent_key(origin)
    manager.save(origin, "base", timeout=120)
    origin.stop(timeout=60)

    keys = [old]
    for name in ("a", "b"):  # two guests from one snapshot
        vm = vms.create("x86_64", state_dir=tmp_path / name, **common)
        manager.restore(vm, "base", timeout=120)
        vm.resume(timeout=30)
        assert vm.guest.run(["echo", name], timeout=60).stdout == f"{name}\n".encode()
        assert vm._core.agent.transport == "vsock"
        for stale in keys:
            raw = vm.vsock.connect(1024, timeout=10)
            with raw, pytest.raises(AgentError, match="authentication failed"):
                authenticate(raw, stale)
        keys.append(_agent_key(vm))
        vm.close()
    assert len(set(keys)) == 3
