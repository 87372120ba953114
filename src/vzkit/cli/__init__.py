"""The ``vzkit`` command line: parse, build a config, call the library, render.

One module per command group, each registering its commands on :data:`main`
(:mod:`._app`): ``config``/``disk`` (:mod:`._setup`), ``run`` (:mod:`._run`; a guest command
attached to this process: :mod:`._attach`, :mod:`._tty`), named VMs (``create``, ``start``,
``ls``, ``stop``, ``rm``, ``cp``, ``logs``, ``inspect``: :mod:`._vms`; ``exec``, ``shell``:
:mod:`._exec`), ``snapshot`` (:mod:`._snapshot`), ``image`` (:mod:`._image`), ``doctor``
(:mod:`._doctor`), ``codesign`` and ``macos`` (:mod:`._macos`), ``completion``
(:mod:`._completion`). Shared options and parameter callbacks live in :mod:`._options`;
library errors become exit codes at this edge only (:mod:`._errors`). A command's module is
imported when the command is asked for (``_app.COMMAND_MODULES``); :func:`load_all` imports
them all.

The CLI uses the library's public API only (``vzkit``, ``vzkit.errors``, ``vzkit.doctor``,
``vzkit.image``, ``vzkit.agent``, ``vzkit.backends`` and its backends' public names), never a
backend's private module; ``tests/unit/test_layering_cli.py`` checks that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._app import load_all, main

if TYPE_CHECKING:
    from ._options import DisplayAction, display_callback


def __getattr__(name: str) -> Any:
    """``DisplayAction``/``display_callback``, imported on first use (``vzkit exec`` does not
    need the VM options' parsers)."""
    if name in ("DisplayAction", "display_callback"):
        from . import _options

        return getattr(_options, name)
    raise AttributeError(f"module 'vzkit.cli' has no attribute {name!r}")


__all__ = ["DisplayAction", "display_callback", "load_all", "main"]
