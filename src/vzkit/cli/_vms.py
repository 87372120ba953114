"""Named VMs that live on (docker's and lima's verbs): ``vzkit create``, ``start``, ``ls``,
``stop``, ``rm``, ``cp``, ``logs`` and ``inspect``; ``run -d`` makes one too (:mod:`._run`),
``exec`` and ``shell`` run commands in one (:mod:`._exec`).

Every command goes through the public API (``vzkit.create``, ``connect``, ``list_vms``,
``remove_vm``): the VM's supervisor owns it, and a VM connected here is only disconnected
at the end (``vm.close()``), never stopped unless asked.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vzkit import format_size
from vzkit.errors import SpecError, StateError, VMNotFoundError, VzkitError

from ._app import main
from ._attach import DOWN, require_running
from ._errors import EXIT_FAILURE, EXIT_USAGE, echo_error, handle_errors
from ._options import vm_options
from ._run import run_config
from ._snapshot import root_options, root_opts

if TYPE_CHECKING:
    from vzkit import VMInfo

__all__ = [
    "cp_cmd",
    "create_cmd",
    "find_vm",
    "inspect_cmd",
    "logs_cmd",
    "ls_cmd",
    "parse_copy_path",
    "rm_cmd",
    "start_cmd",
    "stop_cmd",
]

#: What ``vzkit ls`` shows without ``-a``: VMs that are not stopped (or failed).
#: ``NAME:`` at the start of a ``vzkit cp`` path: a VM's name (the name syntax of the core).
_VM_PATH = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]*):(.*)", re.S)
#: How often ``vzkit logs -f`` looks for more of the console and at the VM's state (seconds).
_FOLLOW_POLL_S = 0.25


def find_vm(name: str) -> VMInfo:
    """The :class:`~vzkit.VMInfo` of the VM ``name``; ``VMNotFoundError`` if there is none."""
    import vzkit

    for info in vzkit.list_vms():
        if info.name == name:
            return info
    raise VMNotFoundError(f"no VM named {name!r}: 'vzkit ls -a' lists them")


def _each(names: tuple[str, ...], action: Callable[[str], None]) -> None:
    """``action`` for each name, printing the name when it is done (docker's habit) and the
    error when it fails, with the name when the error does not say it; the others still go.
    Exit 1 when one failed."""
    failed = False
    for name in names:
        try:
            action(name)
        except (VzkitError, OSError) as err:
            echo_error(err if repr(name) in str(err) else f"{name}: {err}")
            failed = True
        else:
            click.echo(name)
    if failed:
        sys.exit(EXIT_FAILURE)


@root_options
@main.command("create")
@vm_options
@click.option(
    "--backend",
    type=click.Choice(["auto", "qemu", "vz"]),
    default="auto",
    show_default=True,
    help="Which hypervisor backend runs the VM.",
)
@click.argument("name")
@handle_errors
def create_cmd(name: str, backend: str, **opts: Any) -> None:
    """Make the named VM NAME, stopped ('vzkit start NAME' boots it); prints its name.

    Takes 'vzkit run''s VM and image options; the VM keeps them for every start.

    \b
      vzkit create --image debian --memory 1g t2
      vzkit create --cpus 2 -v .:src t3
    """
    import vzkit  # on first use: 'vzkit --help' does not pay for it

    cfg = run_config(False, root_opts(opts))
    vm = vzkit.create(cfg, name, backend=backend, start=False)
    vm.close()
    click.echo(name)


@main.command("start")
@click.option(
    "--boot-timeout",
    type=float,
    default=180.0,
    show_default=True,
    help="Seconds to wait for each VM's agent.",
)
@click.argument("names", nargs=-1, required=True)
def start_cmd(names: tuple[str, ...], boot_timeout: float) -> None:
    """Start the stopped VMs NAMES (each under its own supervisor) and wait until their agents
    answer; prints each name.

    \b
      vzkit start t1
    """
    import vzkit

    def start(name: str) -> None:
        vm = vzkit.connect(name)
        try:
            vm.start(timeout=boot_timeout)
            vm.guest.wait_ready(timeout=boot_timeout)
        finally:
            vm.close()  # disconnects only: the VM runs on

    _each(names, start)


@main.command("stop")
@click.option(
    "-t",
    "--time",
    "seconds",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds for the whole stop: the guest is asked to power off, then forced off.",
)
@click.argument("names", nargs=-1, required=True)
def stop_cmd(names: tuple[str, ...], seconds: float) -> None:
    """Stop the VMs NAMES (a stopped one is left as it is); prints each name. The VMs are
    kept: 'vzkit start' boots them again, 'vzkit rm' removes them.

    \b
      vzkit stop t1
      vzkit stop -t 5 t1 t2
    """
    import vzkit

    def stop(name: str) -> None:
        vm = vzkit.connect(name)
        try:
            if vm.state not in DOWN:
                vm.stop(timeout=seconds)
        finally:
            vm.close()

    _each(names, stop)


@main.command("rm")
@click.option("-f", "--force", is_flag=True, help="Stop a VM that runs first (else refused).")
@click.argument("names", nargs=-1, required=True)
def rm_cmd(names: tuple[str, ...], force: bool) -> None:
    """Remove the VMs NAMES and everything they kept (disk layers, logs); prints each name.

    \b
      vzkit rm t1
      vzkit rm -f t1 t2
    """
    import vzkit

    _each(names, lambda name: vzkit.remove_vm(name, force=force))


def _ago(then: float, now: float) -> str:
    """``then`` for people, as ``docker ps`` says it: ``5 seconds ago``, ``3 hours ago``."""
    seconds = max(0, int(now - then))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return f"{seconds} second{'s' if seconds != 1 else ''} ago"


def _row(info: VMInfo, now: float) -> list[str]:
    memory = format_size(int(info.config.memory_gb * (1 << 30))).replace(" ", "")
    return [
        info.name,
        info.state.value,
        info.backend,
        str(info.config.arch),
        str(info.config.cpus),
        memory,
        _ago(info.created, now),
    ]


_HEADER = ["NAME", "STATE", "BACKEND", "ARCH", "CPUS", "MEMORY", "CREATED"]


@main.command("ls")
@click.option("-a", "--all", "show_all", is_flag=True, help="Stopped and failed VMs too.")
@click.option(
    "--json", "as_json", is_flag=True, help="A JSON list, one object per VM (stable keys)."
)
@handle_errors
def ls_cmd(show_all: bool, as_json: bool) -> None:
    """List the named VMs that are not stopped (with -a: all of them), by name.

    \b
      vzkit ls
      vzkit ls -a --json
    """
    import vzkit

    infos = [i for i in vzkit.list_vms() if show_all or i.state not in DOWN]
    if as_json:
        click.echo(json.dumps([info.to_json() for info in infos], indent=2))
        return
    now = time.time()
    rows = [_HEADER, *(_row(info, now) for info in infos)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[-1]]))


@main.command("inspect")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (stable keys).")
@click.argument("name")
@handle_errors
def inspect_cmd(name: str, as_json: bool) -> None:
    """Show the VM NAME: its state, processes, command, files and configuration.

    \b
      vzkit inspect t1
      vzkit inspect --json t1
    """
    info = find_vm(name)
    data = info.to_json()
    if as_json:
        click.echo(json.dumps({**data, "config": info.config.to_dict()}, indent=2))
        return
    for key, value in data.items():
        if value is None:
            value = "-"
        elif key in ("created", "started"):
            value = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(value))
        elif isinstance(value, list):
            value = " ".join(value)
        click.echo(f"{key + ':':<13} {value}")


def parse_copy_path(arg: str) -> tuple[str | None, str]:
    """``NAME:PATH`` → ``(NAME, PATH)``, a host path → ``(None, path)``. A first component
    that is no VM name (it has a ``/``, or starts with ``.``) is a host path: write a host
    path with a ``:`` as ``./a:b``."""
    match = _VM_PATH.fullmatch(arg)
    if match is None:
        return None, arg
    return match[1], match[2]


@main.command("cp")
@click.argument("src")
@click.argument("dest")
def cp_cmd(src: str, dest: str) -> None:
    """Copy a file or directory tree between the host and a running VM: NAME:PATH on one side.

    Streamed, with docker cp's rules: a file onto an existing directory goes inside it, a
    directory onto a missing path becomes that path, SRC/. copies a directory's contents;
    modes and symbolic links are kept. A guest PATH that is relative is from the guest
    command's working directory. A host path with a ':' before any '/' is written './a:b'.

    \b
      vzkit cp ./src t1:/root/src
      vzkit cp t1:/var/log/app.log .
    """
    (src_vm, src_path), (dest_vm, dest_path) = parse_copy_path(src), parse_copy_path(dest)
    if (src_vm is None) == (dest_vm is None):
        echo_error(
            "give NAME:PATH on exactly one side: 'vzkit cp HOST_PATH NAME:PATH' or "
            "'vzkit cp NAME:PATH HOST_PATH'"
        )
        sys.exit(EXIT_USAGE)
    name = src_vm if src_vm is not None else dest_vm
    assert name is not None
    if not (src_path if src_vm is not None else dest_path):
        echo_error(f"give a guest path after '{name}:', e.g. {name}:/root")
        sys.exit(EXIT_USAGE)
    try:
        _copy(name, src_vm, src_path, dest_path)
    except (SpecError, StateError) as err:
        echo_error(err)
        sys.exit(EXIT_USAGE if isinstance(err, SpecError) else EXIT_FAILURE)
    except (VzkitError, OSError) as err:  # FileNotFoundError: a host path that is not there
        echo_error(err)
        sys.exit(EXIT_FAILURE)


def _copy(name: str, src_vm: str | None, src_path: str, dest_path: str) -> None:
    import vzkit

    vm = vzkit.connect(name)
    try:
        require_running(vm, name)
        if src_vm is None:
            vm.guest.copy_in(src_path, dest_path)
        else:
            vm.guest.copy_out(src_path, dest_path)
    finally:
        vm.close()


def _copy_new(path: Path, offset: int) -> int:
    """Write what ``path`` has past ``offset`` to stdout; the new offset (0 again when the file
    was cut shorter or replaced by a shorter one)."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return offset
    with fh:
        size = fh.seek(0, 2)
        if size < offset:
            offset = 0
        fh.seek(offset)
        out = sys.stdout.buffer
        while chunk := fh.read(1 << 16):
            out.write(chunk)
            offset += len(chunk)
        out.flush()
    return offset


@main.command("logs")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the VM stops.")
@click.argument("name")
@handle_errors
def logs_cmd(name: str, follow: bool) -> None:
    """Print the console of the VM NAME (the kernel's and init's messages, across its boots).

    \b
      vzkit logs t1
      vzkit logs -f t1
    """
    info = find_vm(name)
    if info.console_log is None:
        return
    offset = _copy_new(info.console_log, 0)
    if not follow:
        return
    try:
        while True:
            down = find_vm(name).state in DOWN
            offset = _copy_new(info.console_log, offset)
            if down:  # everything it wrote before it stopped is out
                return
            time.sleep(_FOLLOW_POLL_S)  # poll: the log is a file another process appends to
    except KeyboardInterrupt:
        sys.exit(130)
