"""The ``vzkit`` command group every command module registers on."""

from __future__ import annotations

import logging

import click

from vzkit import __version__

from ._errors import echo_error

__all__ = ["main"]


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
