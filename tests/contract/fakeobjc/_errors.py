"""What the stand-in raises (every contract violation is also recorded on its runtime)."""

from __future__ import annotations

__all__ = ["BadArgument", "ContractViolation", "ObjCError", "UnknownSelector"]


class ContractViolation(AssertionError):
    """The code under test broke Apple's API contract (as PyObjC would enforce or crash on)."""


class UnknownSelector(ContractViolation, AttributeError):
    """No such selector / class / function here (wrong name, arity, OS version or arch)."""


class BadArgument(ContractViolation, TypeError):
    """An argument of the wrong kind, element type or nullability (``None`` for a nonnull
    pointer): PyObjC raises ``TypeError``/``ValueError`` for the first ones, the framework
    throws or crashes on a nil it declared nonnull."""


class ObjCError(Exception):
    """``objc.error``: an Objective-C exception surfaced in Python."""
