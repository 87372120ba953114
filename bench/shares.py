"""VirtioFS vs virtio-9p: one host directory served both ways to one guest, in one run.

The default guest's Debian *cloud* kernel has no 9p modules, so this benchmark builds a
bench-only variant of the default guest from Debian's *generic* kernel (``linux-image-amd64``
/ ``-arm64``, whose modules include ``9p`` and ``9pnet_virtio``): same init, same agent,
same module list, only the kernel package differs. It is cached under
``<cache>/bench-images``. The VM gets the same directory twice: tag ``vfs`` as VirtioFS (an
owned virtiofsd) and tag ``p9`` as virtio-9p (``share_device="9p:p9"``); the guest's init
mounts both (9p with ``msize=262144``). Each round runs, for both mounts in turn
(interleaved): a sequential write of ``--mib`` MiB with ``conv=fsync``, a sequential read of
it after dropping the guest's caches, and creating ``--files`` small files. Times are taken
in the guest from ``/proc/uptime`` (10 ms resolution; each step takes seconds under TCG).

    python bench/shares.py -n 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import vzkit
from vzkit._cache import user_cache_dir
from vzkit.image import GuestImage
from vzkit.image._agent_build import build_agent
from vzkit.image._deb import DebPackage
from vzkit.image._fetch import _resolve_kernel as resolve_kernel
from vzkit.image._fetch import apt_download, deb_arch, find_guest_debs
from vzkit.image._image import AGENT_GUEST_PATH, _image_key, _load
from vzkit.image._initramfs import build_guest

TAGS = {"virtiofs": "vfs", "9p": "p9"}


def generic_kernel_image(arch: str = "x86_64") -> GuestImage:
    """The default guest rebuilt on Debian's generic kernel (which has 9p), cached."""
    cache = user_cache_dir()
    debs = cache / "debs-generic" / arch
    debs.mkdir(parents=True, exist_ok=True)
    kernels = list(debs.glob("linux-image-[0-9]*.deb"))
    if not kernels:
        (meta,) = apt_download([f"linux-image-{deb_arch(arch)}"], debs, arch)
        resolve_kernel(DebPackage(meta), debs, arch)
    default_debs = find_guest_debs(cache / "debs" / arch, arch)  # busybox as the default guest
    for stale in debs.glob("busybox-static_*.deb"):
        stale.unlink()
    shutil.copy2(default_debs.busybox, debs / default_debs.busybox.name)
    picked = find_guest_debs(debs, arch)
    agent = build_agent(arch, cache / "agent", cache_dir=cache / "zig")
    target = cache / "bench-images" / f"{arch}-generic-{_image_key(picked, agent)}"
    image = _load(target)
    if image is not None:
        return image
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".generic-", dir=target.parent))
    try:
        built = build_guest(arch, out_dir=tmp, deb_dir=debs, extra_files={AGENT_GUEST_PATH: agent})
        meta = {
            "kernel": built.kernel.name,
            "initrd": built.initrd.name,
            "arch": built.arch,
            "kernel_version": built.kernel_version,
            "modules": built.modules,
            "builtin_modules": built.builtin_modules,
            "missing_modules": built.missing_modules,
        }
        (tmp / "image.json").write_text(json.dumps(meta, indent=2))
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    image = _load(target)
    assert image is not None
    return image


_TIMED = """set -e
t0=$(cut -d' ' -f1 /proc/uptime)
{body}
t1=$(cut -d' ' -f1 /proc/uptime)
echo "$t0 $t1"
"""


def _timed(vm: vzkit.VirtualMachine, body: str) -> float:
    done = vm.guest.run(["sh", "-c", _TIMED.format(body=body)], timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"guest step failed ({done.returncode}): {done.stderr.decode()}")
    t0, t1 = map(float, done.stdout.split()[-2:])
    return max(t1 - t0, 0.01)


def _round(vm: vzkit.VirtualMachine, mount: str, mib: int, files: int, n: int) -> dict[str, float]:
    big = f"{mount}/big-{n}"
    small = f"{mount}/small-{n}"
    write_s = _timed(vm, f"dd if=/dev/zero of={big} bs=1M count={mib} conv=fsync 2>/dev/null")
    vm.guest.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], timeout=120)
    read_s = _timed(vm, f"dd if={big} of=/dev/null bs=1M 2>/dev/null")
    create_s = _timed(
        vm,
        f"mkdir {small}; i=0; while [ $i -lt {files} ]; do echo x > {small}/f$i; i=$((i+1)); done",
    )
    vm.guest.run(["rm", "-rf", big, small], timeout=600)
    return {
        "write_mb_s": mib * 1.048576 / write_s,
        "read_mb_s": mib * 1.048576 / read_s,
        "create_per_s": files / create_s,
    }


def bench_shares(rounds: int, mib: int = 64, files: int = 500) -> dict[str, Any]:
    image = generic_kernel_image("x86_64")
    if any(m in image.missing_modules for m in ("9p", "9pnet_virtio")):
        return {"error": f"kernel {image.kernel_version} has no 9p modules"}
    with tempfile.TemporaryDirectory(prefix="vzkit-bench-shares-") as tmp:
        shared = Path(tmp) / "shared"
        shared.mkdir()
        cfg = vzkit.LinuxVMConfig(
            arch=image.arch,
            cpus=1,
            memory_gb=0.5,
            kernel_path=image.kernel,
            initrd_path=image.initrd,
            cmdline=image.cmdline(),
            network=vzkit.NetworkConfig(vzkit.NetworkMode.NONE),
            volumes=(vzkit.VolumeMount(shared, TAGS["virtiofs"]), vzkit.VolumeMount(shared, "p9")),
            share_device=f"9p:{TAGS['9p']}",
        )
        with vzkit.VirtualMachine(cfg, backend="qemu") as vm:
            vm.start(timeout=120)
            vm.guest.wait_ready(timeout=180)
            mounts = vm.guest.read_file("/proc/mounts").decode()
            kinds = {line.split()[1]: line.split()[2] for line in mounts.splitlines()}
            if kinds.get("/mnt/vfs") != "virtiofs" or kinds.get("/mnt/p9") != "9p":
                return {"error": f"shares not mounted as expected: {kinds}"}
            samples: dict[str, list[dict[str, float]]] = {k: [] for k in TAGS}
            for n in range(rounds):
                for kind, tag in TAGS.items():
                    samples[kind].append(_round(vm, f"/mnt/{tag}", mib, files, n))
    result: dict[str, Any] = {
        "arch": image.arch,
        "kernel": image.kernel_version,
        "rounds": rounds,
        "mib": mib,
        "files": files,
    }
    for kind, rows in samples.items():
        for key in rows[0]:
            result[f"{kind}_{key}"] = statistics.median(r[key] for r in rows)
    return result


def print_table(res: dict[str, Any]) -> None:
    if "error" in res:
        print(f"shares: not measured: {res['error']}")
        return
    print(
        f"shares ({res['arch']}, {res['kernel']}, {res['mib']} MiB, {res['files']} files, "
        f"median of {res['rounds']}):"
    )
    print(f"  {'device':<9} {'write MB/s':>11} {'read MB/s':>10} {'creates/s':>10}")
    for kind in TAGS:
        print(
            f"  {kind:<9} {res[f'{kind}_write_mb_s']:>11.1f} {res[f'{kind}_read_mb_s']:>10.1f} "
            f"{res[f'{kind}_create_per_s']:>10.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--rounds", type=int, default=3)
    parser.add_argument("--mib", type=int, default=64, help="Sequential file size.")
    parser.add_argument("--files", type=int, default=500, help="Small files created.")
    args = parser.parse_args(argv)
    res = bench_shares(args.rounds, args.mib, args.files)
    print_table(res)
    print(json.dumps(res, indent=2))
    return 0 if "error" not in res else 1


if __name__ == "__main__":
    raise SystemExit(main())
