"""``vzkit run``: boot a VM (or restore a snapshot), run one command in it, exit with its code.

Also the runner ``vzkit snapshot restore`` shares (:func:`run_and_exit`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from vzkit import ConsoleMode, LinuxVMConfig, SnapshotManager, VMState, default_guest_config
from vzkit.errors import ConfigError, SpecError, VMError, VzkitError

from ._app import main
from ._attach import (
    EXIT_RUN_FAILED,
    _Terminated,
    attach_terminal,
    catch_signals,
    expand_env,
    guest_command_options,
    stream_command,
)
from ._errors import EXIT_USAGE, echo_error
from ._options import build_config, vm_options

__all__ = ["EXIT_RUN_FAILED", "expand_env", "run_and_exit", "run_cmd", "run_config"]


@main.command(
    "run", context_settings={"allow_interspersed_args": False, "ignore_unknown_options": False}
)
@vm_options
@click.option(
    "--backend",
    type=click.Choice(["auto", "qemu", "vz"]),
    default="auto",
    show_default=True,
    help="Which hypervisor backend runs the VM.",
)
@guest_command_options
@click.option(
    "-d",
    "--detach",
    is_flag=True,
    help="Make a named VM that lives on: boot it, wait for its agent, print its name and "
    "exit; COMMAND (if any) is its main command, run in the background (its output in "
    "'vzkit logs'), and the VM stops when it ends. 'vzkit exec NAME -- CMD' runs more.",
)
@click.option(
    "--name",
    metavar="NAME",
    help="With -d: the VM's name (letters, digits, '_', '.', '-'; at most 64 bytes); "
    "default: a new random one.",
)
@click.option(
    "--rm",
    "remove",
    is_flag=True,
    help="With -d: the VM is removed once it stops (its main command ended, 'vzkit stop', "
    "its guest powered off); without -d the VM is always removed at the end.",
)
@click.option("--boot-timeout", type=float, default=180.0, show_default=True, help="Seconds.")
@click.option(
    "--from-snapshot",
    metavar="NAME",
    help="Restore snapshot NAME of --vm-dir instead of booting (see 'vzkit snapshot save').",
)
@click.option(
    "--vm-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=".",
    show_default=True,
    help="The directory whose snapshots/ holds --from-snapshot.",
)
@click.option(
    "--image",
    metavar="REF",
    help="Boot an image as the root file system: debian[:bookworm][+P1,P2] (built on first "
    "use; 'vzkit image build debian' looks for newer packages); an OCI image: NAME[:TAG], "
    "docker://HOST/REPO:TAG, oci:DIR, oci-archive:FILE, docker-archive:FILE (pulled on first "
    "use; 'vzkit image pull' looks for a newer one; its Env, WorkingDir, User and command "
    "apply); a digest from 'vzkit image list'; or 'default' (busybox).",
)
@click.option(
    "--insecure-registry",
    is_flag=True,
    help="With --image: the image's registry may be reached over plain HTTP (e.g. a registry "
    "on 127.0.0.1 for tests).",
)
@click.option(
    "--entrypoint",
    metavar="CMD",
    help="Run CMD instead of the image's entrypoint (its default command is dropped too; "
    "COMMAND becomes CMD's arguments), as docker run --entrypoint does.",
)
@click.option(
    "--rootfs",
    type=click.Path(path_type=Path, file_okay=False),
    help="Boot this directory tree as the root file system (made into a cached ext4 image; "
    "each VM writes into its own layer).",
)
@click.option(
    "--root",
    metavar="DEVICE",
    help="Boot the root file system on --disk, e.g. /dev/vda1, LABEL=root or UUID=...",
)
@click.option(
    "--init",
    "init_mode",
    type=click.Choice(["agent", "image"]),
    help="With --image/--rootfs/--root: 'agent' (default) runs no init of the image; 'image' runs "
    "its /sbin/init beside the agent.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run_cmd(
    command: tuple[str, ...],
    backend: str,
    env: tuple[str, ...],
    env_files: tuple[Path, ...],
    workdir: str | None,
    user: str | None,
    interactive: bool,
    tty: bool,
    detach: bool,
    name: str | None,
    remove: bool,
    boot_timeout: float,
    from_snapshot: str | None,
    vm_dir: Path,
    image: str | None,
    insecure_registry: bool,
    entrypoint: str | None,
    rootfs: Path | None,
    root: str | None,
    init_mode: str | None,
    **opts: Any,
) -> None:
    """Boot a fresh VM, run COMMAND in it and exit with its exit code.

    Uses vzkit's default guest (a Debian kernel, busybox and the vzkit agent; built on first
    use) unless --kernel is given. Without COMMAND, an OCI image's own command runs (its
    entrypoint and Cmd), else the guest's console is attached to this terminal. The VM is torn
    down afterwards, also on Ctrl-C.

    \b
      vzkit run -- uname -a
      vzkit run --memory 1 -v .:src:ro -- sh -c 'ls /mnt/src'
      vzkit run -p 8080:80 -- busybox httpd -f -p 80
      vzkit run -u 1000:1000 -w /tmp -- id
      vzkit run -t -- vi /etc/hosts
      vzkit run --from-snapshot warm --vm-dir ./vm -- python3 job.py
      vzkit run --image debian -- python3 -c 'print(1)'
      vzkit run --image python:3.12-slim -- python3 -c 'print(1)'
      vzkit run --image oci-archive:app.tar
      vzkit run --rootfs ./tree -- cat /etc/os-release
      vzkit run --disk disk.img --root /dev/vda1 -- ls /
      vzkit run -d --name t1 --image debian
    """
    from vzkit.agent import check_user

    from ._tty import not_a_tty

    snap = (vm_dir, from_snapshot) if from_snapshot is not None else None
    try:
        env = expand_env(env, env_files, os.environ)
        check_user(user)
        if detach:
            _check_detached(interactive, tty, from_snapshot)
        elif name is not None:
            raise SpecError(
                "--name names a VM that lives on: add -d ('vzkit run -d --name NAME'), then "
                "'vzkit exec NAME -- CMD'"
            )
        if tty and not sys.stdin.isatty():
            raise not_a_tty()
    except SpecError as err:
        echo_error(err)
        sys.exit(EXIT_USAGE)
    if rootfs is not None or root is not None or init_mode is not None or image is not None:
        opts = {**opts, "rootfs": rootfs, "root": root, "init": init_mode, "image": image}
    if insecure_registry:
        opts["insecure_registry"] = True
    if detach:
        detached_and_exit(
            name, command, backend, env, workdir, boot_timeout, opts, user=user,
            entrypoint=entrypoint, auto_remove=remove,
        )  # fmt: skip
    run_and_exit(command, backend, env, workdir, interactive, boot_timeout, opts, snap, user=user,
                 entrypoint=entrypoint, tty=tty)  # fmt: skip


def _check_detached(interactive: bool, tty: bool, from_snapshot: str | None) -> None:
    """What ``-d`` does not combine with (a ``SpecError`` that says what to do instead)."""
    if interactive or tty:
        raise SpecError(
            "-d does not combine with -i or -t: the VM runs on without this terminal; "
            "'vzkit exec -it NAME -- CMD' attaches one to a command in it"
        )
    if from_snapshot is not None:
        raise SpecError("-d does not combine with --from-snapshot yet: boot it without one")


def run_and_exit(
    command: tuple[str, ...],
    backend: str,
    env: tuple[str, ...],
    workdir: str | None,
    interactive: bool,
    boot_timeout: float,
    opts: dict[str, Any],
    snap: tuple[Path, str] | None,
    *,
    user: str | None = None,
    entrypoint: str | None = None,
    tty: bool = False,
) -> None:
    """Run, then exit: with the command's code, 2 for bad options, 125 when the VM failed
    (or the guest does not know ``user``), 130 on Ctrl-C and 143 on SIGTERM, 255 when the
    ``tty`` session was ended with its escape (the VM torn down in every case)."""
    catch_signals()  # Ctrl-C and SIGTERM tear the VM down
    try:
        code = _run(
            command, backend, env, workdir, interactive, boot_timeout, opts, snap, user=user,
            entrypoint=entrypoint, tty=tty,
        )  # fmt: skip
    except (SpecError, ConfigError) as err:
        echo_error(err)
        sys.exit(EXIT_USAGE)
    except VzkitError as err:
        echo_error(err)
        sys.exit(EXIT_RUN_FAILED)
    except KeyboardInterrupt:
        click.echo("vzkit: interrupted; the VM was torn down", err=True)
        sys.exit(130)
    except _Terminated:
        click.echo("vzkit: terminated; the VM was torn down", err=True)
        sys.exit(128 + signal.SIGTERM)
    sys.exit(code)


def detached_and_exit(
    name: str | None,
    command: tuple[str, ...],
    backend: str,
    env: tuple[str, ...],
    workdir: str | None,
    boot_timeout: float,
    opts: dict[str, Any],
    *,
    user: str | None = None,
    entrypoint: str | None = None,
    auto_remove: bool = False,
) -> None:
    """``run -d``: a named VM made through ``vzkit.create`` (its supervisor owns it), its agent
    awaited, its name printed; exit 0, 2 for bad options, 125 when it could not be made or
    did not come up (it is left for 'vzkit logs' and 'vzkit rm -f')."""
    import vzkit  # on first use: 'vzkit --help' does not pay for it

    catch_signals()
    name = name if name is not None else f"vm-{secrets.token_hex(4)}"
    try:
        cfg = run_config(False, opts)
        override = None if entrypoint is None else ([entrypoint] if entrypoint else [])
        argv = tuple(cfg.process.command(command, entrypoint=override))
        environment = cfg.process.command_environment(env, user) or {}
        main_command = None
        if argv:
            main_command = vzkit.GuestCommand(
                argv=argv, env=tuple(f"{k}={v}" for k, v in environment.items()), cwd=workdir,
                user=user,
            )  # fmt: skip
        vm = vzkit.create(
            cfg, name, backend=backend, command=main_command, timeout=boot_timeout,
            auto_remove=auto_remove,
        )  # fmt: skip
        try:
            vm.guest.wait_ready(timeout=boot_timeout)
        except (VzkitError, OSError) as err:  # OSError: the VM's sockets went with it
            if not _main_command_ended(name):  # a short one may be over before we ask
                raise _with_console(vm, err) from err
        finally:
            vm.close()  # disconnects only: the VM runs on
    except (SpecError, ConfigError) as err:
        echo_error(err)
        sys.exit(EXIT_USAGE)
    except VzkitError as err:
        echo_error(err)
        sys.exit(EXIT_RUN_FAILED)
    except (KeyboardInterrupt, _Terminated):
        click.echo(
            f"vzkit: interrupted; the VM {name!r} may be running: 'vzkit rm -f {name}' removes it",
            err=True,
        )
        sys.exit(130)
    click.echo(name)
    sys.exit(0)


def _main_command_ended(name: str) -> bool:
    """The named VM's main command ran and ended (so its VM stopped, as it should; with
    ``--rm`` it may be gone already)."""
    import vzkit

    found = [i for i in vzkit.list_vms() if i.name == name]
    return not found or found[0].exit_code is not None


def run_config(interactive_console: bool, opts: dict[str, Any]) -> LinuxVMConfig:
    """The VM's config: from ``--kernel``/``--config`` if given, else vzkit's default guest."""
    changes = {k: v for k, v in opts.items() if v is not None and v != ()}
    if changes.pop("insecure_registry", False):
        if changes.get("image") in (None, "default"):
            raise ConfigError("--insecure-registry goes with --image REF (an image's registry)")
        changes["insecure_registry"] = True
    if interactive_console:
        changes.setdefault("console", ConsoleMode.STDIO)
    if changes.get("image") == "default":  # the busybox guest: what no --image boots
        del changes["image"]
    roots = ("image", "rootfs", "root")
    rooted = any(changes.get(name) is not None for name in (*roots, "init"))
    if rooted and changes.get("config_file") is not None:
        raise ConfigError("--image, --rootfs, --root and --init do not combine with --config")
    if rooted and all(changes.get(name) is None for name in roots):
        raise ConfigError("--init needs --image, --rootfs or --root")
    if sum(changes.get(name) is not None for name in roots) > 1:
        raise ConfigError("give one of --image, --rootfs and --root")
    if not rooted and (
        changes.get("kernel_path") is not None or changes.get("config_file") is not None
    ):
        cfg = build_config(**{**dict.fromkeys(opts), **changes})
        if (cfg.kernel_path, cfg.disk_path, cfg.iso_path, cfg.root_disk) == (None,) * 4:
            # a config file with nothing to boot ('vzkit config --save'): vzkit's guest with
            # the file's settings, as 'vzkit run' without --config would boot
            keep = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
            for name in ("kernel_path", "initrd_path", "cmdline", "arch"):
                keep.pop(name)
            return default_guest_config(cfg.arch, **keep)
        return cfg
    graphics = changes.pop("graphics", None)
    changes.pop("config_file", None)
    if graphics is not None:
        changes["headless"] = not graphics
    cfg = default_guest_config(changes.pop("arch", None), **changes)
    if interactive_console:  # the console is this terminal: no readiness marker on it
        cfg = cfg.replace(cmdline=f"{cfg.cmdline} vzkit.ready=quiet")
    return cfg


#: How much of a guest's console a failed boot shows (its last lines, at most this many).
_CONSOLE_TAIL_LINES = 12
#: How long a failed boot waits for the VM to be seen stopped before reporting.
_SETTLE_S = 3.0


def logs_dir() -> Path:
    """Where a failed boot's console log is kept: ``$VZKIT_HOME/logs``, else the per-user
    state directory (``$XDG_STATE_HOME/vzkit/logs`` or ``~/.local/state/vzkit/logs``;
    ``~/Library/Logs/vzkit`` on macOS)."""
    home = os.environ.get("VZKIT_HOME")
    if home:
        return Path(home).expanduser() / "logs"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Logs" / "vzkit"
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "vzkit" / "logs"


#: Failed boots' console logs kept (the newest; older ones are removed).
_KEPT_LOGS = 20


def _tail(path: Path, size: int) -> bytes:
    """The last ``size`` bytes of ``path`` (read from there, not the whole file)."""
    with path.open("rb") as fh:
        fh.seek(max(0, fh.seek(0, os.SEEK_END) - size))
        return fh.read()


def _keep_console_log(source: Path | None) -> Path | None:
    """A private copy (0600 in a 0700 directory: it is guest output) of a failed VM's console
    log, which goes with the VM's temporary state directory; the newest few are kept."""
    if source is None:
        return None
    try:
        directory = logs_dir()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        kept = directory / f"console-{stamp}-{os.getpid()}.log"
        fd = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)  # streamed: a console log can be long
        for old in sorted(directory.glob("console-*.log"))[:-_KEPT_LOGS]:
            old.unlink(missing_ok=True)
    except OSError:
        return None
    return kept


def _with_console(vm: Any, err: VzkitError | OSError) -> VzkitError:
    """``err`` with the end of the guest's console, which says why (a root that cannot be
    mounted, a kernel that cannot boot, a guest still booting at the timeout), and where the
    whole console log is kept."""
    if not isinstance(err, TimeoutError):  # a stopping VM's sockets may go before its state
        with contextlib.suppress(VzkitError):
            vm.wait(timeout=_SETTLE_S)
    stopped = vm.state in (VMState.STOPPED, VMState.ERROR)
    if not stopped and not isinstance(err, TimeoutError):
        return err if isinstance(err, VzkitError) else VMError(f"cannot reach the agent: {err}")
    path = vm.console_log_path
    try:
        text = _tail(path, 8192).decode(errors="replace") if path is not None else ""
    except OSError:
        text = ""
    kept = _keep_console_log(path)
    where = f"\nthe whole console log: {kept}" if kept is not None else ""
    lines = [line.rstrip() for line in text.replace("\r", "").splitlines() if line.strip()]
    what = "the guest stopped before its agent answered" if stopped else str(err)
    if not lines:
        detail = f" ({err})" if stopped else ""
        return VMError(f"{what}{detail}; its console is empty{where}")
    tail = "\n".join("  " + line for line in lines[-_CONSOLE_TAIL_LINES:])
    return VMError(f"{what}; its console ended with:\n{tail}{where}")


def _run(
    command: tuple[str, ...],
    backend: str,
    env: tuple[str, ...],
    workdir: str | None,
    interactive: bool,
    boot_timeout: float,
    opts: dict[str, Any],
    snap: tuple[Path, str] | None = None,
    *,
    user: str | None = None,
    entrypoint: str | None = None,
    tty: bool = False,
) -> int:
    from vzkit import VirtualMachine  # on first use: 'vzkit --help' does not pay for it

    cfg = run_config(False, opts)
    # An OCI image's entrypoint and Cmd, as docker run combines them with COMMAND.
    override = None if entrypoint is None else ([entrypoint] if entrypoint else [])
    command = tuple(cfg.process.command(command, entrypoint=override))
    if not command:  # nothing to run: the console is this terminal
        cfg = run_config(True, opts)
    environment = cfg.process.command_environment(env, user)
    with VirtualMachine(cfg, backend=backend) as vm:
        if snap is not None:  # paused at the saved instant; resume steps the guest clock
            SnapshotManager(snap[0]).restore(vm, snap[1], timeout=boot_timeout)
            vm.resume(timeout=boot_timeout)
        else:
            vm.start(timeout=boot_timeout)
        if cfg.gui and (vm.display_address or "").startswith("vnc"):
            click.echo(f"vzkit: the display: {vm.display_address} (a VNC client)", err=True)
        if not command:  # the console is this terminal; run until the guest powers off
            state = vm.wait()
            return 0 if state is VMState.STOPPED else 1
        try:
            vm.guest.wait_ready(timeout=boot_timeout)
        except (VzkitError, OSError) as err:  # OSError: the VM's sockets went with it
            raise _with_console(vm, err) from err
        if tty:
            from ._tty import EXIT_DETACHED

            code, detached = attach_terminal(vm, list(command), environment, workdir, user)
            if detached:
                click.echo(
                    "\nvzkit: the session was ended (Ctrl-] .); tearing the VM down", err=True
                )
                code = EXIT_DETACHED
        else:
            forward_stdin = interactive or not sys.stdin.isatty()
            code = stream_command(vm, list(command), environment, workdir, user, forward_stdin)
        if cfg.disk_path is not None:  # let the guest flush its disk before it goes
            vm.stop(timeout=20)
        return code
