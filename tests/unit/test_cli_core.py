"""The core CLI commands: ``config``, ``disk create``, ``snapshot list/rm``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner, Result

from vzkit import (
    ConsoleMode,
    DiskFormat,
    DisplayConfig,
    LinuxVMConfig,
    NetworkConfig,
    NetworkMode,
    VolumeMount,
    parse_port_spec,
)
from vzkit.cli import main

GIB = 1 << 30


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(
        main, [str(a) for a in args], prog_name="vzkit", catch_exceptions=False
    )


def test_help() -> None:
    result = run("--help")
    assert result.exit_code == 0
    assert result.output.startswith("Usage: vzkit [OPTIONS] COMMAND [ARGS]...")
    for command in ("config", "disk", "snapshot"):
        assert command in result.output
    assert run("-h").exit_code == 0


def test_version() -> None:
    import vzkit

    result = run("--version")
    assert result.exit_code == 0
    assert vzkit.__version__ in result.output


def test_no_command_shows_usage() -> None:
    result = CliRunner().invoke(main, [])
    assert result.exit_code in (0, 2)
    assert "Usage:" in result.output


def test_config_defaults_print_toml_that_loads_back() -> None:
    result = run("config")
    assert result.exit_code == 0, result.output
    assert LinuxVMConfig.from_toml(result.stdout) == LinuxVMConfig()


def test_config_options_round_trip(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    result = run(
        "config",
        "--cpus", "4",
        "--memory", "0.5",
        "--arch", "aarch64",
        "--kernel", kernel,
        "--cmdline", "console=hvc0 quiet",
        "--state-dir", tmp_path / "state",
        "-v", f"{share}:data:ro",
        "--volume", str(share),
        "--network", "bridged:en0",
        "--display", "4k",
        "--display", "800x600@96",
        "--console", "stdio",
        "--accel", "tcg",
        "--cpu", "cortex-a72",
        "--rosetta",
        "--gui",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cfg = LinuxVMConfig.from_toml(result.stdout)
    assert cfg == LinuxVMConfig(
        cpus=4,
        memory_gb=0.5,
        arch="aarch64",  # type: ignore[arg-type]
        kernel_path=kernel,
        cmdline="console=hvc0 quiet",
        state_dir=tmp_path / "state",
        volumes=(VolumeMount(share.resolve(), "data", True), VolumeMount(share.resolve())),
        network=NetworkConfig(NetworkMode.BRIDGED, "en0"),
        displays=(DisplayConfig(3840, 2160), DisplayConfig(800, 600, 96)),
        headless=False,  # --display implies graphics
        console=ConsoleMode.STDIO,
        accelerator="tcg",
        cpu_model="cortex-a72",
        rosetta=True,
        gui=True,
    )


def test_disk_format_option(tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(b"")
    result = run("config", "--disk", disk, "--disk-format", "qcow2")
    assert result.exit_code == 0, result.output
    assert LinuxVMConfig.from_toml(result.stdout).disk_format is DiskFormat.QCOW2
    plain = LinuxVMConfig.from_toml(run("config", "--disk", disk).stdout)
    assert plain.disk_format is DiskFormat.RAW  # never guessed from the file
    bad = run("config", "--disk", disk, "--disk-format", "vmdk")
    assert bad.exit_code == 2
    assert "'vmdk' is not one of 'raw', 'qcow2'" in bad.output
    for command in (["run"], ["snapshot", "save"], ["snapshot", "restore"]):
        assert "--disk-format [raw|qcow2]" in run(*command, "--help").output


def test_config_publish(tmp_path: Path) -> None:
    result = run("config", "-p", "8080:80", "--publish", "0.0.0.0:5353:53/udp")
    assert result.exit_code == 0, result.output
    cfg = LinuxVMConfig.from_toml(result.stdout)
    assert cfg.publish == (parse_port_spec("8080:80"), parse_port_spec("0.0.0.0:5353:53/udp"))


def test_config_json_and_save(tmp_path: Path) -> None:
    target = tmp_path / "vm.toml"
    result = run("config", "--format", "json", "--cpus", "3", "--headless", "--save", target)
    assert result.exit_code == 0, result.output
    printed = LinuxVMConfig.from_json(result.stdout)
    assert printed.cpus == 3
    assert printed.headless is True
    assert LinuxVMConfig.load(target) == printed


def test_config_file_with_overrides(tmp_path: Path) -> None:
    base = tmp_path / "base.json"
    LinuxVMConfig(cpus=6, memory_gb=2.5, balloon=False).save(base)
    result = run("config", "--config", base, "--cpus", "1", "--graphics")
    assert result.exit_code == 0, result.output
    cfg = LinuxVMConfig.from_toml(result.stdout)
    assert (cfg.cpus, cfg.memory_gb, cfg.balloon, cfg.headless) == (1, 2.5, False, False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cpus", "0"], "'--cpus': 0 is not in the range 1<=x<=255"),
        (["--memory", "0.01"], "is below the minimum of 64 MiB"),
        (["--memory", "5000g"], "vzkit: error: memory_gb must be at most 4096 GB (4 TiB)"),
        (["--memory", "1e999"], "--memory '1e999' is not a size: give a number with an optional"),
        (["--memory", "0"], "--memory '0' must be more than zero"),
        (["--cpus", str(2**64)], f"'--cpus': {2**64} is not in the range 1<=x<=255"),
        (
            ["--kernel", "/nonexistent/vmlinuz"],
            "kernel_path: '/nonexistent/vmlinuz' does not exist",
        ),
        (["--cmdline", "quiet"], "cmdline is set but kernel_path is not"),
        (["--network", "bridged"], "bridged networking needs an interface name"),
        (["--network", "wifi"], "unknown network mode 'wifi'"),
        (["--display", "10x10"], "width 10 is out of range"),
        (["--volume", "/nonexistent/dir"], "does not exist"),
        (["--cpus", "two"], "'two' is not a valid integer"),
        (["--arch", "sparc"], "Invalid value for '--arch'"),
        (["--bogus"], "No such option"),
        (["--config", "/nonexistent/vm.toml"], "cannot read VM config"),
        (["-p", "80"], "invalid port spec '80'"),
        (["-p", "8080:80", "-p", "8080:81"], "host port 8080/tcp is published twice"),
    ],
)
def test_config_bad_options_exit_2(args: list[str], message: str) -> None:
    result = run("config", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(("memory", "gb"), [("512m", 0.5), ("1G", 1.0), ("2.5", 2.5)])
def test_memory_takes_units(memory: str, gb: float) -> None:
    result = run("config", "--memory", memory, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["memory_gb"] == gb


def test_config_help_shows_the_cpu_and_memory_ranges() -> None:
    result = run("config", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "Virtual CPUs (default 1 for vzkit's guest, 2 with --kernel or --config)." in text
    assert "[1<=x<=255]" in text  # 0 is refused by the option, not later by the config
    assert (
        "Memory, 64m-4096g, e.g. 512m or 2g; a plain number is GiB (default 512m for vzkit's"
        " guest, 1g with --kernel or --config)." in text
    )


def test_disk_create(tmp_path: Path) -> None:
    target = tmp_path / "disk.img"
    result = run("disk", "create", target, "2")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"created {target} (2.0 GiB)\n"
    assert target.stat().st_size == 2 * GIB
    same = run("disk", "create", target, "2")
    assert same.stdout == f"kept existing {target}\n"
    again = run("disk", "create", target, "5G")
    assert again.exit_code == 0
    assert again.stdout == (
        f"kept existing {target} (2.0 GiB, not the 5.0 GiB asked for: an existing disk is never"
        " resized or overwritten; remove it or choose another path, or grow it with"
        f" 'truncate -s {5 * GIB} {target}' and then its file system in the guest)\n"
    )
    assert target.stat().st_size == 2 * GIB


@pytest.mark.parametrize(("size", "nbytes"), [("512m", 512 << 20), ("1G", GIB), ("1.5g", 3 << 29)])
def test_disk_create_takes_units(tmp_path: Path, size: str, nbytes: int) -> None:
    target = tmp_path / "disk.img"
    assert run("disk", "create", target, size).exit_code == 0
    assert target.stat().st_size == nbytes


def test_disk_create_qcow2(tmp_path: Path) -> None:
    import shutil

    if shutil.which("qemu-img") is None:
        pytest.skip("needs qemu-img")
    target = tmp_path / "disk.qcow2"
    result = run("disk", "create", "--format", "qcow2", target, "1")
    assert result.exit_code == 0, result.output
    assert target.read_bytes()[:4] == b"QFI\xfb"


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("0", "size '0' must be more than zero"),
        ("x", "size 'x' is not a size: give a number with an optional unit, e.g. 512m"),
        ("1000k", "size_bytes must be a positive multiple of 1 MiB"),
    ],
)
def test_disk_create_bad_size(tmp_path: Path, size: str, message: str) -> None:
    result = run("disk", "create", tmp_path / "disk.img", size)
    assert result.exit_code == 2
    assert message in result.stderr
    assert not (tmp_path / "disk.img").exists()


def test_disk_create_qcow2_without_qemu_img(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    result = run("disk", "create", "--format", "qcow2", tmp_path / "d.qcow2", "1")
    assert result.exit_code == 1
    assert "qemu-utils" in result.stderr


def _snapshot(vm_dir: Path, name: str, created: str, state: bytes = b"abc") -> None:
    snaps = vm_dir / "snapshots"
    snaps.mkdir(parents=True, exist_ok=True)
    (snaps / f"{name}.vmstate").write_bytes(state)
    meta = {"name": name, "created": created, "size": 1, "vmState": "paused", "filePath": ""}
    (snaps / f"{name}.json").write_text(json.dumps(meta))


def test_snapshot_list_and_rm(tmp_path: Path) -> None:
    vm_dir = tmp_path / "vm"
    assert run("snapshot", "list", vm_dir).stdout == "no snapshots\n"
    _snapshot(vm_dir, "old", "2025-01-01T00:00:00Z")
    _snapshot(vm_dir, "new", "2026-03-21T10:15:30.123456789-07:00", b"12345")

    result = run("snapshot", "list", vm_dir)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "CREATED", "SIZE", "STATE"]
    # sizes for people (issue 18 item 9); --json below has the bytes
    assert lines[1].split() == ["new", "2026-03-21T10:15:30.123456-07:00", "5", "B", "paused"]
    assert lines[2].split() == ["old", "2025-01-01T00:00:00.000000Z", "3", "B", "paused"]

    as_json = json.loads(run("snapshot", "list", "--json", vm_dir).stdout)
    assert [m["name"] for m in as_json] == ["new", "old"]
    assert set(as_json[0]) == {"name", "created", "size", "vmState", "filePath"}
    assert as_json[0]["size"] == 5

    result = run("snapshot", "rm", vm_dir, "old")
    assert result.exit_code == 0
    assert result.stdout == "deleted old\n"
    assert not (vm_dir / "snapshots" / "old.vmstate").exists()
    assert not (vm_dir / "snapshots" / "old.json").exists()
    assert [m["name"] for m in json.loads(run("snapshot", "list", "--json", vm_dir).stdout)] == [
        "new"
    ]


def test_snapshot_rm_missing_and_bad_names(tmp_path: Path) -> None:
    vm_dir = tmp_path / "vm"
    result = run("snapshot", "rm", vm_dir, "ghost")
    assert result.exit_code == 1
    assert "vzkit: error: no snapshot named 'ghost'" in result.stderr
    result = run("snapshot", "rm", vm_dir, "../x")
    assert result.exit_code == 1
    assert "invalid snapshot name '../x'" in result.stderr
    assert not vm_dir.exists()
    assert run("snapshot", "rm", vm_dir).exit_code == 2  # a name is required


def test_doctor_names_the_vsock_transport_and_the_share_daemon(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from vzkit.backends.qemu import _virtiofs, _vsock

    monkeypatch.setattr(_vsock, "VHOST_DEVICE", str(tmp_path / "no-vhost-vsock"))
    fake = _virtiofs.Virtiofsd(tmp_path / "virtiofsd", rust=True, readonly=True)
    monkeypatch.setattr(_virtiofs, "find_virtiofsd", lambda: fake)
    out = run("doctor").output
    assert "vsock: vzkit's user-space vhost-user-vsock device" in out
    daemon = tmp_path / "virtiofsd"
    assert f"shares: VirtioFS, rust virtiofsd {daemon} (read-only shares with --readonly)" in out
    device = tmp_path / "vhost-vsock"
    device.write_bytes(b"")
    monkeypatch.setattr(_vsock, "VHOST_DEVICE", str(device))
    monkeypatch.setattr(_virtiofs, "find_virtiofsd", lambda: None)
    out = run("doctor").output
    assert f"vsock: kernel vhost-vsock ({device})" in out
    assert "shares: virtio-9p (no virtiofsd found)" in out


def test_doctor_json_and_the_guests_checks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``doctor`` also says what vzkit's guest needs (issue 18 item 9): the image cache per
    arch, the agent's toolchain (with what to do when it is missing), the package source;
    ``--json`` gives the same report as data."""
    monkeypatch.setenv("VZKIT_CACHE_DIR", str(tmp_path / "empty cache"))
    monkeypatch.setenv("VZKIT_ZIG", str(tmp_path / "no-zig"))
    monkeypatch.setenv("VZKIT_DEB_SOURCE", "mirror")
    monkeypatch.setenv("VZKIT_DEBIAN_MIRROR", "http://mirror.example/debian")
    out = run("doctor").output.splitlines()
    guest = out[out.index("guest") + 1 :]
    assert guest[0] == (
        "      x86_64 guest image: not built yet (the first VM builds it, or now: vzkit image"
        " build --arch x86_64)"
    )
    assert guest[1].startswith("      aarch64 guest image: not built yet")
    assert guest[2].startswith("    ! agent toolchain: VZKIT_ZIG=")
    assert "is not an executable" in guest[2]
    assert guest[3] == "      guest packages: http://mirror.example/debian"
    data = json.loads(run("doctor", "--json").stdout)
    assert [b["name"] for b in data["backends"]] == ["vz", "qemu"]
    assert {"name", "available", "detail", "checks", "ok"} <= set(data["backends"][1])
    [toolchain] = [c for c in data["guest"] if c["name"] == "agent toolchain"]
    assert toolchain["ok"] is False


class _FakeGuest:
    def __init__(self, calls: list[list[str]]) -> None:
        self.calls = calls

    def wait_ready(self, timeout: float) -> None:
        pass

    def run(self, argv: list[str]) -> object:
        self.calls.append(argv)
        return type("Done", (), {"stdout": b"", "stderr": b"", "returncode": 0})()


class _FakeVM:
    calls: ClassVar[list[list[str]]] = []

    def __init__(self, cfg: object, backend: str) -> None:
        self.guest = _FakeGuest(self.calls)

    def __enter__(self) -> _FakeVM:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def start(self, timeout: float) -> None:
        pass


def test_snapshot_save_and_restore_do_not_pass_the_separator_to_the_guest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``vzkit snapshot save DIR NAME -- CMD`` runs CMD, not ``-- CMD`` (click hands a ``--``
    that follows positional arguments on as one)."""
    import vzkit
    from vzkit.cli import _snapshot

    saved = type("Meta", (), {"size": 3, "file_path": tmp_path / "vm" / "s" / "x"})()
    manager = type("Manager", (), {"save": lambda self, vm, name: saved})
    monkeypatch.setattr(vzkit, "VirtualMachine", _FakeVM)
    monkeypatch.setattr(_snapshot, "SnapshotManager", lambda vm_dir: manager())
    monkeypatch.setattr(_snapshot, "run_config", lambda interactive, opts: object())
    _FakeVM.calls = []
    result = run("snapshot", "save", tmp_path / "vm", "warm", "--", "echo", "hi")
    assert result.exit_code == 0, result.output
    assert _FakeVM.calls == [["echo", "hi"]]

    restored: list[tuple[str, ...]] = []
    monkeypatch.setattr(_snapshot, "run_and_exit", lambda command, *rest: restored.append(command))
    run("snapshot", "restore", tmp_path / "vm", "warm", "--", "cat", "--", "f")
    assert restored == [("cat", "--", "f")]


def test_python_dash_m_vzkit_is_the_cli() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "vzkit", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("vzkit")


def test_errors_are_red_on_a_terminal_unless_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from vzkit.cli._errors import echo_error

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for no_color, want in (("", "\x1b[31m\x1b[1mvzkit: error:\x1b[0m boom\n"), ("1", None)):
        terminal = Terminal()
        monkeypatch.setattr("sys.stderr", terminal)
        monkeypatch.setenv("NO_COLOR", no_color)
        echo_error("boom")
        assert terminal.getvalue() == (want or "vzkit: error: boom\n")
    pipe = io.StringIO()  # not a terminal: plain
    monkeypatch.setattr("sys.stderr", pipe)
    monkeypatch.setenv("NO_COLOR", "")
    echo_error("boom")
    assert pipe.getvalue() == "vzkit: error: boom\n"


@pytest.mark.parametrize(
    ("args", "level"), [([], None), (["-v"], "INFO"), (["-vv"], "DEBUG"), (["--debug"], "DEBUG")]
)
def test_verbose_and_debug_log_to_stderr(args: list[str], level: str | None) -> None:
    """``vzkit -v`` logs what vzkit does, ``--debug`` (or ``-vv``) everything; without them
    vzkit's log stays quiet (issue 18 item 5)."""
    import logging

    from vzkit.cli import _app

    logger = logging.getLogger("vzkit")
    saved = (logger.level, list(logger.handlers))
    try:
        result = run(*args, "config", "--format", "json")
        assert result.exit_code == 0, result.output
        handlers = [h for h in logger.handlers if isinstance(h, _app._Verbose)]
        if level is None:
            assert handlers == []
            return
        assert logging.getLevelName(logger.level) == level
        [handler] = handlers
        record = logger.makeRecord(
            "vzkit.test", logging.DEBUG, __file__, 1, "argv %s", ("x",), None
        )
        assert handler.format(record).endswith(" DEBUG vzkit.test: argv x")
    finally:
        logger.setLevel(saved[0])
        logger.handlers = saved[1]


def test_an_agent_that_times_out_shows_the_console_and_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest still booting when the boot timeout ends: the error shows the end of its
    console and where the whole log is kept (the VM's own goes with its state directory)."""
    from vzkit import VMState, VMTimeoutError
    from vzkit.cli._run import _with_console

    console = tmp_path / "console.log"
    console.write_bytes(b"".join(b"[ %d.0] line %d\r\n" % (i, i) for i in range(40)))
    vm = type("VM", (), {"state": VMState.RUNNING, "console_log_path": console})()
    monkeypatch.setenv("VZKIT_HOME", str(tmp_path / "home"))
    err = _with_console(vm, VMTimeoutError("the guest agent did not answer within 180 s"))
    text = str(err)
    assert text.startswith("the guest agent did not answer within 180 s; its console ended with:")
    assert "  [ 39.0] line 39" in text
    assert "line 27" not in text  # the last lines only
    [kept] = (tmp_path / "home" / "logs").glob("console-*.log")
    assert text.endswith(f"the whole console log: {kept}")
    assert kept.read_bytes() == console.read_bytes()


def test_rosetta_needs_an_aarch64_guest_and_the_vz_backend(tmp_path: Path) -> None:
    result = run("config", "--arch", "x86_64", "--rosetta")
    assert result.exit_code == 2, result.output
    assert "rosetta runs x86_64 programs in an aarch64 guest" in result.stderr
    kernel = tmp_path / "Image"
    kernel.write_bytes(b"k")
    result = run("run", "--backend", "qemu", "--arch", "aarch64", "--kernel", kernel, "--rosetta")
    assert result.exit_code != 0
    assert "the qemu backend cannot offer it" in result.stderr
