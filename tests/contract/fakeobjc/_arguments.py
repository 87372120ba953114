"""What an argument must be, and what a result may be.

Argument kinds come from ``api.json`` (or, for Foundation, :mod:`._foundation_api`), nil-ness
from ``nullability.json``: ``None`` for a nonnull pointer is refused, ``None`` for a nullable
one accepted. Scalars must be in their C type's range, enums known and not newer than the
simulated macOS; arrays and dictionaries must hold the declared element types (``None``
inside one is refused: PyObjC passes it as ``NSNull``); an ``id<P>`` must be an ``NSObject``
and, if a framework object, adopt ``P``; an opaque C type (``dispatch_queue_t``,
``SecCertificateRef``, ``vmnet_network_ref``) or an object of a framework the stand-in does
not model (AppKit's ``NSScreen``) must be the stand-in's object for exactly that type.

A result is checked the other way round: a behaviour of the stand-in may return ``None``
only where the headers say the result is nullable, so a nil the code under test must handle
is one the real framework can produce.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._dispatch import FakeQueue
from ._errors import BadArgument
from ._spec import MethodSpec, fmt_version

if TYPE_CHECKING:
    from ._runtime import FakeRuntime

__all__ = ["ForeignObject", "check_arg", "check_result", "default_result"]

INT_BITS = {
    "NSInteger": (True, 64),
    "NSUInteger": (False, 64),
    "int64_t": (True, 64),
    "uint64_t": (False, 64),
    "uint32_t": (False, 32),
    "uint16_t": (False, 16),
    "uint8_t": (False, 8),
    "int": (True, 32),
    "size_t": (False, 64),
}
FLOATS = frozenset({"NSTimeInterval", "double", "float", "CGFloat"})
STRUCTS = {"CGSize": 2, "NSSize": 2}  # PyObjC takes a sequence of the fields
# Plain C pointers and a struct whose PyObjC form the data does not give: non-None only.
UNCHECKED = frozenset({"ether_addr_t", "void*", "BOOL*"})


class ForeignObject:
    """A value of a C type or framework the stand-in does not model (``SecCertificateRef``,
    ``vmnet_network_ref``, ``NSScreen``, ...). Only one made for that type by
    :meth:`FakeRuntime.foreign` passes as an argument of the type."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __repr__(self) -> str:
        return f"<fake {self.kind} {id(self):#x}>"


def check_arg(
    rt: FakeRuntime, where: str, spec: MethodSpec, index: int, kind: str, value: Any
) -> None:
    def bad(expected: str) -> BadArgument:
        message = f"{where}: argument {index} ({kind}) must be {expected}, got {value!r}"
        return rt.violation(message, BadArgument)

    nullable = spec.nulls[index] if spec.nulls else None
    if value is None and nullable is not None:
        if nullable:
            return
        raise rt.violation(
            f"{where}: argument {index} ({kind}) is nonnull: None (nil) is not allowed",
            BadArgument,
        )
    blocks = dict(spec.blocks)
    if index in blocks or kind == "block":
        signature = blocks.get(index)
        if signature is None:
            raise rt.violation(f"{where}: argument {index} is a block without a signature")
        if not callable(value):
            raise bad("a callable (block)")
        want = len(signature) - 1
        if not _accepts(value, want):
            raise rt.violation(
                f"{where}: block argument {index} has signature {signature!r} "
                f"(called with {want} argument(s)) but the callable takes {_describe(value)}",
                BadArgument,
            )
        return
    if kind == "NSError**":
        if index != len(spec.args) - 1 or not spec.error_out:
            raise rt.violation(f"{where}: unexpected NSError** at argument {index}")
        if value is not None:
            raise bad("None (PyObjC returns the NSError in a tuple)")
        return
    if not spec.typed or kind in ("id", "Class"):
        return
    if kind == "BOOL":
        if not isinstance(value, bool):
            raise bad("a bool")
        return
    if kind in INT_BITS:
        signed, bits = INT_BITS[kind]
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an int")
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        if not lo <= value <= hi:
            raise bad(f"within {lo}..{hi}")
        return
    if kind in FLOATS:
        if not _is_number(value):
            raise bad("a number")
        return
    if kind in rt.api.enums:
        check_enum(rt, where, kind, value, bad)
        return
    if value is None:  # nullability unknown (no entry for a mutated selector): objects only
        if kind == "NSString" or kind.startswith("id<") or kind in rt.classes:
            return
        raise bad(f"a {kind}")
    if kind == "NSString":
        if not isinstance(value, str):
            raise bad("a str")
        return
    if kind.startswith("NSArray<"):
        element = kind[len("NSArray<") : -1]
        if not isinstance(value, list | tuple):
            raise bad("a list or tuple")
        if not all(_element_ok(rt, element, item) for item in value):
            nsnull = " (a None would reach it as NSNull)" if None in value else ""
            raise bad(f"a sequence of {element}{nsnull}")
        return
    if kind.startswith("NSDictionary<"):
        key, _, item = kind[len("NSDictionary<") : -1].partition(",")
        if not isinstance(value, dict):
            raise bad("a dict")
        for k, v in value.items():
            if not (_element_ok(rt, key, k) and _element_ok(rt, item, v)):
                raise bad(f"a dict of {key} to {item}")
        return
    if kind.startswith("id<"):
        if not _conforms(rt, kind[3:-1], value):
            raise bad(
                f"an NSObject adopting {kind[3:-1]} (a Python subclass of NSObject for delegates)"
            )
        return
    if kind == "NSRect":  # PyObjC: ((x, y), (width, height)), as NSMakeRect returns it
        pairs = value if isinstance(value, tuple | list) else ()
        if len(pairs) != 2 or not all(
            isinstance(p, tuple | list) and len(p) == 2 and all(map(_is_number, p)) for p in pairs
        ):
            raise bad("an NSRect ((x, y), (width, height))")
        return
    if kind in STRUCTS:
        n = STRUCTS[kind]
        fields = value if isinstance(value, tuple | list) else ()
        if len(fields) != n or not all(map(_is_number, fields)):
            raise bad(f"a {kind} (a sequence of {n} numbers)")
        return
    if kind == "const void*":
        if not isinstance(value, bytes | bytearray | memoryview):
            raise bad("a bytes-like object")
        return
    if kind in UNCHECKED:
        return
    if not _element_ok(rt, kind, value):
        raise bad(f"a {kind}")


def check_enum(
    rt: FakeRuntime, where: str, kind: str, value: Any, bad: Callable[[str], Exception]
) -> None:
    cases = rt.api.enums[kind]
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad(f"a {kind} value")
    if kind in rt.api.option_enums:
        mask = 0
        for case, number in cases.items():
            mask |= number
            if value & number and rt.api.enum_case_available.get(case, (0, 0)) > rt.macos:
                raise rt.unknown(f"{where}: {case} is newer than macOS {rt.version}")
        if value & ~mask:
            raise bad(f"a combination of {sorted(cases)}")
        return
    names = [case for case, number in cases.items() if number == value]
    if not names:
        raise bad(f"one of {cases}")
    avail = rt.api.enum_case_available.get(names[0], (0, 0))
    if avail > rt.macos:
        raise rt.unknown(
            f"{where}: {names[0]} is macOS {fmt_version(avail)}+ (simulated {rt.version})"
        )


def check_result(rt: FakeRuntime, where: str, spec: MethodSpec, result: Any) -> None:
    """A stand-in behaviour returned nil where the headers promise an object: the stand-in's
    own bug (recorded, so the test fails and the stand-in gets the value it lacks)."""
    if spec.nil_return is not False:
        return
    value = result[0] if spec.error_out and isinstance(result, tuple) else result
    if value is None:
        rt.violation(
            f"stand-in bug: {where} returned None (nil) but its result is nonnull; "
            "give the stand-in a value for it"
        )


def default_result(returns: str) -> Any:
    """What an accessor without a stored value or behaviour returns (``None`` for objects)."""
    if returns == "BOOL":
        return False
    if returns in INT_BITS or returns in FLOATS:
        return 0
    if returns.startswith("NSArray<"):
        return ()
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _conforms(rt: FakeRuntime, protocol: str, value: Any) -> bool:
    if not isinstance(value, rt.classes["NSObject"]):
        return False
    if type(value)._fk_python:
        return True  # PyObjC does not check a Python class's (informal) protocols
    return any(protocol in spec.protocols for spec in rt.spec_chain(type(value)))


def _element_ok(rt: FakeRuntime, kind: str, value: Any) -> bool:
    """Whether ``value`` is a ``kind`` (an element of a container, or an object argument)."""
    if value is None:
        return False
    if kind == "id":
        return True
    if kind == "NSString":
        return isinstance(value, str)
    if kind == "dispatch_queue_t":
        return isinstance(value, FakeQueue)
    if kind.startswith("id<"):
        return _conforms(rt, kind[3:-1], value)
    cls = rt.classes.get(kind)
    if cls is not None:
        return isinstance(value, cls)
    return isinstance(value, ForeignObject) and value.kind == kind


def _accepts(fn: Callable[..., Any], n: int) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    required = 0
    maximum = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            maximum = 1 << 30
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            maximum += 1
            if p.default is p.empty:
                required += 1
        elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
            return False
    return required <= n <= maximum


def _describe(fn: Callable[..., Any]) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return repr(fn)
