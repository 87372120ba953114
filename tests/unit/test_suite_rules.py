"""Rules the test suite keeps so that it tells the truth on a loaded machine.

A fixed sleep is no synchronisation: whatever it waits for may take longer under load, and a
"nothing happened" check after one passes without testing anything. Tests wait for a positive
signal instead (an event, a poll with a deadline, a round trip through the code under test);
a sleep that remains says on its line why it is not synchronisation (a poll interval inside
such a loop, time that must pass on purpose, ...).
"""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
SLEEP = re.compile(r"\bsleep\(")


def unexplained_sleeps(root: Path) -> list[str]:
    """``file:line`` of each ``sleep(`` call under ``root`` without a comment on its line."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if path == Path(__file__).resolve():
            continue  # this rule's own examples
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code, _, comment = line.partition("#")
            if SLEEP.search(code) and not comment.strip():
                found.append(f"{path.relative_to(root)}:{number}")
    return found


def test_every_sleep_in_the_tests_says_why_it_is_not_synchronisation() -> None:
    assert unexplained_sleeps(TESTS) == []


def test_the_rule_sees_a_bare_sleep(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text(
        "import time\n"
        "time.sleep(0.1)\n"
        "time.sleep(0.1)  # poll interval\n"
        "    await asyncio.sleep(1)\n"
        "# time.sleep(5) in a comment is no call\n"
    )
    assert unexplained_sleeps(tmp_path) == ["test_x.py:2", "test_x.py:4"]
