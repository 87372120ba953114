"""The Debian image end to end: built once per session (resolved from the real bookworm
indexes, unpacked on the host, configured by dpkg in a VM; minutes under TCG, see
docs/images.md) in the user's cache, as ``vzkit run --image debian`` uses it; then a real
userland through the agent, and ``apt-get install`` over NAT. Needs the network."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vzkit
from vzkit.image import DebianImage, find_debian_image

from .test_run_cli import vzkit_run

PROBE = "import sqlite3, ssl; print(sqlite3.sqlite_version, ssl.OPENSSL_VERSION)"


@pytest.fixture(scope="session")
def debian_image() -> DebianImage:
    """``vzkit image build debian`` for x86_64 (a cache hit when an earlier session built it)."""
    return vzkit.build_debian_image("debian", arch="x86_64")


def test_vzkit_run_image_debian_runs_python_and_a_second_build_is_cached(
    debian_image: DebianImage,
) -> None:
    assert debian_image.path.stat().st_mode & 0o777 == 0o600
    assert 90 < debian_image.package_count < 150
    t0 = time.monotonic()
    again = vzkit.build_debian_image("debian:bookworm", arch="x86_64")
    hit_s = time.monotonic() - t0
    assert again.directory == debian_image.directory  # same inputs: found, nothing built
    assert again.created == debian_image.created
    assert hit_s < 60, hit_s  # the indexes are checked; no unpacking, no VM
    script = f"python3 -c '{PROBE}' && . /etc/os-release && echo $VERSION_CODENAME && id -un"
    proc = vzkit_run("--arch", "x86_64", "--image", "debian", "--", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr.decode()
    version, codename, user = proc.stdout.decode().splitlines()
    assert version.startswith("3."), version  # SQLite 3.x
    assert "OpenSSL 3." in version
    assert (codename, user) == ("bookworm", "root")
    used = find_debian_image("debian", arch="x86_64")
    assert used is not None
    assert used.last_used >= t0  # the run marked it used (for prune)


def test_apt_get_install_jq_over_nat(debian_image: DebianImage) -> None:
    """One guest: apt's sources (http://deb.debian.org) over the default NAT, dpkg in the
    VM's own layer; the base image is not written."""
    before = debian_image.path.stat().st_mtime_ns
    script = (
        "apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends jq "
        ">/dev/null && jq --version && echo '{\"a\": [1, 2]}' | jq -c '.a | add'"
    )
    proc = vzkit_run("--arch", "x86_64", "--image", "debian", "--memory", "1g", "--",
                     "sh", "-c", script)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert proc.stdout.decode().splitlines() == ["jq-1.6", "3"]
    assert debian_image.path.stat().st_mtime_ns == before


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid``: their pid and command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found[int(entry.name)] = cmdline
    return found


def _alive(pid: int, cmdline: str) -> bool:
    try:
        now = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return now == cmdline


BUILD = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
import vzkit
vzkit.build_debian_image("debian", arch="x86_64", packages=["jq"], cache_dir=Path(sys.argv[1]))
"""


def test_ctrl_c_in_the_second_stage_leaves_no_vm_and_nothing_in_the_cache(
    debian_image: DebianImage, tmp_path: Path
) -> None:
    """A build of ``debian+jq`` interrupted while dpkg runs in the VM: QEMU and its helpers
    are gone, the cache holds no new image and no build directory, the .debs stay. The build
    uses a cache of its own (the downloads shared with the user's), so an image of the same
    packages built earlier on this machine cannot make it a cache hit."""
    from vzkit._cache import user_cache_dir

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "debs").symlink_to(user_cache_dir() / "debs")  # nothing downloaded twice
    images = cache / "images" / "debian"
    proc = subprocess.Popen(
        [sys.executable, "-c", BUILD, str(cache)], stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL, env={**os.environ, "VZKIT_PROGRESS": "0"},
    )  # fmt: skip
    assert proc.stderr is not None
    seen, vm = [], {}
    try:
        for raw in proc.stderr:
            seen.append(raw.decode(errors="replace"))
            if "installing base-passwd" in seen[-1]:  # the second stage is running
                vm = _children(proc.pid)
                break
        assert vm, "".join(seen[-20:])
        assert any("qemu-system" in cmd for cmd in vm.values()), vm
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        stopped_s = time.monotonic() - t0
        rest = err.decode(errors="replace")
        assert proc.returncode != 0
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert "KeyboardInterrupt" in rest, rest[-2000:]
    assert stopped_s < 60, stopped_s  # dpkg is not waited for
    left = {pid: cmd for pid, cmd in vm.items() if _alive(pid, cmd)}
    assert left == {}  # QEMU, virtiofsd, the vsock device: all gone
    assert [p.name for p in images.iterdir() if p.is_dir()] == []  # no image, no build dir
    assert find_debian_image("debian", packages=["jq"], arch="x86_64", cache_dir=cache) is None
    debs = user_cache_dir() / "debs" / "x86_64" / "debian"
    assert list(debs.glob("jq_*.deb"))  # downloaded once, kept for the next build
