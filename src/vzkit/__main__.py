"""``python -m vzkit``: the same as the ``vzkit`` command."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
