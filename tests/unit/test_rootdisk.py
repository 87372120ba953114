"""Root disks from directory trees (mke2fs -d + debugfs), read back with debugfs on the host."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vzkit.errors import ConfigError, GuestError
from vzkit.image import FileMeta, _rootdisk, build_root_disk, disk_size_for, rootfs_base

_MIB = 1 << 20
NON_UTF8 = b"caf\xe9"  # Latin-1: not UTF-8


def debugfs(image: Path, request: str) -> str:
    _, debugfs_path = _rootdisk.find_e2fsprogs()
    proc = subprocess.run(
        [debugfs_path, "-R", request, str(image)], capture_output=True, check=True
    )
    return proc.stdout.decode(errors="surrogateescape")


def inode_of(stat_text: str) -> int:
    match = re.search(r"Inode: (\d+)", stat_text)
    assert match, stat_text
    return int(match.group(1))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A tree with what unpacked images hold and naive copiers lose."""
    root = tmp_path / "tree"
    for d in ("bin", "etc", "dev", "usr/bin"):
        (root / d).mkdir(parents=True)
    (root / "bin/tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (root / "bin/tool").chmod(0o755)
    os.symlink("/bin/tool", root / "usr/bin/abs-link")  # absolute: resolves in the guest
    os.symlink("../run/systemd/resolve/stub-resolv.conf", root / "etc/resolv.conf")  # dangling
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    os.link(root / "etc/hosts", root / "etc/hosts.hardlink")
    (root / "bin/suid").write_bytes(b"x")
    (root / "bin/suid").chmod(0o4755)
    with open(root / "sparse", "wb") as fh:
        fh.truncate(64 * _MIB)
        fh.seek(32 * _MIB)
        fh.write(b"middle")
    (root / "with space").write_text("s")
    (root / "new\nline").write_text("n")
    (Path(os.fsdecode(os.fsencode(root) + b"/" + NON_UTF8))).write_text("u")
    (Path(os.fsdecode(os.fsencode(root) + b"/etc/" + NON_UTF8))).write_text("owned")
    return root


META = {
    '/dev/a "quoted" fifo': FileMeta(0, 0, stat.S_IFIFO | 0o600),
    os.fsdecode(b"/etc/" + NON_UTF8): FileMeta(7, 8, stat.S_IFREG | 0o600),
    "/dev/console": FileMeta(0, 5, stat.S_IFCHR | 0o620, os.makedev(5, 1)),
    "/dev/null": FileMeta(0, 0, stat.S_IFCHR | 0o666, os.makedev(1, 3)),
    "/dev/initctl": FileMeta(0, 0, stat.S_IFIFO | 0o600),
    "/etc/hosts": FileMeta(0, 0, stat.S_IFREG | 0o644),
    "/bin/tool": FileMeta(0, 50, stat.S_IFREG | 0o2750),
}


def test_tree_and_meta_survive_into_the_image(tree: Path, tmp_path: Path) -> None:
    image = build_root_disk(tree, tmp_path / "out" / "root.img", meta=META)
    assert stat.S_IMODE(image.stat().st_mode) == 0o600
    assert sorted(p.name for p in image.parent.iterdir()) == ["root.img"]  # no leftovers
    e2fsck = Path(_rootdisk.find_e2fsprogs()[0]).with_name("e2fsck")
    subprocess.run([str(e2fsck), "-fn", str(image)], check=True, capture_output=True)

    console = debugfs(image, "stat /dev/console")
    assert "Type: character special" in console
    assert "Mode:  0620" in console
    assert re.search(r"User:\s+0\s+Group:\s+5", console)
    assert re.search(r"Device major/minor number: 0*5:0*1\b", console), console
    assert "Type: FIFO" in debugfs(image, "stat /dev/initctl")
    assert "Type: FIFO" in debugfs(image, 'stat "/dev/a ""quoted"" fifo"')
    latin = debugfs(image, 'stat "/etc/caf\udce9"')  # the name's raw bytes, as mke2fs wrote it
    assert re.search(r"User:\s+7\s+Group:\s+8", latin), latin
    tool = debugfs(image, "stat /bin/tool")
    assert "Mode:  02750" in tool
    assert re.search(r"User:\s+0\s+Group:\s+50", tool)
    assert "Mode:  04755" in debugfs(image, "stat /bin/suid")

    link = debugfs(image, "stat /usr/bin/abs-link")
    assert "Type: symlink" in link
    assert 'Fast link dest: "/bin/tool"' in link
    resolv = debugfs(image, "stat /etc/resolv.conf")
    assert 'Fast link dest: "../run/systemd/resolve/stub-resolv.conf"' in resolv

    hosts, hardlink = debugfs(image, "stat /etc/hosts"), debugfs(image, "stat /etc/hosts.hardlink")
    assert inode_of(hosts) == inode_of(hardlink)
    assert "Links: 2" in hosts

    sparse = debugfs(image, "stat /sparse")
    assert "Size: 67108864" in sparse
    blocks = int(re.search(r"Blockcount: (\d+)", sparse).group(1))  # type: ignore[union-attr]
    assert blocks <= 16  # one 4 KiB block (+ extent), not 64 MiB
    assert debugfs(image, "cat /sparse").encode(errors="surrogateescape")[32 * _MIB :][:6] == (
        b"middle"
    )

    listing = debugfs(image, "ls -l /")
    assert "with space" in listing
    assert "new\\x0aline" in listing
    assert "caf\\xe9" in listing


def test_the_image_is_replaced_atomically_and_sized_by_the_rule(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "root.img"
    dest.write_bytes(b"old")
    build_root_disk(tree, dest)
    used, inodes = _rootdisk.tree_usage(tree)
    assert dest.stat().st_size == disk_size_for(used, inodes)
    assert disk_size_for(used, inodes) >= used + (1 << 30)  # at least 1 GiB free
    assert disk_size_for(8 << 30, 10) >= (8 << 30) * 3 // 2  # big trees: half again
    assert dest.stat().st_blocks * 512 < 64 * _MIB  # sparse: mostly holes
    build_root_disk(tree, dest, size=64 * _MIB)
    assert dest.stat().st_size == 64 * _MIB


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"bin/tool": FileMeta(0, 0, stat.S_IFREG | 0o755)}, "must be absolute"),
        ({"/bin/new\nline": FileMeta(0, 0, stat.S_IFCHR, 0)}, "free of newlines"),
        ({"/../x": FileMeta(0, 0, stat.S_IFCHR, 0)}, "'..'"),
        ({"/etc/missing": FileMeta(0, 0, stat.S_IFREG | 0o644)}, "not in the tree"),
        ({"/nodir/null": FileMeta(0, 0, stat.S_IFCHR, 0)}, "directory is not in the tree"),
        ({"/etc/hosts": FileMeta(0, 0, stat.S_IFDIR | 0o755)}, "another file type"),
    ],
)
def test_bad_meta_is_refused_before_anything_is_written(
    tree: Path, tmp_path: Path, meta: dict[str, FileMeta], message: str
) -> None:
    dest = tmp_path / "root.img"
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_root_disk(tree, dest, meta=meta)
    assert not dest.exists()


def test_missing_e2fsprogs_names_the_package(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(_rootdisk, "_E2FS_DIRS", (str(tmp_path / "empty"),))
    with pytest.raises(GuestError, match=r"apt-get install e2fsprogs; macOS: brew install"):
        build_root_disk(tree, tmp_path / "root.img")


def test_base_images_are_cached_by_content(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = rootfs_base(tree, cache_dir=cache)
    disks = cache / "images" / "disks"
    assert stat.S_IMODE(first.path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o600
    info = json.loads((first.path.parent / "disk.json").read_text())
    assert info["digest"] == first.digest
    assert first.digest.startswith("sha256:")
    assert info["source"] == str(tree)
    assert info["size"] == first.path.stat().st_size
    mtime = first.path.stat().st_mtime_ns
    again = rootfs_base(tree, cache_dir=cache)
    assert again == first
    assert first.path.stat().st_mtime_ns == mtime
    (tree / "etc/hosts").write_text("changed\n")
    changed = rootfs_base(tree, cache_dir=cache)
    assert changed.digest != first.digest
    assert changed.path != first.path
    with_meta = rootfs_base(tree, cache_dir=cache, meta=META)
    assert with_meta.digest not in (first.digest, changed.digest)
    leftovers = sorted(p.name for p in disks.iterdir() if p.name.startswith("."))
    assert leftovers == [".lock"]  # no temporary directory


def test_a_failed_build_leaves_nothing_in_the_cache(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (tree / "big").write_bytes(os.urandom(20 * _MIB))  # does not fit in 16 MiB
    with pytest.raises(GuestError, match="mke2fs -d"):
        rootfs_base(tree, cache_dir=cache, size=16 * _MIB)
    assert [p.name for p in (cache / "images" / "disks").iterdir()] == [".lock"]


def test_concurrent_builds_of_one_tree_make_one_entry(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(max_workers=3) as pool:
        bases = list(pool.map(lambda _: rootfs_base(tree, cache_dir=cache), range(3)))
    assert bases[0] == bases[1] == bases[2]
    entries = [p.name for p in (cache / "images" / "disks").iterdir()]
    assert sorted(entries) == sorted([".lock", bases[0].path.parent.name])


def test_squash_owner_gives_the_builders_files_to_root(tree: Path, tmp_path: Path) -> None:
    """As a user's tree looks to rootless podman: the user's files are root's (meta wins)."""
    for path in (tree / "etc/hosts", tree / "bin/suid", tree / "with space"):
        os.lchown(path, 1234, 4321)
    os.lchown(tree / "usr/bin/abs-link", 1234, 99)  # the link itself
    os.lchown(tree / "bin/tool", 55, 4321)  # someone else's file in the user's group
    (tree / "bin/suid").chmod(0o4755)  # chown cleared the set-id bit on the host
    meta = {"/with space": FileMeta(9, 9, stat.S_IFREG | 0o644)}
    image = build_root_disk(tree, tmp_path / "r.img", meta=meta, squash_owner=(1234, 4321))

    def owner(path: str) -> str:
        found = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", debugfs(image, f'stat "{path}"'))
        assert found
        return f"{found.group(1)}:{found.group(2)}"

    assert owner("/etc/hosts") == "0:0"
    assert owner("/bin/suid") == "0:0"
    assert "Mode:  04755" in debugfs(image, "stat /bin/suid")  # modes untouched
    assert owner("/usr/bin/abs-link") == "0:99"
    assert owner("/bin/tool") == "55:0"
    assert owner("/with space") == "9:9"
    key = _rootdisk._tree_key
    assert key(tree, {}, None, "l", (1234, 4321)) != key(tree, {}, None, "l")


def test_extended_attributes_are_set_byte_for_byte(tree: Path, tmp_path: Path) -> None:
    """``security.capability`` (binary, a tree unpacked without root cannot carry it) and a
    value with quotes and a newline reach the disk as given."""
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    meta = {
        "/bin/tool": FileMeta(0, 0, stat.S_IFREG | 0o755, xattrs=(
            ("security.capability", cap), ("user.note", b'a "quoted"\nvalue'))),
        "/dev/null": FileMeta(0, 0, stat.S_IFCHR | 0o666, os.makedev(1, 3),
                              xattrs=(("user.dev", b"node"),)),
    }  # fmt: skip
    image = build_root_disk(tree, tmp_path / "root.img", meta=meta)
    caps = debugfs(image, "ea_get -x /bin/tool security.capability")
    assert caps.split("=", 1)[1].split() == [f"{b:02x}" for b in cap]
    dump = tmp_path / "note"
    debugfs(image, f"ea_get -f {dump} /bin/tool user.note")
    assert dump.read_bytes() == b'a "quoted"\nvalue'
    assert "user.dev" in debugfs(image, "ea_list /dev/null")
    bad = {"/bin/tool": FileMeta(0, 0, stat.S_IFREG | 0o755, xattrs=(("a\nb", b""),))}
    with pytest.raises(ConfigError, match="bad extended attribute name"):
        build_root_disk(tree, tmp_path / "bad.img", meta=bad)
