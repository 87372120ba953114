"""Boot → agent ready, two source trees side by side: one run of each in turn, N rounds.

    .venv/bin/python bench/ab_boot.py --old /tmp/old/src --new src --rounds 16

Each run is a fresh Python process (as each ``vzkit run`` is) with the tree's ``src`` first on
``PYTHONPATH``; it boots the benchmarked guest of ``bench/run.py`` (the tree's own image),
and prints how long ``start()`` took, when the agent answered, and the guest's own uptime at
that point (the difference is host-side time). Alternating the trees keeps a machine that
slows down or speeds up during the run from favouring one of them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ONE_RUN = """
import json, time
import vzkit
try:
    from vzkit.image._image import default_image
except ImportError:  # a tree from before vzkit.image (vzkit.guest)
    from vzkit.guest._image import default_image
image = default_image({arch!r})
cfg = vzkit.LinuxVMConfig(  # bench/run.py's guest_config, which both trees can build
    arch=image.arch, cpus=1, memory_gb=0.5, kernel_path=image.kernel, initrd_path=image.initrd,
    cmdline=image.cmdline(), network=vzkit.NetworkConfig(vzkit.NetworkMode.NONE),
)
VM = vzkit.VirtualMachine  # imported before the clock starts
t = time.monotonic()
with VM(cfg, backend="qemu") as vm:
    vm.start(timeout=120)
    started = time.monotonic() - t
    vm.guest.wait_ready(timeout=120)
    ready = time.monotonic() - t
    uptime = float(vm.guest.run(["cat", "/proc/uptime"]).stdout.split()[0])
    vm.stop(timeout=30)
print(json.dumps({{"start": started, "ready": ready, "uptime": uptime}}))
"""


def one_run(src: Path, arch: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    code = ONE_RUN.format(arch=arch)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="the old tree's src directory")
    parser.add_argument("--new", type=Path, required=True, help="the new tree's src directory")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--arch", default="x86_64")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for round_ in range(args.rounds):
        for name in ("old", "new"):
            result = one_run(getattr(args, name).resolve(), args.arch)
            runs[name].append(result)
            figures = " ".join(f"{k}={v:.3f}" for k, v in result.items())
            print(f"round {round_ + 1} {name}: {figures}")
    print()
    for name, results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in ("start", "ready", "uptime")}
        host = statistics.median(r["ready"] - r["uptime"] for r in results)
        print(
            f"{name}: start {med['start']:.3f} s, agent ready {med['ready']:.3f} s, "
            f"guest uptime {med['uptime']:.3f} s, host side {host:.3f} s (medians)"
        )
    slower = sum(n["ready"] > o["ready"] for o, n in zip(runs["old"], runs["new"], strict=True))
    ratio = statistics.median(r["ready"] for r in runs["new"]) / statistics.median(
        r["ready"] for r in runs["old"]
    )
    print(f"new/old agent ready: {ratio:.3f}; new slower in {slower} of {args.rounds} rounds")


if __name__ == "__main__":
    main()
