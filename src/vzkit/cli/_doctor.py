"""``vzkit doctor``: prints :func:`vzkit.doctor.report`."""

from __future__ import annotations

import click

from vzkit import doctor as _report

from ._app import main
from ._errors import handle_errors

__all__ = ["doctor", "render"]


def render(report: _report.Report) -> list[str]:
    """One line per backend (``available`` or why not), then one per check, indented; a
    check that is not ok is marked ``!`` and followed by its hint in parentheses."""
    lines = []
    for backend in report.backends:
        if not backend.available:
            lines.append(f"{backend.name:<5} unavailable: {backend.detail}")
            continue
        lines.append(f"{backend.name:<5} available")
        for check in backend.checks:
            mark = "    ! " if not check.ok else "      "
            hint = f" ({check.hint})" if check.hint else ""
            lines.append(f"{mark}{check.name}: {check.detail}{hint}")
    return lines


@main.command()
@handle_errors
def doctor() -> None:
    """Say which backends can run here, with what, and why not."""
    for line in render(_report.report()):
        click.echo(line)
