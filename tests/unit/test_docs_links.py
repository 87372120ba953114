"""The user docs' links lead somewhere: every relative link of the README, the guide and the
three references names a file of the repository, and every ``#anchor`` a heading of its page
(as GitHub makes anchors from headings)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md"] + [
    ROOT / "docs" / name
    for name in ("guide.md", "cli.md", "config.md", "troubleshooting.md", "vz-parity.md")
]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but ``-`` and ``_`` dropped,
    spaces made ``-``."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {_anchor(m[1]) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_anchors_are_made_as_github_makes_them() -> None:
    assert _anchor("`vzkit run`") == "vzkit-run"
    assert (
        _anchor("macOS: the Virtualization entitlement") == "macos-the-virtualization-entitlement"
    )
    assert "vm-options" in _anchors(ROOT / "docs" / "cli.md")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_exists(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        missing_anchor = bool(anchor) and linked.suffix == ".md" and linked.exists()
        if not linked.exists() or (missing_anchor and anchor not in _anchors(linked)):
            broken.append(target)
    assert broken == []
