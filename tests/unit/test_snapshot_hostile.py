"""Hostile snapshot files: a snapshot can at worst fail to restore.

Every test here saves a real snapshot through the fake backend of ``test_snapshot_ops``, then
plays the attacker on its files (metadata, state file, captured disk) and checks that the
restore is refused with a :class:`~vzkit.SnapshotError` before the backend is called (the
fake machine records every ``restore_state``), and that ``get``/``list`` never leak a
``KeyError``/``TypeError``/``ValueError``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vzkit
from vzkit._diskcopy import CopyAborted, nonzero_digest_fd, sha256_fd
from vzkit._state import VMState
from vzkit.snapshots import _files, _ops, _record

from .test_snapshot_ops import machine, make_vms

Factory = Callable[..., vzkit.VirtualMachine]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Factory]:
    yield from make_vms(tmp_path)


def _saved(setup: Factory, tmp_path: Path, name: str = "s") -> tuple[vzkit.VirtualMachine, Any]:
    vm = setup()
    vm.start()
    manager = vzkit.SnapshotManager(tmp_path / "vm")
    manager.save(vm, name)
    vm.stop()
    return vm, manager


def _meta(manager: vzkit.SnapshotManager, name: str = "s") -> dict[str, Any]:
    data: dict[str, Any] = json.loads(manager.meta_path(name).read_text())
    return data


def _write_meta(manager: vzkit.SnapshotManager, data: object, name: str = "s") -> None:
    path = manager.meta_path(name)
    path.unlink()
    path.write_text(json.dumps(data))


def _nonzero_digest(data: bytes) -> str:
    """The disk checksum as docs/snapshots.md defines it, written out independently."""
    block = 1 << 20
    digest = hashlib.sha256(b"vzkit-nonzero-1m\n" + len(data).to_bytes(8, "big"))
    for index in range((len(data) + block - 1) // block):
        chunk = data[index * block : (index + 1) * block]
        if chunk.count(0) != len(chunk):
            digest.update(index.to_bytes(8, "big") + chunk)
    return "sha256-nonzero-1m:" + digest.hexdigest()


def _resign(manager: vzkit.SnapshotManager, data: dict[str, Any], name: str = "s") -> None:
    """What a hostile author does: checksums and sizes that match the files as they are."""
    sdir = manager.snapshot_dir
    state = (sdir / f"{name}.vmstate").read_bytes()
    data["stateSha256"], data["size"] = hashlib.sha256(state).hexdigest(), len(state)
    for disk in data["disks"]:
        image = (sdir / disk["file"]).read_bytes()
        disk["digest"], disk["size"] = _nonzero_digest(image), len(image)
    data["configFingerprint"] = _record.fingerprint(data["machine"])
    _write_meta(manager, data, name)


def _refused(vm: vzkit.VirtualMachine, manager: Any, match: str, name: str = "s") -> str:
    with pytest.raises(vzkit.SnapshotError, match=match) as info:
        manager.restore(vm, name)
    assert machine(vm).restored == []  # the backend never saw a file
    assert vm.state is VMState.STOPPED
    return str(info.value)


def _disk_file(manager: vzkit.SnapshotManager, name: str = "s") -> Path:
    return manager.snapshot_dir / _meta(manager, name)["disks"][0]["file"]


def _replace_bytes(path: Path, data: bytes) -> None:
    """Rewrite a (read-only) snapshot file in place, as an attacker with access would."""
    os.chmod(path, 0o600)
    path.write_bytes(data)


# -- names in the metadata ---------------------------------------------------------------


@pytest.mark.parametrize(
    "file",
    [
        "/etc/passwd",
        "../../x",
        "../snapshots/s.json",
        "sub/s.0123456789ab.disk0.raw",
        "s.vmstate",
        "other.0123456789ab.disk0.raw",  # another snapshot's disk
        "s.0123456789ab.disk0.raw",  # the pattern, but not this save's token
        "s.{token}.disk0.vmdk",  # not a DiskFormat
        "s.{token}.disk1.raw",  # not this entry's role
        "s.{token}.disk0.qcow2",  # not this entry's format
    ],
)
def test_a_disk_file_outside_the_writers_names_is_refused(
    setup: Factory, tmp_path: Path, file: str
) -> None:
    vm, manager = _saved(setup, tmp_path)
    data = _meta(manager)
    file = file.format(token=data["id"])
    if "/" not in file and not (manager.snapshot_dir / file).exists():
        (manager.snapshot_dir / file).write_bytes(b"")  # it exists: only the name rule refuses
    (tmp_path / "x").write_bytes(b"host file")  # what ../../x reaches
    data["disks"][0]["file"] = file
    _write_meta(manager, data)
    message = _refused(vm, manager, r"field 'disks\[0\]\.file' must be ")
    assert f"'s.{data['id']}.disk0.raw'" in message  # says which name it must be
    with pytest.raises(vzkit.SnapshotError, match=r"disks\[0\]\.file"):
        manager.get("s")
    assert [m.name for m in manager.list()] == ["s"]  # still listed, so it can be deleted
    manager.delete("s")
    assert manager.list() == []
    assert (tmp_path / "x").read_bytes() == b"host file"


def test_file_path_in_the_metadata_is_never_used(setup: Factory, tmp_path: Path) -> None:
    vm, manager = _saved(setup, tmp_path)
    decoy = tmp_path / "decoy.vmstate"
    decoy.write_bytes(b"not the state")
    data = _meta(manager)
    data["filePath"] = str(decoy)
    _write_meta(manager, data)
    assert manager.get("s").file_path == manager.state_path("s")
    manager.restore(vm, "s")
    ((state, _),) = machine(vm).restored
    assert state == manager.state_path("s")
    assert machine(vm).state_read == manager.state_path("s").read_bytes()


def test_a_symlinked_disk_is_refused_even_with_matching_checksums(
    setup: Factory, tmp_path: Path
) -> None:
    vm, manager = _saved(setup, tmp_path)
    disk = _disk_file(manager)
    host_file = tmp_path / "host-file"
    host_file.write_bytes(disk.read_bytes())  # same bytes: only the symlink rule can refuse
    disk.unlink()
    disk.symlink_to(host_file)
    _refused(vm, manager, "is a symlink, refused")


def test_a_symlinked_state_file_is_refused(setup: Factory, tmp_path: Path) -> None:
    vm, manager = _saved(setup, tmp_path)
    state = manager.state_path("s")
    host_file = tmp_path / "host-state"
    host_file.write_bytes(state.read_bytes())
    state.unlink()
    state.symlink_to(host_file)
    _refused(vm, manager, "is not a regular file")
    assert manager.list() == []  # a symlink is never a snapshot of ours


def test_a_fifo_as_metadata_does_not_hang(setup: Factory, tmp_path: Path) -> None:
    _, manager = _saved(setup, tmp_path)
    manager.meta_path("s").unlink()
    os.mkfifo(manager.meta_path("s"))
    outcome: list[BaseException | None] = []

    def get() -> None:
        try:
            manager.get("s")
            outcome.append(None)
        except BaseException as err:
            outcome.append(err)

    worker = threading.Thread(target=get, daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "get() blocked opening a FIFO"
    assert isinstance(outcome[0], vzkit.SnapshotError)
    assert "not a regular file" in str(outcome[0])


# -- checksums ---------------------------------------------------------------------------


def test_the_recorded_checksums_are_the_documented_ones(setup: Factory, tmp_path: Path) -> None:
    _, manager = _saved(setup, tmp_path)
    data = _meta(manager)
    state = manager.state_path("s").read_bytes()
    assert data["stateSha256"] == hashlib.sha256(state).hexdigest()  # `sha256sum` agrees
    (disk,) = data["disks"]
    image = (manager.snapshot_dir / disk["file"]).read_bytes()
    assert disk["digest"] == _nonzero_digest(image)
    assert disk["size"] == len(image) == 8 << 20


def test_an_altered_disk_is_refused(setup: Factory, tmp_path: Path) -> None:
    vm, manager = _saved(setup, tmp_path)
    disk = _disk_file(manager)
    data = bytearray(disk.read_bytes())
    data[(1 << 20) + 3] ^= 0x01  # one bit, same size
    _replace_bytes(disk, bytes(data))
    message = _refused(vm, manager, "is damaged: the checksum of")
    assert str(disk) in message


def test_a_disk_with_data_where_the_snapshot_had_zeros_is_refused(
    setup: Factory, tmp_path: Path
) -> None:
    vm, manager = _saved(setup, tmp_path)
    disk = _disk_file(manager)
    data = bytearray(disk.read_bytes())
    data[5 << 20] = 1  # a block that was a hole
    _replace_bytes(disk, bytes(data))
    _refused(vm, manager, "is damaged: the checksum of")


def test_an_altered_state_file_is_refused(setup: Factory, tmp_path: Path) -> None:
    vm, manager = _saved(setup, tmp_path)
    state = manager.state_path("s")
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF
    _replace_bytes(state, bytes(data))
    message = _refused(vm, manager, "is damaged: the checksum of")
    assert str(state) in message


def test_the_checksums_run_while_the_vm_is_built_and_gate_the_load(
    setup: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm, manager = _saved(setup, tmp_path)
    fake = machine(vm)
    check = _ops.check_digests

    def check_while_building(opened: _files.Opened, name: str, abort: threading.Event) -> None:
        # run one after the other, this would wait for a build that waits for it
        assert fake.built.wait(10), "the checksums did not run while the VM was being built"
        check(opened, name, abort)

    monkeypatch.setattr(_ops, "check_digests", check_while_building)
    manager.restore(vm, "s")
    assert fake.restored
    vm.stop()

    state = manager.state_path("s")  # a damaged state file: built, never loaded
    _replace_bytes(state, state.read_bytes()[:-1] + b"X")
    fake.built.clear()
    fake.restored.clear()
    _refused(vm, manager, "is damaged: the checksum of")
    assert fake.built.is_set()
    assert fake.restored == []


def test_a_truncated_state_file_is_refused_even_if_the_size_is_rewritten(
    setup: Factory, tmp_path: Path
) -> None:
    vm, manager = _saved(setup, tmp_path)
    state = manager.state_path("s")
    _replace_bytes(state, state.read_bytes()[:-100])
    _refused(vm, manager, "is incomplete")
    data = _meta(manager)
    data["size"] = state.stat().st_size  # the size check passes now; the checksum does not
    _write_meta(manager, data)
    _refused(vm, manager, "is damaged: the checksum of")


def test_a_truncated_disk_is_refused(setup: Factory, tmp_path: Path) -> None:
    vm, manager = _saved(setup, tmp_path)
    disk = _disk_file(manager)
    _replace_bytes(disk, disk.read_bytes()[: 1 << 20])
    _refused(vm, manager, r"has 1048576 bytes, its metadata says 8388608 \(truncated or altered\)")


def test_the_state_file_swapped_after_the_check_is_not_what_the_backend_reads(
    setup: Factory, tmp_path: Path
) -> None:
    vm, manager = _saved(setup, tmp_path)
    state = manager.state_path("s")
    checked = state.read_bytes()
    evil = tmp_path / "evil"
    evil.write_bytes(checked[:-1] + b"!")

    def swap() -> None:  # between the checksum and the backend's open
        os.replace(evil, state)

    machine(vm).before_restore = swap
    manager.restore(vm, "s")
    assert machine(vm).state_read == checked


def test_a_hostile_qcow2_disk_naming_a_backing_file_is_refused(
    setup: Factory, tmp_path: Path
) -> None:
    """A hostile author can write matching checksums; the header of a captured qcow2 must
    still not lead QEMU to a host file."""
    vm, manager = _saved(setup, tmp_path)
    data = _meta(manager)
    old = _disk_file(manager)
    data["disks"][0]["format"] = "qcow2"
    data["disks"][0]["file"] = f"s.{data['id']}.disk0.qcow2"
    header = bytearray(512)
    header[0:4] = b"QFI\xfb"
    header[4:8] = (3).to_bytes(4, "big")
    header[8:16] = (256).to_bytes(8, "big")  # backing file name at offset 256
    header[16:20] = (11).to_bytes(4, "big")
    header[20:24] = (16).to_bytes(4, "big")  # cluster_bits
    header[100:104] = (104).to_bytes(4, "big")  # header_length (v3)
    header[256:267] = b"/etc/shadow"
    (manager.snapshot_dir / data["disks"][0]["file"]).write_bytes(bytes(header))
    old.unlink()
    _resign(manager, data)
    _refused(vm, manager, "names the backing file '/etc/shadow'")
    header[8:20] = bytes(12)  # no backing file, but an external data file
    header[72:80] = (1 << 2).to_bytes(8, "big")
    _replace_bytes(manager.snapshot_dir / data["disks"][0]["file"], bytes(header))
    _resign(manager, data)
    _refused(vm, manager, "names an external data file")


def test_a_snapshot_of_the_previous_format_asks_to_be_saved_again(
    setup: Factory, tmp_path: Path
) -> None:
    vm, manager = _saved(setup, tmp_path)
    data = _meta(manager)
    data["format"] = 1
    del data["stateSha256"]
    for disk in data["disks"]:
        del disk["digest"]
    _write_meta(manager, data)
    assert manager.get("s").name == "s"  # lists and loads
    _refused(vm, manager, r"older vzkit \(metadata format 1\).*save it again")
    data["format"] = 5
    _write_meta(manager, data)
    _refused(vm, manager, r"newer vzkit \(metadata format 5; this one reads 2, 3, 4\)")


def test_a_format_2_snapshot_still_restores(setup: Factory, tmp_path: Path) -> None:
    """Format 2 (before the typed machine description) has the same files and checksums: what
    the previous vzkit wrote, byte for byte in its keys, restores."""
    vm, manager = _saved(setup, tmp_path)
    data = _meta(manager)
    assert data["format"] == 3
    data["format"] = 2
    data["backendInfo"] = {"fake": "1"}  # what the previous writer recorded
    _write_meta(manager, data)
    manager.restore(vm, "s")
    assert vm.state is VMState.PAUSED
    assert len(machine(vm).restored) == 1


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ({"Arch": "x"}, "field 'backendInfo' has an invalid item name 'Arch'"),
        ({"arch": 1}, "field 'backendInfo.arch' must be a string, not a number"),
        ({"cpu": "a\x1bb"}, "field 'backendInfo.cpu' must be at most 200 characters without"),
        ({"machine": "q" * 201}, "field 'backendInfo.machine' must be at most 200 characters"),
        ([], "field 'backendInfo' must be an object, not a list"),
    ],
)
def test_the_machine_description_is_typed(
    setup: Factory, tmp_path: Path, info: object, message: str
) -> None:
    vm, manager = _saved(setup, tmp_path)
    data = _meta(manager)
    data["backendInfo"] = info
    _write_meta(manager, data)
    with pytest.raises(vzkit.SnapshotError, match=re.escape(message)):
        manager.get("s")
    _refused(vm, manager, re.escape(message))


# -- schema ------------------------------------------------------------------------------

MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], object], str]] = {
    "size as a string": (lambda d: d.update(size=str(d["size"])), "'size' must be a non-neg"),
    "negative size": (lambda d: d.update(size=-1), "'size' must be a non-negative integer, not -1"),
    "size as a bool": (lambda d: d.update(size=True), "'size' must be a non-negative integer"),
    "bad timestamp": (lambda d: d.update(created="yesterday"), "'created' must be an RFC 3339"),
    "impossible date": (
        lambda d: d.update(created="2026-02-31T00:00:00Z"),
        "'created' must be an RFC 3339",
    ),
    "bad id": (lambda d: d.update(id="../../etc"), "'id' must be 12 lower-case hex digits"),
    "id missing": (lambda d: d.pop("id"), "'id' is missing"),
    "other name": (lambda d: d.update(name="t"), "'name' is 't', but the file is named 's'"),
    "machine a list": (lambda d: d.update(machine=[]), "'machine' must be an object, not a list"),
    "agent a string": (lambda d: d.update(agent="yes"), "'agent' must be true or false"),
    "disks an object": (lambda d: d.update(disks={}), "'disks' must be a list, not an object"),
    "disks null": (lambda d: d.update(disks=None), "'disks' is null"),
    "disk a number": (lambda d: d["disks"].__setitem__(0, 5), r"'disks\[0\]' must be an object"),
    "disk without file": (lambda d: d["disks"][0].pop("file"), r"'disks\[0\]\.file' is missing"),
    "unknown role": (
        lambda d: d["disks"][0].update(role="cdrom"),
        r"'disks\[0\]\.role' must be 'disk' and a number",
    ),
    "unknown format": (
        lambda d: d["disks"][0].update(format="vmdk"),
        r"'disks\[0\]\.format' must be one of 'raw', 'qcow2'",
    ),
    "negative disk size": (
        lambda d: d["disks"][0].update(size=-5),
        r"'disks\[0\]\.size' must be a non-negative integer",
    ),
    "relative source": (
        lambda d: d["disks"][0].update(source="disk.raw"),
        r"'disks\[0\]\.source' must be an absolute path",
    ),
    "repeated role": (
        lambda d: d["disks"].append(copy.deepcopy(d["disks"][0])),
        r"'disks\[1\]\.role' repeats 'disk0'",
    ),
    "bad digest": (
        lambda d: d["disks"][0].update(digest="md5:00"),
        r"'disks\[0\]\.digest' must be 'sha256-nonzero-1m:'",
    ),
    "no state checksum": (lambda d: d.pop("stateSha256"), "'stateSha256' is missing"),
    "upper-case checksum": (
        lambda d: d.update(stateSha256=d["stateSha256"].upper()),
        "'stateSha256' must be 64 lower-case hex digits",
    ),
    "machine altered": (
        lambda d: d["machine"].update(memory_mb=1),
        "'configFingerprint' does not match field 'machine'",
    ),
    "format a string": (lambda d: d.update(format="2"), "'format' must be a non-negative"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_every_schema_error_names_the_field(setup: Factory, tmp_path: Path, mutation: str) -> None:
    vm, manager = _saved(setup, tmp_path)
    data = _meta(manager)
    mutate, message = MUTATIONS[mutation]
    mutate(data)
    _write_meta(manager, data)
    _refused(vm, manager, message)
    if mutation != "machine altered":  # a consistency check of restore, not of the schema
        with pytest.raises(vzkit.SnapshotError, match=message):
            manager.get("s")
    [listed] = manager.list()  # listed from its state file, so it can be seen and deleted
    assert listed.name == "s"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "it is a list, not an object"),
        ("\xff", "is not valid JSON"),
        ("[" * 100_000, "is not valid JSON"),
        ("1" * 5000, "is not valid JSON"),  # past int's digit limit
        (" " * (1 << 20) + "{}", "is not a regular file of at most 1048576 bytes"),
    ],
)
def test_unreadable_metadata_is_a_snapshot_error(
    setup: Factory, tmp_path: Path, text: str, match: str
) -> None:
    vm, manager = _saved(setup, tmp_path)
    manager.meta_path("s").unlink()
    manager.meta_path("s").write_bytes(text.encode("latin-1"))
    _refused(vm, manager, match)
    with pytest.raises(vzkit.SnapshotError, match=match):
        manager.get("s")
    assert [m.name for m in manager.list()] == ["s"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any]) -> object:
    """A valid metadata object with a few values replaced, keys removed or added."""
    data: Any = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(data)))
        if not path:
            data = draw(JSON)
            continue
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "replace" or not isinstance(parent, dict | list):
            parent[path[-1]] = draw(JSON)
        elif action == "remove":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON)
        else:
            parent.append(draw(JSON))
    return data


def test_random_and_mutated_metadata_only_ever_raise_snapshot_error(
    setup: Factory, tmp_path: Path
) -> None:
    vm, manager = _saved(setup, tmp_path)
    valid = _meta(manager)
    seen = {"restored": 0, "refused": 0}

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(data=st.one_of(JSON, mutated(valid)))
    def check(data: object) -> None:
        _write_meta(manager, data)
        manager.list()  # never raises for one bad snapshot
        try:
            manager.get("s")
        except vzkit.SnapshotError:
            pass
        try:
            manager.restore(vm, "s")
        except vzkit.SnapshotError:
            seen["refused"] += 1
            assert machine(vm).restored == []
            return
        seen["restored"] += 1  # a harmless change (vmState, backendInfo, extra keys...)
        machine(vm).restored.clear()
        vm.stop()

    check()
    assert seen["refused"] > 0


# -- names and permissions ---------------------------------------------------------------


def test_files_and_directories_are_owner_only_under_a_permissive_umask(
    setup: Factory, tmp_path: Path
) -> None:
    vm = setup()
    vm.start()
    manager = vzkit.SnapshotManager(tmp_path / "new" / "vm")
    old = os.umask(0)
    try:
        manager.save(vm, "s")
        manager.save(vm, "s")  # a replaced snapshot too
    finally:
        os.umask(old)
    assert stat.S_IMODE(manager.snapshot_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new" / "vm").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in manager.snapshot_dir.iterdir()}
    assert len(modes) == 3
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes
    token = _meta(manager)["id"]
    assert modes == {"s.json": 0o600, "s.vmstate": 0o400, f"s.{token}.disk0.raw": 0o400}


def test_an_existing_snapshot_dir_open_to_others_is_tightened(
    setup: Factory, tmp_path: Path
) -> None:
    vm = setup()
    vm.start()
    manager = vzkit.SnapshotManager(tmp_path / "vm")
    manager.snapshot_dir.mkdir(parents=True)
    os.chmod(manager.snapshot_dir, 0o755)
    manager.save(vm, "s")
    assert stat.S_IMODE(manager.snapshot_dir.stat().st_mode) == 0o700


# -- the checksum functions --------------------------------------------------------------


def test_the_disk_digest_depends_on_the_content_not_on_holes(tmp_path: Path) -> None:
    block = 1 << 20
    content = bytearray(5 * block + 123)  # a short last block
    content[block + 7] = 1
    content[-1] = 2
    sparse, dense = tmp_path / "sparse", tmp_path / "dense"
    with open(sparse, "wb") as fh:
        fh.truncate(len(content))
        fh.seek(block)
        fh.write(content[block : 2 * block])
        fh.seek(5 * block)
        fh.write(content[5 * block :])
    dense.write_bytes(bytes(content))  # every zero written out
    digests = set()
    for path in (sparse, dense):
        fd = os.open(path, os.O_RDONLY)
        try:
            digest, size = nonzero_digest_fd(fd)
        finally:
            os.close(fd)
        assert size == len(content)
        digests.add("sha256-nonzero-1m:" + digest)
    assert digests == {_nonzero_digest(bytes(content))}
    # one more zero byte at the end is another disk
    assert _nonzero_digest(bytes(content) + b"\0") != _nonzero_digest(bytes(content))


def test_a_cancelled_restore_stops_the_checksum_thread_and_closes_its_files(
    setup: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm, manager = _saved(setup, tmp_path)
    stopped = threading.Event()

    def slow(fd: int, abort: threading.Event | None = None) -> tuple[str, int]:
        assert abort is not None
        if abort.wait(10):
            stopped.set()
            raise CopyAborted
        return sha256_fd(fd)

    monkeypatch.setattr(_files, "sha256_fd", slow)
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(vzkit.VMTimeoutError, match="restoring snapshot 's'"):
        manager.restore(vm, "s", timeout=0.3)
    assert stopped.is_set()  # the thread was told and had stopped before the error came
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert machine(vm).restored == []
    assert vm.state is VMState.STOPPED
