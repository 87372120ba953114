"""Progress for long work (downloads, image builds, snapshot writes) on a terminal.

Quiet when stderr is not a terminal (CI, pipes) or ``VZKIT_PROGRESS=0``; the same events go to
the log at INFO either way, so nothing is lost when the bar is not drawn.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from types import TracebackType
from typing import TextIO

__all__ = ["Progress"]

log = logging.getLogger("vzkit.progress")
_WIDTH = 24


def _enabled(stream: TextIO) -> bool:
    if os.environ.get("VZKIT_PROGRESS", "") in ("0", "no", "off"):
        return False
    return hasattr(stream, "isatty") and stream.isatty()


class Progress:
    """A one-line progress display: ``with Progress("building image") as p: p.step("...")``.

    ``total`` (bytes or steps) draws a bar with :meth:`advance`; without it, :meth:`step`
    shows what is happening now.
    """

    def __init__(self, title: str, total: int | None = None, stream: TextIO | None = None) -> None:
        self.title = title
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = _enabled(self.stream)
        self._what = ""
        self._t0 = time.monotonic()
        self._last_draw = 0.0
        self._dismissed = False

    def __enter__(self) -> Progress:
        log.info("%s ...", self.title)
        self._draw(force=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        elapsed = time.monotonic() - self._t0
        outcome = "done" if exc is None else "failed"
        log.info("%s: %s in %.1f s", self.title, outcome, elapsed)
        if not self.enabled:
            return
        if self._dismissed and exc is None:  # nothing was done: leave no line behind
            self.stream.write("\r\033[K")
        else:
            self.stream.write(f"\r\033[K{self.title}: {outcome} ({elapsed:.1f} s)\n")
        self.stream.flush()

    def dismiss(self) -> None:
        """There was nothing to do (e.g. found in a cache): the display is erased at the end
        instead of leaving a "done" line (a failure is still reported)."""
        self._dismissed = True

    def step(self, what: str) -> None:
        self._what = what
        log.info("%s: %s", self.title, what)
        self._draw(force=True)

    def update(self, done: int, total: int | None = None) -> None:
        """Set the absolute position (and the total, which may change as work is found)."""
        if total is not None:
            self.total = total
        self.done = done
        self._draw()

    def advance(self, amount: int) -> None:
        self.done += amount
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        line = f"{self.title}"
        if self.total:
            frac = min(1.0, self.done / self.total)
            filled = int(frac * _WIDTH)
            line += f" [{'#' * filled}{'.' * (_WIDTH - filled)}] {frac * 100:3.0f}%"
        if self._what:
            line += f" {self._what}"
        self.stream.write(f"\r\033[K{line}")
        self.stream.flush()
