"""Capturing disk images: content identical, holes kept, aborts leave nothing."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

import vzkit
from vzkit import _diskcopy
from vzkit._diskcopy import CopyAborted, copy_disk, copy_disk_sync
from vzkit.backends.qemu import _migrate
from vzkit.backends.qemu._machine import QemuMachine


def _sparse_file(path: Path) -> None:
    with open(path, "wb") as fh:
        fh.truncate(64 << 20)
        fh.seek(5 << 20)
        fh.write(b"A" * 70000)
        fh.seek(40 << 20)
        fh.write(bytes(3 << 20))  # allocated but zero: stays a hole in the copy
        fh.write(b"tail")


def test_copy_is_identical_sparse_read_only_and_fsynced(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    _sparse_file(src)
    method = copy_disk_sync(src, dst)
    assert method in ("reflink", "sparse")
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_mode & 0o777 == 0o400
    if method == "sparse":
        assert dst.stat().st_blocks * 512 < 2 << 20  # only the written data is allocated
    with pytest.raises(FileExistsError):  # never overwrites
        copy_disk_sync(src, dst)


def test_an_aborted_copy_leaves_nothing(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    _sparse_file(src)
    abort = threading.Event()
    abort.set()
    with pytest.raises(CopyAborted):
        copy_disk_sync(src, dst, abort)
    assert not dst.exists()


def test_cancelling_the_coroutine_removes_the_partial_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while the worker is between two chunks, with a partial copy on disk.

    The copy is held there (fault injection) rather than raced with a sleep: a fast disk, or
    a reflink (one ioctl), finished before the cancel, and the test then proved nothing.
    """
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    with open(src, "wb") as fh:
        for _ in range(4):
            fh.write(os.urandom(1 << 20))
    copy_range = _diskcopy._copy_range
    partial = threading.Event()

    def held_after_one_chunk(
        src_fd: int, dst_fd: int, start: int, end: int, abort: threading.Event | None
    ) -> int:
        assert abort is not None
        written = copy_range(src_fd, dst_fd, start, min(end, start + (1 << 20)), abort)
        partial.set()
        assert abort.wait(30), "the cancellation never reached the worker"
        return written + copy_range(src_fd, dst_fd, start + (1 << 20), end, abort)

    monkeypatch.setattr(_diskcopy, "_reflink", lambda src_fd, dst_fd: False)
    monkeypatch.setattr(_diskcopy, "_copy_range", held_after_one_chunk)

    async def main() -> None:
        task = asyncio.ensure_future(copy_disk(src, dst))
        assert await asyncio.to_thread(partial.wait, 30)
        assert dst.stat().st_size == 1 << 20  # a partial copy
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert not dst.exists()


def test_qemu_refuses_to_save_virtiofs_shares_by_name(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    share = tmp_path / "src"
    share.mkdir()
    cfg = vzkit.LinuxVMConfig(
        kernel_path=kernel, volumes=(vzkit.VolumeMount(share, "code"),), vsock=False
    )
    machine = QemuMachine(cfg, lambda old, new: None)
    assert _migrate.blockers(machine) == [
        f"vhost-user-fs (the VirtioFS share 'code' of {str(share)!r})"
    ]
    plain = QemuMachine(cfg.replace(volumes=()), lambda old, new: None)
    assert _migrate.blockers(plain) == []
    # vsock is unplugged around a save, except on microvm (no PCI hot-plug).
    assert _migrate.blockers(QemuMachine(cfg.replace(volumes=(), vsock=True), print)) == []
    micro = QemuMachine(cfg.replace(volumes=(), vsock=True, machine_type="microvm"), print)
    assert _migrate.blockers(micro) == [
        "the vsock device (microvm has no PCI hot-plug to unplug it around a save)"
    ]
