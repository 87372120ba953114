"""The Debian image end to end: built once per session (resolved from the real bookworm
indexes, unpacked on the host, configured by dpkg in a VM; minutes under TCG, see
docs/images.md) in the user's cache, as ``vzkit run --image debian`` uses it; then a real
userland through the agent, and ``apt-get install`` over NAT. Needs the network."""

from __future__ import annotations

import time

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
