"""Shares at a guest path (``-v HOST:/data[:ro]``), end to end: in vzkit's busybox guest through
``vzkit run``, and in a root disk's image, where init.sh mounts them before switch_root.
Two boots in all (TCG is slow and the machine is shared)."""

from __future__ import annotations

import os
from pathlib import Path

import vzkit

from .conftest import VMFactory
from .test_root_disks import BUSYBOX_ONLY, make_tree
from .test_run_cli import vzkit_run


def _dirs(tmp_path: Path, *names: str) -> dict[str, Path]:
    out = {}
    for name in names:
        path = tmp_path / name
        path.mkdir()
        (path / "hello.txt").write_text(f"hello from {name}\n")
        out[name] = path
    return out


def test_vzkit_run_mounts_at_guest_paths_and_tags_still_at_mnt(tmp_path: Path) -> None:
    dirs = _dirs(tmp_path, "ro", "rw", "tagged")
    script = (
        "cat /data/hello.txt; "
        "echo x >/data/new 2>/dev/null && echo wrote || echo refused; "
        "cp /data/hello.txt '/srv/my out,1=2/copy'; "
        "cat /mnt/t/hello.txt; "
        "grep -c ' /data virtiofs ro,' /proc/mounts"
    )
    proc = vzkit_run(
        "-v", f"{dirs['ro']}:/data:ro",
        "-v", f"{dirs['rw']}:/srv/my out,1=2",  # decoded in the guest: space, comma, '='
        "-v", f"{dirs['tagged']}:t",
        "--", "sh", "-c", script,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().splitlines() == [
        "hello from ro",
        "refused",
        "hello from tagged",
        "1",
    ]
    assert (dirs["rw"] / "copy").read_text() == "hello from ro\n"
    assert not (dirs["ro"] / "new").exists()


def test_root_disk_guest_mounts_at_guest_paths_in_the_image(vms: VMFactory, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", vms.images["x86_64"])
    os.symlink("etc", tree / "lnk")  # a share below it would be made through the link: refused
    dirs = _dirs(tmp_path, "ro", "rw", "linked")
    base = vzkit.image.rootfs_base(tree, cache_dir=tmp_path / "cache")
    vm = vms.create(
        root_disk=vzkit.RootDisk(base=base.path),
        console=vzkit.ConsoleMode.LOG,
        volumes=(
            vzkit.parse_volume_spec(f"{dirs['ro']}:/data:ro"),
            vzkit.parse_volume_spec(f"{dirs['rw']}:/opt/new/deep"),  # made in the VM's layer
            vzkit.parse_volume_spec(f"{dirs['linked']}:/lnk/x"),
        ),
    )
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=120)

    def sh(script: str) -> tuple[int, str]:
        proc = vm.guest.run([BUSYBOX_ONLY, "sh", "-c", script], timeout=60)
        return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")

    assert sh("cat /data/hello.txt /opt/new/deep/hello.txt") == (
        0,
        "hello from ro\nhello from rw\n",
    )
    code, out = sh("echo x >/data/new")
    assert code != 0, out
    assert not (dirs["ro"] / "new").exists()
    assert sh("echo from-guest >/opt/new/deep/out && sync") == (0, "")
    assert (dirs["rw"] / "out").read_text() == "from-guest\n"
    assert sh("busybox grep -c ' /data virtiofs ro,' /proc/mounts") == (0, "1\n")
    # Through the image's symlink: not mounted, and the console says why.
    assert sh("ls /etc/x /lnk/x 2>&1; busybox grep -c ' /etc/x \\| /lnk/x ' /proc/mounts")[1] == (
        "ls: /etc/x: No such file or directory\nls: /lnk/x: No such file or directory\n0\n"
    )
    log = vm.console_log_path
    assert log is not None
    assert b"vzkit-init: cannot mount share linked at /lnk/x: /lnk is a symlink" in (
        log.read_bytes()
    )
