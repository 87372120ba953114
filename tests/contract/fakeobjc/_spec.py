"""The Apple API surface (``api.json`` + ``nullability.json``) as typed specs the stand-in
enforces.

Nothing here is hand-written Virtualization API: every class, selector, argument kind,
availability, block signature and nullability comes from the data files. Property accessors
become getter/setter method specs (a read-only property has no setter, so calling one is an
unknown selector); a property's nullability covers both. The data lists Foundation selectors
without types; their signatures come from :mod:`._foundation_api`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._foundation_api import signature

Version = tuple[int, int]

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "apple-virtualization"
DATA_FILE = DATA_DIR / "api.json"
NULLS_FILE = DATA_DIR / "nullability.json"
Nullable = bool | None  # True: nil allowed; False: nonnull; None: not a pointer / not known


def parse_version(text: str) -> Version:
    major, _, minor = text.partition(".")
    return (int(major), int(minor or 0))


def fmt_version(version: Version) -> str:
    return f"{version[0]}.{version[1]}"


def pyname(selector: str) -> str:
    """PyObjC's method name for a selector: every ``:`` becomes ``_``."""
    return selector.replace(":", "_")


@dataclass(frozen=True)
class MethodSpec:
    owner: str  # the class (or Foundation class) declaring it
    selector: str
    is_class: bool
    args: tuple[str, ...]
    returns: str
    available: Version
    arm64_only: bool = False
    blocks: tuple[tuple[int, str], ...] = ()  # (argument index, PyObjC block signature)
    error_out: bool = False
    prop: str | None = None  # the property this accessor belongs to
    role: str = ""  # "getter" | "setter" | ""
    typed: bool = True  # False for Foundation entries without a known signature
    nulls: tuple[Nullable, ...] = ()  # per argument; () when the data has no entry
    nil_return: Nullable = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.owner, self.selector)

    @property
    def is_init(self) -> bool:
        return not self.is_class and self.selector.startswith("init")


@dataclass
class ClassSpec:
    name: str
    superclass: str | None
    available: Version
    arm64_only: bool
    protocols: tuple[str, ...]
    unavailable_init: bool
    instance: dict[str, MethodSpec] = field(default_factory=dict)  # PyObjC name -> spec
    klass: dict[str, MethodSpec] = field(default_factory=dict)
    framework: str = "Virtualization"


@dataclass
class Api:
    classes: dict[str, ClassSpec]
    enums: dict[str, dict[str, int]]
    enum_case_available: dict[str, Version]  # case name -> version
    option_enums: frozenset[str]
    constants: dict[str, Any]
    protocols: dict[str, dict[str, MethodSpec]]  # protocol -> PyObjC name -> spec
    cf_functions: tuple[str, ...]
    cf_constants: tuple[str, ...]
    cf_enums: dict[str, int]
    foundation_constants: tuple[str, ...]
    libdispatch: tuple[str, ...]
    raw: dict[str, Any]


_CASES_RE = re.compile(r"^enum (\w+) \(type available macOS ([0-9.]+).*?case availability: ([^;]*)")


def _method(
    owner: str,
    selector: str,
    entry: dict[str, Any],
    *,
    is_class: bool,
    nulls: dict[str, Any] | None = None,
) -> MethodSpec:
    args = tuple(entry["args"])
    null_args = tuple(nulls["args"]) if nulls is not None else ()
    return MethodSpec(
        owner=owner,
        selector=selector,
        is_class=is_class,
        args=args,
        returns=entry["returns"],
        available=parse_version(entry["available"]),
        arm64_only=bool(entry.get("arm64_only", False)),
        blocks=tuple((int(b["index"]), str(b["signature"])) for b in entry.get("block_args", ())),
        error_out=bool(entry.get("error_out", False)),
        # an entry that no longer matches the (mutated) selector's arguments says nothing
        nulls=null_args if len(null_args) == len(args) else (),
        nil_return=nulls["returns"] if nulls is not None else None,
    )


def _class_spec(name: str, entry: dict[str, Any], nulls: dict[str, Any]) -> ClassSpec:
    spec = ClassSpec(
        name=name,
        superclass=entry.get("superclass"),
        available=parse_version(entry["available"]),
        arm64_only=bool(entry.get("arm64_only", False)),
        protocols=tuple(entry.get("protocols", ())),
        unavailable_init="unavailable: +new -init" in entry.get("notes", ""),
    )
    for key, table, is_class in (
        ("class_methods", spec.klass, True),
        ("instance_methods", spec.instance, False),
    ):
        known = nulls.get(key, {})
        for selector, m in entry.get(key, {}).items():
            table[pyname(selector)] = _method(
                name, selector, m, is_class=is_class, nulls=known.get(selector)
            )
    prop_nulls = nulls.get("properties", {})
    for prop, p in entry.get("properties", {}).items():
        table = spec.klass if p.get("class_property") else spec.instance
        nullable: Nullable = prop_nulls.get(prop)
        avail = parse_version(p["available"])
        getter = p.get("getter") or prop
        table[pyname(getter)] = MethodSpec(
            owner=name,
            selector=getter,
            is_class=bool(p.get("class_property")),
            args=(),
            returns=p["type"],
            available=avail,
            arm64_only=bool(p.get("arm64_only", False)),
            prop=prop,
            role="getter",
            nil_return=nullable,
        )
        setter = p.get("setter")
        if setter and not p.get("readonly"):
            table[pyname(setter)] = MethodSpec(
                owner=name,
                selector=setter,
                is_class=bool(p.get("class_property")),
                args=(p["type"],),
                returns="void",
                available=avail,
                arm64_only=bool(p.get("arm64_only", False)),
                prop=prop,
                role="setter",
                nulls=(nullable,),
            )
    return spec


def _foundation_spec(name: str, entry: dict[str, Any]) -> ClassSpec:
    spec = ClassSpec(
        name=name,
        superclass="NSObject",
        available=(10, 0),
        arm64_only=False,
        protocols=(),
        unavailable_init=False,
        framework="Foundation",
    )
    for table, selectors, is_class in (
        (spec.klass, entry.get("class_methods", ()), True),
        (spec.instance, entry.get("instance_methods", ()), False),
    ):
        for selector in selectors:
            n = selector.count(":")
            available = (11, 3) if selector == "underlyingErrors" else (10, 0)
            known = signature(name, selector, is_class=is_class)
            typed = known is not None and len(known[0]) == n
            if known is None or not typed:
                # a selector without a (matching) signature: arity and error-out only
                error_out = selector.endswith(("Error:", "error:"))
                tail = ("NSError**",) if error_out else ("id",) * min(n, 1)
                args, nulls, result = ("id",) * (n - 1) + tail, (), ("id", None)
            else:
                args = tuple(kind for kind, _ in known[0])
                nulls = tuple(nullable for _, nullable in known[0])
                error_out, result = args[-1:] == ("NSError**",), known[1]
            table[pyname(selector)] = MethodSpec(
                owner=name,
                selector=selector,
                is_class=is_class,
                args=args,
                returns=result[0],
                available=available,
                error_out=error_out,
                typed=typed,
                nulls=nulls,
                nil_return=result[1],
            )
    return spec


def load_api(data: dict[str, Any] | None = None, nulls: dict[str, Any] | None = None) -> Api:
    """Parse ``api.json`` and ``nullability.json`` (or loaded, possibly mutated, copies)."""
    if data is None:
        data = load_raw()
    if nulls is None:
        nulls = load_raw_nullability()
    known = nulls["classes"]
    classes = {
        name: _class_spec(name, entry, known.get(name, {}))
        for name, entry in data["classes"].items()
    }
    foundation = data.get("foundation_used", {})
    for name, entry in foundation.items():
        if name == "CFRunLoop":
            continue
        classes[name] = _foundation_spec(name, entry)
    from ._appkit import appkit_specs  # the window a VM's display needs (not in the data)

    classes.update(appkit_specs())
    case_available: dict[str, Version] = {}
    option_enums = set()
    for note in data.get("notes", ()):
        match = _CASES_RE.match(note)
        if match is None:
            continue
        for item in match[3].split(","):
            case, _, version = item.strip().partition("=")
            if case and version:
                case_available[case] = parse_version(version)
    for note in data.get("notes", ()):
        if note.startswith("enum underlying types:"):
            for item in note.split(":", 1)[1].split(";")[0].split(","):
                enum_name, _, kind = item.strip().partition("=")
                if kind == "NSUInteger" and enum_name.endswith("Options"):
                    option_enums.add(enum_name)
    protocols: dict[str, dict[str, MethodSpec]] = {}
    for pname, pentry in data.get("protocols", {}).items():
        protocols[pname] = {
            pyname(sel): _method(pname, sel, m, is_class=False)
            for sel, m in pentry.get("methods", {}).items()
        }
    from ._appkit import appkit_protocols

    protocols.update(appkit_protocols())
    cf = foundation.get("CFRunLoop", {})
    fconst: list[str] = []
    for entry in foundation.values():
        fconst.extend(entry.get("constants", ()) if isinstance(entry, dict) else ())
    return Api(
        classes=classes,
        enums={k: dict(v) for k, v in data.get("enums", {}).items()},
        enum_case_available=case_available,
        option_enums=frozenset(option_enums),
        constants=dict(data.get("constants", {})),
        protocols=protocols,
        cf_functions=tuple(cf.get("functions", ())),
        cf_constants=tuple(cf.get("constants", ())),
        cf_enums=dict(cf.get("enums", {})),
        foundation_constants=tuple(c for c in fconst if c not in cf.get("constants", ())),
        libdispatch=tuple(data.get("libdispatch_used", ())),
        raw=data,
    )


def load_raw() -> dict[str, Any]:
    """A fresh, mutable copy of the vendored data (for mutation tests)."""
    result: dict[str, Any] = json.loads(DATA_FILE.read_text(encoding="utf-8"))
    return result


def load_raw_nullability() -> dict[str, Any]:
    """A fresh, mutable copy of the vendored nullability data (for mutation tests)."""
    result: dict[str, Any] = json.loads(NULLS_FILE.read_text(encoding="utf-8"))
    return result
