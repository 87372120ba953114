"""Test-only helpers shared by the test suites (never packaged: the wheel holds src/vzkit)."""
