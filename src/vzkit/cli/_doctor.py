"""``vzkit doctor``: prints :func:`vzkit.doctor.report`."""

from __future__ import annotations

import dataclasses
import json

import click

from vzkit import doctor as _report

from ._app import main
from ._errors import handle_errors

__all__ = ["doctor", "render"]


def _check_line(check: _report.Check) -> str:
    mark = "    ! " if not check.ok else "      "
    hint = f" ({check.hint})" if check.hint else ""
    return f"{mark}{check.name}: {check.detail}{hint}"


def render(report: _report.Report) -> list[str]:
    """One line per backend (``available`` or why not), then one per check, indented; then
    ``guest`` and its checks. A check that is not ok is marked ``!``; a hint follows in
    parentheses."""
    lines = []
    for backend in report.backends:
        if not backend.available:
            lines.append(f"{backend.name:<5} unavailable: {backend.detail}")
            continue
        lines.append(f"{backend.name:<5} available")
        lines += [_check_line(check) for check in backend.checks]
    if report.guest:
        lines.append("guest")
        lines += [_check_line(check) for check in report.guest]
    return lines


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def doctor(as_json: bool) -> None:
    """Say which backends can run here, with what, and why not; and what vzkit's guest needs."""
    report = _report.report()
    if as_json:
        data = dataclasses.asdict(report)
        for backend, item in zip(report.backends, data["backends"], strict=True):
            item["ok"] = backend.ok
        click.echo(json.dumps(data, indent=2))
        return
    for line in render(report):
        click.echo(line)
