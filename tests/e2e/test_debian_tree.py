"""The Debian tree builder against the real bookworm indexes on deb.debian.org.

Needs the network to reach the Debian mirrors. The second test also runs the second stage in
a chroot on the host (root only; the guest runs it inside the VM otherwise): it proves the
host-unpacked tree and the script install every package, with no VM in the way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vzkit.image._debian import prepare_debian_tree
from vzkit.image._debian_resolve import PackageIndex, PackageNotFoundError, resolve
from vzkit.image._debian_stage2 import STAGE2_PATH
from vzkit.image._mirror import DebianMirror, default_sources


@pytest.fixture(scope="module")
def bookworm(tmp_path_factory: pytest.TempPathFactory) -> PackageIndex:
    mirror = DebianMirror(
        default_sources("https://deb.debian.org/debian",
                        security_mirror="https://deb.debian.org/debian-security",
                        suite="bookworm"),
        "amd64", index_dir=tmp_path_factory.mktemp("indexes"),
    )  # fmt: skip
    assert mirror.trust == "verified"  # gpgv and the Debian keyring are installed here
    return PackageIndex.from_mirror(mirror)


def test_the_default_set_resolves_from_the_real_bookworm_indexes(bookworm: PackageIndex) -> None:
    result = resolve(bookworm)
    names = set(result.names)
    required = {n for n, p in bookworm.packages.items() if p.priority == "required"}
    assert len(required) > 30
    assert required <= names
    assert {"apt", "python3", "ca-certificates", "libc6", "dpkg", "libssl3", "libsqlite3-0",
            "usr-is-merged"} <= names  # fmt: skip
    assert "usrmerge" not in names  # the tree is merged from the start
    assert {"dpkg", "libc6", "base-files"} <= result.core
    assert "python3" not in result.core
    assert 90 < len(names) < 150
    assert resolve(bookworm) == result  # deterministic
    with_jq = resolve(bookworm, ["jq"])
    assert {"jq", "libjq1", "libonig5"} <= set(with_jq.names)
    with pytest.raises(PackageNotFoundError, match="did you mean python3"):
        resolve(bookworm, ["pyhton3"])


def _chroot(tree: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", f"--mount-proc={tree / 'proc'}",
         "chroot", str(tree), *argv],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


NEEDS_ROOT = "chroot needs root (the guest runs the second stage otherwise)"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason=NEEDS_ROOT)
def test_the_tree_runs_python_and_the_second_stage_installs_every_package(
    tmp_path: Path,
) -> None:
    tree, meta, manifest = prepare_debian_tree(tmp_path / "out", arch="x86_64")
    assert meta["/usr/bin/chage"].gid == 42  # shadow: owned by group shadow
    probe = "import sqlite3, ssl; print(sqlite3.sqlite_version)"
    ran = _chroot(tree, "/usr/bin/python3", "-c", probe)  # host-unpacked, not yet configured
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("3.")
    stage2 = _chroot(tree, "/bin/sh", STAGE2_PATH)
    assert stage2.returncode == 0, stage2.stdout[-4000:] + stage2.stderr[-4000:]
    assert stage2.stdout.rstrip().endswith("vzkit stage2: done")
    listed = _chroot(tree, "dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Package}\n").stdout
    installed = sorted(line.split()[1] for line in listed.splitlines() if line.startswith("ii"))
    assert installed == [p.name for p in manifest.packages]
    assert not list((tree / "var/cache/apt/archives").glob("*.deb"))
    assert not (tree / "usr/sbin/policy-rc.d").exists()
    assert not (tree / STAGE2_PATH.lstrip("/")).exists()
    assert (tree / "etc/passwd").read_text().startswith("root:x:0:0:")
    # apt works from the sources the tree names (the guest's resolv.conf comes from the
    # initramfs; here the host's stands in for it)
    shutil.copyfile("/etc/resolv.conf", tree / "etc/resolv.conf")
    jq = _chroot(tree, "sh", "-c", "apt-get update -q && apt-get install -y -q jq && jq -n 1+1")
    assert jq.returncode == 0, jq.stdout[-4000:] + jq.stderr[-4000:]
    assert jq.stdout.rstrip().endswith("2")
