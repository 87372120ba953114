"""``guest.copy_in``/``copy_out`` in the real default guest under QEMU (x86_64, TCG where there
is no KVM): the guest's ``sh`` and ``tar`` are its busybox, which must read the host's GNU tar
(a long name, a hard link) and write what the host's confined extraction accepts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import vzkit
from vzkit.agent import GuestFileNotFoundError
from vzkit.image import GuestImage, rootfs_base

from ..unit.test_guest_copy import describe
from .conftest import VMFactory


@pytest.fixture(autouse=True)
def built_image(guest_images: dict[str, GuestImage]) -> None:
    """The default guest image is built (cached) before the clock of a test starts."""


def test_a_small_tree_in_and_out_of_the_default_guest(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    deep = tree / "a" / ("long-" * 30) / "c"
    deep.mkdir(parents=True)
    (deep / "f.txt").write_text("deep\n")
    (tree / "empty").mkdir()
    tool = tree / "tool.sh"
    tool.write_text("#!/bin/sh\necho from-the-tool\n")
    tool.chmod(0o755)
    (tree / "data").write_bytes(os.urandom(300_000))
    (tree / "link").symlink_to("tool.sh")
    (tree / "hard").hardlink_to(tree / "data")
    back = tmp_path / "back"
    with vzkit.start(timeout=120) as vm:
        guest = vm.guest
        guest.copy_in(tree, "/tmp/copy", timeout=60)
        ran = guest.run(["/tmp/copy/link"], text=True)
        assert ran.stdout == "from-the-tool\n", ran.stderr
        listing = guest.run(["sh", "-c", "stat -c '%a %h' /tmp/copy/tool.sh /tmp/copy/hard"])
        assert listing.stdout.split(b"\n")[:2] == [b"755 1", b"644 2"]
        guest.copy_out("/tmp/copy", back, timeout=60)
        with pytest.raises(GuestFileNotFoundError):
            guest.copy_in(tool, "/no/such/dir/x")
        with pytest.raises(FileNotFoundError):
            guest.copy_out("/tmp/nothing", tmp_path)
        with pytest.raises(FileNotFoundError):
            guest.read_file("/tmp/nothing")
    assert describe(back) == describe(tree)
    assert stat.S_IMODE((back / "tool.sh").stat().st_mode) == 0o755


def test_copy_in_a_root_disk_without_sh_or_tar(vms: VMFactory, tmp_path: Path) -> None:
    """An image with no userland at all: the copy runs vzkit's busybox in /run/vzkit/bin."""
    image = tmp_path / "image"
    for d in ("etc", "root", "tmp"):
        (image / d).mkdir(parents=True)
    (image / "etc" / "marker").write_text("from the image\n")
    base = rootfs_base(image, cache_dir=tmp_path / "cache")
    vm = vms.create(root_disk=vzkit.RootDisk(base=base.path), console=vzkit.ConsoleMode.LOG)
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=120)
    assert vm.guest.run(["tar", "--help"]).returncode == 127  # the image has no tar
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("f\n")
    (tree / "link").symlink_to("sub/f")
    vm.guest.copy_in(tree, "/root/", timeout=60)
    assert vm.guest.read_file("/root/tree/sub/f") == b"f\n"
    vm.guest.copy_out("/etc/marker", tmp_path / "marker", timeout=60)
    vm.guest.copy_out("/root/tree", tmp_path / "back", timeout=60)
    assert (tmp_path / "marker").read_text() == "from the image\n"
    assert describe(tmp_path / "back") == describe(tree)
    vm.stop(timeout=30)
