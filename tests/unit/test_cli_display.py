"""The ``--display`` glue of the CLI package: an argparse action and a click callback that turn
repeated specs into displays, with bad specs as each parser's usage error."""

from __future__ import annotations

import argparse

import click
import pytest
from click.testing import CliRunner

from vzkit import DisplayConfig, DisplayList
from vzkit.cli import DisplayAction, display_callback


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    parser.add_argument("--display", action=DisplayAction)
    return parser


def test_argparse_action_collects() -> None:
    ns = _parser().parse_args(["--display", "1080p", "--display", "1280x800@200"])
    assert isinstance(ns.display, DisplayList)
    assert ns.display.to_tuple() == (DisplayConfig(1920, 1080), DisplayConfig(1280, 800, 200))


def test_argparse_action_absent_is_none() -> None:
    assert _parser().parse_args([]).display is None


def test_argparse_action_bad_spec_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["--display", "1x1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--display" in err
    assert "width 1 is out of range" in err


@click.command()
@click.option("--display", "displays", multiple=True, callback=display_callback)
def _click_cmd(displays: tuple[DisplayConfig, ...]) -> None:
    click.echo(repr(displays))
    click.echo(",".join(str(d) for d in displays))


def test_click_callback_collects() -> None:
    result = CliRunner().invoke(_click_cmd, ["--display", "retina", "--display", "hd"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "2560x1600@227,1280x720@144"


def test_click_callback_none_given() -> None:
    result = CliRunner().invoke(_click_cmd, [])
    assert result.exit_code == 0
    assert result.output.splitlines()[0] == "()"


def test_click_callback_bad_spec() -> None:
    result = CliRunner().invoke(_click_cmd, ["--display", "4k", "--display", "bogus"])
    assert result.exit_code == 2
    assert "Invalid value for '--display'" in result.output
    assert "invalid display spec 'bogus'" in result.output
