"""vsock against a virtio console port: throughput both ways, connect latency, CPU per GB.

One default-image guest (``vzkit.default_guest_config``, booted through ``VirtualMachine``),
one run, N rounds; in each round, interleaved, the same 64 MiB of random bytes (sha256
checked every time) go host -> guest and guest -> host over three paths:

* ``relay``: raw vsock, ``vzkit-agent relay --listen-vsock PORT --exec 'cat > FILE'`` /
  ``--exec 'cat FILE'`` on the guest side, ``vm.vsock.connect`` on the host.
* ``agent_vsock``: ``vm.guest.run(["sh", "-c", "cat > FILE"], input=...)`` /
  ``vm.guest.run(["cat", FILE])`` with ``VZKIT_AGENT_TRANSPORT=vsock``.
* ``agent_console``: the same calls with ``VZKIT_AGENT_TRANSPORT=console``: the agent's
  virtio console port (``virtserialport`` ``org.vzkit.agent.0``). **This is "the same bytes
  over a virtio console port"**: same guest, same agent, same framing, same tmpfs file at
  both ends; only the transport differs. (The console port is the agent's, so raw bytes cannot
  go over it without a second port; ``bench/vsock_thread_vs_process.py`` measures a raw
  ``virtserialport`` against raw vsock on a hand-built QEMU command line.)

With ``--base-buffer BYTES`` (default 0: the guest kernel's own 256 KiB) two more paths run
the same image with another guest vsock receive buffer (``vzkit-agent --vsock-buffer``):
``relay_base`` (the relay started with ``--vsock-buffer BYTES``) and ``agent_vsock_base`` (a
second agent, ``vzkit-agent serve --no-console --vsock-port P --vsock-buffer BYTES``,
reached with an ``AgentClient`` of its own), so a tuning and its baseline are measured in one
run, interleaved. ``--no-base`` leaves them out.

With ``--tune SPEC`` a second guest boots whose device helper runs with
``VZKIT_VSOCK_TUNE=SPEC`` (e.g. ``buf_alloc=1048576,credit_step=262144,update_delay_ms=2``,
see :mod:`vzkit.backends.qemu.vhost_vsock._helper`), and ``relay``, ``agent_vsock`` and
``agent_console`` also run there, interleaved step by step with the first guest
(``*_tuned_*``): a device tuning and its baseline in one run, each against the console port of
its own guest.

Also per round: connection setup latency (``vm.vsock.connect`` to the agent's port until the
hybrid ``OK``), median and p95; CPU seconds per GB moved of the vsock helper process and of
QEMU's busiest thread (the TCG vCPU: the guest's own cost), and the device's counters
(notifications, credit packets). Medians over the rounds go to stdout as a table, everything
to ``bench/results/vsock-<time>.json``.

    .venv/bin/python bench/vsock.py -n 3            # or: ./dev bench --suite vsock
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import vzkit
from vzkit.agent import DEFAULT_VSOCK_PORT as AGENT_PORT
from vzkit.agent import AgentClient

RESULTS = Path(__file__).parent / "results"
TICK = os.sysconf("SC_CLK_TCK")
PATHS = ("relay", "relay_base", "agent_vsock", "agent_vsock_base", "agent_console")
H2G_FILE = "/tmp/vsock-bench-h2g"
G2H_FILE = "/tmp/vsock-bench-g2h"


class Runner(Protocol):
    def run(
        self, args: list[str], *, input: bytes | None = ..., check: bool = ...
    ) -> subprocess.CompletedProcess[bytes]: ...


def proc_cpu(pid: int) -> tuple[float, float]:
    """(whole process, busiest thread) CPU seconds of ``pid``."""
    total = busiest = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / TICK
        total += seconds
        busiest = max(busiest, seconds)
    return total, busiest


class Probe:
    """CPU and device counters of one VM run, read before and after each transfer."""

    def __init__(self, vm: vzkit.VirtualMachine, stats_path: Path) -> None:
        machine: Any = vm._core.machine  # the bench looks inside: pids and the helper
        helper = machine._vsock.helper if machine._vsock is not None else None
        self.helper_pid: int | None = helper.pid if helper is not None else None
        self.qemu_pid: int = machine._proc.pid
        self.stats_path = stats_path

    def counters(self) -> dict[str, int]:
        if self.helper_pid is None:
            return {}
        mtime = self.stats_path.stat().st_mtime_ns if self.stats_path.exists() else 0
        os.kill(self.helper_pid, signal.SIGUSR1)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            if self.stats_path.exists() and self.stats_path.stat().st_mtime_ns != mtime:
                break
            time.sleep(0.005)
        data: dict[str, int] = json.loads(self.stats_path.read_text())
        return data

    def snapshot(self) -> dict[str, Any]:
        helper = proc_cpu(self.helper_pid)[0] if self.helper_pid is not None else 0.0
        return {"helper": helper, "vcpu": proc_cpu(self.qemu_pid)[1], "dev": self.counters()}

    @contextlib.contextmanager
    def measure(self, out: dict[str, Any], nbytes: int) -> Iterator[None]:
        before = self.snapshot()
        t0 = time.perf_counter()
        yield
        elapsed = time.perf_counter() - t0
        after = self.snapshot()
        gb = nbytes / 1e9
        out["mib_s"] = nbytes / elapsed / 2**20
        out["helper_cpu_s_per_gb"] = (after["helper"] - before["helper"]) / gb
        out["vcpu_s_per_gb"] = (after["vcpu"] - before["vcpu"]) / gb
        out["device"] = {
            k: v - before["dev"].get(k, 0)
            for k, v in after["dev"].items()
            if v != before["dev"].get(k, 0) and not k.startswith("bytes_")
        }


@contextlib.contextmanager
def agent_transport(vm: vzkit.VirtualMachine, name: str) -> Iterator[None]:
    """Reconnect the agent over ``name`` (``vsock`` or ``console``) for the block."""
    old = os.environ.get("VZKIT_AGENT_TRANSPORT")
    os.environ["VZKIT_AGENT_TRANSPORT"] = name
    vm.guest.close()
    try:
        vm.guest.wait_ready(timeout=60)
        yield
    finally:
        if old is None:
            os.environ.pop("VZKIT_AGENT_TRANSPORT", None)
        else:
            os.environ["VZKIT_AGENT_TRANSPORT"] = old
        vm.guest.close()


def guest_sha256(vm: vzkit.VirtualMachine, path: str) -> str:
    out = vm.guest.run(["sha256sum", path], check=True).stdout
    return out.split()[0].decode()


def connect_retry(vm: vzkit.VirtualMachine, port: int) -> socket.socket:
    """Connect once the guest relay listens (it was just started)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return vm.vsock.connect(port, timeout=10)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Bench:
    def __init__(
        self, vm: vzkit.VirtualMachine, probe: Probe, payload: bytes, base_buffer: int | None
    ) -> None:
        self.vm = vm
        self.probe = probe
        self.payload = payload
        self.digest = hashlib.sha256(payload).hexdigest()
        self.port = 5000
        self.base_buffer = base_buffer

    @contextlib.contextmanager
    def base_agent(self) -> Iterator[AgentClient]:
        """A second agent with the base buffer, for one step (it dies with the session that
        started it, so each step starts its own, on a port of its own)."""
        self.port += 1
        proc = self.vm.guest.popen(
            ["vzkit-agent", "serve", "--no-console", "--vsock-port", str(self.port),
             "--vsock-buffer", str(self.base_buffer)],
            stdin=False,
        )  # fmt: skip
        client = AgentClient(connect_retry(self.vm, self.port), timeout=30)
        try:
            yield client
        finally:
            client.close()
            proc.terminate()
            proc.wait(timeout=30)

    def _relay(self, command: str, base: bool = False) -> socket.socket:
        self.port += 1
        extra = ["--vsock-buffer", str(self.base_buffer)] if base else []
        self.vm.guest.popen(
            ["vzkit-agent", "relay", "--listen-vsock", str(self.port), "--exec", command, *extra],
            stdin=False,
        )
        return connect_retry(self.vm, self.port)

    def relay_base_h2g(self, out: dict[str, Any]) -> None:
        self.relay_h2g(out, base=True)

    def relay_base_g2h(self, out: dict[str, Any]) -> None:
        self.relay_g2h(out, base=True)

    def agent_base_h2g(self, out: dict[str, Any]) -> None:
        with self.base_agent() as client:
            self.agent_h2g(out, client)

    def agent_base_g2h(self, out: dict[str, Any]) -> None:
        with self.base_agent() as client:
            self.agent_g2h(out, client)

    def relay_h2g(self, out: dict[str, Any], base: bool = False) -> None:
        sock = self._relay(f"cat > {H2G_FILE}", base)
        view = memoryview(self.payload)
        with sock, self.probe.measure(out, len(self.payload)):
            for offset in range(0, len(view), 1 << 20):
                sock.sendall(view[offset : offset + (1 << 20)])
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""  # EOF: `cat` has written everything and exited
        self._check_h2g()

    def relay_g2h(self, out: dict[str, Any], base: bool = False) -> None:
        sock = self._relay(f"cat {G2H_FILE}", base)
        digest = hashlib.sha256()
        buf = bytearray(1 << 20)
        total = 0
        with sock, self.probe.measure(out, len(self.payload)):
            while n := sock.recv_into(buf):
                digest.update(memoryview(buf)[:n])
                total += n
        assert total == len(self.payload), (total, len(self.payload))
        assert digest.hexdigest() == self.digest, "guest -> host bytes differ"

    def agent_h2g(self, out: dict[str, Any], runner: Runner | None = None) -> None:
        guest = runner or self.vm.guest
        with self.probe.measure(out, len(self.payload)):
            guest.run(["sh", "-c", f"cat > {H2G_FILE}"], input=self.payload, check=True)
        self._check_h2g()

    def agent_g2h(self, out: dict[str, Any], runner: Runner | None = None) -> None:
        guest = runner or self.vm.guest
        with self.probe.measure(out, len(self.payload)):
            got = guest.run(["cat", G2H_FILE], check=True).stdout
        assert hashlib.sha256(got).hexdigest() == self.digest, "guest -> host bytes differ"

    def _check_h2g(self) -> None:
        assert guest_sha256(self.vm, H2G_FILE) == self.digest, "host -> guest bytes differ"
        self.vm.guest.run(["rm", "-f", H2G_FILE], check=True)

    def connect_latency(self, count: int) -> list[float]:
        """``vm.vsock.connect`` until the hybrid ``OK`` (the guest kernel's RESPONSE, sent
        before the listener's ``accept``), to the agent's port: a listener that forks
        nothing per connection, so the samples do not load the guest. 10 ms apart: the
        guest is idle between them, as it is when a tool connects."""
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            sock = self.vm.vsock.connect(AGENT_PORT, timeout=10)
            times.append(time.perf_counter() - t0)
            sock.close()
            time.sleep(0.01)
        return sorted(times)


def one_round(bench: Bench, latency_samples: int, tuned: Bench | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {}
    steps: list[tuple[str, Callable[[dict[str, Any]], None], str | None, Bench]] = []
    for way in ("h2g", "g2h"):
        for b, tag in ((bench, ""), (tuned, "_tuned")):
            if b is not None:
                steps.append((f"relay{tag}_{way}", getattr(b, f"relay_{way}"), None, b))
            if b is bench:
                steps.append((f"relay_base_{way}", getattr(b, f"relay_base_{way}"), None, b))
        for b, tag in ((bench, ""), (tuned, "_tuned")):
            if b is not None:
                steps.append((f"agent_vsock{tag}_{way}", getattr(b, f"agent_{way}"), "vsock", b))
            if b is bench:
                steps.append((f"agent_vsock_base_{way}", getattr(b, f"agent_base_{way}"), None, b))
        for b, tag in ((bench, ""), (tuned, "_tuned")):
            if b is not None:
                steps.append(
                    (f"agent_console{tag}_{way}", getattr(b, f"agent_{way}"), "console", b)
                )
    for name, step, transport, owner in steps:
        if "_base_" in name and bench.base_buffer is None:
            continue
        out: dict[str, Any] = {}
        with agent_transport(owner.vm, transport) if transport else contextlib.nullcontext():
            step(out)
        result[name] = out
    lat = bench.connect_latency(latency_samples)
    result["connect_ms"] = {
        "median": statistics.median(lat) * 1000,
        "p95": lat[min(len(lat) - 1, int(len(lat) * 0.95))] * 1000,
    }
    return result


def medians(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    keys = ("mib_s", "helper_cpu_s_per_gb", "vcpu_s_per_gb")
    out: dict[str, dict[str, float]] = {}
    for name, first in rounds[0].items():
        fields = keys if "mib_s" in first else tuple(first)
        out[name] = {k: statistics.median(r[name][k] for r in rounds) for k in fields}
    return out


def print_table(med: dict[str, dict[str, float]]) -> None:
    print(f"\n{'median':<20}{'MiB/s':>9}{'helper CPU s/GB':>17}{'guest vCPU s/GB':>17}")
    for name, row in med.items():
        if "mib_s" in row:
            print(f"{name:<20}{row['mib_s']:>9.1f}{row['helper_cpu_s_per_gb']:>17.2f}"
                  f"{row['vcpu_s_per_gb']:>17.2f}")  # fmt: skip
    lat = med["connect_ms"]
    print(f"connect latency: median {lat['median']:.2f} ms, p95 {lat['p95']:.2f} ms")
    for way in ("h2g", "g2h"):
        ratio = med[f"agent_vsock_{way}"]["mib_s"] / med[f"agent_console_{way}"]["mib_s"]
        print(f"{way}: agent over vsock / agent over the console port = {ratio:.2f}")
        if f"agent_vsock_tuned_{way}" in med:
            vs, con = med[f"agent_vsock_tuned_{way}"], med[f"agent_console_tuned_{way}"]
            tuned = vs["mib_s"] / con["mib_s"]
            print(f"{way}: tuned guest: agent over vsock / its console port = {tuned:.2f}")
        if f"agent_vsock_base_{way}" in med:
            base = med[f"agent_vsock_base_{way}"]["mib_s"] / med[f"agent_console_{way}"]["mib_s"]
            print(f"{way}: agent over vsock (base buffer) / the console port = {base:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=3)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--arch", default=None, help="guest architecture (default: the host's)")
    parser.add_argument("--latency-samples", type=int, default=50)
    parser.add_argument(
        "--base-buffer", type=int, default=0, metavar="BYTES",
        help="guest vsock buffer of the *_base paths (default 0: the kernel's 256 KiB)",
    )  # fmt: skip
    parser.add_argument("--no-base", action="store_true", help="leave out the *_base paths")
    parser.add_argument(
        "--tune", default=None, metavar="SPEC",
        help="also run a second guest whose device helper has VZKIT_VSOCK_TUNE=SPEC",
    )  # fmt: skip
    args = parser.parse_args(argv)
    # The user-space device is what this measures (the kernel one, where it works, is not ours).
    os.environ.setdefault("VZKIT_VSOCK", "user")
    nbytes = args.mib << 20
    payload = os.urandom(nbytes)
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vzkit-vsock-bench-") as tmp:
        stats_path = Path(tmp) / "device-stats.json"
        os.environ["VZKIT_VSOCK_STATS"] = str(stats_path)
        cfg = vzkit.default_guest_config(
            args.arch, memory_gb=1, network=vzkit.NetworkConfig(vzkit.NetworkMode.NONE)
        )
        with contextlib.ExitStack() as stack:
            vm = stack.enter_context(vzkit.VirtualMachine(cfg, backend="qemu"))
            vm.start(timeout=120)
            vm.guest.wait_ready(timeout=120)
            vm.guest.write_file(G2H_FILE, payload)
            probe = Probe(vm, stats_path)
            bench = Bench(vm, probe, payload, None if args.no_base else args.base_buffer)
            tuned: Bench | None = None
            if args.tune:
                tuned_stats = Path(tmp) / "device-stats-tuned.json"
                os.environ["VZKIT_VSOCK_STATS"] = str(tuned_stats)
                os.environ["VZKIT_VSOCK_TUNE"] = args.tune  # read by the helper it starts
                try:
                    vm2 = stack.enter_context(vzkit.VirtualMachine(cfg, backend="qemu"))
                    vm2.start(timeout=120)
                finally:
                    os.environ.pop("VZKIT_VSOCK_TUNE", None)
                    os.environ["VZKIT_VSOCK_STATS"] = str(stats_path)
                vm2.guest.wait_ready(timeout=120)
                vm2.guest.write_file(G2H_FILE, payload)
                tuned = Bench(vm2, Probe(vm2, tuned_stats), payload, None)
            for i in range(args.rounds):
                result = one_round(bench, args.latency_samples, tuned)
                rounds.append(result)
                summary = ", ".join(
                    f"{k}={v['mib_s']:.1f}" for k, v in result.items() if "mib_s" in v
                )
                print(f"round {i + 1}: {summary} MiB/s, "
                      f"connect {result['connect_ms']['median']:.2f} ms", flush=True)  # fmt: skip
        os.environ.pop("VZKIT_VSOCK_STATS", None)
    med = medians(rounds)
    print_table(med)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"vsock-{stamp}.json"
    path.write_text(json.dumps({
        "bench": "vsock", "time": stamp, "arch": str(cfg.arch), "mib": args.mib,
        "rounds": args.rounds, "base_buffer": None if args.no_base else args.base_buffer,
        "tune": args.tune,
        "transport": "user" if probe.helper_pid else "kernel",
        "host": platform.node(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
        "python": platform.python_version(), "medians": med, "raw": rounds,
    }, indent=2) + "\n")  # fmt: skip
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
