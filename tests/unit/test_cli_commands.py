"""CLI commands and options that need no VM, through ``vzkit.cli:main`` only: ``image build``
(from local .debs), ``image list``, ``image rm``, the config options for boot media, and the
checks ``run`` makes before it boots anything."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from vzkit import LinuxVMConfig, format_size
from vzkit.cli import main

# the synthetic kernel/busybox .debs and a stand-in agent of the image builder's own tests
from .test_guest_image import debs, fake_agent  # noqa: F401


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="vzkit")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty vzkit cache of this test's own."""
    path = tmp_path / "cache"
    monkeypatch.setenv("VZKIT_CACHE_DIR", str(path))
    return path


def _fields(output: str) -> dict[str, str]:
    return dict(line.split(None, 1) for line in output.splitlines())


def test_image_build_list_and_rm(cache: Path, debs: Path, fake_agent: Path) -> None:  # noqa: F811
    assert run("image", "list").stdout == "no images (vzkit image build makes one)\n"
    assert json.loads(run("image", "list", "--json").stdout) == []

    built = run("image", "build", "--arch", "x86_64", "--deb-dir", debs)
    assert built.exit_code == 0, built.output
    fields = _fields(built.stdout)
    kernel, initrd = Path(fields["kernel"]), Path(fields["initrd"])
    assert kernel.is_file()
    assert initrd.is_file()
    assert kernel.parent.parent == cache / "images"
    assert fields["trust"] == "local"  # packages from --deb-dir

    again = run("image", "build", "--arch", "x86_64", "--source", "deb-dir", "--deb-dir", debs)
    assert again.exit_code == 0, again.output
    assert again.stdout == built.stdout  # found in the cache, not built twice

    listed = run("image", "list")
    assert listed.exit_code == 0, listed.output
    header, row = listed.stdout.splitlines()
    assert header.split() == ["IMAGE", "ARCH", "KERNEL", "INITRD", "TRUST"]
    assert row.split() == [
        kernel.parent.name,
        "x86_64",
        fields["version"],
        format_size(initrd.stat().st_size).replace(" ", ""),  # human, one word
        "local",
    ]
    [entry] = json.loads(run("image", "list", "--json").stdout)
    assert entry == {
        "kind": "default",
        "image": kernel.parent.name,
        "path": str(kernel.parent),
        "arch": "x86_64",
        "kernel_version": fields["version"],
        "initrd_bytes": initrd.stat().st_size,
        "trust": "local",
    }

    other = run("image", "rm", "--arch", "aarch64")
    assert (other.exit_code, other.stdout) == (0, "")
    assert kernel.is_file()  # another arch's images only
    removed = run("image", "rm")
    assert removed.exit_code == 0, removed.output
    assert removed.stdout == f"removed {kernel.parent}\n"
    assert not kernel.parent.exists()
    assert run("image", "list").stdout == "no images (vzkit image build makes one)\n"


def test_image_build_refresh_rebuilds_nothing_that_did_not_change(
    cache: Path,
    debs: Path,  # noqa: F811
    fake_agent: Path,  # noqa: F811
) -> None:
    first = run("image", "build", "--arch", "x86_64", "--deb-dir", debs)
    assert first.exit_code == 0, first.output
    initrd = Path(_fields(first.stdout)["initrd"])
    mtime = initrd.stat().st_mtime_ns
    refreshed = run("image", "build", "--arch", "x86_64", "--deb-dir", debs, "--refresh")
    assert refreshed.exit_code == 0, refreshed.output
    assert refreshed.stdout == first.stdout  # the same packages: the same image
    assert initrd.stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "deb-dir"], "--source deb-dir goes with --deb-dir DIR (and only with it)"),
        (["--source", "apt", "--deb-dir", "."], "--source deb-dir goes with --deb-dir DIR"),
        (["--source", "ftp"], "Invalid value for '--source'"),
        (["--deb-dir", "/nonexistent/debs"], "'/nonexistent/debs' does not exist"),
        (["--arch", "sparc"], "Invalid value for '--arch'"),
    ],
)
def test_image_build_bad_options_exit_2_and_build_nothing(
    cache: Path, args: list[str], message: str
) -> None:
    result = run("image", "build", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (cache / "images").exists() or not list((cache / "images").iterdir())


def test_image_rm_bad_arch_exits_2() -> None:
    result = run("image", "rm", "--arch", "sparc")
    assert result.exit_code == 2
    assert "Invalid value for '--arch'" in result.stderr


def test_config_initrd_and_iso(tmp_path: Path) -> None:
    kernel, initrd, iso = tmp_path / "vmlinuz", tmp_path / "initrd.img", tmp_path / "boot.iso"
    for path in (kernel, initrd, iso):
        path.write_bytes(b"x")
    result = run("config", "--kernel", kernel, "--initrd", initrd, "--iso", iso)
    assert result.exit_code == 0, result.output
    cfg = LinuxVMConfig.from_toml(result.stdout)
    assert (cfg.kernel_path, cfg.initrd_path, cfg.iso_path) == (kernel, initrd, iso)
    missing = run("config", "--kernel", kernel, "--initrd", tmp_path / "nope.img")
    assert missing.exit_code == 2
    assert f"initrd_path: '{tmp_path / 'nope.img'}' does not exist" in missing.stderr


@pytest.mark.parametrize("bad", ["=value", " SPACED=1"])
def test_run_env_without_a_name_is_a_usage_error_before_any_boot(cache: Path, bad: str) -> None:
    # (an empty cache: a boot would have to build the default image first, and fail otherwise)
    result = run("run", "-e", "GOOD=1", "--env", bad, "--", "true")
    assert result.exit_code == 2, result.output
    assert f"vzkit: error: --env wants NAME=VALUE or NAME, got {bad!r}" in result.stderr
    assert not cache.exists()


@pytest.mark.parametrize("bad", [":0", "nobody:", "a:b:c", "no body"])
def test_run_malformed_user_is_a_usage_error_before_any_boot(cache: Path, bad: str) -> None:
    result = run("run", "-u", bad, "--", "id")
    assert result.exit_code == 2, result.output
    assert "vzkit: error: user must be USER or USER:GROUP" in result.stderr
    assert repr(bad) in result.stderr
    assert not cache.exists()  # nothing was built or booted


def test_env_and_env_files_as_docker_reads_them(tmp_path: Path) -> None:
    """``-e NAME`` passes the host's value (left out when the host has none), ``--env-file``
    lines are NAME=VALUE or NAME with # comments and no quote removal; -e wins over files
    (issue 18 item 7)."""
    from vzkit.cli._run import expand_env

    first = tmp_path / "a.env"
    first.write_text("# settings\nA=1\n\nB='quoted'\nFROM_HOST\nMISSING\nC=x=y\n")
    second = tmp_path / "b.env"
    second.write_text("A=2\n")
    host = {"FROM_HOST": "host value", "HOME": "/home/me", "A": "host"}
    assert expand_env(("HOME", "NOPE", "A=3", "E="), (first, second), host) == (
        "A=1",
        "B='quoted'",
        "FROM_HOST=host value",
        "C=x=y",
        "A=2",
        "HOME=/home/me",
        "A=3",
        "E=",
    )
    bad = tmp_path / "bad.env"
    bad.write_text("OK=1\n=oops\n")
    with pytest.raises(ValueError, match=r"bad.env:2 wants NAME=VALUE or NAME, got '=oops'"):
        expand_env((), (bad,), host)
    with pytest.raises(ValueError, match=r"--env-file .*missing.env' cannot be read"):
        expand_env((), (tmp_path / "missing.env",), host)


def test_run_env_file_that_cannot_be_read_exits_2_before_any_boot(
    cache: Path, tmp_path: Path
) -> None:
    result = run("run", "--env-file", tmp_path / "missing.env", "--", "true")
    assert result.exit_code == 2, result.output
    assert "cannot be read" in result.stderr
    assert not cache.exists()


@pytest.mark.parametrize("command", [["run"], ["snapshot", "save"], ["snapshot", "restore"]])
def test_boot_timeout_must_be_a_number(command: list[str], tmp_path: Path) -> None:
    args = [] if command == ["run"] else [tmp_path / "vm", "snap"]
    result = run(*command, "--boot-timeout", "soon", *args, "--", "true")
    assert result.exit_code == 2
    assert "'soon' is not a valid float" in result.stderr


def _declaration(option: click.Option) -> tuple[object, ...]:
    return (
        option.opts,
        option.secondary_opts,
        option.name,
        option.type.to_info_dict(),
        option.multiple,
        option.is_flag,
        option.default,
    )


@pytest.mark.parametrize(
    "path", [["run"], ["create"], ["snapshot", "save"], ["snapshot", "restore"]]
)
def test_vm_making_commands_share_the_vm_options(path: list[str]) -> None:
    """The commands that boot take exactly the VM options of ``config``, declared alike (so
    ``config``'s tests of each option hold for them) and documented alike."""
    ctx = click.Context(main)
    config = main.get_command(ctx, "config")
    command: click.Command | None = main
    for name in path:
        assert isinstance(command, click.Group)
        command = command.get_command(ctx, name)
    assert config is not None
    assert command is not None
    ours = {o.name: o for o in config.params if isinstance(o, click.Option)}
    theirs = {o.name: o for o in command.params if isinstance(o, click.Option)}
    vm_options = set(ours) - {"fmt", "save_to"}  # config's own: --format, --save
    assert vm_options <= set(theirs)
    for name in sorted(vm_options):
        assert _declaration(theirs[name]) == _declaration(ours[name]), name
        assert theirs[name].help == ours[name].help, name


def test_an_output_pump_blocked_on_its_terminal_does_not_hold_the_stream_lock() -> None:
    """``vzkit run``'s daemon pumps may be blocked writing when it ends (Ctrl-C while the
    command prints). A pump blocked inside a buffered writer holds its lock, so whatever else
    writes to that stream waits, and the interpreter aborts at shutdown ("_enter_buffered_busy",
    exit 134, issue 18 item 2). The pump writes the file descriptor, outside the lock."""
    import contextlib
    import io
    import os
    import threading
    import time

    from vzkit.cli._attach import pump as _pump

    read_end, write_end = os.pipe()
    dst = open(write_end, "wb")  # noqa: SIM115  # a BufferedWriter, as sys.stdout.buffer is
    source = io.BytesIO(b"x" * (1 << 20))  # more than the unread pipe holds: the pump blocks
    pump = threading.Thread(target=_pump, args=(source, dst), daemon=True)
    pump.start()
    deadline = time.monotonic() + 10
    while source.tell() < 2 * 65536 and time.monotonic() < deadline:
        time.sleep(0.01)  # poll: the pump has read its second chunk, the pipe holds one
    time.sleep(0.2)  # and is now blocked writing it
    other = threading.Thread(target=dst.write, args=(b"y",), daemon=True)
    other.start()
    other.join(timeout=5)
    blocked = other.is_alive()
    os.close(read_end)  # the pump's write fails (EPIPE) and it ends
    pump.join(timeout=10)
    with contextlib.suppress(OSError):  # the byte written above cannot reach a closed pipe
        dst.close()
    assert not blocked, "a write to the stream waited for the pump's lock"
    assert not pump.is_alive()


def test_an_image_from_the_cache_leaves_no_progress_line(
    cache: Path,
    debs: Path,  # noqa: F811
    fake_agent: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The image build's progress line is drawn on a terminal and ends with "done (N s)" when
    it built something; found in the cache, it is erased (issue 18 item 8: "done (0.0 s)" on
    every interactive run)."""
    import io

    from vzkit.image import default_image

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    default_image("x86_64", cache_dir=cache, deb_dir=debs)
    built = terminal.getvalue()
    assert built.endswith(")\n")
    assert "guest image (x86_64): done (" in built
    terminal.seek(0)
    terminal.truncate()
    default_image("x86_64", cache_dir=cache, deb_dir=debs)
    again = terminal.getvalue()
    assert "done" not in again
    assert again.endswith("\r\033[K")  # the line is erased: the next output starts clean


def test_run_config_file_with_nothing_to_boot_boots_vzkits_guest_with_its_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'vzkit config --save vm.toml' writes no kernel; 'vzkit run --config vm.toml' used to
    start a VM with nothing to boot and time out after minutes (issue 18 item 1). It now
    boots vzkit's guest with the file's settings."""
    from vzkit.cli import _run

    saved = tmp_path / "vm.toml"
    assert run("config", "--cpus", "3", "--memory", "768m", "--save", saved).exit_code == 0
    calls: list[tuple[object, dict[str, object]]] = []
    monkeypatch.setattr(
        _run, "default_guest_config", lambda arch, **kw: calls.append((arch, kw)) or "guest"
    )
    config = main.get_command(click.Context(main), "config")
    assert config is not None
    opts = {o.name: None for o in config.params if o.name not in ("fmt", "save_to")}
    assert _run.run_config(False, {**opts, "config_file": saved}) == "guest"
    [(_, settings)] = calls
    assert (settings["cpus"], settings["memory_gb"]) == (3, 0.75)
    assert "kernel_path" not in settings
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    calls.clear()
    cfg = _run.run_config(False, {**opts, "config_file": saved, "kernel_path": kernel})
    assert isinstance(cfg, LinuxVMConfig)  # something to boot: the file's config as it is
    assert cfg.kernel_path == kernel
    assert calls == []


def test_an_interactive_console_gets_no_readiness_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``vzkit run`` without a command makes this terminal the console: the guest is told
    (``vzkit.ready=quiet``) to keep its VZKIT-GUEST-READY line, meant for programs, off it."""
    from vzkit.cli import _run

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    plain = LinuxVMConfig(kernel_path=kernel, cmdline="console=ttyS0")
    monkeypatch.setattr(_run, "default_guest_config", lambda arch, **kw: plain)
    config = main.get_command(click.Context(main), "config")
    assert config is not None
    opts = {o.name: None for o in config.params if o.name not in ("fmt", "save_to")}
    assert _run.run_config(True, opts).cmdline == "console=ttyS0 vzkit.ready=quiet"
    assert _run.run_config(False, opts).cmdline == "console=ttyS0"
