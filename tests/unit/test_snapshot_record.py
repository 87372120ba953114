"""The record layer: ``SnapshotRecord.from_json``/``to_json`` round-trips, any number of disks,
and the typed machine description."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

import vzkit
from vzkit.snapshots import MachineInfo, SnapshotDisk, SnapshotRecord
from vzkit.snapshots._record import FORMAT, fingerprint

TOKEN = "0123456789ab"


def _record(disks: int, **info: str) -> SnapshotRecord:
    machine = {"cpus": 2, "memory_mb": 512, "disk_path": "/vm/disk.raw"}
    return SnapshotRecord(
        name="warm",
        format=FORMAT,
        created=datetime(2026, 12, 2, 11, 0, 0, 123456, tzinfo=UTC),
        size=4096,
        vm_state="running",
        file_path="/vm/snapshots/warm.vmstate",
        token=TOKEN,
        backend="qemu",
        info=MachineInfo.from_items(info),
        machine=machine,
        config_fingerprint=fingerprint(machine),
        disks=tuple(
            SnapshotDisk(
                role=f"disk{i}",
                source=f"/vm/disk{i}.img",
                file=f"warm.{TOKEN}.disk{i}.{fmt.value}",
                format=fmt,
                size=(i + 1) << 20,
                digest="sha256-nonzero-1m:" + f"{i:x}" * 64,
            )
            for i in range(disks)
            for fmt in [(vzkit.DiskFormat.RAW, vzkit.DiskFormat.QCOW2)[i % 2]]
        ),
        state_sha256="ab" * 32,
        agent=True,
    )


@pytest.mark.parametrize("disks", [0, 1, 3, 8])
def test_a_record_round_trips_through_json_with_any_number_of_disks(disks: int) -> None:
    record = _record(disks, arch="x86_64", accel="tcg", machine="q35", cpu="max", smt="off")
    text = json.dumps(record.to_json())  # what the store writes
    back = SnapshotRecord.from_json("warm", json.loads(text))
    assert back == record
    assert [d.role for d in back.disks] == [f"disk{i}" for i in range(disks)]
    assert back.info.machine_type == "q35"
    assert back.info.cpu_model == "max"
    assert back.info.other == (("smt", "off"),)


def test_the_json_keeps_the_seed_keys_and_names_the_machine_items() -> None:
    data = _record(1, arch="aarch64", machine="virt").to_json()
    assert {"name", "created", "size", "vmState", "filePath"} <= data.keys()
    assert data["created"] == "2026-12-02T11:00:00.123456Z"
    assert data["format"] == FORMAT == 3
    assert data["backendInfo"] == {"arch": "aarch64", "machine": "virt"}
    assert data["disks"][0] == {
        "role": "disk0",
        "source": "/vm/disk0.img",
        "file": f"warm.{TOKEN}.disk0.raw",
        "format": "raw",
        "size": 1 << 20,
        "digest": "sha256-nonzero-1m:" + "0" * 64,
    }


def test_a_seed_record_round_trips_with_its_keys_only() -> None:
    data = {"name": "old", "created": "2025-01-01T00:00:00Z", "size": 3, "vmState": "paused"}
    record = SnapshotRecord.from_json("old", data)
    assert record.format is None
    assert record.to_json() == data | {"created": "2025-01-01T00:00:00.000000Z"}
    assert SnapshotRecord.from_json("old", record.to_json()) == record


def test_a_disk_file_must_be_the_name_the_writer_gives_it() -> None:
    data = _record(2).to_json()
    data["disks"][1]["file"] = f"warm.{TOKEN}.disk0.qcow2"  # another disk's role
    with pytest.raises(vzkit.SnapshotError, match=r"field 'disks\[1\]\.file' must be"):
        SnapshotRecord.from_json("warm", data)
    data = _record(2).to_json()
    data["disks"][1]["role"] = "disk0"
    data["disks"][1]["file"] = f"warm.{TOKEN}.disk0.qcow2"
    with pytest.raises(vzkit.SnapshotError, match=r"'disks\[1\]\.role' repeats 'disk0'"):
        SnapshotRecord.from_json("warm", data)


def test_machine_info_compares_the_hardware_items_only() -> None:
    saved = MachineInfo.from_items({"arch": "x86_64", "accel": "kvm", "machine": "microvm"})
    assert saved.mismatches(MachineInfo.from_items({"arch": "x86_64", "accel": "tcg"})) == []
    assert saved.mismatches(
        MachineInfo.from_items({"arch": "x86_64", "accel": "kvm", "machine": "q35"})
    ) == ["machine: snapshot 'microvm', this machine 'q35'"]
    cpu = MachineInfo.from_items({"cpu": "host", "numa": "1"})
    assert cpu.mismatches(MachineInfo.from_items({"cpu": "max", "numa": "2"})) == [
        "cpu: snapshot 'host', this machine 'max'",
        "numa: snapshot '1', this machine '2'",
    ]
