"""Pulling an OCI image from a local registry: vzkit (pull + convert) against ``skopeo copy``.

    .venv/bin/python bench/oci.py --rounds 5 [--random-mib 40] [--warm 20]

The image (~100 MB compressed) is the Debian test image of ``tests/support/oci_debian.py``
(mmdebstrap minbase + umoci, built and cached on first use, as root) plus one layer of
``--random-mib`` MiB of random bytes (gzip cannot shrink them), served by Debian's
``docker-registry`` on 127.0.0.1 (``tests/support/registry.py``). Each round pulls it cold
both ways, in turn (the first of the two alternates between rounds, so a machine that slows
down favours neither): vzkit into an empty cache (download, verify, unpack the layers, build
the root disk) and ``skopeo copy docker://... oci:DIR`` into an empty layout (download,
verify). Three more contenders show where the time goes: vzkit's pull alone (the part that
does what skopeo copy does), the same end reached with real tools (``skopeo copy``,
``umoci unpack``, ``mkfs.ext4 -d``), and the least any converter does beyond ``skopeo copy``:
``skopeo copy`` then ``gzip -dc`` of each layer into /dev/null (decompression in C, nothing
written) -- its ratio to ``skopeo copy`` is a floor for the goal's ratio. Medians, bytes on
disk, and the ratios (vzkit / skopeo copy: goal <= 1.5x) are printed.

Then the start-up a cached image adds, ``--warm`` times each: the same pull again with
everything cached (it still asks the registry for the tag), ``resolve_oci_image`` (what
``vzkit run --image`` does: a cached registry image asks nothing; goal <= 50 ms), and
``vzkit.default_guest_config(image=REF)`` against
``default_guest_config()`` (the built default image) -- the latter in vzkit's own cache, where
the root disk is removed afterwards and the blobs (~100 MB) stay.

Every call into vzkit's OCI API is in :func:`pull_and_convert`, :func:`resolve_cached` and
:func:`image_config`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo: tests.support

from tests.support.oci_debian import DebianOciImage, debian_oci_image
from tests.support.registry import LocalRegistry, local_registry

import vzkit
from vzkit.image.oci import find_oci_image, pull_image, remove_oci_image, resolve_oci_image

TAG = "bench"


def pull_and_convert(ref: str, cache_dir: Path | None) -> str:
    """vzkit's pull + convert of ``ref`` into ``cache_dir`` (vzkit's own when ``None``)."""
    image = pull_image(ref, arch="x86_64", insecure=True, cache_dir=cache_dir)
    return f"pull + convert ({image.digest[:19]})"


def resolve_cached(ref: str, cache_dir: Path | None) -> str:
    """What ``vzkit run --image REF`` does to find the image (a cached registry image: no
    registry asked)."""
    resolve_oci_image(ref, arch="x86_64", insecure=True, cache_dir=cache_dir)
    return "resolve_oci_image"


def image_config(ref: str | None) -> Any:
    """``default_guest_config`` for the OCI image ``ref`` (``None``: the default image)."""
    if ref is None:
        return vzkit.default_guest_config("x86_64")
    return vzkit.default_guest_config("x86_64", image=ref, insecure_registry=True)


def forget(ref: str) -> None:
    """Remove the root disk :func:`image_config` left in vzkit's own cache (its blobs stay)."""
    found = find_oci_image(ref, arch="x86_64")
    if found is not None:
        remove_oci_image(found)


def bench_image(base: DebianOciImage, work: Path, mib: int) -> Path:
    """A layout whose ``bench`` image is the Debian test image plus a layer of ``mib`` MiB of
    random bytes (``umoci insert``)."""
    layout = work / "layout"
    tool("skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{base.layout}:1",
         f"oci:{layout}:{TAG}")  # fmt: skip
    payload = work / "payload"
    payload.mkdir()
    with open(payload / "random.bin", "wb") as out:
        for _ in range(mib):
            out.write(os.urandom(1 << 20))
    tool("umoci", "insert", "--image", f"{layout}:{TAG}", payload, "/opt/payload")
    shutil.rmtree(payload)
    return layout


def tool(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, timeout=600, stdin=subprocess.DEVNULL)


def tree_bytes(path: Path) -> int:
    """Bytes allocated on disk (a sparse root disk counts what it uses)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def vzkit_pull_only(ref: str, cache_dir: Path) -> None:
    """vzkit's pull half alone (download and verify into the blob store; nothing unpacked)."""
    from vzkit.image.oci._pull import pull

    pull(ref, platform="linux/amd64", cache_dir=cache_dir, insecure=True)


def skopeo_copy(ref: str, dest: Path) -> None:
    tool("skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false", ref,
         f"oci:{dest / 'layout'}:1")  # fmt: skip


def skopeo_umoci_mkfs(ref: str, dest: Path) -> None:
    """The same end with the real tools: ``skopeo copy``, ``umoci unpack`` (keeping owners as
    root, ``--rootless`` otherwise), ``mkfs.ext4 -d`` of the tree into a sparse file."""
    skopeo_copy(ref, dest)
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    tool("umoci", "unpack", *rootless, "--image", f"{dest / 'layout'}:1", dest / "bundle")
    tree = dest / "bundle" / "rootfs"
    used = int(subprocess.run(["du", "-sb", str(tree)], capture_output=True, text=True,
                              check=True).stdout.split()[0])  # fmt: skip
    image = dest / "root.img"
    with open(image, "wb") as out:
        out.truncate(used * 3 // 2 + (256 << 20))
    tool("mkfs.ext4", "-q", "-d", tree, image)


def skopeo_gunzip(ref: str, dest: Path) -> None:
    """``skopeo copy``, then every gzip layer decompressed by ``gzip -dc`` into /dev/null: what
    any converter must do at the least (it cannot unpack a layer it has not decompressed)."""
    skopeo_copy(ref, dest)
    for blob in sorted((dest / "layout" / "blobs" / "sha256").iterdir()):
        with open(blob, "rb") as fh:
            if fh.read(2) != b"\x1f\x8b":
                continue  # a manifest or config
        with open(blob, "rb") as fh:
            subprocess.run(["gzip", "-dc"], stdin=fh, stdout=subprocess.DEVNULL, check=True)


def cold_rounds(reg: LocalRegistry, work: Path, rounds: int) -> dict[str, list[float]]:
    """Each contender into an empty directory, in turn (the order rotates every round)."""
    ref = f"docker://{reg.host}/{TAG}:1"
    what = ""

    def vzkit(dest: Path) -> None:
        nonlocal what
        what = pull_and_convert(ref, dest)

    contenders: dict[str, Callable[[Path], None]] = {
        "vzkit": vzkit,
        "vzkit pull only": lambda dest: vzkit_pull_only(ref, dest),
        "skopeo copy": lambda dest: skopeo_copy(ref, dest),
        "skopeo+umoci+mkfs": lambda dest: skopeo_umoci_mkfs(ref, dest),
        "skopeo+gunzip": lambda dest: skopeo_gunzip(ref, dest),
    }
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    disk: dict[str, int] = {}
    for n in range(rounds):
        order = names[n % len(names) :] + names[: n % len(names)]
        for name in order:
            dest = work / f"cold-{n}"
            dest.mkdir()
            seconds, _ = timed(lambda: contenders[name](dest))  # noqa: B023 (called at once)
            times[name].append(seconds)
            disk[name] = tree_bytes(dest)
            shutil.rmtree(dest)
        print(f"round {n}: " + ", ".join(f"{k} {times[k][-1]:.2f} s" for k in names), flush=True)
    print(f"vzkit ran: {what}")
    for name, values in times.items():
        rounded = [round(v, 2) for v in values]
        print(f"{name:<18} median {statistics.median(values):6.2f} s, on disk "
              f"{disk[name] / 1e6:7.1f} MB, all {rounded}")  # fmt: skip
    median = {name: statistics.median(values) for name, values in times.items()}
    for a, b, goal in [
        ("vzkit", "skopeo copy", " (goal <= 1.5x)"),
        ("vzkit", "skopeo+umoci+mkfs", ""),
        ("vzkit pull only", "skopeo copy", ""),
        ("skopeo+gunzip", "skopeo copy", " (the floor of any converter)"),
    ]:
        print(f"{a} / {b}: {median[a] / median[b]:.2f}x{goal}")
    return times


def warm(reg: LocalRegistry, work: Path, count: int, *, guest_config: bool) -> None:
    ref = f"docker://{reg.host}/{TAG}:1"
    cache = work / "warm"
    first, what = timed(lambda: pull_and_convert(ref, cache))
    values = [timed(lambda: pull_and_convert(ref, cache))[0] for _ in range(count)]
    print(f"cached {what}: median {statistics.median(values) * 1000:.1f} ms "
          f"(first, cold: {first:.2f} s)")  # fmt: skip
    values = [timed(lambda: resolve_cached(ref, cache))[0] for _ in range(count)]
    print(f"cached resolve_oci_image (run --image): median "
          f"{statistics.median(values) * 1000:.1f} ms (goal <= 50 ms)")  # fmt: skip
    if not guest_config:
        return
    try:
        image_config(ref)  # converts into vzkit's own cache (not timed)
    except (TypeError, vzkit.errors.VzkitError) as err:  # no OCI references there yet
        print(f"default_guest_config(image=REF): not available yet ({err})")
        return
    try:
        pairs = [(timed(lambda: image_config(None))[0], timed(lambda: image_config(ref))[0])
                 for _ in range(count)]  # fmt: skip
    finally:
        forget(ref)
    base = statistics.median(p[0] for p in pairs)
    oci = statistics.median(p[1] for p in pairs)
    print(f"default_guest_config: default image {base * 1000:.1f} ms, image=REF "
          f"{oci * 1000:.1f} ms, added {(oci - base) * 1000:.1f} ms (goal <= 50 ms)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--random-mib", type=int, default=40)
    parser.add_argument("--warm", type=int, default=20, help="cached pulls timed")
    parser.add_argument(
        "--no-guest-config", action="store_true",
        help="leave out default_guest_config(image=REF) (which uses vzkit's own cache)",
    )  # fmt: skip
    args = parser.parse_args()
    t0 = time.perf_counter()
    base = debian_oci_image()
    print(f"Debian test image (cached unless built now): {time.perf_counter() - t0:.1f} s; "
          f"its build: {base.build['seconds']}")  # fmt: skip
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vzkit-bench-oci-")))
        layout = bench_image(base, work, args.random_mib)
        reg = stack.enter_context(local_registry())
        reg.push(f"oci:{layout}:{TAG}", f"{TAG}:1")
        shutil.rmtree(layout)
        blobs = tree_bytes(reg.root / "data")
        print(f"image in the registry: {blobs / 1e6:.1f} MB (compressed layers, config, manifest)")
        cold_rounds(reg, work, args.rounds)
        warm(reg, work, args.warm, guest_config=not args.no_guest_config)


if __name__ == "__main__":
    main()
