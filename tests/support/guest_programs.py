"""Small static guest programs (C sources of the tests and benchmarks), built with the zig the
project depends on and cached by source hash in the user's cache."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from vzkit.backends.qemu._discover import user_cache_dir

__all__ = ["ZIG_TARGETS", "build_static"]

ZIG_TARGETS = {"x86_64": "x86_64-linux-musl", "aarch64": "aarch64-linux-musl"}


def build_static(source: Path, name: str, arch: str = "x86_64") -> Path:
    """``source`` compiled static for ``arch`` guests (the first build takes ~40 s)."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    out = user_cache_dir() / name / f"{name}-{arch}-{digest}"
    if out.exists():
        return out
    import ziglang  # noqa: F401  (a dependency: missing means a broken install, not a skip)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    subprocess.run(
        [sys.executable, "-m", "ziglang", "cc", "-target", ZIG_TARGETS[arch], "-static", "-O2",
         "-s", "-o", str(tmp), str(source)],
        check=True,
        timeout=600,
    )  # fmt: skip
    tmp.replace(out)
    return out
