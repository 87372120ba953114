"""Volume specs (``path[:tag][:ro|rw]``) and per-VM tag assignment."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vzkit import ConfigError, SpecError, VolumeMount, assign_volume_tags, parse_volume_spec


@pytest.fixture
def share(tmp_path: Path) -> Path:
    path = tmp_path / "share"
    path.mkdir()
    return path


def test_plain_path(share: Path) -> None:
    assert parse_volume_spec(str(share)) == VolumeMount(share.resolve(), "", False)


def test_tag_and_mode(share: Path) -> None:
    assert parse_volume_spec(f"{share}:data") == VolumeMount(share.resolve(), "data", False)
    assert parse_volume_spec(f"{share}:data:ro") == VolumeMount(share.resolve(), "data", True)
    assert parse_volume_spec(f"{share}:data:rw") == VolumeMount(share.resolve(), "data", False)
    assert parse_volume_spec(f"{share}:ro") == VolumeMount(share.resolve(), "", True)


@pytest.mark.parametrize(
    ("word", "read_only"),
    [
        ("ro", True),
        ("RO", True),
        ("Ro", True),
        ("readonly", True),
        ("ReadOnly", True),
        ("READONLY", True),
        ("rw", False),
        ("RW", False),
        ("readwrite", False),
        ("ReadWrite", False),
    ],
)
def test_mode_words_any_case(share: Path, word: str, read_only: bool) -> None:
    assert parse_volume_spec(f"{share}:{word}").read_only is read_only
    vol = parse_volume_spec(f"{share}:tag1:{word}")
    assert (vol.tag, vol.read_only) == ("tag1", read_only)


def test_relative_path_made_absolute(
    share: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    vol = parse_volume_spec("share:ro")
    assert vol.host_path.is_absolute()
    assert vol.host_path == share.resolve()
    assert parse_volume_spec("./share/../share").host_path == share.resolve()


def test_symlink_resolved(share: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(share, target_is_directory=True)
    vol = parse_volume_spec(f"{link}:t")
    assert vol.host_path == share.resolve()
    assert not vol.host_path.is_symlink()


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(SpecError) as info:
        parse_volume_spec(f"{missing}:ro")
    assert str(info.value) == f"volume '{missing}:ro': host path '{missing}' does not exist"


def test_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(SpecError, match="does not exist"):
        parse_volume_spec(str(link))


def test_file_is_not_a_directory(tmp_path: Path) -> None:
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(SpecError) as info:
        parse_volume_spec(str(file))
    assert str(info.value) == f"volume '{file}': host path '{file}' is not a directory"


@pytest.mark.parametrize("spec", ["", "   ", "\t\n"])
def test_empty_spec(spec: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_volume_spec(spec)
    assert (
        str(info.value)
        == "empty volume spec; expected path[:tag][:ro|rw] or path:/guest/path[:ro|rw]"
    )


def test_no_host_path() -> None:
    with pytest.raises(SpecError, match="has no host path"):
        parse_volume_spec(":tag:ro")


@pytest.mark.parametrize("suffix", [":a:b", ":a:b:ro", ":ro:tag", ":a:b:c:rw"])
def test_two_tags(share: Path, suffix: str) -> None:
    with pytest.raises(SpecError, match="more than one tag"):
        parse_volume_spec(f"{share}{suffix}")


@pytest.mark.parametrize("tag", ["a b", "a,b", "a\\b", "..", "x" * 37])
def test_bad_tags(share: Path, tag: str) -> None:
    with pytest.raises(SpecError):
        parse_volume_spec(f"{share}:{tag}")


def test_spec_error_is_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the point is the base class
        parse_volume_spec(str(tmp_path / "missing"))


def test_non_string_spec(share: Path) -> None:
    with pytest.raises(SpecError):
        parse_volume_spec(share)  # type: ignore[arg-type]


def test_volume_mount_accepts_str_and_is_frozen() -> None:
    vol = VolumeMount("/srv/data", "data", True)
    assert vol.host_path == Path("/srv/data")
    assert str(vol) == "/srv/data:data:ro"
    assert str(VolumeMount("/srv/data")) == "/srv/data:rw"
    assert VolumeMount("/srv/data").tag == ""
    assert VolumeMount("/srv/data").read_only is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        vol.tag = "other"  # type: ignore[misc]


def test_volume_mount_validates() -> None:
    with pytest.raises(SpecError):
        VolumeMount(42)  # type: ignore[arg-type]
    with pytest.raises(SpecError):
        VolumeMount("/srv", "t", "yes")  # type: ignore[arg-type]
    with pytest.raises(SpecError):
        VolumeMount("/srv", "a/b")


# -- tags -----------------------------------------------------------------------------------


def test_auto_tag_is_base_name_then_numbered() -> None:
    vols = [VolumeMount("/a/data"), VolumeMount("/b/data"), VolumeMount("/c/data")]
    assert [v.tag for v in assign_volume_tags(vols)] == ["data", "data-1", "data-2"]


def test_assign_keeps_order_and_other_fields() -> None:
    vols = [VolumeMount("/a/src", read_only=True), VolumeMount("/b/out", "results")]
    tagged = assign_volume_tags(vols)
    assert tagged == (VolumeMount("/a/src", "src", True), VolumeMount("/b/out", "results"))
    assert isinstance(tagged, tuple)


def test_explicit_tags_win_over_auto_tags() -> None:
    vols = [VolumeMount("/a/data"), VolumeMount("/b/x", "data"), VolumeMount("/c/data")]
    assert [v.tag for v in assign_volume_tags(vols)] == ["data-1", "data", "data-2"]


def test_auto_tags_skip_explicit_numbered_tags() -> None:
    vols = [VolumeMount("/a/data"), VolumeMount("/b/data"), VolumeMount("/c/y", "data-1")]
    assert [v.tag for v in assign_volume_tags(vols)] == ["data", "data-2", "data-1"]


def test_explicit_duplicate_is_config_error() -> None:
    vols = [VolumeMount("/a", "same"), VolumeMount("/b", "same")]
    with pytest.raises(ConfigError) as info:
        assign_volume_tags(vols)
    assert str(info.value) == (
        "volume tag 'same' is used by more than one volume; tags must be unique"
    )


def test_root_and_odd_base_names_get_valid_tags() -> None:
    tagged = assign_volume_tags([VolumeMount("/"), VolumeMount("/srv/my dir")])
    assert tagged[0].tag == "root"
    assert tagged[1].tag == "my_dir"
    long = assign_volume_tags([VolumeMount("/srv/" + "x" * 100)])[0].tag
    assert 0 < len(long.encode()) <= 36


def test_share_cmdline_names_tags_and_read_only_ones() -> None:
    from vzkit._volume import share_cmdline

    assert share_cmdline([]) == ""
    vols = [VolumeMount("/a/src", read_only=True), VolumeMount("/b/café ✓"), VolumeMount("/c/x")]
    assert share_cmdline(vols) == ("vzkit.shares=src,caf%C3%A9_%E2%9C%93,x vzkit.ro=src")
    assert share_cmdline([VolumeMount("/x", "t")]) == "vzkit.shares=t"
