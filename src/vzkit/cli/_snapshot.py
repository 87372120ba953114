"""``vzkit snapshot list/rm/save/restore``: the snapshots of a VM directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from vzkit import SnapshotManager, format_size
from vzkit.errors import GuestError

from ._app import main
from ._errors import handle_errors
from ._options import vm_options
from ._run import run_and_exit, run_cmd, run_config

__all__ = [
    "root_options",
    "root_opts",
    "snapshot",
    "snapshot_list",
    "snapshot_restore",
    "snapshot_rm",
    "snapshot_save",
]


def _guest_command(command: tuple[str, ...]) -> tuple[str, ...]:
    """COMMAND without the ``--`` that separates it from VM_DIR NAME: once the positional
    arguments have started, click passes a ``--`` on as an argument."""
    return command[1:] if command[:1] == ("--",) else command


#: ``vzkit run``'s root file system options, the same click options (defined once, there).
_ROOT_PARAMS = ("image", "insecure_registry", "rootfs", "root", "init_mode")


def root_options(command: click.Command) -> click.Command:
    """Give ``command`` ``vzkit run``'s ``--image``, ``--rootfs``, ``--root`` and ``--init``: a
    snapshot of a VM on a root disk is saved and restored with the options it booted with."""
    shared = [p for p in run_cmd.params if p.name in _ROOT_PARAMS]
    assert len(shared) == len(_ROOT_PARAMS)
    first_argument = next(i for i, p in enumerate(command.params) if isinstance(p, click.Argument))
    command.params[first_argument:first_argument] = shared
    return command


def root_opts(opts: dict[str, Any]) -> dict[str, Any]:
    """The options as ``run_config`` takes them (``--init`` is ``init``)."""
    image, rootfs, root = opts.pop("image"), opts.pop("rootfs"), opts.pop("root")
    init = opts.pop("init_mode")
    if image is not None or rootfs is not None or root is not None or init is not None:
        opts = {**opts, "image": image, "rootfs": rootfs, "root": root, "init": init}
    if opts.pop("insecure_registry", False):
        opts["insecure_registry"] = True
    return opts


@main.group()
def snapshot() -> None:
    """VM state snapshots."""


@snapshot.command("list")
@click.argument("vm_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def snapshot_list(vm_dir: Path, as_json: bool) -> None:
    """List the snapshots of VM_DIR, newest first."""
    metas = SnapshotManager(vm_dir).list()
    if as_json:
        click.echo(json.dumps([m.to_json_dict() for m in metas], indent=2))
        return
    if not metas:
        click.echo("no snapshots")
        return
    click.echo(f"{'NAME':<24} {'CREATED':<28} {'SIZE':>10}  STATE")
    for m in metas:
        created = m.to_json_dict()["created"]  # RFC 3339, as in the metadata file
        size = format_size(m.size)  # --json has the bytes
        click.echo(f"{m.name:<24} {created:<28} {size:>10}  {m.vm_state}")


@snapshot.command("rm")
@click.argument("vm_dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("names", nargs=-1, required=True)
@handle_errors
def snapshot_rm(vm_dir: Path, names: tuple[str, ...]) -> None:
    """Delete snapshots of VM_DIR by name."""
    manager = SnapshotManager(vm_dir)
    for name in names:
        manager.delete(name)
        click.echo(f"deleted {name}")


@root_options
@snapshot.command("save", context_settings={"allow_interspersed_args": False})
@vm_options
@click.option(
    "--backend", type=click.Choice(["auto", "qemu", "vz"]), default="auto", show_default=True
)
@click.option("--boot-timeout", type=float, default=180.0, show_default=True, help="Seconds.")
@click.argument("vm_dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def snapshot_save(
    vm_dir: Path, name: str, command: tuple[str, ...], backend: str, boot_timeout: float,
    **opts: Any,
) -> None:  # fmt: skip
    """Boot a VM, run COMMAND in it (optional set-up), then save it as snapshot NAME of VM_DIR.

    The VM options must be given again to restore it ('vzkit run --from-snapshot NAME
    --vm-dir VM_DIR' or 'vzkit snapshot restore'); a mismatch is reported field by field.
    """
    from vzkit import VirtualMachine  # on first use: 'vzkit --help' does not pay for it

    command = _guest_command(command)
    cfg = run_config(False, root_opts(opts))
    with VirtualMachine(cfg, backend=backend) as vm:
        vm.start(timeout=boot_timeout)
        vm.guest.wait_ready(timeout=boot_timeout)
        if command:
            proc = vm.guest.run(list(command))
            sys.stdout.buffer.write(proc.stdout)
            sys.stderr.buffer.write(proc.stderr)
            if proc.returncode != 0:
                raise GuestError(f"the set-up command exited with {proc.returncode}; not saved")
        meta = SnapshotManager(vm_dir).save(vm, name)
    click.echo(f"saved {name} ({meta.size} bytes of machine state) in {meta.file_path.parent}")


@root_options
@snapshot.command("restore", context_settings={"allow_interspersed_args": False})
@vm_options
@click.option(
    "--backend", type=click.Choice(["auto", "qemu", "vz"]), default="auto", show_default=True
)
@click.option("--boot-timeout", type=float, default=180.0, show_default=True, help="Seconds.")
@click.argument("vm_dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def snapshot_restore(
    vm_dir: Path, name: str, command: tuple[str, ...], backend: str, boot_timeout: float,
    **opts: Any,
) -> None:  # fmt: skip
    """Restore snapshot NAME of VM_DIR into a new VM and run COMMAND in it (like 'vzkit run
    --from-snapshot'); without COMMAND the console is attached to this terminal."""
    command = _guest_command(command)
    snap = (vm_dir, name)
    run_and_exit(command, backend, (), None, False, boot_timeout, root_opts(opts), snap)
