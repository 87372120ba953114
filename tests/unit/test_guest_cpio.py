"""Unit tests for vzkit.image._cpio: the newc writer and reader."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from vzkit.errors import GuestError
from vzkit.image import CpioWriter, read_cpio


def sample(order: int = 0) -> CpioWriter:
    """The same archive content, added in one of two orders."""
    steps = [
        lambda w: w.add_file("/init", b"#!/bin/sh\necho hi\n", 0o755),
        lambda w: w.add_chardev("/dev/console", 5, 1, 0o600),
        lambda w: w.add_symlink("/bin/sh", "busybox"),
        lambda w: w.add_file("/bin/busybox", b"\x7fELF" + bytes(range(256)), 0o755),
        lambda w: w.add_dir("/tmp", 0o1777),
        lambda w: w.add_blockdev("/dev/vda", 254, 0),
        lambda w: w.add_fifo("/run/fifo"),
        lambda w: w.add_file("/lib/modules/6.1/kernel/a-b.ko", b"mod"),
    ]
    writer = CpioWriter()
    for step in steps if order == 0 else reversed(steps):
        step(writer)
    return writer


def test_round_trip_all_kinds() -> None:
    entries = {e.name: e for e in read_cpio(sample().to_bytes())}
    assert entries["init"].kind == "file"
    assert entries["init"].permissions == 0o755
    assert entries["init"].data == b"#!/bin/sh\necho hi\n"
    console = entries["dev/console"]
    assert (console.kind, console.rdevmajor, console.rdevminor, console.permissions) == (
        "chardev",
        5,
        1,
        0o600,
    )
    assert (entries["dev/vda"].kind, entries["dev/vda"].rdevmajor) == ("blockdev", 254)
    assert entries["run/fifo"].kind == "fifo"
    assert (entries["bin/sh"].kind, entries["bin/sh"].linkname) == ("symlink", "busybox")
    assert entries["init"].linkname == ""
    assert entries["tmp"].mode == stat.S_IFDIR | 0o1777
    # parents were created implicitly as 0755 directories
    for parent in ("dev", "bin", "run", "lib", "lib/modules", "lib/modules/6.1/kernel"):
        assert entries[parent].kind == "dir"
        assert entries[parent].permissions == 0o755
        assert entries[parent].nlink == 2
    assert all(e.uid == 0 and e.gid == 0 and e.mtime == 0 for e in entries.values())


def test_sorted_order_sequential_inodes_and_parents_first() -> None:
    entries = read_cpio(sample().to_bytes())
    names = [e.name for e in entries]
    assert names == sorted(names, key=lambda n: n.split("/"))
    assert [e.ino for e in entries] == list(range(1, len(entries) + 1))
    seen: set[str] = set()
    for name in names:
        parent = name.rpartition("/")[0]
        assert not parent or parent in seen
        seen.add(name)


def test_layout_header_alignment_and_trailer() -> None:
    raw = sample().to_bytes()
    assert len(raw) % 4 == 0
    pos, names = 0, []
    while True:  # walk the headers by hand: every one starts on a 4-byte boundary
        assert pos % 4 == 0
        assert raw[pos : pos + 6] == b"070701"
        size, namesize = int(raw[pos + 54 : pos + 62], 16), int(raw[pos + 94 : pos + 102], 16)
        names.append(raw[pos + 110 : pos + 110 + namesize - 1].decode())
        pos += 110 + namesize
        pos += -pos % 4
        assert pos % 4 == 0
        pos += size + (-size % 4)
        if names[-1] == "TRAILER!!!":
            break
    assert pos == len(raw)
    assert "TRAILER!!!" not in [e.name for e in read_cpio(raw)]


def test_exact_bytes_of_a_one_file_archive() -> None:
    writer = CpioWriter()
    writer.add_file("a", b"xyz", 0o644)
    header = b"070701" + b"".join(
        b"%08X" % v for v in (1, 0o100644, 0, 0, 1, 0, 3, 0, 0, 0, 0, 2, 0)
    )
    trailer = b"070701" + b"".join(b"%08X" % v for v in (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 11, 0))
    expected = header + b"a\0" + b"xyz\0" + trailer + b"TRAILER!!!\0" + b"\0\0\0"
    assert writer.to_bytes() == expected


def test_reproducible_regardless_of_insertion_order() -> None:
    assert sample(0).to_bytes() == sample(1).to_bytes()
    first, second = sample(0).to_gzip(), sample(1).to_gzip()
    assert first == second
    assert first[:2] == b"\x1f\x8b"
    assert first[3] == 0  # FLG: no FNAME, no FCOMMENT, no FEXTRA
    assert first[4:8] == b"\0\0\0\0"  # MTIME 0
    assert gzip.decompress(first) == sample().to_bytes()


def test_reader_accepts_gzip_and_concatenated_archives() -> None:
    one, two = CpioWriter(), CpioWriter()
    one.add_file("early/microcode.bin", b"u")
    two.add_file("init", b"i")
    combined = one.to_bytes() + b"\0" * 8 + two.to_bytes()
    assert [e.name for e in read_cpio(combined)] == ["early", "early/microcode.bin", "init"]
    assert [e.name for e in read_cpio(gzip.compress(two.to_bytes()))] == ["init"]


def test_duplicates_and_conflicts() -> None:
    writer = CpioWriter()
    writer.add_dir("/etc")
    writer.add_dir("/etc")  # same directory again is fine
    writer.add_file("/etc/hostname", b"x")
    with pytest.raises(GuestError, match="added twice"):
        writer.add_file("/etc/hostname", b"y")
    with pytest.raises(GuestError, match="added twice"):
        writer.add_dir("/etc", 0o700)
    with pytest.raises(GuestError, match="not a directory"):
        writer.add_file("/etc/hostname/child", b"z")
    assert "/etc/hostname" in writer
    writer.discard("/etc/hostname")
    assert "etc/hostname" not in writer
    writer.add_file("/etc/hostname", b"y")
    with pytest.raises(GuestError, match="cannot replace directory"):
        writer.discard("/etc")
    assert len(writer) == 2


@pytest.mark.parametrize("path", ["", "/", ".", "../etc/passwd", "a/../../b"])
def test_rejects_bad_paths(path: str) -> None:
    with pytest.raises(GuestError):
        CpioWriter().add_file(path, b"")


def test_rejects_empty_symlink_and_out_of_range_fields() -> None:
    writer = CpioWriter()
    with pytest.raises(GuestError, match="needs a target"):
        writer.add_symlink("/x", "")
    writer.add_chardev("/dev/big", 1 << 33, 0)
    with pytest.raises(GuestError, match="out of range"):
        writer.to_bytes()


def _good() -> bytes:
    writer = CpioWriter()
    writer.add_file("init", b"12345")
    return writer.to_bytes()


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "empty cpio archive"),
        (b"garbage!" * 20, "bad cpio magic"),
        (_good()[:50], "truncated cpio header"),
        (_good()[:120], "truncated cpio data|bad cpio entry name"),
        (b"070701" + b"Z" * 104, "non-hex"),
        (_good()[: _good().index(b"TRAILER") - 110], "no TRAILER"),
        (b"\x1f\x8b\x08\x00corrupt", "corrupt gzip"),
        (b"070701" + b"0" * 104 + b"x", "bad cpio entry name"),
    ],
)
def test_reader_rejects_malformed_input(blob: bytes, message: str) -> None:
    with pytest.raises(GuestError, match=message):
        read_cpio(blob)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_gnu_cpio_lists_the_archive(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(sample().to_bytes())
    with archive.open("rb") as stdin:
        listing = subprocess.run(
            ["cpio", "-it", "--quiet"], stdin=stdin, capture_output=True, text=True, check=True
        ).stdout.split()
    assert listing == [e.name for e in read_cpio(archive.read_bytes())]
