"""The ``vzkit`` command group every command module registers on."""

from __future__ import annotations

import logging

import click

from vzkit import __version__

__all__ = ["main"]


class _EchoWarnings(logging.Handler):
    """Shows the guest image builder's warnings (e.g. unsigned package indexes) on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"vzkit: warning: {record.getMessage()}", err=True)


def _show_guest_warnings() -> None:
    logger = logging.getLogger("vzkit.image")
    if not any(isinstance(h, _EchoWarnings) for h in logger.handlers):
        logger.addHandler(_EchoWarnings(logging.WARNING))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vzkit")
def main() -> None:
    """vzkit: build and run lightweight virtual machines.

    Backends: Apple's Virtualization framework (macOS) and QEMU (Linux, macOS).
    """
    _show_guest_warnings()
