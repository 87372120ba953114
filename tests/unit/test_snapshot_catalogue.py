"""The snapshot catalogue: listing, deleting, Go-compatible metadata, name safety."""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from vzkit import SnapshotError, SnapshotManager, SnapshotMeta


def _write(
    vm_dir: Path, name: str, state: bytes = b"state", meta: dict[str, object] | str | None = None
) -> Path:
    snaps = vm_dir / "snapshots"
    snaps.mkdir(parents=True, exist_ok=True)
    state_file = snaps / f"{name}.vmstate"
    state_file.write_bytes(state)
    if meta is not None:
        text = meta if isinstance(meta, str) else json.dumps(meta)
        (snaps / f"{name}.json").write_text(text, encoding="utf-8")
    return state_file


def _go_meta(name: str, created: str, vm_dir: Path, size: int = 5) -> dict[str, object]:
    return {
        "name": name,
        "created": created,
        "size": size,
        "vmState": "paused",
        "filePath": str(vm_dir / "snapshots" / f"{name}.vmstate"),
    }


def test_snapshot_meta_fields() -> None:
    names = [f.name for f in dataclasses.fields(SnapshotMeta)]
    assert names[:5] == ["name", "created", "size", "vm_state", "file_path"]


def test_empty_and_missing_catalogue(tmp_path: Path) -> None:
    assert SnapshotManager(tmp_path / "vm").list() == []
    assert not (tmp_path / "vm").exists()  # listing creates nothing
    (tmp_path / "vm2" / "snapshots").mkdir(parents=True)
    assert SnapshotManager(tmp_path / "vm2").list() == []


def test_paths(tmp_path: Path) -> None:
    manager = SnapshotManager(tmp_path)
    assert manager.snapshot_dir == tmp_path / "snapshots"
    assert manager.state_path("a") == tmp_path / "snapshots" / "a.vmstate"
    assert manager.meta_path("a") == tmp_path / "snapshots" / "a.json"


def test_go_written_metadata_loads(tmp_path: Path) -> None:
    state = _write(
        tmp_path,
        "before-upgrade",
        b"x" * 1234,
        _go_meta("before-upgrade", "2026-03-21T10:15:30.123456789-07:00", tmp_path, size=1234),
    )
    [meta] = SnapshotManager(tmp_path).list()
    assert meta.name == "before-upgrade"
    assert meta.created.tzinfo is not None
    assert meta.created.utcoffset() == timedelta(hours=-7)
    assert meta.created == datetime(2026, 3, 21, 17, 15, 30, 123456, tzinfo=UTC)
    assert meta.size == 1234
    assert meta.vm_state == "paused"
    assert meta.file_path == state
    assert isinstance(meta.file_path, Path)


@pytest.mark.parametrize(
    ("created", "expected"),
    [
        ("2026-03-21T10:15:30Z", datetime(2026, 3, 21, 10, 15, 30, tzinfo=UTC)),
        ("2026-03-21T10:15:30.5Z", datetime(2026, 3, 21, 10, 15, 30, 500000, tzinfo=UTC)),
        (
            "2026-03-21T10:15:30.12345678+05:30",
            datetime(2026, 3, 21, 10, 15, 30, 123456, tzinfo=timezone(timedelta(hours=5.5))),
        ),
        ("2026-03-21t10:15:30z", datetime(2026, 3, 21, 10, 15, 30, tzinfo=UTC)),
        ("2026-03-21T10:15:30.000000001Z", datetime(2026, 3, 21, 10, 15, 30, tzinfo=UTC)),
    ],
)
def test_rfc3339_variants(tmp_path: Path, created: str, expected: datetime) -> None:
    _write(tmp_path, "s", meta=_go_meta("s", created, tmp_path))
    assert SnapshotManager(tmp_path).list()[0].created == expected


def test_newest_first(tmp_path: Path) -> None:
    _write(tmp_path, "middle", meta=_go_meta("middle", "2026-03-21T12:00:00Z", tmp_path))
    # 10:00 -07:00 is 17:00 UTC: the newest despite the smaller wall-clock hour
    _write(tmp_path, "newest", meta=_go_meta("newest", "2026-03-21T10:00:00-07:00", tmp_path))
    _write(tmp_path, "oldest", meta=_go_meta("oldest", "2025-01-01T00:00:00Z", tmp_path))
    names = [m.name for m in SnapshotManager(tmp_path).list()]
    assert names == ["newest", "middle", "oldest"]


def test_state_file_without_json_lists_with_mtime(tmp_path: Path) -> None:
    state = _write(tmp_path, "bare", b"abc")
    when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC).timestamp()
    os.utime(state, (when, when))
    [meta] = SnapshotManager(tmp_path).list()
    assert meta.name == "bare"
    assert meta.created == datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    assert meta.created.tzinfo is not None
    assert meta.size == 3
    assert meta.vm_state == ""
    assert meta.file_path == state


def test_size_is_state_file_size(tmp_path: Path) -> None:
    _write(tmp_path, "s", b"12345678", _go_meta("s", "2026-01-01T00:00:00Z", tmp_path, size=999))
    assert SnapshotManager(tmp_path).list()[0].size == 8


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "", '{"created": "yesterday"}'])
def test_corrupt_json_still_lists(tmp_path: Path, text: str) -> None:
    state = _write(tmp_path, "s", b"abcd", text)
    [meta] = SnapshotManager(tmp_path).list()
    assert meta.name == "s"
    assert meta.size == 4
    assert meta.created.tzinfo is not None
    assert meta.created == datetime.fromtimestamp(state.stat().st_mtime, tz=UTC)


def test_json_without_state_file_is_not_listed(tmp_path: Path) -> None:
    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    (snaps / "orphan.json").write_text(
        json.dumps(_go_meta("orphan", "2026-01-01T00:00:00Z", tmp_path))
    )
    (snaps / ".tmp.vmstate").write_bytes(b"partial")
    (snaps / "notes.txt").write_text("x")
    (snaps / "dir.vmstate").mkdir()
    assert SnapshotManager(tmp_path).list() == []


def test_to_json_dict_uses_go_keys(tmp_path: Path) -> None:
    _write(tmp_path, "s", b"abc", _go_meta("s", "2026-03-21T10:15:30.123456789-07:00", tmp_path))
    meta = SnapshotManager(tmp_path).list()[0]
    data = meta.to_json_dict()
    assert data == {
        "name": "s",
        "created": "2026-03-21T10:15:30.123456-07:00",
        "size": 3,
        "vmState": "paused",
        "filePath": str(tmp_path / "snapshots" / "s.vmstate"),
    }


def test_get(tmp_path: Path) -> None:
    _write(tmp_path, "s", b"abc")
    assert SnapshotManager(tmp_path).get("s").size == 3
    with pytest.raises(SnapshotError, match="no snapshot named 'other'"):
        SnapshotManager(tmp_path).get("other")


def test_delete_removes_both(tmp_path: Path) -> None:
    state = _write(tmp_path, "a", meta=_go_meta("a", "2026-01-01T00:00:00Z", tmp_path))
    keep = _write(tmp_path, "b", meta=_go_meta("b", "2026-01-01T00:00:00Z", tmp_path))
    manager = SnapshotManager(tmp_path)
    manager.delete("a")
    assert not state.exists()
    assert not state.with_suffix(".json").exists()
    assert keep.exists()
    assert keep.with_suffix(".json").exists()
    assert [m.name for m in manager.list()] == ["b"]


def test_delete_state_only(tmp_path: Path) -> None:
    state = _write(tmp_path, "bare")
    SnapshotManager(tmp_path).delete("bare")
    assert not state.exists()


def test_delete_missing(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError) as info:
        SnapshotManager(tmp_path).delete("ghost")
    assert str(info.value) == f"no snapshot named 'ghost' in '{tmp_path / 'snapshots'}'"
    assert not (tmp_path / "snapshots").exists()


BAD_NAMES = ["", "a/b", "/etc/passwd", "..", "../x", "x/..", "a..b", "a\x00b", "\x00", ".hidden"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_rejected_before_touching_disk(tmp_path: Path, name: str) -> None:
    vm_dir = tmp_path / "vm"
    manager = SnapshotManager(vm_dir)
    for call in (manager.delete, manager.get, manager.state_path, manager.meta_path):
        with pytest.raises(SnapshotError):
            call(name)
    assert not vm_dir.exists()


@pytest.mark.parametrize("name", ["..", "../victim", "sub/victim"])
def test_bad_names_remove_nothing(tmp_path: Path, name: str) -> None:
    vm_dir = tmp_path / "vm"
    victim = _write(vm_dir, "victim")
    (vm_dir / "victim.vmstate").write_bytes(b"outside")
    (vm_dir / "snapshots" / "sub").mkdir()
    (vm_dir / "snapshots" / "sub" / "victim.vmstate").write_bytes(b"nested")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SnapshotError):
        SnapshotManager(vm_dir).delete(name)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert victim.read_bytes() == b"state"


def test_exact_messages_for_bad_names(tmp_path: Path) -> None:
    manager = SnapshotManager(tmp_path)
    with pytest.raises(SnapshotError) as info:
        manager.delete("")
    assert str(info.value) == "snapshot name must not be empty"
    with pytest.raises(SnapshotError) as info:
        manager.delete("a/b")
    assert str(info.value) == "invalid snapshot name 'a/b': it contains '/'"
    with pytest.raises(SnapshotError) as info:
        manager.delete("a\x00b")
    assert str(info.value) == "invalid snapshot name 'a\\x00b': it contains a NUL byte"
    with pytest.raises(SnapshotError) as info:
        manager.delete(None)  # type: ignore[arg-type]
    assert str(info.value) == "snapshot name must be a string, got NoneType"


def test_manager_accepts_str_and_does_not_create(tmp_path: Path) -> None:
    manager = SnapshotManager(str(tmp_path / "vm"))
    assert manager.vm_dir == tmp_path / "vm"
    assert "SnapshotManager(" in repr(manager)
    assert not (tmp_path / "vm").exists()


@pytest.mark.parametrize(
    ("name", "code"),
    [("\x01", "U+0001"), ("a\nb", "U+000A"), ("tab\there", "U+0009"), ("esc\x1b[31m", "U+001B"),
     ("del\x7f", "U+007F"), ("c1\x85", "U+0085"), ("c1\x9f", "U+009F")],
)  # fmt: skip
def test_control_characters_are_refused(tmp_path: Path, name: str, code: str) -> None:
    manager = SnapshotManager(tmp_path / "vm")
    for call in (manager.delete, manager.get, manager.state_path, manager.meta_path):
        with pytest.raises(SnapshotError) as info:
            call(name)
        assert str(info.value) == (
            f"invalid snapshot name {name!r}: it contains the control character {code} "
            "(use letters, digits and punctuation)"
        )
    assert not (tmp_path / "vm").exists()
    assert SnapshotManager(tmp_path).state_path("café ünïcode ✓").name == "café ünïcode ✓.vmstate"


def test_a_state_file_with_a_control_character_is_not_listed(tmp_path: Path) -> None:
    _write(tmp_path, "ok")
    _write(tmp_path, "bad\x1bname")
    assert [m.name for m in SnapshotManager(tmp_path).list()] == ["ok"]


def test_get_refuses_what_list_forgives(tmp_path: Path) -> None:
    _write(tmp_path, "s", b"abcd", '{"created": "yesterday"}')
    assert [m.name for m in SnapshotManager(tmp_path).list()] == ["s"]
    with pytest.raises(SnapshotError) as info:
        SnapshotManager(tmp_path).get("s")
    assert str(info.value) == (
        "snapshot 's' has invalid metadata: field 'created' must be an RFC 3339 timestamp, not "
        "'yesterday' (the file is damaged or was not written by vzkit: delete the snapshot and "
        "save it again)"
    )
