"""``vzkit snapshot list/rm/save/restore``: the snapshots of a VM directory."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vzkit import SnapshotManager, format_size
from vzkit.errors import GuestError

from ._app import main
from ._errors import handle_errors
from ._options import vm_options
from ._run import run_and_exit, run_cmd, run_config

if TYPE_CHECKING:
    from vzkit import VirtualMachine

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
@click.option(
    "--vm",
    "vm_name",
    metavar="VM",
    help="Save the running named VM VM (see 'vzkit ls') instead of booting one; no VM options.",
)
@click.argument("vm_dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def snapshot_save(
    vm_dir: Path, name: str, command: tuple[str, ...], backend: str, boot_timeout: float,
    vm_name: str | None, **opts: Any,
) -> None:  # fmt: skip
    """Boot a VM, run COMMAND in it (optional set-up), then save it as snapshot NAME of VM_DIR.

    The VM options must be given again to restore it ('vzkit run --from-snapshot NAME
    --vm-dir VM_DIR' or 'vzkit snapshot restore'); a mismatch is reported field by field.
    With --vm, the named VM VM is saved as it runs (COMMAND, if any, runs in it first) and
    goes on running; 'vzkit snapshot restore --vm VM' brings it back to that point.

    \b
      vzkit snapshot save ./vm warm -- sh -c 'echo ready > /root/state'
      vzkit snapshot save --vm t1 ./snaps before-upgrade
    """
    from vzkit import VirtualMachine  # on first use: 'vzkit --help' does not pay for it

    command = _guest_command(command)
    if vm_name is not None:
        _no_vm_options(opts, backend)
        with _named_vm(vm_name) as vm:
            _set_up(vm, command)
            meta = SnapshotManager(vm_dir).save(vm, name)
        click.echo(f"saved {name} of {vm_name} ({meta.size} bytes of machine state) in "
                   f"{meta.file_path.parent}")  # fmt: skip
        return
    cfg = run_config(False, root_opts(opts))
    with VirtualMachine(cfg, backend=backend) as vm:
        vm.start(timeout=boot_timeout)
        vm.guest.wait_ready(timeout=boot_timeout)
        _set_up(vm, command)
        meta = SnapshotManager(vm_dir).save(vm, name)
    click.echo(f"saved {name} ({meta.size} bytes of machine state) in {meta.file_path.parent}")


def _set_up(vm: VirtualMachine, command: tuple[str, ...]) -> None:
    if command:
        proc = vm.guest.run(list(command))
        sys.stdout.buffer.write(proc.stdout)
        sys.stderr.buffer.write(proc.stderr)
        if proc.returncode != 0:
            raise GuestError(f"the set-up command exited with {proc.returncode}; not saved")


def _no_vm_options(opts: dict[str, Any], backend: str) -> None:
    given = sorted(k for k, v in opts.items() if v not in (None, (), False))
    if given or backend != "auto":
        names = ", ".join("--" + k.replace("_", "-") for k in given) or "--backend"
        raise click.UsageError(f"--vm takes the named VM as it is: drop {names}")


@contextlib.contextmanager
def _named_vm(name: str) -> Iterator[VirtualMachine]:
    import vzkit

    vm = vzkit.connect(name)
    try:
        yield vm
    finally:
        vm.close()  # disconnects only


@root_options
@snapshot.command("restore", context_settings={"allow_interspersed_args": False})
@vm_options
@click.option(
    "--backend", type=click.Choice(["auto", "qemu", "vz"]), default="auto", show_default=True
)
@click.option("--boot-timeout", type=float, default=180.0, show_default=True, help="Seconds.")
@click.option(
    "--vm",
    "vm_name",
    metavar="VM",
    help="Restore into the stopped named VM VM, which runs on from the snapshot (its config "
    "must match the one saved); no VM options, no COMMAND ('vzkit exec' runs commands).",
)
@click.argument("vm_dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def snapshot_restore(
    vm_dir: Path, name: str, command: tuple[str, ...], backend: str, boot_timeout: float,
    vm_name: str | None, **opts: Any,
) -> None:  # fmt: skip
    """Restore snapshot NAME of VM_DIR into a new VM and run COMMAND in it (like 'vzkit run
    --from-snapshot'); without COMMAND the console is attached to this terminal.

    \b
      vzkit snapshot restore ./vm warm -- cat /root/state
      vzkit snapshot restore --vm t1 ./snaps before-upgrade
    """
    command = _guest_command(command)
    if vm_name is not None:
        _restore_named(vm_dir, name, vm_name, command, backend, boot_timeout, opts)
        return
    snap = (vm_dir, name)
    run_and_exit(command, backend, (), None, False, boot_timeout, root_opts(opts), snap)


@handle_errors
def _restore_named(
    vm_dir: Path, name: str, vm_name: str, command: tuple[str, ...], backend: str,
    boot_timeout: float, opts: dict[str, Any],
) -> None:  # fmt: skip
    _no_vm_options(opts, backend)
    if command:
        raise click.UsageError(
            f"--vm restores the VM and leaves it running: run commands with 'vzkit exec "
            f"{vm_name} -- ...'"
        )
    with _named_vm(vm_name) as vm:
        SnapshotManager(vm_dir).restore(vm, name, timeout=boot_timeout)
        vm.resume(timeout=boot_timeout)
    click.echo(f"restored {name} into {vm_name}, running")
