"""More disks and NICs on a real guest (issue 19): an NVMe disk, a network block device served
by qemu-nbd over a Unix socket, and a second NIC with its own kept MAC, in one boot."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import vzkit

from .conftest import VMFactory

pytestmark = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-nbd")


@pytest.fixture
def nbd_socket(tmp_path: Path) -> Iterator[Path]:
    """An export named ``data`` of a 1 MiB image that starts with ``NBD-DATA``."""
    image, sock = tmp_path / "nbd.img", tmp_path / "nbd.sock"
    image.write_bytes(b"NBD-DATA" + bytes((1 << 20) - 8))
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-x", "data", "-k", str(sock), "--persistent", str(image)]
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, "qemu-nbd exited"
            assert time.monotonic() < deadline, "qemu-nbd did not listen"
            time.sleep(0.05)  # poll interval
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)


def test_an_nvme_disk_an_nbd_disk_and_a_second_nic(
    vms: VMFactory, tmp_path: Path, nbd_socket: Path
) -> None:
    nvme = tmp_path / "nvme.img"
    nvme.write_bytes(b"NVME-DISK" + bytes((1 << 20) - 9))
    state = tmp_path / "state"
    _, shell = vms.boot(
        "x86_64",
        state_dir=state,
        disks=(
            vzkit.Disk(path=nvme, bus="nvme"),
            vzkit.Disk(url=f"nbd+unix:///data?socket={nbd_socket}", read_only=True),
        ),
        network=vzkit.parse_network_mode("host-only"),
        networks=(vzkit.parse_network_mode("host-only"),),
    )
    rc, out = shell.run("head -c 9 /dev/nvme0n1; echo; head -c 8 /dev/vda; echo")
    assert rc == 0, out
    assert out.split() == ["NVME-DISK", "NBD-DATA"]
    rc, out = shell.run("cat /sys/class/net/eth0/address /sys/class/net/eth1/address")
    assert rc == 0, out
    kept = [(state / name).read_text().strip() for name in ("mac-address", "mac-address-1")]
    assert out.split() == kept
    assert kept[0] != kept[1]
    rc, out = shell.run("echo x > /dev/vda")  # the NBD export is attached read-only
    assert rc != 0


def test_a_qcow2_disk_naming_a_data_file_never_starts(vms: VMFactory, tmp_path: Path) -> None:
    """More disks get the main disk's check: a qcow2 header naming an external data file (a
    host file QEMU would open read-write) is refused before QEMU runs."""
    host_file, image = tmp_path / "host-file", tmp_path / "extra.qcow2"
    host_file.write_bytes(b"")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={host_file}", str(image),
         "16M"],
        check=True,
    )  # fmt: skip
    vm = vms.create("x86_64", disks=(vzkit.Disk(path=image, format="qcow2", bus="nvme"),))
    with pytest.raises(vzkit.ConfigError, match="data file"):
        vm.start(timeout=30)
    assert vm.state is vzkit.VMState.STOPPED
