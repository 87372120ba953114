"""vzkit benchmarks: one runner, a table on stdout and the same figures as JSON.

Every comparison is measured side by side in one run, interleaved (A, B, A, B, ...), so the
ratio holds even on a shared, noisy machine. Figures are medians.

    ./dev bench                     # all benchmarks, both arches
    ./dev bench --arch x86_64 -n 3  # fewer rounds
    ./dev bench --suite snapshots   # only the snapshot figures (bench/snapshots.py)
    ./dev bench --suite vsock       # vsock against the console port (bench/vsock.py)
    ./dev bench --suite cpu         # guest CPU models side by side (bench/cpu_models.py)
    ./dev bench --suite ports       # -p through the agent against passt/slirp (bench/ports.py)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import vzkit
from vzkit.backends.qemu._argv import cpu_model, default_cmdline
from vzkit.backends.qemu._discover import find_qemu
from vzkit.image import GuestImage
from vzkit.image._image import default_image

READY = b"VZKIT-GUEST-READY"
RESULTS = Path(__file__).parent / "results"


def wait_for(path: Path, marker: bytes, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if marker in path.read_bytes():
                return
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    raise TimeoutError(f"{marker!r} not in {path} after {timeout} s")


def guest_config(image: GuestImage, **overrides: Any) -> vzkit.LinuxVMConfig:
    """The benchmarked guest: 1 CPU, 0.5 GB, no NIC, the image's kernel and initramfs."""
    settings: dict[str, Any] = {
        "arch": image.arch,
        "cpus": 1,
        "memory_gb": 0.5,
        "kernel_path": image.kernel,
        "initrd_path": image.initrd,
        "cmdline": image.cmdline(),
        "network": vzkit.NetworkConfig(vzkit.NetworkMode.NONE),
    }
    return vzkit.LinuxVMConfig(**{**settings, **overrides})


def raw_qemu_boot(image: GuestImage, workdir: Path) -> tuple[float, float]:
    """A hand-written QEMU command line booting the same kernel and initrd."""
    arch = vzkit.Arch(image.arch)
    log = workdir / "raw-console.log"
    log.unlink(missing_ok=True)
    machine = ["-M", "q35"] if arch is vzkit.Arch.X86_64 else ["-M", "virt"]
    cpu = cpu_model(guest_config(image), "tcg")  # vzkit's default: the same guest CPU
    argv = [
        str(find_qemu(arch)), *machine, "-accel", "tcg", "-cpu", cpu,
        "-smp", "1", "-m", "512M", "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", f"file:{log}",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", f"{default_cmdline(arch)} quiet",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        wait_for(log, READY)
        ready = time.perf_counter() - t0
    finally:
        t1 = time.perf_counter()
        proc.kill()
        proc.wait()
        teardown = time.perf_counter() - t1
    return ready, teardown


def vzkit_boot(image: GuestImage, workdir: Path) -> tuple[float, float]:
    cfg = guest_config(image, entropy=False, balloon=False)  # the raw command's devices
    t0 = time.perf_counter()
    vm = vzkit.VirtualMachine(cfg, backend="qemu")
    try:
        vm.start(timeout=120)
        log = vm.console_log_path
        assert log is not None
        wait_for(log, READY)
        ready = time.perf_counter() - t0
    finally:
        t1 = time.perf_counter()
        vm.close()
        teardown = time.perf_counter() - t1
    return ready, teardown


def agent_ready(image: GuestImage, workdir: Path) -> tuple[float, float]:
    """VirtualMachine created → the agent answers (what every vm.guest call waits for)."""
    cfg = guest_config(image)
    t0 = time.perf_counter()
    with vzkit.VirtualMachine(cfg, backend="qemu") as vm:
        vm.start(timeout=120)
        vm.guest.wait_ready(timeout=120)
        ready = time.perf_counter() - t0
    return ready, 0.0


def cli_run_true(image: GuestImage, workdir: Path) -> tuple[float, float]:
    """Wall time of a whole ``vzkit run -- true`` (Python start-up and teardown included)."""
    argv = [sys.executable, "-m", "vzkit.cli", "run", "--arch", image.arch, "--network", "none"]
    t0 = time.perf_counter()
    subprocess.run([*argv, "--", "true"], check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0, 0.0


def bench_run(arch: str, rounds: int) -> dict[str, Any]:
    """The main job against a raw QEMU boot of the same kernel and initramfs."""
    image = default_image(arch)
    with tempfile.TemporaryDirectory(prefix="vzkit-bench-") as tmp:
        work = Path(tmp)
        cli_run_true(image, work)  # warm-up
        res = interleaved(
            rounds,
            {
                "raw": lambda: raw_qemu_boot(image, work),
                "agent": lambda: agent_ready(image, work),
                "run": lambda: cli_run_true(image, work),
            },
        )
    raw = res["raw"]["ready_s"]
    return {
        "arch": arch,
        "rounds": rounds,
        "raw_ready_s": raw,
        "agent_ready_s": res["agent"]["ready_s"],
        "agent_ratio": res["agent"]["ready_s"] / raw,
        "run_true_s": res["run"]["ready_s"],
        "run_ratio": res["run"]["ready_s"] / raw,
        "initramfs_bytes": image.initrd.stat().st_size,
    }


def interleaved(
    rounds: int, runs: dict[str, Callable[[], tuple[float, float]]]
) -> dict[str, dict[str, float]]:
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            samples[name].append(run())
    return {
        name: {
            "ready_s": statistics.median(s[0] for s in vals),
            "teardown_s": statistics.median(s[1] for s in vals),
            "ready_min_s": min(s[0] for s in vals),
        }
        for name, vals in samples.items()
    }


def bench_boot(arch: str, rounds: int) -> dict[str, Any]:
    image = default_image(arch)
    with tempfile.TemporaryDirectory(prefix="vzkit-bench-") as tmp:
        work = Path(tmp)
        # One warm-up of each so page cache and QEMU's first start don't bias round one.
        raw_qemu_boot(image, work)
        vzkit_boot(image, work)
        res = interleaved(
            rounds,
            {"raw": lambda: raw_qemu_boot(image, work), "vzkit": lambda: vzkit_boot(image, work)},
        )
    return {
        "arch": arch,
        "rounds": rounds,
        "raw_ready_s": res["raw"]["ready_s"],
        "vzkit_ready_s": res["vzkit"]["ready_s"],
        "ready_ratio": res["vzkit"]["ready_s"] / res["raw"]["ready_s"],
        "raw_teardown_s": res["raw"]["teardown_s"],
        "vzkit_teardown_s": res["vzkit"]["teardown_s"],
        "initramfs_bytes": image.initrd.stat().st_size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--arch", action="append", choices=["x86_64", "aarch64"])
    parser.add_argument("-n", "--rounds", type=int, default=5)
    parser.add_argument(
        "--suite",
        choices=["all", "boot", "snapshots", "shares", "vsock", "cpu", "ports"],
        default="all",
    )
    args = parser.parse_args(argv)
    arches = args.arch or ["x86_64", "aarch64"]
    report: dict[str, Any] = {}
    if args.suite in ("all", "boot"):
        report.update(boot_suite(arches, args.rounds))
    if args.suite in ("all", "snapshots"):
        sys.path.insert(0, str(Path(__file__).parent))
        from snapshots import bench_snapshots, print_snapshots

        report["snapshots"] = [bench_snapshots(arch, args.rounds) for arch in arches]
        print()
        for snap in report["snapshots"]:
            print_snapshots(snap)
    if args.suite in ("all", "shares"):  # VirtioFS vs virtio-9p (x86_64 guest only)
        sys.path.insert(0, str(Path(__file__).parent))
        from shares import bench_shares, print_table

        report["shares"] = bench_shares(min(args.rounds, 3))
        print()
        print_table(report["shares"])
    if args.suite in ("all", "cpu"):
        sys.path.insert(0, str(Path(__file__).parent))
        from cpu_models import bench_cpu_models, print_cpu_models

        report["cpu_models"] = [bench_cpu_models(arch, args.rounds) for arch in arches]
        print()
        for row in report["cpu_models"]:
            print_cpu_models(row)
    if args.suite in ("all", "vsock"):
        sys.path.insert(0, str(Path(__file__).parent))
        import vsock  # bench/vsock.py, next to this file (writes its own JSON)

        for arch in arches:
            vsock.main(["-n", str(args.rounds), "--arch", arch])
    if args.suite in ("all", "ports"):  # x86_64 guests (the guest service's build)
        sys.path.insert(0, str(Path(__file__).parent))
        import ports  # bench/ports.py, next to this file (writes its own JSON)

        ports.main(["-n", str(min(args.rounds, 3))])
    if not report:  # the vsock and ports suites write their own JSON
        return 0
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"boot-{stamp}.json"
    meta = {"when": stamp, "host": platform.node(), "python": sys.version.split()[0]}
    out.write_text(json.dumps({**meta, **report}, indent=2))
    print(f"wrote {out}")
    return 0


def boot_suite(arches: list[str], rounds: int) -> dict[str, Any]:
    rows = [bench_boot(arch, rounds) for arch in arches]

    print(f"{'arch':<8} {'raw ready':>10} {'vzkit ready':>12} {'ratio':>6} "
          f"{'raw down':>9} {'vzkit down':>11} {'initramfs':>10}")  # fmt: skip
    for r in rows:
        print(
            f"{r['arch']:<8} {r['raw_ready_s']:>9.3f}s {r['vzkit_ready_s']:>11.3f}s "
            f"{r['ready_ratio']:>6.3f} {r['raw_teardown_s']:>8.3f}s "
            f"{r['vzkit_teardown_s']:>10.3f}s "
            f"{r['initramfs_bytes'] / 1e6:>8.2f}MB"
        )
    runs = [bench_run(arch, rounds) for arch in arches]
    print()
    print(f"{'arch':<8} {'raw ready':>10} {'agent ready':>12} {'ratio':>6} "
          f"{'run -- true':>12} {'ratio':>6} {'initramfs':>10}")  # fmt: skip
    for r in runs:
        print(
            f"{r['arch']:<8} {r['raw_ready_s']:>9.3f}s {r['agent_ready_s']:>11.3f}s "
            f"{r['agent_ratio']:>6.3f} {r['run_true_s']:>11.3f}s {r['run_ratio']:>6.3f} "
            f"{r['initramfs_bytes'] / 1e6:>8.2f}MB"
        )
    return {"boot": rows, "run": runs}


if __name__ == "__main__":
    sys.exit(main())
