"""Snapshot benchmarks (called by bench/run.py, or alone: ``python bench/snapshots.py``).

* restore → agent ready vs cold boot → agent ready (interleaved; goal: ratio ≤ 0.25)
* save time and state file size vs guest RAM (idle guest, and with 128 MiB of it written)
* 4 VMs started from one snapshot vs 4 booted, side by side (to all agents ready)
* capturing a disk: sparse copy vs ``qemu-img convert`` vs a qcow2 overlay
* the checksums a save records and a restore checks: throughput on the state file and on a
  sparse disk (page cache hot, and cold: the file's pages dropped with ``posix_fadvise``),
  and restore → agent ready with the check vs without it (a bench-only switch), interleaved
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import vzkit
from vzkit._diskcopy import copy_disk_sync, nonzero_digest_fd, sha256_fd
from vzkit.image import GuestImage
from vzkit.image._image import default_image
from vzkit.snapshots import _ops

MIB = 1 << 20


def _config(image: GuestImage, work: Path, name: str, **overrides: Any) -> vzkit.LinuxVMConfig:
    settings: dict[str, Any] = {
        "arch": image.arch,
        "cpus": 1,
        "memory_gb": 0.5,
        "kernel_path": image.kernel,
        "initrd_path": image.initrd,
        "cmdline": image.cmdline(),
        "network": vzkit.NetworkConfig(vzkit.NetworkMode.NONE),
        "state_dir": work / name,
    }
    return vzkit.LinuxVMConfig(**{**settings, **overrides})


def cold_agent_ready(cfg: vzkit.LinuxVMConfig) -> float:
    t0 = time.perf_counter()
    with vzkit.VirtualMachine(cfg, backend="qemu") as vm:
        vm.start(timeout=120)
        vm.guest.wait_ready(timeout=120)
        return time.perf_counter() - t0


def restore_agent_ready(cfg: vzkit.LinuxVMConfig, manager: vzkit.SnapshotManager) -> float:
    t0 = time.perf_counter()
    with vzkit.VirtualMachine(cfg, backend="qemu") as vm:
        manager.restore(vm, "bench", timeout=120)
        vm.resume()  # steps the guest clock through the agent
        vm.guest.wait_ready(timeout=120)
        return time.perf_counter() - t0


def _no_digests(opened: Any, name: str, abort: threading.Event) -> None:
    """Bench only: a restore's file check minus reading the files for their checksums."""


@contextlib.contextmanager
def no_checksums() -> Iterator[None]:
    with mock.patch.object(_ops, "check_digests", _no_digests):
        yield


def hash_rate(path: Path, digest: Callable[[int], tuple[str, int]], cold: bool) -> dict[str, float]:
    """Seconds and MB/s of ``digest`` over ``path`` (its size; a sparse file's holes count)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if cold:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        _, size = digest(fd)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
    return {"s": seconds, "mb_s": size / seconds / 1e6, "bytes": size}


def checksum_rates(state: Path, work: Path, data_mib: int = 256) -> dict[str, dict[str, float]]:
    """The state file (SHA-256) and a 2 GiB raw disk holding ``data_mib`` MiB (the non-zero
    block digest, and plain SHA-256 of the whole file for comparison)."""
    disk = work / "hash-disk.raw"
    _sparse_disk(disk, data_mib)
    out = {}
    for label, path, digest in (
        ("state_sha256", state, sha256_fd),
        ("disk_nonzero", disk, nonzero_digest_fd),
        ("disk_plain_sha256", disk, sha256_fd),
    ):
        for cold in (True, False):
            out[f"{label}_{'cold' if cold else 'hot'}"] = hash_rate(path, digest, cold)
    disk.unlink()
    return out


def _sparse_disk(path: Path, data_mib: int) -> None:
    with open(path, "wb") as fh:
        fh.truncate(2 << 30)
        chunk = bytes(range(256)) * (MIB // 256)
        for i in range(data_mib):
            fh.seek(i * 8 * MIB)  # spread out, as a file system would
            fh.write(chunk)


def make_snapshot(
    cfg: vzkit.LinuxVMConfig, manager: vzkit.SnapshotManager, name: str, fill_mib: int = 0
) -> tuple[float, int]:
    """Boot, optionally write ``fill_mib`` MiB of non-zero data into the guest's tmpfs, save."""
    with vzkit.VirtualMachine(cfg, backend="qemu") as vm:
        vm.start(timeout=120)
        vm.guest.wait_ready(timeout=120)
        if fill_mib:
            script = f"yes vzkit | head -c {fill_mib * MIB} > /tmp/fill"
            vm.guest.run(["sh", "-c", script], timeout=300, check=True)
        t0 = time.perf_counter()
        meta = manager.save(vm, name, timeout=300, progress=lambda d, t: None)
        return time.perf_counter() - t0, meta.size


def _parallel(jobs: list[Callable[[], object]]) -> float:
    errors: list[BaseException] = []

    def run(job: Callable[[], object]) -> None:
        try:
            job()
        except BaseException as err:  # reported below
            errors.append(err)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def four_at_once(image: GuestImage, work: Path, manager: vzkit.SnapshotManager) -> dict[str, float]:
    vms: list[vzkit.VirtualMachine] = []
    try:

        def boot(i: int) -> Callable[[], None]:
            def job() -> None:
                vm = vzkit.VirtualMachine(_config(image, work, f"boot4-{i}"), backend="qemu")
                vms.append(vm)
                vm.start(timeout=300)
                vm.guest.wait_ready(timeout=300)

            return job

        def restore(i: int) -> Callable[[], None]:
            def job() -> None:
                vm = vzkit.VirtualMachine(_config(image, work, f"restore4-{i}"), backend="qemu")
                vms.append(vm)
                manager.restore(vm, "bench", timeout=300)
                vm.resume()
                vm.guest.wait_ready(timeout=300)

            return job

        booted = _parallel([boot(i) for i in range(4)])
        for vm in vms:
            vm.close()
        vms.clear()
        restored = _parallel([restore(i) for i in range(4)])
    finally:
        for vm in vms:
            vm.close()
    return {"boot4_s": booted, "restore4_s": restored, "ratio": restored / booted}


def disk_capture(work: Path, data_mib: int = 256) -> dict[str, float]:
    """Capturing a 2 GiB raw disk holding ``data_mib`` MiB: the options measured."""
    src = work / "disk.raw"
    _sparse_disk(src, data_mib)
    subprocess.run(["sync"], check=True)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    method = copy_disk_sync(src, work / "copy.raw")
    out[f"copy_{method}_s"] = time.perf_counter() - t0
    qemu_img = shutil.which("qemu-img")
    if qemu_img:
        t0 = time.perf_counter()
        subprocess.run(
            [qemu_img, "convert", "-O", "raw", str(src), str(work / "conv.raw")], check=True
        )
        out["qemu_img_convert_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        argv = [qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(src)]
        subprocess.run([*argv, str(work / "overlay.qcow2")], check=True)
        out["qcow2_overlay_s"] = time.perf_counter() - t0
    return out


def bench_snapshots(arch: str, rounds: int) -> dict[str, Any]:
    image = default_image(arch)
    with tempfile.TemporaryDirectory(prefix="vzkit-bench-snap-") as tmp:
        work = Path(tmp)
        manager = vzkit.SnapshotManager(work / "vm")
        make_snapshot(_config(image, work, "origin"), manager, "bench")
        cold, warm, unchecked = [], [], []
        cold_agent_ready(_config(image, work, "warm-up"))
        for i in range(rounds):
            cold.append(cold_agent_ready(_config(image, work, f"cold{i}")))
            warm.append(restore_agent_ready(_config(image, work, f"warm{i}"), manager))
            with no_checksums():
                cfg = _config(image, work, f"unchecked{i}")
                unchecked.append(restore_agent_ready(cfg, manager))
        hashes = checksum_rates(manager.state_path("bench"), work)
        sizes = []
        for memory_gb in (0.5, 1.0, 2.0):
            for fill in (0, 128):
                cfg = _config(image, work, f"ram{memory_gb}-{fill}", memory_gb=memory_gb)
                save_s, size = make_snapshot(cfg, manager, f"ram-{memory_gb}-{fill}", fill)
                sizes.append(
                    {"memory_gb": memory_gb, "written_mib": fill, "save_s": save_s, "bytes": size}
                )
                manager.delete(f"ram-{memory_gb}-{fill}")
        fleet = four_at_once(image, work, manager)
        disks = disk_capture(work)
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    unchecked_s = statistics.median(unchecked)
    return {
        "arch": arch,
        "rounds": rounds,
        "cold_agent_ready_s": cold_s,
        "restore_agent_ready_s": warm_s,
        "restore_ratio": warm_s / cold_s,
        "restore_unchecked_agent_ready_s": unchecked_s,
        "restore_checked_vs_unchecked": warm_s / unchecked_s,
        "checksums": hashes,
        "save_vs_ram": sizes,
        "four": fleet,
        "disk_capture": disks,
    }


def print_snapshots(r: dict[str, Any]) -> None:
    print(
        f"{r['arch']}: cold boot → agent {r['cold_agent_ready_s']:.3f}s, restore → agent "
        f"{r['restore_agent_ready_s']:.3f}s, ratio {r['restore_ratio']:.3f} (goal ≤ 0.25)"
    )
    print(
        f"  restore → agent without the checksum check {r['restore_unchecked_agent_ready_s']:.3f}s"
        f" (with/without {r['restore_checked_vs_unchecked']:.3f})"
    )
    for label, h in r["checksums"].items():
        print(f"  checksum {label:<24} {h['bytes'] / MIB:>7.0f} MiB {h['s']:>6.3f}s "
              f"{h['mb_s']:>7.0f} MB/s")  # fmt: skip
    print(f"  {'guest RAM':>9} {'written':>8} {'save':>7} {'state file':>11}")
    for s in r["save_vs_ram"]:
        print(
            f"  {s['memory_gb']:>7.1f}GB {s['written_mib']:>6}MiB {s['save_s']:>6.3f}s "
            f"{s['bytes'] / MIB:>8.1f}MiB"
        )
    f = r["four"]
    print(
        f"  4 VMs to agent ready: booted {f['boot4_s']:.2f}s, restored {f['restore4_s']:.2f}s "
        f"(ratio {f['ratio']:.3f})"
    )
    print("  disk capture (2 GiB raw, 256 MiB data): " + ", ".join(
        f"{k} {v:.3f}s" for k, v in r["disk_capture"].items()
    ))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="x86_64", choices=["x86_64", "aarch64"])
    parser.add_argument("-n", "--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    result = bench_snapshots(args.arch, args.rounds)
    print_snapshots(result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
