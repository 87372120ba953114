"""``LinuxVMConfig``: defaults, validation, and exact TOML/JSON round trips."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vzkit import (
    MIN_MEMORY_MB,
    Arch,
    ConfigError,
    ConsoleMode,
    Disk,
    DiskBus,
    DiskFormat,
    DisplayConfig,
    LinuxVMConfig,
    NetworkConfig,
    NetworkMode,
    PortForward,
    PortProtocol,
    VolumeMount,
    host_arch,
    parse_port_spec,
)
from vzkit._config import MAX_MEMORY_GB


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"kernel")
    return path


@pytest.fixture
def initrd(tmp_path: Path) -> Path:
    path = tmp_path / "initrd.img"
    path.write_bytes(b"initrd")
    return path


# -- defaults ---------------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = LinuxVMConfig()
    assert cfg.cpus == 2
    assert cfg.memory_gb == 1.0
    assert isinstance(cfg.memory_gb, float)
    assert cfg.memory_mb == 1024
    assert cfg.arch is host_arch()
    assert (cfg.vsock, cfg.balloon, cfg.entropy) == (True, True, True)
    assert cfg.vsock_cid == 3
    assert cfg.console is ConsoleMode.LOG
    assert cfg.network == NetworkConfig(NetworkMode.NAT)
    assert cfg.headless is True
    assert cfg.nested_virtualization is True
    assert cfg.volumes == ()
    assert cfg.displays == ()
    for name in ("disk_path", "iso_path", "kernel_path", "initrd_path", "state_dir"):
        assert getattr(cfg, name) is None
    assert cfg.cmdline == ""
    assert cfg.direct_boot is False
    assert cfg.disk_format is DiskFormat.RAW


def test_issue_field_names_exist() -> None:
    names = {f.name for f in dataclasses.fields(LinuxVMConfig)}
    assert {
        "cpus",
        "memory_gb",
        "disk_path",
        "iso_path",
        "kernel_path",
        "initrd_path",
        "cmdline",
        "state_dir",
        "nested_virtualization",
        "volumes",
        "network",
        "headless",
        "displays",
        "vsock",
        "balloon",
        "entropy",
        "console",
    } <= names


def test_fractional_memory() -> None:
    cfg = LinuxVMConfig(memory_gb=0.5)
    assert cfg.memory_gb == 0.5
    assert cfg.memory_mb == 512
    assert LinuxVMConfig(memory_gb=3).memory_gb == 3.0


def test_frozen() -> None:
    cfg = LinuxVMConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cpus = 4  # type: ignore[misc]


# -- validation -------------------------------------------------------------------------------


def test_zero_cpus() -> None:
    with pytest.raises(ConfigError) as info:
        LinuxVMConfig(cpus=0)
    assert str(info.value) == "cpus must be between 1 and 255, got 0"


@pytest.mark.parametrize("cpus", [-1, 256, 2**64, -(2**64), 10**400, 2.0, "2", True, None])
def test_bad_cpus(cpus: object) -> None:
    with pytest.raises(ConfigError, match="cpus"):
        LinuxVMConfig(cpus=cpus)  # type: ignore[arg-type]


def test_memory_below_minimum() -> None:
    assert MIN_MEMORY_MB == 64
    LinuxVMConfig(memory_gb=MIN_MEMORY_MB / 1024)  # exactly the minimum is fine
    with pytest.raises(ConfigError) as info:
        LinuxVMConfig(memory_gb=0.05)
    assert str(info.value) == "memory_gb=0.05 is below the minimum of 64 MiB (0.0625 GB)"


@pytest.mark.parametrize("memory", [0, -1.0, 0.0, float("nan"), float("inf"), "1", True, None])
def test_bad_memory(memory: object) -> None:
    with pytest.raises(ConfigError, match="memory_gb"):
        LinuxVMConfig(memory_gb=memory)  # type: ignore[arg-type]


def test_memory_above_maximum() -> None:
    assert MAX_MEMORY_GB == 4096
    assert LinuxVMConfig(memory_gb=MAX_MEMORY_GB).memory_mb == 4096 * 1024  # exactly is fine
    with pytest.raises(ConfigError) as info:
        LinuxVMConfig(memory_gb=4096.5)
    assert str(info.value) == "memory_gb must be at most 4096 GB (4 TiB), got 4096.5"


@pytest.mark.parametrize(
    ("memory", "message"),
    [
        (1e30, "memory_gb must be at most 4096 GB (4 TiB), got 1e+30"),
        (2**64, "memory_gb must be at most 4096 GB (4 TiB), got 18446744073709551616"),
        (10**400, "memory_gb must be at most 4096 GB (4 TiB), got an integer of 1329 bits"),
        (10**5000, "memory_gb must be at most 4096 GB (4 TiB), got an integer of 16610 bits"),
        (-(10**400), "memory_gb must be a finite number, got an integer of 1329 bits"),
        (float("inf"), "memory_gb must be at most 4096 GB (4 TiB), got inf"),
        (float("-inf"), "memory_gb must be a finite number, got -inf"),
    ],
    ids=["1e30", "2**64", "10**400", "10**5000", "-10**400", "inf", "-inf"],
)
def test_huge_memory_is_a_config_error_not_an_overflow(memory: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        LinuxVMConfig(memory_gb=memory)  # type: ignore[arg-type]
    assert str(info.value) == message
    with pytest.raises(ConfigError):  # the same through a config file
        LinuxVMConfig.from_dict({"memory_gb": memory})


def test_missing_kernel_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-kernel"
    with pytest.raises(ConfigError) as info:
        LinuxVMConfig(kernel_path=missing)
    assert str(info.value) == f"kernel_path: '{missing}' does not exist"


def test_kernel_must_be_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a regular file"):
        LinuxVMConfig(kernel_path=tmp_path)


@pytest.mark.parametrize("name", ["disk_path", "iso_path"])
def test_missing_disk_and_iso(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}: .* does not exist"):
        LinuxVMConfig(**{name: tmp_path / "missing.img"})


def test_direct_boot(kernel: Path, initrd: Path) -> None:
    cfg = LinuxVMConfig(kernel_path=kernel, initrd_path=initrd, cmdline="console=hvc0")
    assert cfg.direct_boot
    assert (cfg.kernel_path, cfg.initrd_path, cfg.cmdline) == (kernel, initrd, "console=hvc0")


def test_initrd_without_kernel(initrd: Path) -> None:
    with pytest.raises(ConfigError) as info:
        LinuxVMConfig(initrd_path=initrd)
    assert str(info.value) == "initrd_path is set but kernel_path is not (direct boot needs both)"


def test_cmdline_without_kernel() -> None:
    with pytest.raises(ConfigError, match="cmdline is set but kernel_path is not"):
        LinuxVMConfig(cmdline="quiet")


@pytest.mark.parametrize("cmdline", [5, None, b"quiet"])
def test_cmdline_must_be_a_string(kernel: Path, cmdline: object) -> None:
    with pytest.raises(ConfigError, match="cmdline must be a string"):
        LinuxVMConfig(kernel_path=kernel, cmdline=cmdline)  # type: ignore[arg-type]


def test_cmdline_nul(kernel: Path) -> None:
    with pytest.raises(ConfigError, match="NUL"):
        LinuxVMConfig(kernel_path=kernel, cmdline="a\x00b")


def test_relative_paths_resolved(
    tmp_path: Path, kernel: Path, initrd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "disk.img").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    cfg = LinuxVMConfig(
        kernel_path="vmlinuz",  # type: ignore[arg-type]
        initrd_path=Path("initrd.img"),
        disk_path="disk.img",  # type: ignore[arg-type]
        state_dir="state",  # type: ignore[arg-type]
        console_log_path="logs/console.log",  # type: ignore[arg-type]
        volumes=(VolumeMount("share", "s"),),
    )
    assert cfg.kernel_path == kernel
    assert cfg.initrd_path == initrd
    assert cfg.disk_path == tmp_path / "disk.img"
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.console_log_path == tmp_path / "logs" / "console.log"
    assert cfg.volumes[0].host_path == tmp_path / "share"
    for path in (cfg.kernel_path, cfg.initrd_path, cfg.disk_path, cfg.state_dir):
        assert isinstance(path, Path)
        assert path.is_absolute()


@pytest.mark.parametrize("value", ["", 5, "a\x00b"])
def test_bad_path_values(value: object) -> None:
    with pytest.raises(ConfigError, match="state_dir"):
        LinuxVMConfig(state_dir=value)  # type: ignore[arg-type]


def test_duplicate_explicit_volume_tags() -> None:
    vols = (VolumeMount("/a", "t"), VolumeMount("/b", "t"))
    with pytest.raises(ConfigError, match="'t' is used by more than one volume"):
        LinuxVMConfig(volumes=vols)


def test_tagged_volumes() -> None:
    cfg = LinuxVMConfig(volumes=[VolumeMount("/a/data"), VolumeMount("/b/data")])  # type: ignore[arg-type]
    assert cfg.volumes == (VolumeMount("/a/data"), VolumeMount("/b/data"))
    assert [v.tag for v in cfg.tagged_volumes()] == ["data", "data-1"]


@pytest.mark.parametrize(
    "changes",
    [
        {"volumes": 5},
        {"volumes": "/srv"},
        {"volumes": ["/srv"]},
        {"displays": None},
        {"displays": ["4k"]},
        {"network": "nat"},
        {"headless": "yes"},
        {"vsock": 1},
        {"balloon": None},
        {"entropy": "no"},
        {"nested_virtualization": 0},
        {"vsock_cid": 2},
        {"vsock_cid": 0xFFFFFFFF},
        {"arch": "sparc"},
        {"console": "tty"},
        {"accelerator": 1},
    ],
)
def test_bad_values(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        LinuxVMConfig(**changes)


def test_disk_format_is_given_never_guessed(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"QFI\xfb" + bytes(508))  # looks like qcow2: still raw unless told
    cfg = LinuxVMConfig(disk_path=disk)
    assert cfg.disk_format is DiskFormat.RAW
    qcow2 = LinuxVMConfig(disk_path=disk, disk_format="qcow2")  # type: ignore[arg-type]
    assert qcow2.disk_format is DiskFormat.QCOW2
    for text in (qcow2.to_toml(), cfg.to_toml()):
        assert LinuxVMConfig.from_toml(text).to_toml() == text
    assert tomllib.loads(qcow2.to_toml())["disk_format"] == "qcow2"
    assert LinuxVMConfig.from_json(qcow2.to_json()) == qcow2
    assert LinuxVMConfig.from_dict({"disk_path": str(disk)}).disk_format is DiskFormat.RAW


@pytest.mark.parametrize("value", ["vmdk", "QCOW2", "", 2, None, ["raw"]])
def test_bad_disk_format(tmp_path: Path, value: object) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        LinuxVMConfig(disk_path=disk, disk_format=value)  # type: ignore[arg-type]
    assert str(info.value) == f"disk_format must be one of raw, qcow2, got {value!r}"
    with pytest.raises(ConfigError, match="disk_format must be one of raw, qcow2, got 'vhd'"):
        LinuxVMConfig.from_json(json.dumps({"disk_path": str(disk), "disk_format": "vhd"}))


def test_qcow2_needs_a_disk() -> None:
    with pytest.raises(ConfigError, match="disk_format is 'qcow2' but disk_path is not set"):
        LinuxVMConfig(disk_format=DiskFormat.QCOW2)


def test_arch_aliases() -> None:
    assert LinuxVMConfig(arch="arm64").arch is Arch.AARCH64  # type: ignore[arg-type]
    assert LinuxVMConfig(arch="AMD64").arch is Arch.X86_64  # type: ignore[arg-type]


def test_replace_validates() -> None:
    cfg = LinuxVMConfig()
    changed = cfg.replace(cpus=8, memory_gb=0.5)
    assert (changed.cpus, changed.memory_gb) == (8, 0.5)
    assert cfg.cpus == 2
    with pytest.raises(ConfigError, match="cpus"):
        cfg.replace(cpus=0)
    with pytest.raises(ConfigError, match="below the minimum"):
        cfg.replace(memory_gb=0.01)
    with pytest.raises(ConfigError, match="unknown config field"):
        cfg.replace(bogus=1)


# -- serialisation ----------------------------------------------------------------------------


def test_to_dict_is_plain_and_omits_none() -> None:
    cfg = LinuxVMConfig(
        volumes=(VolumeMount("/srv/a", "a", True),),
        displays=(DisplayConfig(1920, 1080),),
        network=NetworkConfig(NetworkMode.BRIDGED, "en0"),
    )
    data = cfg.to_dict()
    assert "kernel_path" not in data
    assert data["network"] == {"mode": "bridged", "interface": "en0"}
    assert data["volumes"] == [{"host_path": "/srv/a", "tag": "a", "read_only": True}]
    assert data["displays"] == ["1920x1080@144"]
    assert data["console"] == "log"
    json.dumps(data)  # plain data only


@pytest.mark.parametrize("fmt", ["toml", "json"])
def test_unknown_keys(fmt: str) -> None:
    with pytest.raises(ConfigError) as info:
        LinuxVMConfig.from_dict({"cpus": 2, "memroy_gb": 1, "zzz": 0})
    assert str(info.value) == "unknown config key(s): memroy_gb, zzz"
    text = 'cpus = 2\nbogus = "x"\n' if fmt == "toml" else '{"cpus": 2, "bogus": "x"}'
    load = LinuxVMConfig.from_toml if fmt == "toml" else LinuxVMConfig.from_json
    with pytest.raises(ConfigError, match="unknown config key\\(s\\): bogus"):
        load(text)


@pytest.mark.parametrize("text", ["cpus = ", "[network\n", "cpus = 2\ncpus = 3\n", "= 1"])
def test_invalid_toml(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid TOML VM config"):
        LinuxVMConfig.from_toml(text)


@pytest.mark.parametrize("text", ["{", "", "{'cpus': 2}", "[1,]"])
def test_invalid_json(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid JSON VM config"):
        LinuxVMConfig.from_json(text)


@pytest.mark.parametrize("text", ["[]", "1", '"x"', "null"])
def test_json_not_an_object(text: str) -> None:
    with pytest.raises(ConfigError, match="must be a table/object"):
        LinuxVMConfig.from_json(text)


@pytest.mark.parametrize(
    "data",
    [
        {"network": "nat"},
        {"network": {"mode": "wifi"}},
        {"network": {"mode": "bridged"}},
        {"network": {"mode": "nat", "iface": "x"}},
        {"volumes": [{"tag": "x"}]},
        {"volumes": [{"host_path": "/srv", "mode": "ro"}]},
        {"volumes": ["/srv"]},
        {"volumes": [{"host_path": "/srv", "read_only": "yes"}]},
        {"displays": ["huge"]},
        {"displays": [1920]},
        {"displays": "4k"},
        {"cpus": "2"},
        {"kernel_path": 5},
    ],
)
def test_from_dict_bad_nested_values(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        LinuxVMConfig.from_dict(data)


def test_from_dict_partial_uses_defaults() -> None:
    cfg = LinuxVMConfig.from_dict({"cpus": 4, "network": {"mode": "none"}})
    assert cfg == LinuxVMConfig(cpus=4, network=NetworkConfig(NetworkMode.NONE))


def test_go_style_toml_with_int_memory() -> None:
    cfg = LinuxVMConfig.from_toml('cpus = 1\nmemory_gb = 2\ndisplays = ["4k"]\n')
    assert cfg.memory_gb == 2.0
    assert isinstance(cfg.memory_gb, float)
    assert cfg.displays == (DisplayConfig(3840, 2160),)


@pytest.mark.parametrize("name", ["vm.toml", "vm.json", "vm.conf"])
def test_save_load_round_trip(tmp_path: Path, kernel: Path, name: str) -> None:
    share = tmp_path / "share"
    share.mkdir()
    cfg = LinuxVMConfig(
        cpus=3,
        memory_gb=0.75,
        kernel_path=kernel,
        cmdline='console=hvc0 root=/dev/vda quiet msg="a b"',
        state_dir=tmp_path / "state",
        volumes=(VolumeMount(share, "", True), VolumeMount(share, "two")),
        network=NetworkConfig(NetworkMode.BRIDGED, "en0"),
        headless=False,
        displays=(DisplayConfig(1920, 1080), DisplayConfig(2560, 1600, 227)),
        balloon=False,
        console=ConsoleMode.STDIO,
    )
    target = tmp_path / name
    cfg.save(target)
    text = target.read_text(encoding="utf-8")
    if name.endswith(".toml"):
        assert tomllib.loads(text) == cfg.to_dict()
    else:
        assert json.loads(text) == cfg.to_dict()
    assert LinuxVMConfig.load(target) == cfg
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read VM config"):
        LinuxVMConfig.load(tmp_path / "missing.toml")


def test_load_invalid_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("cpus = [", encoding="utf-8")
    with pytest.raises(ConfigError):
        LinuxVMConfig.load(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"cpus": 0}', encoding="utf-8")
    with pytest.raises(ConfigError, match="cpus must be between"):
        LinuxVMConfig.load(bad_json)


# -- hypothesis round trips -------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cfg-files")
    dirs = []
    for name in ("data", "src", "my share", "ünïcode", "data2"):
        (root / "a" / name).mkdir(parents=True)
        dirs.append(root / "a" / name)
    (root / "b" / "data").mkdir(parents=True)
    dirs.append(root / "b" / "data")
    files = {}
    for name in ("vmlinuz", "initrd.img", "disk.img", "debian.iso"):
        (root / name).write_bytes(b"\0")
        files[name] = root / name
    return {"root": root, "dirs": dirs, **files}


_TEXT = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=30
)
_SEGMENT = st.text(
    st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=12,
)
_TAG = st.text(
    st.characters(whitelist_categories=("L", "N"), whitelist_characters="-_."),
    min_size=1,
    max_size=10,
).filter(lambda t: t not in (".", ".."))
_MEMORY = st.one_of(
    st.floats(min_value=MIN_MEMORY_MB / 1024, max_value=MAX_MEMORY_GB, allow_nan=False),
    st.integers(min_value=1, max_value=512),
    st.sampled_from([0.0625, 0.5, 1.5, 2.0, 4096, 0.1 + 0.2]),
)
_NETWORK = st.one_of(
    st.sampled_from(
        [NetworkMode.NAT, NetworkMode.NONE, NetworkMode.VMNET, NetworkMode.HOST_ONLY]
    ).map(NetworkConfig),
    st.just(NetworkConfig(NetworkMode.NAT, host_loopback=True)),
    st.from_regex(r"[A-Za-z0-9_.:@-]{1,16}", fullmatch=True).map(
        lambda iface: NetworkConfig(NetworkMode.BRIDGED, iface)
    ),
)
_DISPLAY = st.builds(
    DisplayConfig,
    st.integers(640, 7680),
    st.integers(480, 4320),
    st.integers(1, 1000),
)


def _disks(path: Path) -> st.SearchStrategy[Disk]:
    """Disks of either source, on any bus, in any format a source takes."""
    urls = st.sampled_from(
        ["nbd://nas.local/vm", "nbd://[::1]:10810/a%2Cb", "nbd+unix:///e?socket=/run/nbd.sock"]
    )
    buses, flags = st.sampled_from(list(DiskBus)), st.booleans()
    return st.one_of(
        st.builds(Disk, path=st.just(path), format=st.sampled_from(list(DiskFormat)), bus=buses,
                  read_only=flags),
        st.builds(Disk, url=urls, bus=buses, read_only=flags),
    )  # fmt: skip


@st.composite
def configs(draw: st.DrawFn, files: dict[str, Any]) -> LinuxVMConfig:
    root: Path = files["root"]
    kwargs: dict[str, Any] = {
        "cpus": draw(st.integers(1, 255)),
        "memory_gb": draw(_MEMORY),
        "arch": draw(st.sampled_from(list(Arch))),
        "network": draw(_NETWORK),
        "displays": tuple(draw(st.lists(_DISPLAY, max_size=3))),
        "vsock_cid": draw(st.integers(3, 0xFFFFFFFE)),
        "console": draw(st.sampled_from(list(ConsoleMode))),
        "accelerator": draw(st.sampled_from(["", "kvm", "hvf", "tcg"]) | _TEXT),
    }
    for name in ("nested_virtualization", "headless", "vsock", "balloon", "entropy", "sound"):
        kwargs[name] = draw(st.booleans())
    extra_nets = st.lists(_NETWORK.filter(lambda n: n.mode is not NetworkMode.NONE), max_size=3)
    kwargs["networks"] = tuple(draw(extra_nets))
    kwargs["disks"] = tuple(draw(st.lists(_disks(files["disk.img"]), max_size=3)))
    kwargs["rosetta"] = kwargs["arch"] is Arch.AARCH64 and draw(st.booleans())
    if draw(st.booleans()):
        kwargs["disk_path"] = files["disk.img"]
        kwargs["disk_format"] = draw(st.sampled_from(list(DiskFormat)))
    if draw(st.booleans()):
        kwargs["iso_path"] = files["debian.iso"]
    if draw(st.booleans()):
        kwargs["kernel_path"] = files["vmlinuz"]
        if draw(st.booleans()):
            kwargs["initrd_path"] = files["initrd.img"]
        kwargs["cmdline"] = draw(_TEXT)
    for name in ("state_dir", "console_log_path"):
        if draw(st.booleans()):
            kwargs[name] = root.joinpath(*draw(st.lists(_SEGMENT, min_size=1, max_size=3)))
    volumes = []
    used: set[str] = set()
    for host, tag, read_only in draw(
        st.lists(
            st.tuples(st.sampled_from(files["dirs"]), st.one_of(st.just(""), _TAG), st.booleans()),
            max_size=5,
        )
    ):
        if tag in used:
            tag = ""
        used.add(tag)
        volumes.append(VolumeMount(host, tag, read_only))
    kwargs["volumes"] = tuple(volumes)
    if kwargs["network"].mode in (NetworkMode.NAT, NetworkMode.HOST_ONLY):
        ports = draw(st.lists(st.integers(1, 65535), unique=True, max_size=3))
        kwargs["publish"] = tuple(
            PortForward(
                port,
                draw(st.integers(1, 65535)),
                draw(st.sampled_from(list(PortProtocol))),
                draw(st.sampled_from(["127.0.0.1", "0.0.0.0", "10.1.2.3"])),
            )
            for port in ports
        )
    return LinuxVMConfig(**kwargs)


@settings(max_examples=75)
@given(data=st.data())
def test_toml_round_trip(real_files: dict[str, Any], data: st.DataObject) -> None:
    cfg = data.draw(configs(real_files))
    text = cfg.to_toml()
    back = LinuxVMConfig.from_toml(text)
    assert back == cfg
    assert back.to_toml() == text


@settings(max_examples=75)
@given(data=st.data())
def test_json_round_trip(real_files: dict[str, Any], data: st.DataObject) -> None:
    cfg = data.draw(configs(real_files))
    text = cfg.to_json()
    back = LinuxVMConfig.from_json(text)
    assert back == cfg
    assert back.to_json() == text
    assert LinuxVMConfig.from_dict(cfg.to_dict()) == cfg


@settings(max_examples=25)
@given(data=st.data(), suffix=st.sampled_from([".toml", ".json"]))
def test_save_load_round_trip_property(
    real_files: dict[str, Any], data: st.DataObject, suffix: str
) -> None:
    cfg = data.draw(configs(real_files))
    target = real_files["root"] / f"vm{suffix}"
    cfg.save(target)
    assert LinuxVMConfig.load(target) == cfg


# -- published ports and shared directories --------------------------------------------------


def test_publish_round_trips_as_spec_strings() -> None:
    cfg = LinuxVMConfig(publish=(parse_port_spec("8080:80"), parse_port_spec("0.0.0.0:53:53/udp")))
    assert cfg.to_dict()["publish"] == ["127.0.0.1:8080:80/tcp", "0.0.0.0:53:53/udp"]
    assert LinuxVMConfig.from_toml(cfg.to_toml()) == cfg
    assert LinuxVMConfig.from_json(cfg.to_json()) == cfg


def test_publish_takes_any_network() -> None:
    """Where the network does not publish a port, the core forwards it through the agent."""
    for mode in (NetworkMode.NONE, NetworkMode.HOST_ONLY, NetworkMode.VMNET):
        cfg = LinuxVMConfig(network=NetworkConfig(mode), publish=(parse_port_spec("8080:80"),))
        assert cfg.publish == (parse_port_spec("8080:80"),)


def test_publish_same_host_port_twice() -> None:
    with pytest.raises(ConfigError, match=r"^host port 8080/tcp is published twice$"):
        LinuxVMConfig(publish=(parse_port_spec("8080:80"), parse_port_spec("0.0.0.0:8080:81")))
    udp_and_tcp = (parse_port_spec("53:53"), parse_port_spec("53:53/udp"))
    assert LinuxVMConfig(publish=udp_and_tcp).publish == udp_and_tcp


@pytest.mark.parametrize("value", ["8080:80", ("8080:80",), (8080,)])
def test_publish_must_hold_port_forwards(value: object) -> None:
    with pytest.raises(ConfigError, match="publish must"):
        LinuxVMConfig(publish=value)  # type: ignore[arg-type]


def test_bad_publish_in_a_file() -> None:
    with pytest.raises(ConfigError, match="invalid VM config: invalid port spec '80'"):
        LinuxVMConfig.from_dict({"publish": ["80"]})


def test_share_that_disappears_before_start(tmp_path: Path) -> None:
    share = tmp_path / "a share"
    share.mkdir()
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    cfg = LinuxVMConfig(kernel_path=kernel, volumes=(VolumeMount(share, "s", True),))
    cfg.check_inputs()
    share.rmdir()
    with pytest.raises(ConfigError) as err:
        cfg.check_inputs()
    assert str(err.value) == (
        f"shared directory {str(share)!r} (volume '{share}:s:ro') does not exist"
    )
    share.write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        cfg.check_inputs()


def test_network_host_loopback_in_config_files() -> None:
    """The flag is written only when set (older files are unchanged) and read back."""
    plain = LinuxVMConfig()
    assert plain.to_dict()["network"] == {"mode": "nat", "interface": ""}
    cfg = LinuxVMConfig.from_toml('[network]\nmode = "nat"\nhost_loopback = true\n')
    assert cfg.network == NetworkConfig(NetworkMode.NAT, host_loopback=True)
    assert cfg.to_dict()["network"] == {"mode": "nat", "interface": "", "host_loopback": True}
    assert LinuxVMConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="mode/interface/host_loopback"):
        LinuxVMConfig.from_toml('[network]\nmode = "nat"\nloopback = true\n')


def test_a_config_with_nothing_to_boot_is_refused_at_start(tmp_path: Path) -> None:
    """No kernel, disk or ISO: the firmware would wait forever and ``run`` would time out
    after minutes (issue 18, item 1); ``check_inputs`` (every backend's start) says so."""
    with pytest.raises(ConfigError, match=r"^nothing to boot: .* --kernel"):
        LinuxVMConfig().check_inputs()
    iso = tmp_path / "boot.iso"
    iso.write_bytes(b"iso")
    LinuxVMConfig(iso_path=iso).check_inputs()


def test_rosetta_is_for_aarch64_guests() -> None:
    assert LinuxVMConfig().rosetta is False
    cfg = LinuxVMConfig(arch="aarch64", rosetta=True)
    assert LinuxVMConfig.from_toml(cfg.to_toml()) == cfg
    with pytest.raises(ConfigError, match=r"aarch64 guest; this guest is x86_64: set arch="):
        LinuxVMConfig(arch="x86_64", rosetta=True)
    with pytest.raises(ConfigError, match="rosetta"):
        LinuxVMConfig(arch="aarch64", rosetta=1)  # type: ignore[arg-type]
