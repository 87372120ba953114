"""Shared test settings: deterministic, database-free hypothesis runs."""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("vzkit", derandomize=True, database=None, deadline=None)
settings.load_profile("vzkit")
