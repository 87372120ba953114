"""``vzkit completion bash|zsh|fish``: the shell's completion script, made by click.

The script is click's own (:mod:`click.shell_completion`): at each TAB the shell runs
``vzkit`` with ``_VZKIT_COMPLETE`` set, and click answers with the commands, options and
values that fit; nothing here knows the command tree, so the completions follow it.
"""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

from ._app import main

__all__ = ["COMPLETE_VAR", "PROG_NAME", "SHELLS", "completion", "completion_script"]

#: The console script the completions are for, and the variable click reads for it.
PROG_NAME = "vzkit"
COMPLETE_VAR = "_VZKIT_COMPLETE"
SHELLS = ("bash", "zsh", "fish")


def completion_script(shell: str) -> str:
    """The completion script for ``shell`` (one of :data:`SHELLS`)."""
    cls = get_completion_class(shell)
    if cls is None:  # click knows every shell of SHELLS: a click without one is broken
        raise click.UsageError(f"this click cannot complete for {shell}")
    return cls(main, {}, PROG_NAME, COMPLETE_VAR).source()


@main.command(
    epilog="""\b
Install (once; new shells complete vzkit's commands, options and values):
  bash  echo 'eval "$(vzkit completion bash)"' >> ~/.bashrc
        (needs bash >= 4.4; or save the script as
        ~/.local/share/bash-completion/completions/vzkit)
  zsh   echo 'eval "$(vzkit completion zsh)"' >> ~/.zshrc
        (after compinit; or save the script as _vzkit in a directory of $fpath)
  fish  vzkit completion fish > ~/.config/fish/completions/vzkit.fish"""
)
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL (bash, zsh or fish)."""
    click.echo(completion_script(shell))
