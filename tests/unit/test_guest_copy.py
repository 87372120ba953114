"""``guest.copy_in``/``copy_out`` and ``read_file``'s ``FileNotFoundError`` with the real agent.

The agent runs on the host (:mod:`tests.support.agent_vm`), so the host is the guest: guest
paths are paths of this machine, and the guest's ``sh`` and ``tar`` are the host's (busybox's
are in the e2e test, ``tests/e2e/test_guest_copy.py``). The confined extraction of a guest's
tar (:mod:`vzkit._hosttar`) gets hostile streams, both directly and from a "guest tar" that
prints a crafted stream.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import os
import platform
import stat
import sys
import tarfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

import vzkit
import vzkit.aio
from vzkit import _guestcopy
from vzkit._hosttar import CopyRefusedError, extract_confined
from vzkit.agent import GuestFileNotFoundError
from vzkit.errors import GuestError, VMTimeoutError

from ..support.agent_vm import AgentBackend, host_agent

pytestmark = [
    pytest.mark.skipif(
        sys.platform != "linux" or platform.machine() != "x86_64",
        reason="runs the x86_64 Linux agent binary on the host",
    ),
]

BIG = 20 * 1024 * 1024
FILES = 4000  # tarfile keeps a TarInfo per member unless told not to: 5 MB for these


@pytest.fixture(scope="module")
def agent() -> Path:
    return host_agent()


@pytest.fixture
def vm(agent: Path, tmp_path: Path) -> Iterator[vzkit.VirtualMachine]:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    with vzkit.start(backend=AgentBackend(agent), kernel_path=kernel) as vm:
        yield vm


def make_tree(root: Path) -> Path:
    """A tree with nested directories, a symlink, an executable, an empty directory and a
    20 MiB file."""
    tree = root / "tree"
    (tree / "a" / "b" / "c").mkdir(parents=True)
    (tree / "empty").mkdir()
    (tree / "a" / "b" / "c" / "deep.txt").write_text("deep\n")
    tool = tree / "a" / "tool.sh"
    tool.write_text("#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    private = tree / "a" / "private"
    private.write_bytes(b"secret")
    private.chmod(0o600)
    (tree / "link").symlink_to("a/b/c/deep.txt")
    with open(tree / "big.bin", "wb") as out:
        block = os.urandom(1024 * 1024)
        for i in range(BIG // len(block)):
            out.write(bytes([i]) + block[1:])
    (tree / "a" / "hard").hardlink_to(tree / "a" / "private")
    return tree


def describe(tree: Path) -> dict[str, tuple[str, int, str]]:
    """Each entry below ``tree``: its kind, permission bits and content (a hash, a target)."""
    out: dict[str, tuple[str, int, str]] = {}
    for path in sorted(tree.rglob("*")):
        st = path.lstat()
        name = str(path.relative_to(tree))
        if stat.S_ISLNK(st.st_mode):
            out[name] = ("link", 0, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[name] = ("dir", stat.S_IMODE(st.st_mode), "")
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[name] = ("file", stat.S_IMODE(st.st_mode), digest)
    return out


def test_a_tree_round_trips_byte_identical_in_bounded_memory(
    vm: vzkit.VirtualMachine, tmp_path: Path
) -> None:
    tree = make_tree(tmp_path)
    os.chown(tree / "a" / "tool.sh", 1234, 5678)
    guest_dir = tmp_path / "guest" / "copy"
    (tmp_path / "guest").mkdir()
    back = tmp_path / "back"
    tracemalloc.start()
    try:
        vm.guest.copy_in(tree, str(guest_dir), timeout=120)
        vm.guest.copy_out(str(guest_dir), back, timeout=120)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = describe(tree)
    assert set(expected) >= {"empty", "link", "a/tool.sh", "big.bin", "a/b/c/deep.txt"}
    assert describe(guest_dir) == expected
    assert describe(back) == expected
    assert peak < BIG // 4, f"{peak} bytes traced at the peak for {BIG} bytes of data"
    # copied in as root: the host's numeric owners are kept
    owner = (guest_dir / "a" / "tool.sh").stat()
    assert (owner.st_uid, owner.st_gid) == (1234, 5678)
    # hard links stay linked, both ways
    assert (guest_dir / "a" / "hard").stat().st_ino == (guest_dir / "a" / "private").stat().st_ino
    assert (back / "a" / "hard").stat().st_ino == (back / "a" / "private").stat().st_ino


def test_docker_cp_semantics(vm: vzkit.VirtualMachine, tmp_path: Path) -> None:
    guest, g = vm.guest, tmp_path / "g"
    g.mkdir()
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("f")
    one = tmp_path / "one.txt"
    one.write_text("one")
    # a file onto an existing directory goes inside it; onto a missing name becomes it
    guest.copy_in(one, str(g))
    guest.copy_in(one, str(g / "renamed"))
    assert (g / "one.txt").read_text() == (g / "renamed").read_text() == "one"
    # onto an existing file: replaced
    one.write_text("two")
    guest.copy_in(one, str(g / "renamed"))
    assert (g / "renamed").read_text() == "two"
    # a directory onto an existing directory goes inside; onto a missing name becomes it
    guest.copy_in(src, str(g))
    guest.copy_in(src, str(g / "new"))
    assert (g / "src" / "sub" / "f").read_text() == (g / "new" / "sub" / "f").read_text() == "f"
    # SRC/. copies the contents
    (g / "contents").mkdir()
    guest.copy_in(f"{src}/.", str(g / "contents"))
    assert sorted(p.name for p in (g / "contents").iterdir()) == ["sub"]
    # a directory onto a file, a file into a missing "dir/": refused
    with pytest.raises(GuestError, match="onto the guest file"):
        guest.copy_in(src, str(g / "renamed"))
    with pytest.raises(FileNotFoundError, match="must be an existing directory"):
        guest.copy_in(one, f"{g}/nodir/")
    # the destination's parent is missing: FileNotFoundError (and a GuestError)
    with pytest.raises(GuestFileNotFoundError, match="no directory") as caught:
        guest.copy_in(one, str(g / "missing" / "x"))
    assert isinstance(caught.value, FileNotFoundError)
    assert caught.value.errno == errno.ENOENT
    with pytest.raises(FileNotFoundError):
        guest.copy_in(tmp_path / "no-such-host-file", str(g))
    # and out: into an existing directory, onto a new name, a missing source
    out = tmp_path / "out"
    out.mkdir()
    guest.copy_out(str(g / "one.txt"), out)
    guest.copy_out(str(g / "new"), out / "tree")
    guest.copy_out(f"{g / 'new'}/.", out)
    assert (out / "one.txt").read_text() == "one"
    assert (out / "tree" / "sub" / "f").read_text() == (out / "sub" / "f").read_text() == "f"
    with pytest.raises(GuestError, match="not a directory"):
        guest.copy_out(str(g / "new"), out / "one.txt")
    with pytest.raises(GuestFileNotFoundError, match="No such file"):
        guest.copy_out(str(g / "nothing"), out)
    with pytest.raises(FileNotFoundError):
        guest.copy_out(str(g / "one.txt"), out / "missing" / "x")
    assert not (out / "missing").exists()


def test_read_file_of_a_missing_path_raises_file_not_found(
    agent: Path, vm: vzkit.VirtualMachine, tmp_path: Path
) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as caught:
        vm.guest.read_file(missing)
    assert isinstance(caught.value, GuestFileNotFoundError)
    assert caught.value.errno == errno.ENOENT
    assert missing in str(caught.value)
    (tmp_path / "d").mkdir()
    with pytest.raises(GuestError) as other:
        vm.guest.read_file(str(tmp_path / "d"))
    assert not isinstance(other.value, FileNotFoundError)  # EISDIR stays an AgentError

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")

    async def main() -> tuple[BaseException, bytes]:
        async with vzkit.aio.start(backend=AgentBackend(agent), kernel_path=kernel) as avm:
            try:
                await avm.guest.read_file(missing)
            except FileNotFoundError as err:
                error: BaseException = err
            else:
                raise AssertionError("no error")
            (tmp_path / "tree").mkdir()
            (tmp_path / "tree" / "x").write_text("x")
            await avm.guest.copy_in(tmp_path / "tree", str(tmp_path / "in"))
            await avm.guest.copy_out(str(tmp_path / "in"), tmp_path / "out")
            return error, (tmp_path / "out" / "x").read_bytes()

    error, copied = asyncio.run(main())
    assert isinstance(error, GuestFileNotFoundError)
    assert copied == b"x"


# ---- hostile guest streams ---------------------------------------------------------------------


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
    return info


HOSTILE = {
    "dotdot": [(_member("x/../../escaped"), b"evil")],
    "absolute": [(_member("/etc/escaped"), b"evil")],
    "outside the top": [(_member("other/escaped"), b"evil")],
    "absolute link": [(_member("x/etc", tarfile.SYMTYPE, "/etc"), b"")],
    "escaping link, then a file through it": [
        (_member("x", tarfile.DIRTYPE), b""),
        (_member("x/up", tarfile.SYMTYPE, "../.."), b""),
        (_member("x/up/escaped"), b"evil"),
    ],
    "inner link, then a file through it": [
        (_member("x", tarfile.DIRTYPE), b""),
        (_member("x/here", tarfile.SYMTYPE, "."), b""),
        (_member("x/here/escaped"), b"evil"),
    ],
    "a name then '..' in a link": [
        (_member("x/a", tarfile.SYMTYPE, "."), b""),
        (_member("x/b", tarfile.SYMTYPE, "a/a/../../.."), b""),
    ],
    "hard link out": [(_member("x/passwd", tarfile.LNKTYPE, "/etc/passwd"), b"")],
    "hard link to what is not there": [(_member("x/h", tarfile.LNKTYPE, "x/nothing"), b"")],
    "device node": [(_member("x/dev", tarfile.CHRTYPE), b"")],
    "fifo": [(_member("x/fifo", tarfile.FIFOTYPE), b"")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_streams_are_refused_and_nothing_escapes(case: str, tmp_path: Path) -> None:
    root = tmp_path / "box" / "dest"
    root.mkdir(parents=True)
    with pytest.raises(CopyRefusedError):
        extract_confined(io.BytesIO(_tar(*HOSTILE[case])), root, "x", "x")
    assert not list(tmp_path.rglob("escaped"))
    assert {p.name for p in tmp_path.rglob("*")} <= {"box", "dest", "x", "up", "here", "a"}
    for link in root.rglob("*"):
        if link.is_symlink():  # whatever link was written resolves inside the copy
            assert link.resolve().is_relative_to(root)


def test_links_inside_the_copy_are_kept(tmp_path: Path) -> None:
    stream = _tar(
        (_member("x", tarfile.DIRTYPE), b""),
        (_member("x/d", tarfile.DIRTYPE), b""),
        (_member("x/d/f"), b"data"),
        (_member("x/d/up", tarfile.SYMTYPE, "../d/f"), b""),
        (_member("x/h", tarfile.LNKTYPE, "x/d/f"), b""),
    )
    extract_confined(io.BytesIO(stream), tmp_path, "x", "y")
    assert os.readlink(tmp_path / "y" / "d" / "up") == "../d/f"
    assert (tmp_path / "y" / "h").read_bytes() == b"data"


def test_modes_lose_set_id_and_group_write(tmp_path: Path) -> None:
    info = _member("x")
    info.mode = 0o6777
    extract_confined(io.BytesIO(_tar((info, b"data"))), tmp_path, "x", "x")
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o755


def test_a_hostile_guest_tar_through_copy_out(
    vm: vzkit.VirtualMachine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest's ``tar`` prints a crafted stream: copy_out refuses it, nothing escapes."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    crafted = tmp_path / "crafted.tar"
    crafted.write_bytes(
        _tar((_member("./src", tarfile.DIRTYPE), b""), (_member("../escaped"), b"evil"))
    )
    _fake_tar(tmp_path, monkeypatch, f"cat {crafted}")
    (tmp_path / "src").mkdir()
    dest = tmp_path / "box" / "out"
    dest.mkdir(parents=True)
    with pytest.raises(CopyRefusedError, match=r"'\.\.' component"):
        vm.guest.copy_out(str(tmp_path / "src"), dest)
    assert not list(tmp_path.rglob("escaped"))
    assert vm.guest.run(["true"]).returncode == 0  # the connection is fine afterwards


def _fake_tar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """Make the guest's ``tar`` (first on the copy's PATH) the shell ``script``."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "tar"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    env = dict(_guestcopy._ENV)
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    monkeypatch.setattr(_guestcopy, "_ENV", env)


def test_a_guest_tar_that_fails_midway_is_reported(
    vm: vzkit.VirtualMachine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"\0" * (8 * 1024 * 1024))  # more than the agent's window: it must block
    _fake_tar(tmp_path, monkeypatch, "head -c 100000 >/dev/null; echo 'tar: disk full' >&2; exit 1")
    (tmp_path / "g").mkdir()
    with pytest.raises(GuestError, match="tar: disk full"):
        vm.guest.copy_in(big, str(tmp_path / "g"), timeout=60)
    assert vm.guest.run(["true"]).returncode == 0


def test_a_copy_over_its_timeout_stops(
    vm: vzkit.VirtualMachine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_tar(tmp_path, monkeypatch, "exec sleep 60")  # a guest tar that never writes
    (tmp_path / "src").mkdir()
    started = time.monotonic()
    with pytest.raises(VMTimeoutError, match=r"over 0\.5 s"):
        vm.guest.copy_out(str(tmp_path / "src"), tmp_path / "out", timeout=0.5)
    assert time.monotonic() - started < 10
    assert vm.guest.run(["true"]).returncode == 0


def test_memory_does_not_grow_with_the_number_of_files(
    vm: vzkit.VirtualMachine, tmp_path: Path
) -> None:
    tree = tmp_path / "many"
    tree.mkdir()
    for i in range(FILES):
        (tree / f"file-{i:05d}").write_bytes(b"x")
    tracemalloc.start()
    try:
        vm.guest.copy_in(tree, str(tmp_path / "in"), timeout=120)
        vm.guest.copy_out(str(tmp_path / "in"), tmp_path / "out", timeout=120)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(list((tmp_path / "out").iterdir())) == FILES
    assert peak < 3_000_000, f"{peak} bytes traced at the peak for {FILES} files"
