"""Guest-local disk throughput against the host file system it lives on, side by side.

    .venv/bin/python bench/disk.py --rounds 3 [--arch x86_64] [--mib 256]

The guest is ``--image debian`` (GNU dd; the Debian image is built first if it is not cached):
its root file system is the image with the VM's own qcow2 layer, and ``/root`` is on it, so a
file written there goes through the layer, QEMU's block layer and the host file system the
layer lives on. The host side writes and reads a file in that very directory (the VM's state
directory) with the same ``dd`` flags. Writes are ``oflag=direct conv=fsync``, reads
``iflag=direct`` with the guest's and (as root) the host's page caches dropped first: QEMU
reads its image files through the host's page cache, so without that a guest read of what it
just wrote comes from host memory. One round
is host write, guest write, host read, guest read; medians of the rounds are reported with the
ratio guest / host.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

import vzkit

_COPIED = re.compile(rb"(\d+) bytes .* copied, ([0-9.]+) s")


def _rate(stderr: bytes) -> float:
    """MiB/s from GNU dd's last line."""
    found = _COPIED.search(stderr)
    if found is None:
        raise RuntimeError(f"no dd figures in {stderr!r}")
    return int(found[1]) / float(found[2]) / (1 << 20)


def _dd_write(path: str, mib: int) -> list[str]:
    return ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "oflag=direct",
            "conv=fsync"]  # fmt: skip


def _dd_read(path: str) -> list[str]:
    return ["dd", f"if={path}", "of=/dev/null", "bs=1M", "iflag=direct"]


def _drop_host_cache() -> None:
    """Drop the host's page cache (as root; elsewhere the guest's reads may be cached)."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arch", default="x86_64")
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    vzkit.build_debian_image("debian", arch=args.arch)
    rates: dict[str, list[float]] = {k: [] for k in ("host write", "guest write", "host read",
                                                     "guest read")}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="vzkit-disk-bench-", dir=Path.home()) as tmp:
        state = Path(tmp) / "vm"
        cfg = vzkit.default_guest_config(args.arch, image="debian", state_dir=state)
        host_file = str(state / "host-bench")
        with vzkit.VirtualMachine(cfg, backend="qemu") as vm:
            vm.start(timeout=120)
            vm.guest.wait_ready(timeout=300)
            for n in range(args.rounds):
                done = subprocess.run(_dd_write(host_file, args.mib), capture_output=True)
                rates["host write"].append(_rate(done.stderr))
                got = vm.guest.run(_dd_write("/root/bench", args.mib), check=True, timeout=600)
                rates["guest write"].append(_rate(got.stderr))
                done = subprocess.run(_dd_read(host_file), capture_output=True)
                rates["host read"].append(_rate(done.stderr))
                vm.guest.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)
                _drop_host_cache()  # QEMU reads the layer through the host's page cache
                got = vm.guest.run(_dd_read("/root/bench"), check=True, timeout=600)
                rates["guest read"].append(_rate(got.stderr))
                print(f"round {n}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()),
                      "MiB/s", flush=True)  # fmt: skip
            vm.stop(timeout=30)
    med = {k: statistics.median(v) for k, v in rates.items()}
    for kind in ("write", "read"):
        guest, host = med[f"guest {kind}"], med[f"host {kind}"]
        print(f"{kind}: guest {guest:.0f} MiB/s, host {host:.0f} MiB/s, guest/host "
              f"{guest / host:.2f} ({args.mib} MiB, {args.rounds} rounds, medians)")  # fmt: skip


if __name__ == "__main__":
    main()
