"""``docs/cli.md`` against the real command tree (``vzkit.cli:main``, walked as click walks it
for ``--help``).

The page is written by hand (examples and prose per command); these tests keep it whole and
true: every command has a section and an example, every option of every command is named in a
row of its section's table (or of "VM options", which a section pulls in by linking it), every
row names an option the command has, and every ``vzkit ...`` example line uses only commands
and options that exist. A new option fails here until it is documented. The ``vzkit ...``
examples of the README, the guide and the troubleshooting page are checked the same way, and
the Python examples of the user docs must at least compile.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest

from vzkit.cli import load_all, main

load_all()  # every command registered, as --help lists them

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
#: A command's section: "## `vzkit`", "## `vzkit run`", "### `vzkit image build`".
HEADING = re.compile(r"^#{2,3} `vzkit((?: [a-z][a-z-]*)*)`$")
VM_OPTIONS_HEADING = "## VM options"
VM_OPTIONS_LINK = "(#vm-options)"
#: An option name in a table row's first cell: `--cpus N`, `-v`, `--graphics`.
OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z][a-zA-Z0-9-]*)")
HELP_NAMES = {"-h", "--help"}


@dataclass
class Section:
    text: list[str] = field(default_factory=list)
    rows: set[str] = field(default_factory=set)  # option names in the table's first column

    @property
    def links_vm_options(self) -> bool:
        return any(VM_OPTIONS_LINK in line for line in self.text)


def _sections(text: str) -> dict[str, Section]:
    """Command path ("" for the root, "VM options" for the shared table) -> its section."""
    sections: dict[str, Section] = {}
    current: Section | None = None
    for line in text.splitlines():
        match = HEADING.match(line)
        if match or line == VM_OPTIONS_HEADING:
            name = match[1].strip() if match else "VM options"
            assert name not in sections, f"two sections for {name!r}"
            current = sections[name] = Section()
            continue
        if line.startswith("## "):  # another heading ends the command's section
            current = None
        if current is None:
            continue
        current.text.append(line)
        if line.startswith("| `-"):
            first_cell = line.split(" | ")[0]
            current.rows.update(OPTION.findall(first_cell))
    return sections


def _commands(command: click.Command, path: tuple[str, ...] = ()) -> dict[str, click.Command]:
    """Every command by its path ("" for the root), as ``vzkit --help`` leads to them."""
    out = {" ".join(path): command}
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            out.update(_commands(sub, (*path, name)))
    return out


def _option_names(command: click.Command) -> set[str]:
    names = set()
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts, param.secondary_opts)
    return names - HELP_NAMES


def _vm_option_names() -> set[str]:
    """The VM options: those ``vzkit config`` has but for its own two."""
    return _option_names(COMMANDS["config"]) - {"--format", "--save"}


COMMANDS = _commands(main)
SECTIONS = _sections(DOC.read_text(encoding="utf-8"))


def test_the_walk_and_the_page_are_real() -> None:
    assert {"", "run", "snapshot save", "image rm", "macos install"} <= set(COMMANDS)
    assert "--env-file" in _option_names(COMMANDS["run"])
    assert "--headless" in _option_names(COMMANDS["run"])  # the off side of a flag pair too
    assert "--cpus" in SECTIONS["VM options"].rows
    assert "-e" in SECTIONS["run"].rows


def test_every_command_has_a_section() -> None:
    missing = sorted(set(COMMANDS) - set(SECTIONS) - {"VM options"})
    assert missing == [], "add a section '## `vzkit COMMAND`' to docs/cli.md for these"
    stale = sorted(set(SECTIONS) - set(COMMANDS) - {"VM options"})
    assert stale == [], "docs/cli.md has sections for commands that are gone"


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_option_has_a_row_in_its_commands_section(path: str) -> None:
    section = SECTIONS.get(path, Section())
    documented = set(section.rows)
    if section.links_vm_options:
        documented |= SECTIONS["VM options"].rows
    undocumented = sorted(_option_names(COMMANDS[path]) - documented)
    assert undocumented == [], f"document these in the table of 'vzkit {path}' in docs/cli.md"


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_row_names_an_option_the_command_has(path: str) -> None:
    section = SECTIONS.get(path, Section())
    assert sorted(section.rows - _option_names(COMMANDS[path])) == []


def test_the_vm_options_table_is_exactly_the_shared_options() -> None:
    assert SECTIONS["VM options"].rows == _vm_option_names()
    for path in ("run", "snapshot save", "snapshot restore", "config"):
        assert _vm_option_names() <= _option_names(COMMANDS[path]), path
        assert SECTIONS[path].links_vm_options, f"'vzkit {path}' should link #vm-options"


def _examples(text: str) -> list[str]:
    """The ``vzkit ...`` lines of the page's ``sh`` blocks (an ``echo ... | vzkit`` too)."""
    lines, in_sh = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_sh = line == "```sh"
            continue
        if in_sh:
            command = line.split("|")[-1].strip() if "| vzkit " in line else line.strip()
            if command.startswith("vzkit"):
                lines.append(command)
    return lines


def _check_example(line: str) -> str:
    """The command path an example runs; AssertionError for a command or option that does
    not exist."""
    tokens = shlex.split(line, comments=True)[1:]
    command: click.Command = main
    path: list[str] = []
    while tokens:
        token = tokens.pop(0)
        if token == "--":
            break
        if token.startswith("-") and token != "-":
            name, _, inline = token.partition("=")
            options = {o: p for p in command.params if isinstance(p, click.Option)
                       for o in (*p.opts, *p.secondary_opts)}  # fmt: skip
            if name not in options and not name.startswith("--") and len(name) > 2:
                # bundled short flags, e.g. -vv
                assert all(f"-{c}" in options for c in name[1:]), f"{line}: {token}"
                continue
            assert name in options or name in HELP_NAMES, f"{line}: no option {name}"
            param = options.get(name)
            takes_value = param is not None and not (param.is_flag or param.count)
            if takes_value and not inline:
                assert tokens, f"{line}: {name} needs a value"
                tokens.pop(0)
            continue
        if isinstance(command, click.Group):
            found = command.get_command(click.Context(command), token)
            assert found is not None, f"{line}: no command {token!r}"
            command = found
            path.append(token)
            continue
        if not command.context_settings.get("allow_interspersed_args", True):
            break  # the rest is the guest command
    return " ".join(path)


def test_every_example_uses_real_commands_and_options() -> None:
    examples = _examples(DOC.read_text(encoding="utf-8"))
    assert len(examples) > 40
    for line in examples:
        _check_example(line)


def test_every_command_has_an_example() -> None:
    ran = {_check_example(line) for line in _examples(DOC.read_text(encoding="utf-8"))}
    without = sorted(
        p for p in COMMANDS if p and not any(r == p or r.startswith(f"{p} ") for r in ran)
    )
    assert without == []


def test_the_example_check_catches_a_wrong_option() -> None:
    assert _check_example("vzkit run --memory 1g -v ./x:code -- ls -l /mnt") == "run"
    assert _check_example("vzkit -vv snapshot list --json ./vm") == "snapshot list"
    with pytest.raises(AssertionError, match="no option --nope"):
        _check_example("vzkit run --nope -- true")
    with pytest.raises(AssertionError, match="no command 'nope'"):
        _check_example("vzkit image nope")
    with pytest.raises(AssertionError, match="no option --json"):
        _check_example("vzkit disk create --json x.img 1g")


USER_DOCS = [
    DOC.parents[1] / "README.md",
    *(DOC.parent / n for n in ("guide.md", "troubleshooting.md")),
]


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_the_examples_of_the_other_user_docs_are_real_too(doc: Path) -> None:
    examples = _examples(doc.read_text(encoding="utf-8"))
    assert examples
    for line in examples:
        _check_example(line)


@pytest.mark.parametrize("doc", [*USER_DOCS, DOC.parent / "config.md"], ids=lambda p: p.name)
def test_the_python_examples_of_the_user_docs_parse(doc: Path) -> None:
    blocks = re.findall(r"^```python\n(.*?)^```", doc.read_text(encoding="utf-8"), re.M | re.S)
    assert blocks
    for block in blocks:
        compile(block, str(doc), "exec", flags=0x2000)  # PyCF_ALLOW_TOP_LEVEL_AWAIT
