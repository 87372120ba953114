"""Unpacking .debs into a tree without root: confinement, merged /usr, links, owners, modes."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vzkit.image._deb import DebPackage
from vzkit.image._debian_unpack import FileMeta, TreeWriter, UnpackError

from .test_guest_deb import make_ar

MTIME = 1_690_000_000


@dataclass
class M:
    """One tar member: ``kind`` file/dir/sym/link/chr/fifo; ``data`` content or link target."""

    name: str
    kind: str = "file"
    data: bytes | str = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)  # PAX SCHILY.xattr records


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "sym": tarfile.SYMTYPE,
    "link": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def write_members(tar: tarfile.TarFile, members: list[M]) -> None:
    for m in members:
        info = tarfile.TarInfo(m.name)
        info.type, info.mode, info.uid, info.gid = _TYPES[m.kind], m.mode, m.uid, m.gid
        info.mtime = m.mtime
        info.devmajor, info.devminor = m.dev
        info.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in m.xattrs.items()
        }
        body = None
        if m.kind in ("sym", "link"):
            assert isinstance(m.data, str)
            info.linkname = m.data
        elif m.kind == "file":
            assert isinstance(m.data, bytes)
            info.size, body = len(m.data), io.BytesIO(m.data)
        tar.addfile(info, body)


def deb(tmp_path: Path, name: str, members: list[M]) -> DebPackage:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:xz") as tar:
        write_members(tar, members)
    control = io.BytesIO()
    with tarfile.open(fileobj=control, mode="w:gz") as tar:
        text = f"Package: {name}\nVersion: 1.0\nArchitecture: amd64\n".encode()
        info = tarfile.TarInfo("./control")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    path = tmp_path / f"{name}.deb"
    path.write_bytes(
        make_ar(
            [
                ("debian-binary", b"2.0\n"),
                ("control.tar.gz", control.getvalue()),
                ("data.tar.xz", out.getvalue()),
            ]
        )
    )
    return DebPackage(path)


@pytest.fixture
def writer(tmp_path: Path) -> TreeWriter:
    w = TreeWriter(tmp_path / "tree", epoch=1_600_000_000)
    w.merge_usr("amd64")
    return w


def test_files_dirs_links_owners_and_modes(tmp_path: Path, writer: TreeWriter) -> None:
    pkg = deb(tmp_path, "demo", [
        M("./", "dir", mode=0o755),
        M("./etc/", "dir", mode=0o755),
        M("./etc/demo.conf", data=b"conf\n", mtime=MTIME + 5),
        M("./usr/", "dir", mode=0o755),
        M("./usr/bin/", "dir", mode=0o755),
        M("./usr/bin/passwd", data=b"ELF", mode=0o4755),
        M("./usr/bin/chage", data=b"ELF2", mode=0o2755, gid=42),
        M("./usr/bin/chage-again", "link", "./usr/bin/chage"),
        M("./usr/bin/view", "sym", "/usr/bin/vim.basic"),
        M("./var/", "dir", mode=0o755),
        M("./var/local/", "dir", mode=0o2775, gid=50),
        M("./tmp/", "dir", mode=0o1777),
        M("./proc/", "dir", mode=0o555),
        M("./proc/inside", data=b"written before the 0555 applies"),
        M("./dev/", "dir", mode=0o755),
        M("./dev/null", "chr", mode=0o666, dev=(1, 3)),
        M("./run/fifo", "fifo", mode=0o640, uid=7),
        M("./etc/secret", data=b"s", mode=0o000),
    ])  # fmt: skip
    assert writer.unpack(pkg) == 17  # "./" is the tree itself
    meta = writer.finish()
    root = writer.root
    assert (root / "etc/demo.conf").read_bytes() == b"conf\n"
    assert (root / "etc/demo.conf").stat().st_mtime == MTIME + 5
    assert stat.S_IMODE((root / "usr/bin/passwd").stat().st_mode) == 0o4755
    assert (root / "usr/bin/chage-again").stat().st_ino == (root / "usr/bin/chage").stat().st_ino
    assert os.readlink(root / "usr/bin/view") == "/usr/bin/vim.basic"  # absolute, kept as is
    assert stat.S_ISFIFO((root / "run/fifo").lstat().st_mode)
    assert not (root / "dev/null").exists()  # users cannot mknod: only in meta
    assert stat.S_IMODE((root / "proc").stat().st_mode) == 0o755  # u+rwx on disk
    assert meta == {
        "/": FileMeta(0, 0, stat.S_IFDIR | 0o755),
        "/dev/null": FileMeta(0, 0, stat.S_IFCHR | 0o666, os.makedev(1, 3)),
        "/etc/secret": FileMeta(0, 0, stat.S_IFREG | 0o000),  # 0600 on disk, to be readable
        "/proc": FileMeta(0, 0, stat.S_IFDIR | 0o555),  # 0755 on disk
        "/run/fifo": FileMeta(7, 0, stat.S_IFIFO | 0o640),
        "/usr/bin/chage": FileMeta(0, 42, stat.S_IFREG | 0o2755),
        "/usr/bin/chage-again": FileMeta(0, 42, stat.S_IFREG | 0o2755),
        "/var/local": FileMeta(0, 50, stat.S_IFDIR | 0o2775),
    }
    # every path not in meta is root:root with exactly lstat's mode
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE(root.stat().st_mode) == 0o700  # the tree itself is private


def test_merged_usr_entries_under_bin_and_lib_land_in_usr(
    tmp_path: Path, writer: TreeWriter
) -> None:
    pkg = deb(tmp_path, "bash", [
        M("./bin/", "dir", mode=0o755),
        M("./bin/bash", data=b"bash", mode=0o755),
        M("./bin/rbash", "sym", "bash"),
        M("./lib64/ld-linux-x86-64.so.2", "sym", "/lib/x86_64-linux-gnu/ld-2.36.so"),
        M("./lib/x86_64-linux-gnu/ld-2.36.so", data=b"ld", mode=0o755),
    ])  # fmt: skip
    writer.unpack(pkg)
    writer.finish()
    root = writer.root
    for top in ("bin", "sbin", "lib", "lib64"):
        assert os.readlink(root / top) == f"usr/{top}"
    assert (root / "usr/bin/bash").read_bytes() == b"bash"
    assert os.readlink(root / "usr/bin/rbash") == "bash"
    assert os.readlink(root / "usr/lib64/ld-linux-x86-64.so.2").startswith("/lib/")
    assert (root / "usr/lib/x86_64-linux-gnu/ld-2.36.so").is_file()
    assert writer.resolve("/bin/bash", follow_last=True) == "/usr/bin/bash"


def test_no_entry_escapes_the_tree_through_symlinks(tmp_path: Path, writer: TreeWriter) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_text("host file")
    pkg = deb(tmp_path, "evil", [
        M("./up", "sym", "../../../../.."),
        M("./abs", "sym", str(outside)),
        M("./etc/", "dir", mode=0o755),
        M("./etc/passwd", "sym", str(victim)),
        M("./up/escaped", data=b"x"),
        M("./abs/victim", data=b"overwritten?"),
        M("./etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),  # replaces the link
        M("./../../dotdot", data=b"y"),
    ])  # fmt: skip
    writer.unpack(pkg)
    writer.finish()
    root = writer.root
    assert victim.read_text() == "host file"
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.deb", "outside", "tree"]
    assert (root / "escaped").read_bytes() == b"x"  # ".." stops at the tree's root
    assert (root / outside.relative_to("/") / "victim").read_bytes() == b"overwritten?"
    assert not (root / "etc/passwd").is_symlink()
    assert (root / "dotdot").read_bytes() == b"y"


def test_a_hard_link_must_name_a_file_in_the_tree(tmp_path: Path, writer: TreeWriter) -> None:
    (tmp_path / "secret").write_text("host")
    pkg = deb(tmp_path, "bad", [M("./stolen", "link", "../secret")])
    with pytest.raises(
        UnpackError, match="/stolen: hard link to /secret, which is not a file in the tree"
    ):
        writer.unpack(pkg)


def test_path_clashes_are_errors(tmp_path: Path, writer: TreeWriter) -> None:
    writer.unpack(deb(tmp_path, "one", [M("./etc/", "dir"), M("./etc/thing/", "dir")]))
    with pytest.raises(UnpackError, match="cannot replace the directory /etc/thing"):
        writer.unpack(deb(tmp_path, "two", [M("./etc/thing", data=b"file")]))
    writer.unpack(deb(tmp_path, "three", [M("./etc/file", data=b"f")]))
    with pytest.raises(UnpackError, match="/etc/file is not a directory"):
        writer.unpack(deb(tmp_path, "four", [M("./etc/file/below", data=b"f")]))
    writer.unpack(deb(tmp_path, "five", [M("./loop", "sym", "loop")]))
    with pytest.raises(UnpackError, match="too many levels of symbolic links"):
        writer.unpack(deb(tmp_path, "six", [M("./loop/x", data=b"f")]))


def test_times_come_from_the_packages_or_the_epoch(tmp_path: Path) -> None:
    writer = TreeWriter(tmp_path / "tree")  # no epoch: the newest member's mtime
    writer.merge_usr("arm64")
    writer.unpack(deb(tmp_path, "p", [M("./usr/share/doc/p/x", data=b"1", mtime=MTIME),
                                      M("./etc/y", data=b"2", mtime=MTIME + 100)]))  # fmt: skip
    assert writer.epoch == MTIME + 100
    writer.file("/etc/hostname", b"debian\n", 0o644)
    writer.finish()
    root = writer.root
    assert (root / "usr/share/doc/p/x").stat().st_mtime == MTIME
    assert (root / "usr/share/doc").stat().st_mtime == MTIME + 100  # made by the writer
    assert (root / "etc/hostname").stat().st_mtime == MTIME + 100
    assert (root / "bin").lstat().st_mtime == MTIME + 100
    assert not (root / "lib64").exists()  # arm64 has no /lib64


def test_the_tree_must_start_empty(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "old").write_text("x")
    with pytest.raises(UnpackError, match="is not empty"):
        TreeWriter(tmp_path / "tree")
