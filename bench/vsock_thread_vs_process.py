"""vsock device placement: a thread in the vzkit process, or a helper process per VM?

Boots the same x86_64 TCG guest (with ``/bin/vsock-echo``) once per mode and round,
interleaved (thread, process, thread, ...), and measures through the hybrid Unix socket:

* ``h2g``: host -> guest throughput (guest ``vsock-echo recv`` into /dev/null)
* ``g2h``: guest -> host throughput (guest ``dd if=/dev/zero bs=64k | vsock-echo send``)
* ``connect``: connection setup latency (``CONNECT``..``OK``), median and p95
* ``cpu``: the device's CPU seconds per GB moved (its thread, or its process)
* the same transfers again while a pure-Python thread keeps the vzkit process busy
  (``*_busy``): a thread shares the GIL with it, a helper process does not
* ``console_*``: the same bytes over a virtio-serial port in the same guest (the baseline
  vsock should match or beat)

Figures are medians over the rounds; a table goes to stdout, JSON to bench/results/.

    .venv/bin/python bench/vsock_thread_vs_process.py -n 3 --mib 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vzkit.backends.qemu._discover import user_cache_dir
from vzkit.backends.qemu.vhost_vsock import VhostUserVsockDevice, connect_hybrid, helper_argv
from vzkit.image import GuestImage, build_guest

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def vsock_echo() -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.e2e.test_vhost_vsock_smoke import build_vsock_echo

    return build_vsock_echo("x86_64")


def cpu_seconds(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


class Guest:
    def __init__(self, image: GuestImage, workdir: Path, mode: str) -> None:
        self.uds = workdir / f"v-{mode}.sock"
        self.mode = mode
        self.console, con_theirs = socket.socketpair()
        self.port, port_theirs = socket.socketpair()
        ours, theirs = socket.socketpair()
        self.device: VhostUserVsockDevice | None = None
        self.helper: subprocess.Popen[bytes] | None = None
        if mode == "process":
            self.helper = subprocess.Popen(helper_argv(self.uds, fd=ours.fileno()),
                                           pass_fds=(ours.fileno(),))  # fmt: skip
            ours.close()
            self.stat = Path(f"/proc/{self.helper.pid}/stat")
        else:
            self.device = VhostUserVsockDevice(self.uds, vhost_socket=ours)
            self.device.start()
            assert self.device._thread is not None
            self.stat = Path(f"/proc/self/task/{self.device._thread.native_id}/stat")
        argv = [
            "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-no-reboot",
            "-display", "none", "-cpu", "max", "-smp", "1", "-m", "512M",
            "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
            "-machine", "q35,accel=tcg,memory-backend=mem",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", image.cmdline(),
            "-chardev", f"socket,id=vsock0,fd={theirs.fileno()}",
            "-device", "vhost-user-vsock-pci,chardev=vsock0",
            "-chardev", f"socket,id=con0,fd={con_theirs.fileno()}", "-serial", "chardev:con0",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=port0,fd={port_theirs.fileno()}",
            "-device", "virtserialport,chardev=port0,name=bench",
        ]  # fmt: skip
        fds = (theirs.fileno(), con_theirs.fileno(), port_theirs.fileno())
        self.qemu = subprocess.Popen(argv, pass_fds=fds, stderr=subprocess.DEVNULL)
        for sock in (theirs, con_theirs, port_theirs):
            sock.close()
        self.buffer = b""
        self.read_until(b"VZKIT-GUEST-READY", 120)
        self.seq = 0
        out = self.run("ls /sys/class/virtio-ports/")
        self.vport = "/dev/" + out.split()[0]

    def read_until(self, marker: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            ready, _, _ = select.select([self.console], [], [], 0.5)
            if ready:
                self.buffer += self.console.recv(65536)
            if time.monotonic() > deadline:
                raise TimeoutError(marker)
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def run(self, command: str, timeout: float = 120) -> str:
        self.seq += 1
        n = self.seq
        self.console.sendall(
            f"printf '@@%s@@\\n' B{n}; {command}; printf '@@%s@@\\n' E{n}\n".encode()
        )
        self.read_until(f"@@B{n}@@\r\n".encode(), timeout)
        return self.read_until(f"@@E{n}@@".encode(), timeout).decode(errors="replace")

    def background(self, command: str) -> None:
        self.console.sendall(f"( ({command}) >/dev/null 2>&1 & )\n".encode())

    def connect(self, port: int) -> socket.socket:
        deadline = time.monotonic() + 20
        while True:
            try:
                return connect_hybrid(self.uds, port, timeout=5)[0]
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.qemu.kill()
        self.qemu.wait()
        if self.helper is not None:
            try:
                self.helper.wait(10)
            except subprocess.TimeoutExpired:
                self.helper.kill()
                self.helper.wait()
        if self.device is not None:
            self.device.close()
        self.console.close()
        self.port.close()


def measure(guest: Guest, fn: Callable[[], float]) -> tuple[float, float]:
    """Run ``fn`` (returns elapsed seconds); also return the device CPU seconds it cost."""
    cpu0 = cpu_seconds(guest.stat)
    elapsed = fn()
    return elapsed, cpu_seconds(guest.stat) - cpu0


def h2g(guest: Guest, nbytes: int, port: int) -> float:
    guest.background(f"vsock-echo recv {port} > /dev/null")
    sock = guest.connect(port)
    block = b"\xa5" * (1 << 20)
    t0 = time.perf_counter()
    with sock:
        for _ in range(nbytes // len(block)):
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # EOF once the guest has read everything
    return time.perf_counter() - t0


def g2h(guest: Guest, nbytes: int, port: int) -> float:
    guest.background(f"dd if=/dev/zero bs=64k count={nbytes >> 16} | vsock-echo send {port}")
    sock = guest.connect(port)
    buf = bytearray(1 << 20)
    total = 0
    t0 = time.perf_counter()
    with sock:
        while n := sock.recv_into(buf):
            total += n
    elapsed = time.perf_counter() - t0
    assert total == nbytes, (total, nbytes)
    return elapsed


def connect_latency(guest: Guest, count: int) -> list[float]:
    guest.background("vsock-echo serve 5000")
    guest.connect(5000).close()
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        sock, _ = connect_hybrid(guest.uds, 5000, timeout=10)
        times.append(time.perf_counter() - t0)
        sock.close()
    return times


def console_h2g(guest: Guest, nbytes: int) -> float:
    guest.console.sendall(
        f"dd if={guest.vport} bs=64k count={nbytes >> 16} iflag=fullblock of=/dev/null 2>/dev/null;"
        " echo CONH2G\n".encode()
    )
    time.sleep(0.3)  # let head open the port first
    block = b"\xa5" * (1 << 20)
    t0 = time.perf_counter()
    for _ in range(nbytes // len(block)):
        guest.port.sendall(block)
    guest.read_until(b"CONH2G\r\n", 300)
    return time.perf_counter() - t0


def console_g2h(guest: Guest, nbytes: int) -> float:
    guest.console.sendall(
        f"dd if=/dev/zero bs=64k count={nbytes >> 16} of={guest.vport} 2>/dev/null\n".encode()
    )
    buf = bytearray(1 << 20)
    total = 0
    t0 = None
    while total < nbytes:
        n = guest.port.recv_into(buf)
        if t0 is None:
            t0 = time.perf_counter()
        total += n
    assert t0 is not None
    return time.perf_counter() - t0


@contextlib.contextmanager
def busy_python() -> Any:
    """A pure-Python thread in this process, like an application doing work."""
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i * i

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def one_round(
    image: GuestImage, workdir: Path, mode: str, mib: int, console: bool
) -> dict[str, Any]:
    nbytes = mib << 20
    guest = Guest(image, workdir, mode)
    out: dict[str, Any] = {}
    try:
        gb = nbytes / 1e9
        elapsed, cpu = measure(guest, lambda: h2g(guest, nbytes, 5001))
        out["h2g_mib_s"], out["h2g_cpu_s_per_gb"] = mib / elapsed, cpu / gb
        elapsed, cpu = measure(guest, lambda: g2h(guest, nbytes, 5002))
        out["g2h_mib_s"], out["g2h_cpu_s_per_gb"] = mib / elapsed, cpu / gb
        with busy_python():
            out["h2g_busy_mib_s"] = mib / h2g(guest, nbytes, 5003)
            out["g2h_busy_mib_s"] = mib / g2h(guest, nbytes, 5004)
        lat = sorted(connect_latency(guest, 100))
        out["connect_ms_median"] = statistics.median(lat) * 1000
        out["connect_ms_p95"] = lat[int(len(lat) * 0.95)] * 1000
        with busy_python():
            lat = sorted(connect_latency(guest, 30))
        out["connect_busy_ms_median"] = statistics.median(lat) * 1000
        if console:
            out["console_h2g_mib_s"] = mib / console_h2g(guest, nbytes)
            out["console_g2h_mib_s"] = mib / console_g2h(guest, nbytes)
    finally:
        guest.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=3)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--no-console", action="store_true", help="skip the virtio-serial baseline")
    args = parser.parse_args()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"vzkit-vsock-bench-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    image = build_guest(
        "x86_64",
        out_dir=workdir / "guest",
        cache_dir=user_cache_dir() / "test-debs" / "x86_64",
        extra_files={"/bin/vsock-echo": vsock_echo()},
    )
    rounds: dict[str, list[dict[str, Any]]] = {"thread": [], "process": []}
    for i in range(args.rounds):
        for mode in ("thread", "process"):
            console = not args.no_console and mode == "thread"
            result = one_round(image, workdir, mode, args.mib, console)
            print(f"round {i + 1} {mode}: " + ", ".join(f"{k}={v:.2f}" for k, v in result.items()),
                  flush=True)  # fmt: skip
            rounds[mode].append(result)
    medians = {
        mode: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for mode, runs in rounds.items()
    }
    keys = list(medians["thread"])
    print(f"\n{'median of ' + str(args.rounds):<26}{'thread':>12}{'process':>12}")
    for key in keys:
        row = f"{key:<26}{medians['thread'][key]:>12.2f}"
        row += f"{medians['process'].get(key, float('nan')):>12.2f}"
        print(row)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"vsock-thread-vs-process-{stamp}.json"
    path.write_text(json.dumps({
        "bench": "vsock_thread_vs_process", "time": stamp, "mib": args.mib,
        "rounds": args.rounds, "host": platform.node(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "medians": medians, "raw": rounds,
    }, indent=2) + "\n")  # fmt: skip
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
