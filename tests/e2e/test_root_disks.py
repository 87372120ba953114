"""Guests on root disks: a tree made into a disk, a partitioned disk made by other tools, and a
root that is not there. vzkit's kernel and initramfs mount the root, inject the agent and
switch_root; commands run through the agent in the image's userland."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

import vzkit
from vzkit.image import FileMeta, GuestImage, read_cpio, rootfs_base

from .conftest import ARCHES, VMFactory
from .test_run_cli import vzkit_run

BUSYBOX_ONLY = "/bin/busybox"  # the trees have no /bin/sh: the image's userland is this only


def busybox_of(image: GuestImage) -> bytes:
    """The static busybox of the default guest's initramfs: a userland for test trees."""
    entries = read_cpio(image.initrd.read_bytes())
    return next(e.data for e in entries if e.name == "bin/busybox")


def make_tree(root: Path, image: GuestImage) -> Path:
    """A small userland with what a naive copy would lose; no /bin/sh, no /run, no /tmp."""
    for d in ("bin", "etc", "opt", "root"):
        (root / d).mkdir(parents=True)
    (root / "bin/busybox").write_bytes(busybox_of(image))
    (root / "bin/busybox").chmod(0o755)
    os.symlink("/bin/busybox", root / "opt/abs-link")
    os.symlink("/run/systemd/resolve/stub-resolv.conf", root / "etc/resolv.conf")  # dangling
    (root / "etc/marker").write_text("from the image\n")
    os.link(root / "etc/marker", root / "etc/marker.hard")
    (root / "opt/suid").write_bytes(b"x")
    (root / "opt/suid").chmod(0o4755)
    with open(root / "opt/sparse", "wb") as fh:
        fh.truncate(256 << 20)
    (root / "opt/odd name\nwith newline").write_text("odd\n")
    return root


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def test_rootfs_keeps_metadata_and_the_agent_runs_in_it(vms: VMFactory, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", vms.images["x86_64"])
    meta = {
        "/opt/null": FileMeta(0, 0, stat.S_IFCHR | 0o666, os.makedev(1, 3)),
        "/opt/marker-owned": FileMeta(1234, 4321, stat.S_IFIFO | 0o640),
    }
    base = rootfs_base(tree, cache_dir=tmp_path / "cache", meta=meta)
    before = sha256(base.path)
    share = tmp_path / "share"
    share.mkdir()
    (share / "from-host").write_text("shared\n")
    vm = vms.create(
        root_disk=vzkit.RootDisk(base=base.path),
        console=vzkit.ConsoleMode.LOG,
        volumes=(vzkit.VolumeMount(share, "data", read_only=True),),
    )
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=120)

    def sh(script: str) -> str:
        proc = vm.guest.run([BUSYBOX_ONLY, "sh", "-c", script], timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode()

    assert sh("echo $PATH $HOME") == (
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin /root\n"
    )
    assert sh("cat /etc/marker; readlink /opt/abs-link; [ -x /opt/abs-link ] && echo x") == (
        "from the image\n/bin/busybox\nx\n"  # an absolute link resolves in the guest's root
    )
    stats = sh(
        "cd /opt; busybox stat -c '%n %F %a %u:%g %t:%T' null marker-owned suid; "
        "busybox stat -c %i /etc/marker /etc/marker.hard; busybox stat -c '%s %b' sparse; "
        "ls /opt | busybox grep -c newline; readlink /etc/resolv.conf; echo ok >/opt/null"
    ).splitlines()
    assert stats[0] == "null character special file 666 0:0 1:3"
    assert stats[1] == "marker-owned fifo 640 1234:4321 0:0"
    assert stats[2] == "suid regular file 4755 0:0 0:0"
    assert stats[3] == stats[4]  # one inode: the hard link survived
    assert stats[5] == f"{256 << 20} 0"  # no blocks: still sparse
    assert stats[6:] == ["1", "/run/systemd/resolve/stub-resolv.conf"]  # no network: kept
    assert sh("cat /mnt/data/from-host") == "shared\n"  # shares land in the image's /mnt
    assert sh("cat /proc/1/cmdline | tr '\\0' ' '") == "/run/vzkit/busybox sh /run/vzkit/stage2.sh "
    # The VM writes into its own layer, never into the shared base.
    sh("echo written >/root/new; sync")
    assert sh("cat /root/new") == "written\n"
    vm.stop(timeout=30)
    assert sha256(base.path) == before


@pytest.mark.parametrize("arch", ARCHES)
def test_vzkit_run_rootfs_with_network_and_dns(vms: VMFactory, tmp_path: Path, arch: str) -> None:
    tree = make_tree(tmp_path / "tree", vms.images[arch])
    proc = vzkit_run(
        "--arch", arch, "--rootfs", str(tree), "--", BUSYBOX_ONLY, "sh", "-c",
        "readlink /etc/resolv.conf; busybox grep -c nameserver /etc/resolv.conf; exit 7",
    )  # fmt: skip
    assert proc.returncode == 7, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    # The dangling symlink into /run is satisfied on vzkit's tmpfs there, not replaced.
    assert lines[0] == "/run/systemd/resolve/stub-resolv.conf", lines
    assert int(lines[1]) >= 1, lines


@pytest.mark.parametrize("arch", ARCHES)
def test_partitioned_disk_boots_with_root_vda1(vms: VMFactory, tmp_path: Path, arch: str) -> None:
    """A disk vzkit did not write: an MBR by sfdisk, ext4 by mke2fs -d at the partition's
    offset."""
    tree = make_tree(tmp_path / "tree", vms.images[arch])
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as fh:
        fh.truncate(256 << 20)
    subprocess.run(
        ["sfdisk", "-q", str(disk)], input=b"label: dos\nstart=2048, type=83\n", check=True
    )
    offset, blocks = 2048 * 512, (256 << 20) // 1024 - 1024
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), "-E", f"offset={offset}",
         str(disk), f"{blocks}k"],
        check=True,
    )  # fmt: skip
    proc = vzkit_run(
        "--arch", arch, "--disk", str(disk), "--root", "/dev/vda1", "--network", "none", "--",
        BUSYBOX_ONLY, "sh", "-c", "cat /etc/marker; busybox df / | busybox tail -1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode().splitlines()
    assert out[0] == "from the image", out
    assert out[1].startswith("/dev/vda1 "), out


@pytest.mark.parametrize(
    ("root", "message"),
    [
        ("/dev/vdz", "vzkit-init: FATAL: root device /dev/vdz did not appear within 5 s"),
        ("/dev/vda", "vzkit-init: FATAL: cannot mount root /dev/vda"),
    ],
)
def test_a_bad_root_fails_fast_with_the_guests_message(
    tmp_path: Path, root: str, message: str
) -> None:
    empty = tmp_path / "empty.img"
    with open(empty, "wb") as fh:
        fh.truncate(64 << 20)  # no file system
    t0 = time.monotonic()
    home = tmp_path / "vzkit home"
    proc = vzkit_run(
        "--disk", str(empty), "--root", root, "--network", "none", "--", "true",
        env={**os.environ, "VZKIT_HOME": str(home)},
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    err = proc.stderr.decode()
    assert proc.returncode == 125, err
    assert "the guest stopped before its agent answered" in err, err
    assert message in err, err
    assert elapsed < 90, elapsed  # not the 180 s boot timeout
    # the whole console log outlives the VM's temporary state directory, private to the user
    [kept] = (home / "logs").glob("console-*.log")
    assert f"the whole console log: {kept}" in err
    assert message.encode() in kept.read_bytes()
    assert (kept.stat().st_mode & 0o777, kept.parent.stat().st_mode & 0o777) == (0o600, 0o700)


def test_init_image_runs_the_images_init_beside_the_agent(vms: VMFactory, tmp_path: Path) -> None:
    """``--init image``: the image's /sbin/init becomes PID 1; the agent still answers."""
    tree = make_tree(tmp_path / "tree", vms.images["x86_64"])
    (tree / "sbin").mkdir()
    (tree / "sbin/init").write_text(
        "#!/bin/busybox sh\necho IMAGE-INIT-RAN >/dev/console\nexec /bin/busybox sleep 600\n"
    )
    (tree / "sbin/init").chmod(0o755)
    # The agent may answer before the image's init has got to its exec (it starts beside
    # it): the guest looks at PID 1 until it is the sleep, for up to 20 s.
    look = (
        "for i in $(busybox seq 200); do c=$(busybox tr '\\0' ' ' </proc/1/cmdline); "
        'case "$c" in *sleep*) break;; esac; busybox sleep 0.1; done; echo "$c"'
    )
    proc = vzkit_run(
        "--rootfs", str(tree), "--init", "image", "--network", "none", "--",
        BUSYBOX_ONLY, "sh", "-c", look,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == "/bin/busybox sleep 600 \n"  # /sbin/init exec'd into sleep


def test_a_disk_booted_twice_keeps_working_dns(vms: VMFactory, tmp_path: Path) -> None:
    """A dangling /etc/resolv.conf outside /run is replaced once (on the disk: --disk is
    written in place) by a link to vzkit's tmpfs; the next boot finds that link and keeps it."""
    tree = make_tree(tmp_path / "tree", vms.images["x86_64"])
    (tree / "etc/resolv.conf").unlink()
    os.symlink("../etc/resolvconf/run/resolv.conf", tree / "etc/resolv.conf")
    disk = tmp_path / "disk.img"
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(disk), "128M"], check=True
    )
    script = "readlink /etc/resolv.conf; busybox grep -c nameserver /etc/resolv.conf"
    for boot in (1, 2):
        proc = vzkit_run(
            "--disk", str(disk), "--root", "/dev/vda", "--", BUSYBOX_ONLY, "sh", "-c", script
        )
        assert proc.returncode == 0, (boot, proc.stderr.decode())
        lines = proc.stdout.decode().splitlines()
        assert lines[0] == "/run/vzkit/resolv.conf", (boot, lines)
        assert int(lines[1]) >= 1, (boot, lines)
