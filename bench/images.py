"""Boot → agent ready: the default busybox guest against ``--image debian``, side by side.

    .venv/bin/python bench/images.py --rounds 5 [--arch x86_64]

Both on the same kernel and initramfs (the Debian image is a root disk the initramfs mounts,
with a per-VM layer); one boot of each in turn, so a machine that slows down or speeds up
during the run favours neither. Builds the Debian image first if it is not cached (minutes;
timed and reported), and times a second ``build_debian_image`` (the cache hit).
"""

from __future__ import annotations

import argparse
import statistics
import time

import vzkit


def boot(cfg: vzkit.LinuxVMConfig) -> float:
    with vzkit.VirtualMachine(cfg, backend="qemu") as vm:
        t0 = time.perf_counter()
        vm.start(timeout=120)
        vm.guest.wait_ready(timeout=300)
        ready = time.perf_counter() - t0
        vm.stop(timeout=30)
    return ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--arch", default="x86_64")
    args = parser.parse_args()
    t0 = time.perf_counter()
    image = vzkit.build_debian_image("debian", arch=args.arch)
    print(f"build_debian_image (cached unless built now): {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    vzkit.build_debian_image("debian", arch=args.arch)
    print(f"cache hit: {time.perf_counter() - t0:.1f} s; image {image.name} {image.digest[:19]}")
    configs = {
        kind: vzkit.default_guest_config(args.arch, image=kind) for kind in ("default", "debian")
    }
    times: dict[str, list[float]] = {kind: [] for kind in configs}
    for n in range(args.rounds):
        for kind, cfg in configs.items():
            times[kind].append(boot(cfg))
            print(f"round {n}: {kind:<8} {times[kind][-1]:.2f} s", flush=True)
    for kind, values in times.items():
        rounded = [round(v, 2) for v in values]
        print(f"{kind:<8} median {statistics.median(values):.2f} s, all {rounded}")
    ratio = statistics.median(times["debian"]) / statistics.median(times["default"])
    print(f"debian / default: {ratio:.2f}x (goal <= 1.3x)")


if __name__ == "__main__":
    main()
