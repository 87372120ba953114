"""Where vzkit keeps what it learns and builds: the user cache directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["user_cache_dir"]


def user_cache_dir() -> Path:
    """``$VZKIT_CACHE_DIR``, else the platform's user cache dir + ``/vzkit``.

    Linux: ``$XDG_CACHE_HOME/vzkit`` (``~/.cache/vzkit``); macOS: ``~/Library/Caches/vzkit``.
    """
    env = os.environ.get("VZKIT_CACHE_DIR")
    if env:
        return Path(env)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "vzkit"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vzkit"
