"""Published ports: the guest agent's forwarder against QEMU's own (passt, slirp), side by side.

Two default-image guests under QEMU, one after the other, each on the ``nat`` network with a
port published natively (guest 1: passt, guest 2: slirp's ``hostfwd``, passt hidden from
vzkit), and the same guest port published a second time through the agent: a
:class:`vzkit._portfwd.PortForwarder` of the VM's own core, as the core makes for ``-p`` where
the network publishes nothing (vz; qemu with network ``none``). One guest service
(``bench/port_service.c``, static, one connection at a time) answers both, so only the path
differs. Per round, interleaved between the two paths of a guest:

* ``connect_ms``: connect, ask, read the 2-byte answer to its end (median and p95 of
  ``--latency-samples``): what a new connection costs;
* ``up_mib_s`` / ``down_mib_s``: ``--mib`` MiB host -> guest (counted by the guest) and
  guest -> host, one connection each. A transfer that fails (reset, cut short) is counted in
  ``failed`` and left out of the medians.

Medians over the rounds go to stdout with the agent/native ratios, everything to
``bench/results/ports-<time>.json``.

    .venv/bin/python bench/ports.py -n 3          # or: ./dev bench --suite ports
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import socket
import statistics
import struct
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo: tests.support

from tests.support.guest_programs import build_static

import vzkit
from vzkit._loop import run_sync
from vzkit._vmcore import core_of
from vzkit.backends.qemu import _passt

RESULTS = Path(__file__).parent / "results"
SERVICE = Path(__file__).parent / "port_service.c"
GUEST_PORT = 8000


def build_service() -> Path:
    """port_service.c for x86_64 guests (cached by source hash)."""
    return build_static(SERVICE, "port-service")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def recv_all(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(1 << 20):
        parts.append(chunk)
    return b"".join(parts)


def hello(port: int) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"h")
        answer = recv_all(s)
    elapsed = time.perf_counter() - t0
    if answer != b"hi":
        raise RuntimeError(f"port {port}: answered {answer!r}")
    return elapsed


def upload(port: int, payload: bytes) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(b"u")
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        count = recv_all(s)
    elapsed = time.perf_counter() - t0
    if count != struct.pack("<Q", len(payload)):
        raise RuntimeError(f"port {port}: the guest counted {count!r} of {len(payload)} bytes")
    return len(payload) / elapsed / (1 << 20)


def download(port: int, nbytes: int) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(b"d" + struct.pack("<Q", nbytes))
        got = 0
        while chunk := s.recv(1 << 20):
            got += len(chunk)
    elapsed = time.perf_counter() - t0
    if got != nbytes:
        raise RuntimeError(f"port {port}: {got} of {nbytes} bytes")
    return nbytes / elapsed / (1 << 20)


def wait_serving(port: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            hello(port)
            return
        except (OSError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # poll interval: the guest service starts


@contextlib.contextmanager
def guest(native: str, service: bytes) -> Iterator[dict[str, int]]:
    """A guest with the service, its port published natively (``native``) and through the
    agent; the host ports by path name."""
    ports = {native: free_port(), "agent": free_port()}
    cfg = vzkit.default_guest_config(
        memory_gb=1,
        network=vzkit.NetworkConfig(vzkit.NetworkMode.NAT),
        publish=(vzkit.parse_port_spec(f"{ports[native]}:{GUEST_PORT}"),),
    )
    hidden = _passt.find_passt
    if native == "slirp":
        _passt.find_passt = lambda: None  # type: ignore[assignment]  # vzkit falls back to slirp
    try:
        with vzkit.VirtualMachine(cfg, backend="qemu") as vm:
            vm.start(timeout=120)
            vm.guest.wait_ready(timeout=180)
            vm.guest.write_file("/tmp/port-service", service, mode=0o755)
            vm.guest.run(
                ["sh", "-c", f"/tmp/port-service {GUEST_PORT} </dev/null >/dev/null 2>&1 &"],
                check=True,
            )
            from vzkit._portfwd import PortForwarder

            forwarder = PortForwarder(core_of(vm))  # what the core does for -p without NAT
            forwarder.open((vzkit.parse_port_spec(f"{ports['agent']}:{GUEST_PORT}"),))
            run_sync(forwarder.serve())
            try:
                for port in ports.values():
                    wait_serving(port)
                yield ports
            finally:
                run_sync(forwarder.aclose())
                vm.stop(timeout=60)
    finally:
        _passt.find_passt = hidden  # type: ignore[assignment]


def one_round(ports: dict[str, int], payload: bytes, samples: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {name: {} for name in ports}
    latencies: dict[str, list[float]] = {name: [] for name in ports}
    for _ in range(samples):  # interleaved
        for name, port in ports.items():
            latencies[name].append(hello(port) * 1000)
    for name, port in ports.items():
        out[name]["failed"] = 0.0
        for key, transfer in (
            ("up_mib_s", lambda port=port: upload(port, payload)),
            ("down_mib_s", lambda port=port: download(port, len(payload))),
        ):
            try:
                out[name][key] = transfer()
            except (OSError, RuntimeError) as err:  # counted, left out of the medians
                print(f"{name}: {key} failed: {err}", file=sys.stderr, flush=True)
                out[name][key] = math.nan
                out[name]["failed"] += 1
    for name, values in latencies.items():
        values.sort()
        out[name]["connect_ms"] = statistics.median(values)
        out[name]["connect_p95_ms"] = values[int(len(values) * 0.95) - 1]
    return out


def _medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Medians over the rounds of every figure that did not fail; ``failed``: their sum."""
    out = {"failed": sum(r["failed"] for r in rounds)}
    for key in rounds[0]:
        if key != "failed":
            values = [r[key] for r in rounds if not math.isnan(r[key])]
            out[key] = statistics.median(values) if values else math.nan
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=3)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--latency-samples", type=int, default=30)
    parser.add_argument(
        "--native", nargs="+", default=["passt", "slirp"], choices=["passt", "slirp"]
    )
    args = parser.parse_args(argv)
    if platform.machine() != "x86_64":
        print("bench/ports.py builds its guest service for x86_64 guests only", file=sys.stderr)
        return 2
    payload = os.urandom(args.mib << 20)
    service = build_service().read_bytes()
    results: dict[str, Any] = {}
    for native in args.native:
        if native == "passt" and _passt.find_passt() is None:
            print("passt is not installed: skipping the passt guest", file=sys.stderr)
            continue
        rounds = []
        with guest(native, service) as ports:
            for i in range(args.rounds):
                rounds.append(one_round(ports, payload, args.latency_samples))
                print(f"{native} guest, round {i + 1}: {json.dumps(rounds[-1])}", flush=True)
        med = {name: _medians([r[name] for r in rounds]) for name in rounds[0]}
        results[native] = {"medians": med, "raw": rounds}
    print(f"\n{args.mib} MiB per transfer, medians of {args.rounds} rounds:")
    print(f"{'path':<18} {'up MiB/s':>9} {'down MiB/s':>11} {'connect ms':>11} {'p95 ms':>8} "
          f"{'failed':>6}")  # fmt: skip
    for native, res in results.items():
        med = res["medians"]
        for name in (native, "agent"):
            m = med[name]
            label = name if name != "agent" else f"agent ({native} guest)"
            print(f"{label:<18} {m['up_mib_s']:>9.1f} {m['down_mib_s']:>11.1f} "
                  f"{m['connect_ms']:>11.2f} {m['connect_p95_ms']:>8.2f} "
                  f"{int(m['failed']):>6}")  # fmt: skip
        a, n = med["agent"], med[native]
        print(f"  agent / {native}: up {a['up_mib_s'] / n['up_mib_s']:.2f}x, down "
              f"{a['down_mib_s'] / n['down_mib_s']:.2f}x, connect "
              f"{a['connect_ms'] / n['connect_ms']:.2f}x the time")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"ports-{stamp}.json"
    path.write_text(json.dumps({
        "bench": "ports", "time": stamp, "mib": args.mib, "rounds": args.rounds,
        "host": platform.node(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
        "python": platform.python_version(), "results": results,
    }, indent=2) + "\n")  # fmt: skip
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
