"""``vzkit run --rootfs/--root/--init``: how they become a config, and what they refuse."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from vzkit.cli import main
from vzkit.cli._run import run_config
from vzkit.cli._snapshot import root_opts


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("vmlinuz", "disk.img"):
        out[name] = tmp_path / name
        out[name].write_bytes(b"x")
    return out


def _opts(**given: object) -> dict[str, object]:
    opts: dict[str, object] = dict.fromkeys(("config_file", "graphics", "rootfs", "root", "init"))
    opts.update(given)
    return opts


def test_root_and_init_reach_the_kernel_command_line(files: dict[str, Path]) -> None:
    cfg = run_config(
        False,
        _opts(
            kernel_path=files["vmlinuz"], cmdline="console=ttyS0", disk_path=files["disk.img"],
            root="/dev/vda1", init="image",
        ),
    )  # fmt: skip
    assert cfg.cmdline == "console=ttyS0 root=/dev/vda1 vzkit.init=image"
    assert cfg.disk_path == files["disk.img"]  # booted and written in place
    assert cfg.root_disk is None


def test_rootfs_becomes_a_cached_root_disk(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VZKIT_CACHE_DIR", str(tmp_path / "cache"))
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    cfg = run_config(False, _opts(kernel_path=files["vmlinuz"], rootfs=tree))
    assert cfg.root_disk is not None
    assert cfg.root_disk.base.is_relative_to(tmp_path / "cache" / "images" / "disks")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--init", "image"], "--init needs --image, --rootfs or --root"),
        (["--root", "/dev/vda1", "--config", "{cfg}"], "do not combine with --config"),
        (["--root", "vda1", "--kernel", "{kernel}", "--disk", "{disk}"], "is not /dev/NAME"),
        (["--init", "systemd"], "'systemd' is not one of 'agent', 'image'"),
        (["--insecure-registry"], "--insecure-registry goes with --image REF"),
        (["--insecure-registry", "--image", "default"], "--insecure-registry goes with --image"),
    ],
)
def test_bad_root_options_exit_2(
    files: dict[str, Path], tmp_path: Path, args: list[str], message: str
) -> None:
    cfg = tmp_path / "vm.toml"
    cfg.write_text("")
    values = {"cfg": cfg, "kernel": files["vmlinuz"], "disk": files["disk.img"]}
    argv = ["run", *(a.format(**values) for a in args), "--", "true"]
    result = CliRunner().invoke(main, argv, prog_name="vzkit")
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_the_snapshot_commands_take_runs_root_options(files: dict[str, Path]) -> None:
    """``snapshot save``/``restore`` take ``run``'s very ``--image/--rootfs/--root/--init``,
    and reach the config the same way."""
    ctx = click.Context(main)
    run = main.get_command(ctx, "run")
    group = main.get_command(ctx, "snapshot")
    assert run is not None
    assert isinstance(group, click.Group)
    wanted = ("image", "insecure_registry", "rootfs", "root", "init_mode")
    shared = {p.name: p for p in run.params if p.name in wanted}
    assert len(shared) == 5
    for name in ("save", "restore"):
        command = group.get_command(ctx, name)
        assert command is not None
        theirs = {p.name: p for p in command.params}
        assert all(theirs[key] is option for key, option in shared.items()), name
    given = {"kernel_path": files["vmlinuz"], "cmdline": "console=ttyS0"}
    given |= {"disk_path": files["disk.img"], "image": None, "rootfs": None, "root": "/dev/vda1"}
    opts = root_opts({**given, "init_mode": "image"})
    cfg = run_config(False, {**_opts(), **opts})
    assert cfg.cmdline == "console=ttyS0 root=/dev/vda1 vzkit.init=image"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["save", "--init", "image"], "--init needs --image, --rootfs or --root"),
        (["restore", "--root", "vda1", "--kernel", "{kernel}", "--disk", "{disk}"], "/dev/NAME"),
        (["save", "--insecure-registry"], "--insecure-registry goes with --image REF"),
        (["restore", "--insecure-registry"], "--insecure-registry goes with --image REF"),
    ],
)
def test_bad_root_options_of_the_snapshot_commands_exit_2(
    files: dict[str, Path], tmp_path: Path, args: list[str], message: str
) -> None:
    values = {"kernel": files["vmlinuz"], "disk": files["disk.img"]}
    argv = ["snapshot", *(a.format(**values) for a in args), str(tmp_path / "vm"), "s", "true"]
    result = CliRunner().invoke(main, argv, prog_name="vzkit")
    assert result.exit_code == 2, result.output
    assert message in result.stderr
