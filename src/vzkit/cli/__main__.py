"""``python -m vzkit.cli``: the same as the ``vzkit`` command."""

from __future__ import annotations

from . import main

if __name__ == "__main__":  # pragma: no cover
    main()
