"""Where the guest's time goes on vsock and on the console port: guest-side counters.

``bench/vsock.py`` says how fast each path is; this says why. It boots the default guest with
the kernel's tick profiler on (``profile=2``: ``/proc/profile`` counts the kernel's program
counter at every timer tick), then moves 64 MiB through the agent over vsock and over the
console port, both ways, interleaved, and reads around each transfer:

* ``/proc/stat``: user and system ticks, context switches (``ctxt``), interrupts;
* ``/proc/interrupts``: per device (``virtio*-virtqueues``);
* the vsock device's counters (packets, kicks and calls per ring, credit updates);
* ``/proc/profile`` mapped to ``/proc/kallsyms``: the guest kernel functions that took the
  most ticks (the modules, vsock and virtio_console among them, sit outside the kernel
  text: they are counted as ``<modules>``).

The reading goes through the agent too (a few small frames), the same for both paths.

    .venv/bin/python bench/vsock_guest.py [--arch aarch64] [-n 2] [--top 12]
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import struct
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import vzkit

sys.path.insert(0, str(Path(__file__).parent))
from vsock import G2H_FILE, Bench, Probe, agent_transport

STAT_FIELDS = ("user", "nice", "sys", "idle", "iowait", "irq", "softirq")
Symbols = tuple[list[int], list[str], int]  # sorted addresses, their names, _stext


def guest_counters(vm: vzkit.VirtualMachine) -> dict[str, int]:
    text = vm.guest.run(["cat", "/proc/stat", "/proc/interrupts"], check=True).stdout.decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "cpu":
            out.update({k: int(v) for k, v in zip(STAT_FIELDS, parts[1:8], strict=False)})
        elif parts[0] in ("ctxt", "intr"):
            out[parts[0]] = int(parts[1])
        elif parts[0].endswith(":") and len(parts) > 3 and parts[1].isdigit():
            name = parts[-1]
            if name.startswith("virtio"):
                out[f"irq {name}"] = int(parts[1])
    return out


def kernel_symbols(vm: vzkit.VirtualMachine) -> Symbols:
    text = vm.guest.run(["cat", "/proc/kallsyms"], check=True).stdout.decode()
    syms = []
    for line in text.splitlines():
        addr, kind, name = line.split()[:3]
        if kind in "tTwW":
            syms.append((int(addr, 16), name))
    syms.sort()
    stext = next(a for a, n in syms if n == "_stext")
    return [a for a, _ in syms], [n for _, n in syms], stext


def profile_hits(
    before: bytes, after: bytes, symbols: tuple[list[int], list[str], int]
) -> Counter[str]:
    """Ticks per kernel function between two reads of /proc/profile (u32 step, u32 counters;
    the last counter also takes every address past the kernel text: the modules)."""
    addrs, names, stext = symbols
    step = struct.unpack_from("<I", after)[0]
    count = (len(after) - 4) // 4
    old = struct.unpack_from(f"<{count}I", before, 4)
    new = struct.unpack_from(f"<{count}I", after, 4)
    hits: Counter[str] = Counter()
    for i, (a, b) in enumerate(zip(old, new, strict=True)):
        if b != a:
            name = (
                "<modules>"
                if i == count - 1
                else names[bisect.bisect_right(addrs, stext + i * step) - 1]
            )
            hits[name] += b - a
    return hits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--arch", default=None)
    parser.add_argument("-n", "--rounds", type=int, default=2)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    os.environ.setdefault("VZKIT_VSOCK", "user")
    payload = os.urandom(args.mib << 20)
    cfg = vzkit.default_guest_config(
        args.arch, memory_gb=1, network=vzkit.NetworkConfig(vzkit.NetworkMode.NONE)
    )
    cfg = cfg.replace(cmdline=f"{cfg.cmdline} profile=2")
    with tempfile.TemporaryDirectory(prefix="vzkit-vsock-guest-") as tmp:
        stats = Path(tmp) / "device-stats.json"
        os.environ["VZKIT_VSOCK_STATS"] = str(stats)
        with vzkit.VirtualMachine(cfg, backend="qemu") as vm:
            vm.start(timeout=120)
            vm.guest.wait_ready(timeout=120)
            vm.guest.write_file(G2H_FILE, payload)
            symbols = kernel_symbols(vm)
            bench = Bench(vm, Probe(vm, stats), payload, None)
            for _ in range(args.rounds):
                for way in ("h2g", "g2h"):
                    for transport in ("vsock", "console"):
                        out: dict[str, Any] = {}
                        with agent_transport(vm, transport):
                            before = guest_counters(vm)
                            prof0 = vm.guest.read_file("/proc/profile")
                            getattr(bench, f"agent_{way}")(out)
                            prof1 = vm.guest.read_file("/proc/profile")
                            after = guest_counters(vm)
                        delta = {k: v - before.get(k, 0) for k, v in after.items()}
                        hits = profile_hits(prof0, prof1, symbols)
                        total = sum(hits.values()) or 1
                        print(f"== agent over {transport} {way}: {out['mib_s']:.1f} MiB/s, "
                              f"guest vCPU {out['vcpu_s_per_gb']:.1f} s/GB")  # fmt: skip
                        print("   guest:", {k: v for k, v in delta.items() if v})
                        with contextlib.suppress(KeyError):
                            print("   device:", out["device"])
                        top = ", ".join(
                            f"{name} {n * 100 / total:.1f}%"
                            for name, n in hits.most_common(args.top)
                        )
                        print(f"   kernel ticks {total}: {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
