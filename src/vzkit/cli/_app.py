"""The ``vzkit`` command group every command module registers on."""

from __future__ import annotations

import importlib
import logging

import click

from vzkit import __version__

from ._errors import echo_error

__all__ = ["COMMAND_MODULES", "load_all", "main"]


class _EchoWarnings(logging.Handler):
    """Shows the guest image builder's warnings (e.g. unsigned package indexes) on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        echo_error(record.getMessage(), kind="warning")


class _Verbose(logging.Handler):
    """``-v``/``--debug``: vzkit's log on stderr, one line per record."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a bad log call must not end the command
            line = record.getMessage()
        click.echo(line, err=True)


def _configure_logging(verbose: int, debug: bool) -> None:
    """No output of its own by default (warnings of the image builder aside); ``-v`` shows
    what vzkit does (INFO), ``-vv`` or ``--debug`` everything, QEMU command lines included."""
    if not verbose and not debug:
        _show_guest_warnings()
        return
    logger = logging.getLogger("vzkit")
    handler = _Verbose()
    line = "vzkit %(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(line, "%H:%M:%S"))
    logger.handlers = [h for h in logger.handlers if not isinstance(h, _Verbose)]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug or verbose > 1 else logging.INFO)


def _show_guest_warnings() -> None:
    logger = logging.getLogger("vzkit.image")
    if not any(isinstance(h, _EchoWarnings) for h in logger.handlers):
        logger.addHandler(_EchoWarnings(logging.WARNING))


#: Which module registers each command: imported when the command is asked for, so
#: ``vzkit exec`` does not pay for ``doctor``'s or ``image``'s imports (``vzkit.cli``'s doc).
COMMAND_MODULES = {
    "completion": "_completion",
    "config": "_setup",
    "disk": "_setup",
    "doctor": "_doctor",
    "run": "_run",
    "snapshot": "_snapshot",
    "create": "_vms",
    "start": "_vms",
    "stop": "_vms",
    "rm": "_vms",
    "ls": "_vms",
    "inspect": "_vms",
    "cp": "_vms",
    "logs": "_vms",
    "exec": "_exec",
    "shell": "_exec",
    "image": "_image",
    "codesign": "_macos",
    "macos": "_macos",
}


class _LazyGroup(click.Group):
    """A group whose commands' modules are imported on first use (click's lazy group)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMAND_MODULES})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMAND_MODULES.get(cmd_name)
        if cmd_name not in self.commands and module is not None:
            importlib.import_module(f"vzkit.cli.{module}")  # registers it on main
        return super().get_command(ctx, cmd_name)


def load_all() -> None:
    """Import every command module (for tools that walk ``main.commands``)."""
    for module in sorted(set(COMMAND_MODULES.values())):
        importlib.import_module(f"vzkit.cli.{module}")


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vzkit")
@click.option(
    "-v", "--verbose", count=True, help="Log what vzkit does to stderr (-vv: everything)."
)
@click.option("--debug", is_flag=True, help="Log everything to stderr, QEMU command lines too.")
def main(verbose: int, debug: bool) -> None:
    """vzkit: build and run lightweight virtual machines.

    Backends: Apple's Virtualization framework (macOS) and QEMU (Linux, macOS).
    """
    _configure_logging(verbose, debug)
