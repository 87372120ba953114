"""Named VMs: what the CLI adds to a command, and what a supervisor costs in memory.

    .venv/bin/python bench/named.py --rounds 30

One named default-image guest (``vzkit.create``, in a private ``VZKIT_HOME``), then, in
each round and interleaved (the order alternates between rounds):

* ``cli exec``: ``vzkit exec bench -- true`` as a new process (``python -m vzkit``): the
  interpreter's start, the CLI's imports, one ``exec`` request to the supervisor with the
  process's stdio as descriptors (``vzkit.exec_call``: the supervisor runs the command on its
  own agent session and writes into them), the exit;
* ``connect + run``: ``vzkit.connect("bench")`` then ``vm.guest.run(["true"])`` in this
  process (a new session each time, no interpreter start);
* ``connected run``: ``vm.guest.run(["true"])`` on a VM already connected (the baseline the
  issue names: goal, the CLI adds <= 100 ms to it).

Then memory: the proportional set size (PSS, ``/proc/PID/smaps_rollup``) of the supervisor
against the QEMU process it supervises (goal <= 10%), after the guest has answered.
Medians and p90 to stdout, everything to ``bench/results/named-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import vzkit


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Pss for {pid}")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="vzkit-bench-named-"))
    os.environ["VZKIT_HOME"] = str(home)
    cli = [sys.executable, "-m", "vzkit", "exec", "bench", "--", "true"]
    vm = vzkit.create(vzkit.default_guest_config(), "bench", timeout=180)
    try:
        vm.guest.wait_ready(timeout=180)

        # as an installed vzkit runs: from compiled bytecode (the warm-up round writes it)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

        def cli_exec() -> None:
            subprocess.run(cli, check=True, stdin=subprocess.DEVNULL, env=env)

        def connect_run() -> None:
            with vzkit.connect("bench") as other:
                other.guest.run(["true"], check=True)

        def connected_run() -> None:
            vm.guest.run(["true"], check=True)

        contenders = {
            "cli exec": cli_exec,
            "connect + run": connect_run,
            "connected run": connected_run,
        }
        for fn in contenders.values():  # warm: page cache, the agent's first exec
            fn()
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for i in range(args.rounds):
            order = list(contenders) if i % 2 == 0 else list(reversed(contenders))
            for name in order:
                times[name].append(timed(contenders[name]))
        starts = []
        for _ in range(args.rounds):
            starts.append(timed(lambda: subprocess.run([sys.executable, "-c", "pass"], env=env)))
        bare = statistics.median(starts)
        (info,) = [i for i in vzkit.list_vms() if i.name == "bench"]
        assert info.supervisor_pid is not None
        assert info.vmm_pid is not None
        sup, qemu = pss_kib(info.supervisor_pid), pss_kib(info.vmm_pid)
    finally:
        vm.stop(timeout=60)
        vm.close()
        vzkit.remove_vm("bench", force=True)
    rows = {
        name: {
            "median_ms": statistics.median(values),
            "p90_ms": sorted(values)[int(len(values) * 0.9) - 1],
        }
        for name, values in times.items()
    }
    added = rows["cli exec"]["median_ms"] - rows["connected run"]["median_ms"]
    print(f"{'':16} {'median ms':>10} {'p90 ms':>10}")
    for name, row in rows.items():
        print(f"{name:16} {row['median_ms']:10.1f} {row['p90_ms']:10.1f}")
    print(f"the CLI adds {added:.1f} ms to a connected run (goal <= 100 ms)")
    print(f"bare interpreter start: {bare:.1f} ms")
    print(
        f"PSS: supervisor {sup / 1024:.1f} MiB, QEMU {qemu / 1024:.1f} MiB, "
        f"ratio {sup / qemu:.3f} (goal <= 0.10)"
    )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"named-{stamp}.json").write_text(
        json.dumps(
            {
                "rounds": args.rounds,
                "times_ms": times,
                "rows": rows,
                "cli_added_ms": added,
                "bare_python_ms": bare,
                "pss_kib": {"supervisor": sup, "qemu": qemu},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
