"""The user-space vhost-user-vsock device against real QEMU guests (TCG).

The VM is started here with a hand-written QEMU command line (the facade does not wire vsock
yet): guest RAM is a shared memfd, the device gets one end of a socketpair and QEMU the other
as ``-chardev socket,fd=N``, the serial console is another socketpair. The guest image holds
``/bin/vsock-echo`` (``vsock_echo.c``, built static with ``python -m ziglang``; the tests skip
when ziglang is missing).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.guest_programs import ZIG_TARGETS, build_static
from vzkit.backends.qemu._discover import user_cache_dir
from vzkit.backends.qemu.vhost_vsock import VhostUserVsockDevice, connect_hybrid, helper_argv
from vzkit.image import GuestImage, build_guest

HERE = Path(__file__).parent
SOURCE = HERE / "vsock_echo.c"
MIB = 1 << 20


def build_vsock_echo(arch: str) -> Path:
    """Compile vsock_echo.c for ``arch`` (cached by source hash; the first build takes ~40 s)."""
    return build_static(SOURCE, "vsock-echo", arch)


@pytest.fixture(scope="session")
def vsock_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, GuestImage]:
    out = tmp_path_factory.mktemp("vsock-guests")
    debs = user_cache_dir() / "test-debs"
    images = {}
    for arch in ZIG_TARGETS:
        tool = build_vsock_echo(arch)
        images[arch] = build_guest(
            arch, out_dir=out / arch, cache_dir=debs / arch, extra_files={"/bin/vsock-echo": tool}
        )
    return images


class VsockGuest:
    """A QEMU guest with the vhost-user-vsock device, driven over its serial console."""

    def __init__(
        self, image: GuestImage, workdir: Path, *, helper: bool = False, **device_kwargs: Any
    ) -> None:
        self.uds = workdir / "v.sock"
        self.console, con_theirs = socket.socketpair()
        vhost_ours, vhost_theirs = socket.socketpair()
        self.device: VhostUserVsockDevice | None = None
        self.helper: subprocess.Popen[bytes] | None = None
        if helper:
            self.helper = subprocess.Popen(
                helper_argv(self.uds, fd=vhost_ours.fileno()), pass_fds=(vhost_ours.fileno(),)
            )
            vhost_ours.close()
        else:
            self.device = VhostUserVsockDevice(self.uds, vhost_socket=vhost_ours, **device_kwargs)
            self.device.start()
        machine = "q35" if image.arch == "x86_64" else "virt,gic-version=max"
        argv = [
            f"qemu-system-{image.arch}", "-nodefaults", "-no-user-config", "-no-reboot",
            "-display", "none", "-cpu", "max", "-smp", "1", "-m", "512M",
            "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
            "-machine", f"{machine},accel=tcg,memory-backend=mem",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", image.cmdline(),
            "-chardev", f"socket,id=vsock0,fd={vhost_theirs.fileno()}",
            "-device", "vhost-user-vsock-pci,chardev=vsock0",
            "-chardev", f"socket,id=con0,fd={con_theirs.fileno()}", "-serial", "chardev:con0",
        ]  # fmt: skip
        self.stderr = workdir / "qemu.log"
        with open(self.stderr, "wb") as err:
            self.qemu = subprocess.Popen(
                argv, pass_fds=(vhost_theirs.fileno(), con_theirs.fileno()), stderr=err
            )
        vhost_theirs.close()
        con_theirs.close()
        self.buffer = b""
        self.seq = 0
        try:
            self.read_until(b"VZKIT-GUEST-READY", 120)
        except BaseException:
            self.close()
            raise

    def read_until(self, marker: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{marker!r} not on the console: {self.buffer[-1500:]!r}")
            ready, _, _ = select.select([self.console], [], [], min(left, 0.5))
            if ready:
                chunk = self.console.recv(65536)
                if not chunk:
                    raise EOFError(f"console closed: {self.buffer[-1500:]!r}")
                self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def run(self, command: str, timeout: float = 120) -> tuple[int, str]:
        self.seq += 1
        n = self.seq
        self.console.sendall(
            f"printf '@@%s@@\\n' B{n}; {command}; printf '@@%s@@%s\\n' E{n} $?\n".encode()
        )
        self.read_until(f"@@B{n}@@\r\n".encode(), timeout)
        out = self.read_until(f"@@E{n}@@".encode(), timeout)
        status = self.read_until(b"\r\n", timeout)
        return int(status.strip()), out.decode(errors="replace").replace("\r\n", "\n")

    def background(self, command: str) -> None:
        status, out = self.run(f"( ({command}) >/tmp/bg.log 2>&1 & )")
        assert status == 0, out

    def connect(self, port: int, timeout: float = 20) -> socket.socket:
        """Connect to a guest port, retrying while the guest program starts listening."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock, _ = connect_hybrid(self.uds, port, timeout=5)
                return sock
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # poll interval

    def close(self) -> None:
        if self.qemu.poll() is None:
            self.qemu.kill()
        self.qemu.wait()
        if self.helper is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.helper.wait(10)  # it exits when QEMU hangs up
            if self.helper.poll() is None:
                self.helper.kill()
                self.helper.wait()
        if self.device is not None:
            self.device.close()
        self.console.close()


@pytest.fixture(params=["x86_64", "aarch64"])
def guest(
    request: pytest.FixtureRequest, vsock_images: dict[str, GuestImage], tmp_path: Path
) -> Iterator[VsockGuest]:
    vm = VsockGuest(vsock_images[request.param], tmp_path)
    yield vm
    vm.close()


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def test_guest_driver_binds_and_posts_rx_buffers(guest: VsockGuest) -> None:
    assert guest.device is not None
    deadline = time.monotonic() + 10
    while not guest.device.running and time.monotonic() < deadline:
        time.sleep(0.05)  # poll interval
    assert guest.device.running  # features negotiated, CID read, both rings started
    status, out = guest.run("ls /dev/vsock /sys/bus/virtio/drivers/vmw_vsock_virtio_transport")
    assert status == 0, out
    assert guest.device._muxer.rxq is not None
    assert guest.device._muxer.rxq.pending() > 0  # the driver posted rx buffers


def test_refused_ports_both_ways(guest: VsockGuest) -> None:
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        connect_hybrid(guest.uds, 4444, timeout=10)
    assert time.monotonic() - t0 < 2
    _status, out = guest.run("vsock-echo refuse 2 4445")
    assert out.strip() == "refused", out


def test_64_mib_host_to_guest_sha256(guest: VsockGuest) -> None:
    data = os.urandom(64 * MIB)
    guest.background("vsock-echo recv 5001 | sha256sum > /tmp/h2g.sum")
    sock = guest.connect(5001)
    with sock:
        t0 = time.monotonic()
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b""  # the guest closes after EOF
        elapsed = time.monotonic() - t0
    deadline = time.monotonic() + 60
    while True:
        _status, out = guest.run("cat /tmp/h2g.sum")
        if out.strip() or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # poll interval
    assert out.split()[0] == hashlib.sha256(data).hexdigest()
    print(f"host->guest 64 MiB: {64 / elapsed:.1f} MiB/s")


def test_64_mib_guest_to_host_sha256(guest: VsockGuest) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{guest.uds}_6001")
    listener.listen()
    listener.settimeout(30)
    with listener:
        guest.background("vsock-echo gen 7 67108864 | vsock-echo connect 2 6001 >/dev/null")
        conn, _ = listener.accept()
        with conn:
            t0 = time.monotonic()
            digest = hashlib.sha256()
            total = 0
            while chunk := conn.recv(1 << 20):
                digest.update(chunk)
                total += len(chunk)
            elapsed = time.monotonic() - t0
    assert total == 64 * MIB
    _status, out = guest.run("vsock-echo gen 7 67108864 | sha256sum")
    assert out.split()[0] == digest.hexdigest()
    print(f"guest->host 64 MiB: {64 / elapsed:.1f} MiB/s")


def test_64_concurrent_echo_connections_and_half_close(guest: VsockGuest) -> None:
    guest.background("vsock-echo serve 5000")
    socks = [guest.connect(5000)]
    socks += [connect_hybrid(guest.uds, 5000, timeout=10)[0] for _ in range(63)]
    payloads = [os.urandom(256 * 1024 + i) for i in range(64)]
    results: dict[int, bytes] = {}

    def echo(i: int) -> None:
        sock = socks[i]
        sender = threading.Thread(target=lambda: (sock.sendall(payloads[i]),
                                                  sock.shutdown(socket.SHUT_WR)))  # fmt: skip
        sender.start()
        results[i] = recv_all(sock)  # the echo ends with the guest's half-close
        sender.join()
        sock.close()

    threads = [threading.Thread(target=echo, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(results.get(i) == payloads[i] for i in range(64))


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_echo_under_a_tight_byte_budget(
    vsock_images: dict[str, GuestImage], tmp_path: Path, arch: str
) -> None:
    """24 concurrent echo connections through a device whose byte budget (2 MiB) is below
    their 1 MiB windows: Linux honours the smaller, changing buf_alloc the device advertises
    (a guest exceeding it would be reset), and every byte comes back."""
    budget = 2 * MIB
    vm = VsockGuest(vsock_images[arch], tmp_path, byte_budget=budget)
    try:
        assert vm.device is not None
        vm.background("vsock-echo serve 5000")
        socks = [vm.connect(5000)]
        socks += [connect_hybrid(vm.uds, 5000, timeout=10)[0] for _ in range(23)]
        payloads = [os.urandom(512 * 1024 + i) for i in range(24)]
        results: dict[int, bytes] = {}
        peak = [0]

        def echo(i: int) -> None:
            sock = socks[i]
            sender = threading.Thread(target=lambda: (sock.sendall(payloads[i]),
                                                      sock.shutdown(socket.SHUT_WR)))  # fmt: skip
            sender.start()
            results[i] = recv_all(sock)
            sender.join()
            sock.close()

        threads = [threading.Thread(target=echo, args=(i,)) for i in range(24)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 300
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            peak[0] = max(peak[0], vm.device.committed_bytes)
            time.sleep(0.01)  # sampling interval of the peak, not synchronisation
        for thread in threads:
            thread.join(10)
        assert all(results.get(i) == payloads[i] for i in range(24))
        assert 0 < peak[0] <= budget
        assert vm.device.stats.credit_violations == 0
    finally:
        vm.close()


def test_vm_killed_mid_transfer(guest: VsockGuest) -> None:
    guest.background("vsock-echo recv 5002 > /dev/null")
    sock = guest.connect(5002)
    sock.settimeout(15)
    stop = threading.Event()

    def flood() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                sock.sendall(b"\0" * 65536)

    sender = threading.Thread(target=flood)
    sender.start()
    assert guest.device is not None
    device = guest.device
    deadline = time.monotonic() + 30
    while device.stats.bytes_to_guest < 1 << 20:  # the transfer is under way
        assert time.monotonic() < deadline, "no data reached the guest"
        time.sleep(0.01)  # poll interval
    guest.qemu.kill()  # the vhost-user socket closes mid-transfer
    t0 = time.monotonic()
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1) == b""
    assert time.monotonic() - t0 < 5
    stop.set()
    sender.join(10)
    sock.close()
    assert guest.device is not None
    deadline = time.monotonic() + 5
    while guest.device.attached and time.monotonic() < deadline:
        time.sleep(0.05)  # poll interval
    assert not guest.device.attached
    with pytest.raises(ConnectionRefusedError):
        connect_hybrid(guest.uds, 5002, timeout=5)


def test_helper_process_mode(vsock_images: dict[str, GuestImage], tmp_path: Path) -> None:
    vm = VsockGuest(vsock_images["x86_64"], tmp_path, helper=True)
    try:
        vm.background("vsock-echo serve 5000")
        sock = vm.connect(5000)
        with sock:
            data = os.urandom(4 * MIB)
            sender = threading.Thread(target=lambda: (sock.sendall(data),
                                                      sock.shutdown(socket.SHUT_WR)))  # fmt: skip
            sender.start()
            assert recv_all(sock) == data
            sender.join()
    finally:
        vm.close()
    assert vm.helper is not None
    assert vm.helper.returncode == 0  # it left on its own when QEMU went away
    assert not vm.uds.exists()
