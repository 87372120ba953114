"""How CLI commands turn vzkit errors into exit codes (every command module uses it)."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from vzkit.errors import ConfigError, SpecError, VzkitError

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "F", "echo_error", "handle_errors"]

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes at the edge: usage-like errors share click's 2, everything else is 1.
EXIT_USAGE = 2
EXIT_FAILURE = 1


def _color() -> bool:
    """Color on a terminal unless ``NO_COLOR`` is set to anything (https://no-color.org)."""
    return not os.environ.get("NO_COLOR") and sys.stderr.isatty()


def echo_error(message: object, *, kind: str = "error") -> None:
    """``vzkit: error: MESSAGE`` on stderr, the prefix in bold red on a terminal."""
    color = _color()
    prefix = click.style(f"vzkit: {kind}:", fg="red" if kind == "error" else "yellow", bold=True)
    click.echo(f"{prefix if color else f'vzkit: {kind}:'} {message}", err=True, color=color)


def handle_errors(func: F) -> F:
    """Print a vzkit error as ``vzkit: error: ...`` and exit with its code (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (SpecError, ConfigError) as err:
            echo_error(err)
            sys.exit(EXIT_USAGE)
        except VzkitError as err:
            echo_error(err)
            sys.exit(EXIT_FAILURE)

    return wrapper  # type: ignore[return-value]
