"""The Debian image end to end, on x86_64 and aarch64: built once per session (resolved from
the real bookworm indexes, unpacked on the host, configured by dpkg in a VM; minutes under TCG,
see docs/images.md) in the user's cache, as ``vzkit run --image debian`` uses it; then a real
userland through the agent, ``apt-get install`` over NAT, and a file under /root kept by a
snapshot. The two arches build at once (one VM each; builders of different arches do not
exclude each other). Needs the network."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import vzkit
from vzkit.image import DebianImage, find_debian_image

from .conftest import ARCHES
from .test_run_cli import VZKIT, vzkit_run

PROBE = "import sqlite3, ssl; print(sqlite3.sqlite_version, ssl.OPENSSL_VERSION)"


@pytest.fixture(scope="session")
def debian_images() -> dict[str, DebianImage]:
    """``vzkit image build debian`` for each arch, both at once (cache hits when an earlier
    session built them)."""
    with ThreadPoolExecutor(len(ARCHES)) as pool:
        futures = {a: pool.submit(vzkit.build_debian_image, "debian", arch=a) for a in ARCHES}
        return {arch: future.result() for arch, future in futures.items()}


@pytest.fixture(scope="session")
def debian_image(debian_images: dict[str, DebianImage]) -> DebianImage:
    return debian_images["x86_64"]


@pytest.mark.parametrize("arch", ARCHES)
def test_vzkit_run_image_debian_runs_python_and_a_second_build_is_cached(
    debian_images: dict[str, DebianImage], arch: str
) -> None:
    image = debian_images[arch]
    assert image.path.stat().st_mode & 0o777 == 0o600
    assert 90 < image.package_count < 150
    t0 = time.monotonic()
    again = vzkit.build_debian_image("debian:bookworm", arch=arch)
    hit_s = time.monotonic() - t0
    assert again.directory == image.directory  # same inputs: found, nothing built
    assert again.created == image.created
    assert hit_s < 60, hit_s  # the indexes are checked; no unpacking, no VM
    script = (
        f"python3 -c '{PROBE}' && . /etc/os-release && echo $VERSION_CODENAME && id -un "
        "&& uname -m && dpkg --print-architecture"
    )
    proc = vzkit_run("--arch", arch, "--image", "debian", "--", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr.decode()
    version, codename, user, machine, debarch = proc.stdout.decode().splitlines()
    assert version.startswith("3."), version  # SQLite 3.x
    assert "OpenSSL 3." in version
    assert (codename, user) == ("bookworm", "root")
    assert (machine, debarch) == (arch, {"x86_64": "amd64", "aarch64": "arm64"}[arch])
    used = find_debian_image("debian", arch=arch)
    assert used is not None
    assert used.last_used >= t0  # the run marked it used (for prune)


@pytest.mark.parametrize("arch", ARCHES)
def test_apt_get_install_jq_over_nat(debian_images: dict[str, DebianImage], arch: str) -> None:
    """One guest: apt's sources (http://deb.debian.org) over the default NAT, dpkg in the
    VM's own layer; the base image is not written."""
    image = debian_images[arch]
    before = image.path.stat().st_mtime_ns
    script = (
        "apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends jq "
        ">/dev/null && jq --version && echo '{\"a\": [1, 2]}' | jq -c '.a | add'"
    )
    proc = vzkit_run("--arch", arch, "--image", "debian", "--memory", "1g", "--",
                     "sh", "-c", script, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert proc.stdout.decode().splitlines() == ["jq-1.6", "3"]
    assert image.path.stat().st_mtime_ns == before


@pytest.mark.parametrize("arch", ARCHES)
def test_a_file_under_root_survives_snapshot_save_and_restore(
    debian_images: dict[str, DebianImage], arch: str, tmp_path: Path
) -> None:
    """``vzkit snapshot save`` of a Debian guest with a file written under /root (in the VM's
    layer, not yet synced), then ``vzkit snapshot restore`` with the same options reads it."""
    assert debian_images[arch].path.exists()
    opts = ["--arch", arch, "--image", "debian"]
    vm_dir = tmp_path / "vm"
    save = subprocess.run(
        [*VZKIT, "snapshot", "save", *opts, str(vm_dir), "s", "--",
         "sh", "-c", "echo kept-by-the-snapshot > /root/note && cat /root/note"],
        capture_output=True, timeout=600,
    )  # fmt: skip
    assert save.returncode == 0, save.stderr.decode()[-3000:]
    assert save.stdout.decode().splitlines()[0] == "kept-by-the-snapshot"
    restore = subprocess.run(
        [*VZKIT, "snapshot", "restore", *opts, str(vm_dir), "s", "--",
         "sh", "-c", "cat /root/note; python3 -c 'print(6 * 7)'"],
        capture_output=True, timeout=600,
    )  # fmt: skip
    assert restore.returncode == 0, restore.stderr.decode()[-3000:]
    assert restore.stdout.decode().splitlines() == ["kept-by-the-snapshot", "42"]


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
import logging, signal, sys
from pathlib import Path
# Ctrl-C as a terminal delivers it: a test run started in the background by a shell without
# job control inherits SIGINT ignored, which Python would keep
signal.signal(signal.SIGINT, signal.default_int_handler)
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
