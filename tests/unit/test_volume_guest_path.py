"""Shares at a guest path (``-v HOST:/data[:ro]``): parsing, validation, the kernel command
line that carries them to the guest, config files and snapshots."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import vzkit
from vzkit import ConfigError, LinuxVMConfig, SpecError, VolumeMount, parse_volume_spec
from vzkit._volume import assign_volume_tags, share_cmdline
from vzkit.backends.qemu._argv import Plan
from vzkit.backends.qemu._devices import build_argv
from vzkit.backends.qemu._virtiofs import ShareDevice
from vzkit.cli import main
from vzkit.snapshots._match import config_diff, machine_fields


@pytest.fixture
def share(tmp_path: Path) -> Path:
    path = tmp_path / "share"
    path.mkdir()
    return path.resolve()


# -- parsing ---------------------------------------------------------------------------------


def test_a_second_part_with_a_slash_is_the_guest_path(share: Path) -> None:
    assert parse_volume_spec(f"{share}:/data") == VolumeMount(share, "", False, "/data")
    assert parse_volume_spec(f"{share}:/work/src:ro") == VolumeMount(share, "", True, "/work/src")
    assert parse_volume_spec(f"{share}:/data:RW").read_only is False


def test_a_second_part_without_a_slash_is_still_the_tag(share: Path) -> None:
    assert parse_volume_spec(f"{share}:data") == VolumeMount(share, "data", False, "")
    assert parse_volume_spec(f"{share}:data:ro") == VolumeMount(share, "data", True, "")
    assert parse_volume_spec(f"{share}:data").mount_point == "/mnt/data"


def test_relative_host_path_with_a_guest_path(share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(share)
    assert parse_volume_spec(".:/data") == VolumeMount(share, "", False, "/data")


@pytest.mark.parametrize(
    ("given", "stored"),
    [("/data/", "/data"), ("//srv//x/./y/", "/srv/x/y"), ("/my data,x=y", "/my data,x=y")],
)
def test_guest_path_is_normalised(share: Path, given: str, stored: str) -> None:
    assert parse_volume_spec(f"{share}:{given}").guest_path == stored
    assert VolumeMount(share, guest_path=given).guest_path == stored


@pytest.mark.parametrize(
    ("guest", "message"),
    [
        ("data/x", "guest path 'data/x' is not absolute; write it from the guest's root"),
        ("/a/../etc", "guest path '/a/../etc' contains '..'; name the directory directly"),
        ("/", "a share cannot be mounted at the guest's root '/'; pick a directory"),
        ("/./", "a share cannot be mounted at the guest's root '/'"),
        ("/proc", "guest path '/proc' is under /proc, which the guest keeps for itself"),
        ("/sys/x", "guest path '/sys/x' is under /sys"),
        ("/dev//shm", "guest path '/dev/shm' is under /dev"),
        ("/run/vzkit", "guest path '/run/vzkit' is under /run"),
    ],
)
def test_bad_guest_paths_say_what_to_do(share: Path, guest: str, message: str) -> None:
    spec = f"{share}:{guest}:ro"
    with pytest.raises(SpecError) as info:
        parse_volume_spec(spec)
    assert str(info.value).startswith(f"volume {spec!r}: {message}")
    with pytest.raises(SpecError, match="guest"):
        VolumeMount(share, guest_path=guest)


@pytest.mark.parametrize("suffix", [":/data:tag", ":tag:/data:ro", ":/a:/b"])
def test_a_guest_path_and_a_tag_in_one_spec_are_refused(share: Path, suffix: str) -> None:
    with pytest.raises(SpecError, match="names a guest path or a tag, not both"):
        parse_volume_spec(f"{share}{suffix}")


def test_neighbours_of_reserved_directories_are_fine(share: Path) -> None:
    assert parse_volume_spec(f"{share}:/procfs").guest_path == "/procfs"
    assert parse_volume_spec(f"{share}:/srv/run").guest_path == "/srv/run"


def test_guest_path_must_be_a_string_without_control_characters(share: Path) -> None:
    with pytest.raises(SpecError, match="guest_path must be a string"):
        VolumeMount(share, guest_path=Path("/data"))  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="contains a control character"):
        VolumeMount(share, guest_path="/da\nta")


def test_str_shows_the_guest_path(share: Path) -> None:
    assert str(VolumeMount(share, "t", True, "/data")) == f"{share}:/data:ro"
    assert str(VolumeMount(share, "t")) == f"{share}:t:rw"


# -- one directory per share -----------------------------------------------------------------


def test_two_shares_at_one_guest_path_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        assign_volume_tags(
            [VolumeMount("/a", guest_path="/data"), VolumeMount("/b", "d", True, "/data/")]
        )
    assert str(info.value) == (
        "volumes '/a:/data:rw' and '/b:/data:ro' are both mounted at /data in the guest; "
        "give each its own guest path"
    )


def test_a_guest_path_on_a_tags_mount_point_is_refused() -> None:
    with pytest.raises(ConfigError, match="both mounted at /mnt/src"):
        assign_volume_tags([VolumeMount("/x/src"), VolumeMount("/y", guest_path="/mnt/src")])


@pytest.mark.parametrize(
    ("first", "second"),
    [("/data", "/data/sub"), ("/data/sub", "/data"), ("/mnt", "")],
)
def test_nested_shares_are_refused(first: str, second: str) -> None:
    vols = [VolumeMount("/a", guest_path=first), VolumeMount("/b", "bee", guest_path=second)]
    with pytest.raises(ConfigError, match="vzkit does not nest shares; mount them side by side"):
        assign_volume_tags(vols)
    with pytest.raises(ConfigError, match="does not nest shares"):
        LinuxVMConfig(volumes=tuple(vols))


def test_siblings_and_common_prefixes_are_fine() -> None:
    vols = assign_volume_tags(
        [
            VolumeMount("/a", guest_path="/data"),
            VolumeMount("/b", guest_path="/data2"),
            VolumeMount("/c", guest_path="/srv/data"),
            VolumeMount("/d/src"),
        ]
    )
    assert [v.mount_point for v in vols] == ["/data", "/data2", "/srv/data", "/mnt/src"]


# -- the kernel command line -----------------------------------------------------------------


def test_share_cmdline_places_shares_with_a_guest_path() -> None:
    vols = [
        VolumeMount("/a/src", read_only=True, guest_path="/work/src"),
        VolumeMount("/b/x"),
        VolumeMount("/c", "t=%", guest_path="/my data/50%,x=y"),
    ]
    # every separator the guest splits on ('=', ',', ' ') and '%' itself is encoded
    assert share_cmdline(vols) == (
        "vzkit.shares=src,x,t%3D%25 vzkit.ro=src "
        "vzkit.mounts=src=/work/src,t%3D%25=/my%20data/50%25%2Cx%3Dy"
    )
    assert share_cmdline([VolumeMount("/b/x")]) == "vzkit.shares=x"


def _plan(kernel: Path, cfg_volumes: tuple[VolumeMount, ...], *shares: ShareDevice) -> Plan:
    cfg = LinuxVMConfig(
        arch="x86_64",  # type: ignore[arg-type]
        kernel_path=kernel,
        cmdline="console=ttyS0",
        vsock=False,
        console=vzkit.ConsoleMode.NONE,
        volumes=cfg_volumes,
    )
    return Plan(
        config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, shares=shares, shared_memory=True
    )


def test_qemu_lowers_guest_paths_onto_the_kernel_command_line(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"x")
    vols = (
        VolumeMount(tmp_path / "src", read_only=True, guest_path="/work/src"),
        VolumeMount(tmp_path / "d", "data"),
    )
    shares = [
        ShareDevice(v.tag, v.host_path, v.read_only, fd=20 + i)
        for i, v in enumerate(assign_volume_tags(vols))
    ]
    argv = build_argv(_plan(kernel, vols, *shares))
    assert argv[argv.index("-append") + 1] == (
        "console=ttyS0 vzkit.shares=src,data vzkit.ro=src vzkit.mounts=src=/work/src"
    )


# -- config files, snapshots, macOS ----------------------------------------------------------


def test_config_round_trips_guest_paths(share: Path) -> None:
    cfg = LinuxVMConfig(
        volumes=(
            parse_volume_spec(f"{share}:/data:ro"),
            parse_volume_spec(f"{share}:tag"),
        )
    )
    assert LinuxVMConfig.from_toml(cfg.to_toml()) == cfg
    assert LinuxVMConfig.from_json(cfg.to_json()) == cfg
    assert cfg.to_dict()["volumes"] == [
        {"host_path": str(share), "tag": "", "read_only": True, "guest_path": "/data"},
        {"host_path": str(share), "tag": "tag", "read_only": False},  # as files were before
    ]


def test_config_files_are_checked_like_specs(share: Path) -> None:
    with pytest.raises(ConfigError, match="is under /proc"):
        LinuxVMConfig.from_dict({"volumes": [{"host_path": str(share), "guest_path": "/proc"}]})
    with pytest.raises(ConfigError, match=r"each volume needs host_path\[, tag, read_only, gu"):
        LinuxVMConfig.from_dict({"volumes": [{"host_path": str(share), "mount": "/data"}]})


def test_a_snapshot_records_the_guest_path(share: Path) -> None:
    plain = LinuxVMConfig(volumes=(VolumeMount(share, "t"),))
    placed = LinuxVMConfig(volumes=(VolumeMount(share, "t", guest_path="/data"),))
    assert machine_fields(plain)["volumes"] == [  # unchanged for shares without one
        {"host_path": str(share), "tag": "t", "read_only": False}
    ]
    assert machine_fields(placed)["volumes"][0]["guest_path"] == "/data"
    assert config_diff(machine_fields(plain), placed)[0].startswith("volumes: snapshot")


def test_macos_guests_refuse_a_guest_path(tmp_path: Path, share: Path) -> None:
    with pytest.raises(ConfigError, match="drop the guest path and give a tag instead"):
        vzkit.MacVMConfig(vm_dir=tmp_path / "mac", volumes=(VolumeMount(share, guest_path="/d"),))


# -- the command line ------------------------------------------------------------------------


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), prog_name="vzkit", catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_volume_help_shows_both_forms() -> None:
    for command in ("run", "config"):
        code, out, _ = _cli(command, "--help")
        assert code == 0
        text = " ".join(out.split())
        assert "-v, --volume HOST[:GUEST_PATH|:TAG][:ro|rw]" in text
        assert "HOST:/data[:ro] mounts it at /data in the guest" in text
        assert "HOST[:TAG][:ro] at /mnt/TAG" in text


def test_cli_volume_with_a_guest_path(share: Path) -> None:
    code, out, err = _cli("config", "-v", f"{share}:/work/src:ro", "-v", f"{share}:t")
    assert code == 0, err
    assert LinuxVMConfig.from_toml(out).volumes == (
        VolumeMount(share, "", True, "/work/src"),
        VolumeMount(share, "t", False, ""),
    )


def test_cli_bad_guest_path_is_a_usage_error(share: Path) -> None:
    code, _, err = _cli("config", "-v", f"{share}:/proc/x")
    assert code == 2
    assert "is under /proc, which the guest keeps for itself; pick another directory" in err
    code, _, err = _cli("config", "-v", f"{share}:/data", "-v", f"{share}:/data")
    assert code != 0
    assert "both mounted at /data in the guest; give each its own guest path" in err


# -- what the guest's init reads back ---------------------------------------------------------

_GUEST_CHARS = re.compile(r"[A-Za-z0-9@+._~/%-]+")  # init.sh's decode() refuses anything else


def _as_the_guest_reads(cmdline: str) -> dict[str, str]:
    """init.sh's parsing, in Python: words split at spaces, lists at ',', entries at the first
    '=', each part only of the encoder's characters, then percent-decoded."""
    words = dict(word.split("=", 1) for word in cmdline.split())
    placed = {}
    entries = words["vzkit.mounts"].split(",") if "vzkit.mounts" in words else []
    for entry in entries:
        tag, path = entry.split("=", 1)
        assert _GUEST_CHARS.fullmatch(tag), entry
        assert _GUEST_CHARS.fullmatch(path), entry
        placed[urllib.parse.unquote(tag)] = urllib.parse.unquote(path)
    for tag in words["vzkit.shares"].split(","):
        assert _GUEST_CHARS.fullmatch(tag), tag
        placed.setdefault(urllib.parse.unquote(tag), "/mnt/" + urllib.parse.unquote(tag))
    return placed


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4))
def test_any_accepted_guest_path_reaches_the_guest_intact(parts: list[str]) -> None:
    path = "/" + "/".join(parts)
    try:
        vol = VolumeMount("/srv/share", "t", guest_path=path)
    except SpecError:
        return
    assert vol.guest_path.startswith("/")
    components = vol.guest_path.split("/")[1:]
    assert all(c not in ("", ".", "..") for c in components)
    assert components[0] not in ("proc", "sys", "dev", "run")
    other = VolumeMount("/srv/other", "u-v")
    assert _as_the_guest_reads(share_cmdline([vol, other])) == {
        "t": vol.guest_path,
        "u-v": "/mnt/u-v",
    }
