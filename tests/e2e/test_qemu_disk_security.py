"""A guest writes a qcow2 header into its own raw disk: at the next start it must still see
its own bytes, and QEMU must neither read nor write the host file that header names (the
CVE-2008-2004 class: a disk's format guessed from bytes the guest controls).

The header is written by the guest itself, through the agent, to ``/dev/vda``; the same
VM (same config) is then started again. x86_64 only: the path is the same on aarch64.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import vzkit
from vzkit._process import live_children

from .conftest import VMFactory

CLUSTER = 64 << 10  # qemu-img's default cluster: the header and its extensions
SECRET = b"HOST-SECRET-FILE " * 512
MARK_OFFSET = 1 << 20
MARK = b"written by the guest after its restart"


def _hostile_header(tmp_path: Path, host_file: Path, *, data_file: bool) -> bytes:
    """The first cluster of a qcow2 image naming ``host_file`` as its backing file (read at
    open) or as its external data file (where guest writes would land)."""
    image = tmp_path / "hostile.qcow2"
    opts = ["-o", f"data_file={host_file}"] if data_file else ["-b", str(host_file), "-F", "raw"]
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(image), "64M"],
        check=True,
        capture_output=True,
    )
    header = image.read_bytes()[:CLUSTER]
    image.unlink()
    assert header[:4] == b"QFI\xfb"
    assert str(host_file).encode() in header
    return header


def _open_files(pid: int) -> set[str]:
    fds = Path(f"/proc/{pid}/fd")
    out = set()
    for fd in fds.iterdir():
        try:
            out.add(os.readlink(fd))
        except OSError:
            pass
    return out


@pytest.mark.parametrize("data_file", [False, True], ids=["backing-file", "data-file"])
def test_a_qcow2_header_the_guest_writes_into_its_raw_disk_stays_its_own_bytes(
    vms: VMFactory, tmp_path: Path, data_file: bool
) -> None:
    host_file = tmp_path / "host-secret.bin"
    host_file.write_bytes(SECRET)
    header = _hostile_header(tmp_path, host_file, data_file=data_file)
    host_file.write_bytes(SECRET)  # again: qemu-img create sizes a data file it names
    disk = vzkit.create_disk_image(tmp_path / "disk.img", 1)
    vm = vms.create("x86_64", disk_path=disk)

    # First boot: root in the guest writes the header over the start of its disk.
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=60)
    done = vm.guest.run(["dd", "of=/dev/vda", "bs=4096", "conv=fsync"], input=header, timeout=60)
    assert done.returncode == 0, done.stderr
    vm.stop(timeout=30)
    assert disk.read_bytes()[:CLUSTER] == header
    before = host_file.stat()

    # Second boot from the same config: the disk is raw, the header is just bytes.
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=60)
    assert vm.pid is not None
    assert str(host_file) not in _open_files(vm.pid)
    seen = vm.guest.run(["dd", "if=/dev/vda", "bs=4096", f"count={CLUSTER // 4096}"], timeout=60)
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout == header  # its own bytes, not the host file's
    size = vm.guest.run(["cat", "/sys/block/vda/size"]).stdout
    assert int(size) * 512 == 1 << 30  # the raw file's size, not the header's 64 MiB
    write = f"printf '{MARK.decode()}' | dd of=/dev/vda bs=1 seek={MARK_OFFSET} conv=fsync"
    wrote = vm.guest.run(["sh", "-c", write], timeout=60)
    assert wrote.returncode == 0, wrote.stderr
    vm.stop(timeout=30)

    with open(disk, "rb") as fh:  # the guest's write landed in its own disk...
        fh.seek(MARK_OFFSET)
        assert fh.read(len(MARK)) == MARK
    after = host_file.stat()  # ...and the host file is as it was: not written, not read
    assert host_file.read_bytes() == SECRET
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_atime_ns == before.st_atime_ns


def test_a_declared_qcow2_disk_runs_and_one_naming_a_host_file_never_starts(
    vms: VMFactory, tmp_path: Path
) -> None:
    disk = vzkit.create_disk_image(tmp_path / "disk.qcow2", 1, format="qcow2")
    vm = vms.create("x86_64", disk_path=disk, disk_format="qcow2")
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=60)
    assert int(vm.guest.run(["cat", "/sys/block/vda/size"]).stdout) * 512 == 1 << 30
    write = f"printf '{MARK.decode()}' | dd of=/dev/vda bs=1 seek={MARK_OFFSET} conv=fsync"
    assert vm.guest.run(["sh", "-c", write], timeout=60).returncode == 0
    vm.stop(timeout=30)
    flat = tmp_path / "flat.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(flat)], check=True
    )
    with open(flat, "rb") as fh:
        fh.seek(MARK_OFFSET)
        assert fh.read(len(MARK)) == MARK

    host_file = tmp_path / "host-secret.bin"
    host_file.write_bytes(SECRET)
    hostile = tmp_path / "hostile.qcow2"
    hostile.write_bytes(_hostile_header(tmp_path, host_file, data_file=False))
    before = live_children()
    bad = vms.create("x86_64", disk_path=hostile, disk_format="qcow2")
    with pytest.raises(vzkit.ConfigError, match=r"names the backing file .*qemu-img convert"):
        bad.start(timeout=60)
    assert bad.state is vzkit.VMState.STOPPED
    assert live_children() == before
