"""``vzkit exec`` and ``vzkit shell``: a command in a named VM that runs on, from any shell.

The VM is reached through ``vzkit.connect(NAME)`` (its supervisor's control socket); the
command is attached to this process as ``vzkit run`` attaches one (:mod:`._attach`: pipes, or
this terminal on a pty in the guest with ``-t``), and ``vzkit.connect``'s VM is only
disconnected at the end: the VM runs on.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from vzkit.errors import SpecError, VzkitError

from ._app import main
from ._attach import (
    EXIT_RUN_FAILED,
    _Terminated,
    attach_terminal,
    catch_signals,
    exit_code,
    expand_env,
    guest_command_options,
    require_running,
)
from ._errors import EXIT_USAGE, echo_error

__all__ = ["LOGIN_SHELL", "exec_cmd", "shell_cmd"]

#: ``vzkit shell``'s command: the user's login shell from the guest's passwd (``sh`` when it
#: has none, as the busybox guest has no /etc/passwd), started as a login shell.
LOGIN_SHELL = (
    "shell=$(awk -F: -v u=\"$(id -un 2>/dev/null)\" '$1 == u { print $7 }' /etc/passwd "
    '2>/dev/null); [ -x "${shell:-/-}" ] || shell=/bin/sh; exec "$shell" -l'
)


def _user_option(func: Any) -> Any:
    return click.option(
        "-u",
        "--user",
        metavar="USER[:GROUP]",
        help="Run as this guest user (names resolved in the guest, or numeric ids), with its "
        "groups and HOME.",
    )(func)


def _workdir_option(func: Any) -> Any:
    return click.option("-w", "--workdir", metavar="DIR", help="Working directory in the guest.")(
        func
    )


@main.command(
    "exec", context_settings={"allow_interspersed_args": False, "ignore_unknown_options": False}
)
@guest_command_options
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_cmd(
    name: str,
    command: tuple[str, ...],
    interactive: bool,
    tty: bool,
    env: tuple[str, ...],
    env_files: tuple[Path, ...],
    workdir: str | None,
    user: str | None,
) -> None:
    """Run COMMAND in the running VM NAME and exit with its exit code.

    Its output goes to this stdout and stderr; stdin is forwarded when it is no terminal (or
    with -i). Exit 125 when NAME is unknown or not running (or the guest does not know the
    user), 2 for bad options, 255 when -t's escape ended the session. The VM runs on.

    \b
      vzkit exec t1 -- sh -c 'echo $((6*7))'
      vzkit exec -it t1 -- vi /etc/hosts
      vzkit exec -u 1000 -w /tmp -e GREETING=hi t1 -- env
      tar -c src | vzkit exec -i t1 -- tar -x -C /root
    """
    command = command[1:] if command[:1] == ("--",) else command
    if not command:
        raise click.UsageError("give the command after the VM's name: vzkit exec NAME -- CMD")
    try:
        env = expand_env(env, env_files, os.environ)
        _check_tty(tty, user)
    except SpecError as err:
        echo_error(err)
        sys.exit(EXIT_USAGE)
    exec_and_exit(name, list(command), env, workdir, user, interactive=interactive, tty=tty)


@main.command("shell")
@_workdir_option
@_user_option
@click.argument("name")
def shell_cmd(name: str, workdir: str | None, user: str | None) -> None:
    """A login shell in the running VM NAME, on a terminal (as 'vzkit exec -t NAME -- sh -l',
    with the user's shell from the guest's /etc/passwd when it has one).

    Ctrl-] then . ends a hung session. The VM runs on when the shell exits.

    \b
      vzkit shell t1
      vzkit shell -u nobody t1
    """
    try:
        _check_tty(True, user)
    except SpecError as err:
        echo_error(err)
        sys.exit(EXIT_USAGE)
    exec_and_exit(name, ["sh", "-c", LOGIN_SHELL], (), workdir, user, interactive=True, tty=True)


def _check_tty(tty: bool, user: str | None) -> None:
    """``-t``'s checks, before anything starts (without ``-t`` the supervisor checks the
    user and answers a ``SpecError``, so this process imports no agent code)."""
    if not tty:
        return
    from vzkit.agent import check_user

    from ._tty import not_a_tty

    check_user(user)
    if not sys.stdin.isatty():
        raise not_a_tty()


def exec_and_exit(
    name: str,
    command: list[str],
    env: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    *,
    interactive: bool,
    tty: bool,
) -> None:
    """Run ``command`` in the named VM, then exit with its code; 125 when the VM cannot be
    reached or the command cannot start, 130 on Ctrl-C and 143 on SIGTERM (the command is
    killed, the VM runs on), 255 when ``tty``'s escape ended the session."""
    catch_signals()
    try:
        code = _exec(name, command, env, workdir, user, interactive=interactive, tty=tty)
    except SpecError as err:
        echo_error(err)
        sys.exit(EXIT_USAGE)
    except VzkitError as err:
        echo_error(err)
        sys.exit(EXIT_RUN_FAILED)
    except KeyboardInterrupt:
        click.echo("vzkit: interrupted; the command was killed, the VM runs on", err=True)
        sys.exit(130)
    except _Terminated:
        click.echo("vzkit: terminated; the command was killed, the VM runs on", err=True)
        sys.exit(143)
    sys.exit(code)


def _exec(
    name: str,
    command: list[str],
    env: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    *,
    interactive: bool,
    tty: bool,
) -> int:
    import vzkit  # on first use: 'vzkit --help' does not pay for it

    if not tty:  # the supervisor runs it on this process's descriptors: no session here
        forward_stdin = interactive or not sys.stdin.isatty()
        stdin: dict[str, Any] = {"stdin": None} if forward_stdin else {}  # None: this one's
        returncode = vzkit.exec_call(
            name, command, env=env, cwd=workdir, user=user, **stdin
        )  # fmt: skip
        return exit_code(returncode)
    vm = vzkit.connect(name)
    try:
        require_running(vm, name)
        config = vm.config
        assert isinstance(config, vzkit.LinuxVMConfig)  # a named VM is a Linux VM
        environment = config.process.command_environment(env, user)
        from ._tty import EXIT_DETACHED

        code, detached = attach_terminal(vm, command, environment, workdir, user)
        if detached:
            click.echo("\nvzkit: the session was ended (Ctrl-] .); the VM runs on", err=True)
            return EXIT_DETACHED
        return code
    finally:
        vm.close()  # disconnects only: the VM runs on
