"""How CLI commands turn vzkit errors into exit codes (every command module uses it)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from vzkit.errors import ConfigError, SpecError, VzkitError

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "F", "handle_errors"]

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes at the edge: usage-like errors share click's 2, everything else is 1.
EXIT_USAGE = 2
EXIT_FAILURE = 1


def handle_errors(func: F) -> F:
    """Print a vzkit error as ``vzkit: error: ...`` and exit with its code (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (SpecError, ConfigError) as err:
            click.echo(f"vzkit: error: {err}", err=True)
            sys.exit(EXIT_USAGE)
        except VzkitError as err:
            click.echo(f"vzkit: error: {err}", err=True)
            sys.exit(EXIT_FAILURE)

    return wrapper  # type: ignore[return-value]
