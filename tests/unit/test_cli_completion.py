"""``vzkit completion bash|zsh|fish``: click's completion script for each shell, and (bash, the
shell this machine has) that it really completes ``vzkit``'s commands once sourced."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import vzkit
from vzkit.cli import main

SRC = Path(vzkit.__file__).resolve().parents[1]


def completion(*args: str) -> Result:
    return CliRunner().invoke(main, ["completion", *args], prog_name="vzkit")


# what each shell's script must say to hook `vzkit` up (click's own scripts)
HOOKS = {
    "bash": "complete -o nosort -F _vzkit_completion vzkit",
    "zsh": "compdef _vzkit_completion vzkit",
    "fish": 'complete --no-files --command vzkit --arguments "(_vzkit_completion)"',
}


@pytest.mark.parametrize("shell", sorted(HOOKS))
def test_completion_prints_the_shells_script(shell: str) -> None:
    result = completion(shell)
    assert result.exit_code == 0, result.output
    assert HOOKS[shell] in result.output
    assert f"_VZKIT_COMPLETE={shell}_complete" in result.output  # what main() answers to


def test_completion_refuses_other_shells_and_says_how_to_install() -> None:
    bad = completion("tcsh")
    assert bad.exit_code == 2
    assert "'tcsh' is not one of 'bash', 'zsh', 'fish'" in bad.output
    help_text = completion("--help").output
    for line in (
        """echo 'eval "$(vzkit completion bash)"' >> ~/.bashrc""",
        """echo 'eval "$(vzkit completion zsh)"' >> ~/.zshrc""",
        "vzkit completion fish > ~/.config/fish/completions/vzkit.fish",
    ):
        assert line in help_text


def test_the_bash_script_defines_the_function_and_completes_vzkit(tmp_path: Path) -> None:
    """Sourced in bash, the script registers ``_vzkit_completion`` for ``vzkit``; called the
    way bash calls it on TAB, it asks this vzkit (a ``vzkit`` on PATH) for the words."""
    script = tmp_path / "vzkit.bash"
    script.write_text(completion("bash").output)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "vzkit"  # the console script, run from this source tree
    shim.write_text(
        f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(SRC))} exec {shlex.quote(sys.executable)} "
        '-c \'from vzkit.cli import main; main(prog_name="vzkit")\' "$@"\n'
    )
    shim.chmod(0o755)
    probe = f"""
        source {shlex.quote(str(script))}
        declare -F _vzkit_completion
        complete -p vzkit
        COMP_WORDS=(vzkit compl); COMP_CWORD=1
        _vzkit_completion vzkit compl vzkit
        printf 'reply:%s\\n' "${{COMPREPLY[@]}}"
        COMP_WORDS=(vzkit completion ''); COMP_CWORD=2; COMPREPLY=()
        _vzkit_completion vzkit '' completion
        printf 'reply:%s\\n' "${{COMPREPLY[@]}}"
    """
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", probe],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "_vzkit_completion"
    assert lines[1] == "complete -o nosort -F _vzkit_completion vzkit"
    assert lines[2:] == ["reply:completion", "reply:bash", "reply:zsh", "reply:fish"]
