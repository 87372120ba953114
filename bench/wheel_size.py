"""What ``pip install vzkit`` costs: the wheel, and a fresh venv with it (issue 18).

Builds the wheel as pip does from this checkout (``pip wheel --no-deps``, isolated: hatchling
and ziglang from PyPI, the agents compiled by ``hatch_build.py`` with the build environment's
own zig), twice, and says whether the two wheels and their agents are byte-identical. Then
installs the wheel into a fresh venv (``python -m venv`` + ``pip install WHEEL``, dependencies
from PyPI) and measures its ``site-packages`` two ways: the sum of the file sizes (apparent)
and ``du -sk`` (disk blocks), with pip itself shown apart since every venv has it. ``--before``
also measures the venv as it was before the agents shipped: the same wheel plus ``ziglang``,
which ``pip install vzkit`` used to pull as a dependency.

    .venv/bin/python bench/wheel_size.py [--before] [--once]

Prints a table and writes the figures as JSON to ``bench/results/wheel_size-<time>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
MIB = 1 << 20


def build_wheel(out: Path) -> tuple[Path, float]:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    [wheel] = out.glob("vzkit-*.whl")
    return wheel, time.perf_counter() - t0


def agent_hashes(wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as zf:
        return {
            name: hashlib.sha256(zf.read(name)).hexdigest()
            for name in zf.namelist()
            if name.startswith("vzkit/agent/bin/")
        }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def site_packages(venv: Path) -> Path:
    [found] = venv.glob("lib/python3*/site-packages")
    return found


def apparent_bytes(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() or p.is_symlink())


def disk_bytes(root: Path) -> int:
    done = subprocess.run(["du", "-sk", str(root)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0]) * 1024


def venv_with(packages: list[str], where: Path) -> dict[str, float]:
    """A fresh venv with ``packages`` installed: its site-packages in MiB, pip apart."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    subprocess.run(
        [str(where / "bin" / "python"), "-m", "pip", "install", "-q", *packages],
        check=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    site = site_packages(where)
    pip = [p for p in site.iterdir() if p.name == "pip" or p.name.startswith("pip-")]
    pip_bytes = sum(apparent_bytes(p) if p.is_dir() else p.lstat().st_size for p in pip)
    return {
        "site_packages_mib": apparent_bytes(site) / MIB,
        "site_packages_du_mib": disk_bytes(site) / MIB,
        "pip_mib": pip_bytes / MIB,
        "without_pip_mib": (apparent_bytes(site) - pip_bytes) / MIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", action="store_true", help="also measure wheel + ziglang")
    parser.add_argument("--once", action="store_true", help="build the wheel once, not twice")
    args = parser.parse_args()
    figures: dict[str, object] = {"when": datetime.now(UTC).isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory(prefix="vzkit-wheel-bench-") as tmp:
        work = Path(tmp)
        wheel, seconds = build_wheel(work / "a")
        size = wheel.stat().st_size
        figures["wheel"] = {"name": wheel.name, "bytes": size, "build_s": seconds}
        figures["agents"] = agent_hashes(wheel)
        if not args.once:
            again, seconds_again = build_wheel(work / "b")
            figures["rebuild"] = {
                "build_s": seconds_again,
                "wheel_identical": sha256(again) == sha256(wheel),
                "agents_identical": agent_hashes(again) == agent_hashes(wheel),
            }
        figures["venv_after"] = venv_with([str(wheel)], work / "after")
        if args.before:
            figures["venv_before"] = venv_with([str(wheel), "ziglang==0.17.1"], work / "before")
    print(f"wheel {wheel.name}: {size / 1024:.0f} KiB, built in {seconds:.0f} s")
    if "rebuild" in figures:
        print(f"built twice: {figures['rebuild']}")
    for key in ("venv_after", "venv_before"):
        if key in figures:
            sizes = figures[key]
            assert isinstance(sizes, dict)
            print(f"{key}: " + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"wheel_size-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"figures: {out}")


if __name__ == "__main__":
    main()
