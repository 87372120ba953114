"""Which Debian packages make a root filesystem: a dependency resolver over ``Packages`` indexes.

:func:`resolve` starts from every package with ``Priority: required`` or ``Essential: yes``,
the base set (:data:`BASE_PACKAGES`: ``apt``, ``python3``, ``ca-certificates``) and the
user's packages, and closes the set over ``Pre-Depends`` and ``Depends`` (``Recommends`` and
``Suggests`` are not followed, like ``apt-get --no-install-recommends`` and debootstrap):

- one candidate version per package, the newest across the sources (``bookworm``,
  ``-updates``, ``-security``: :func:`~vzkit.image._mirror.default_sources`), as apt picks it;
  a version constraint (``<<``, ``<=``, ``=``, ``>=``, ``>>``) is checked against that
  candidate with :func:`~vzkit.image._deb.compare_versions`, never by going back to an older
  version;
- alternatives (``a | b``): one already selected wins, else the first that exists;
- virtual packages through ``Provides``: an unversioned relation is met by any provider, a
  versioned one only by a versioned ``Provides`` that satisfies it (Debian policy 7.5); among
  several providers, the real package of that name, else the provider of the highest
  priority, then the first by name;
- arch qualifiers: ``:any`` and ``:native`` (and our own architecture) are met by our
  packages; a relation on another architecture cannot be met (one architecture per image);
- ``Architecture: all`` packages count as ours;
- ``usr-is-merged`` is selected when the suite has it (bookworm's ``init-system-helpers``
  depends on ``usrmerge | usr-is-merged``; the tree is merged-/usr from the start, as
  mmdebstrap does, so the converter ``usrmerge`` and its Perl are not needed).

After the closure, ``Conflicts`` and ``Breaks`` between selected packages are refused.
The result is deterministic: the same indexes and request give the same list, sorted by name.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import GuestError
from ._deb import compare_versions, is_package_name, is_version, parse_control
from ._mirror import DebianMirror

__all__ = [
    "BASE_PACKAGES",
    "DebianPackage",
    "PackageIndex",
    "PackageNotFoundError",
    "Relation",
    "Resolution",
    "ResolveError",
    "UnsatisfiableError",
    "parse_relations",
    "resolve",
]

log = logging.getLogger(__name__)

BASE_PACKAGES = ("apt", "python3", "ca-certificates")
"""What every Debian image holds beside ``Priority: required``: a package manager, python3
for ``vzkit run -- python3 ...``, and the CA certificates for HTTPS."""

_PRIORITY_RANK = {"required": 0, "important": 1, "standard": 2, "optional": 3, "extra": 4}
_ALTERNATIVE = re.compile(
    r"\s*(?P<name>[a-z0-9][a-z0-9+.\-]*)(?::(?P<arch>[a-z0-9\-]+))?\s*"
    r"(?:\(\s*(?P<op><<|<=|>=|>>|=|<|>)\s*(?P<version>[0-9][^()\s]*)\s*\))?\s*"
    r"(?:\[[^\]]*\])?\s*(?:<[^<>]*>\s*)*"
)
_OPS = {
    "<<": lambda c: c < 0,
    "<=": lambda c: c <= 0,
    "<": lambda c: c <= 0,  # deprecated spelling of <=
    "=": lambda c: c == 0,
    ">=": lambda c: c >= 0,
    ">": lambda c: c >= 0,  # deprecated spelling of >=
    ">>": lambda c: c > 0,
}


class ResolveError(GuestError):
    """A Debian package set cannot be resolved (a package is missing or cannot be installed)."""


class PackageNotFoundError(ResolveError, ValueError):
    """A requested package is in none of the indexes; ``suggestions`` holds close names."""

    def __init__(self, name: str, suggestions: Sequence[str], where: str) -> None:
        hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(
            f"no Debian package named {name!r} in {where}{hint} (check the spelling, or search "
            "https://packages.debian.org for the package name)"
        )
        self.name = name
        self.suggestions = tuple(suggestions)


class UnsatisfiableError(ResolveError):
    """A dependency has no installable candidate; ``chain`` lists who needs what, from the top."""

    def __init__(self, message: str, chain: Sequence[str]) -> None:
        super().__init__(message)
        self.chain = tuple(chain)


@dataclass(frozen=True, slots=True)
class Relation:
    """One alternative of a relation field: ``name[:arch] [(op version)]``."""

    name: str
    arch: str | None = None
    op: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        qualified = f"{self.name}:{self.arch}" if self.arch else self.name
        return f"{qualified} ({self.op} {self.version})" if self.op else qualified


def parse_relations(value: str, *, where: str = "") -> list[list[Relation]]:
    """A ``Depends``-style field as groups of alternatives: ``"a (>= 1), b | c:any"`` ->
    ``[[a (>= 1)], [b, c:any]]``. Architecture restrictions and build profiles are dropped.
    Raises ResolveError naming ``where`` on a malformed relation."""
    groups: list[list[Relation]] = []
    for clause in value.split(","):
        if not clause.strip():
            continue
        group = []
        for alternative in clause.split("|"):
            match = _ALTERNATIVE.fullmatch(alternative)
            if match is None:
                raise ResolveError(f"{where}: malformed relation {alternative.strip()!r}")
            group.append(Relation(match["name"], match["arch"], match["op"], match["version"]))
        groups.append(group)
    return groups


@dataclass(frozen=True, slots=True, kw_only=True)
class DebianPackage:
    """One candidate package: the fields of its ``Packages`` stanza the resolver uses."""

    name: str
    version: str
    architecture: str
    priority: str = "optional"
    essential: bool = False
    pre_depends: str = ""
    depends: str = ""
    provides: str = ""
    conflicts: str = ""
    breaks: str = ""

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> DebianPackage:
        return cls(
            name=fields["Package"],
            version=fields["Version"],
            architecture=fields.get("Architecture", ""),
            priority=fields.get("Priority", "optional"),
            essential=fields.get("Essential", "").lower() == "yes",
            pre_depends=fields.get("Pre-Depends", ""),
            depends=fields.get("Depends", ""),
            provides=fields.get("Provides", ""),
            conflicts=fields.get("Conflicts", ""),
            breaks=fields.get("Breaks", ""),
        )

    def relations(self, field: str) -> list[list[Relation]]:
        value = {"Pre-Depends": self.pre_depends, "Depends": self.depends,
                 "Provides": self.provides, "Conflicts": self.conflicts,
                 "Breaks": self.breaks}[field]  # fmt: skip
        return parse_relations(value, where=f"{self.name} {self.version} {field}")


def _satisfies(have: str | None, rel: Relation) -> bool:
    if rel.op is None or rel.version is None:
        return True
    if have is None:
        return False
    return bool(_OPS[rel.op](compare_versions(have, rel.version)))


class PackageIndex:
    """The candidate of each package for one architecture, and who provides each virtual name.

    Built from ``Packages`` stanzas (:meth:`from_stanzas`, :meth:`from_text`) or a loaded
    :class:`~vzkit.image._mirror.DebianMirror` (:meth:`from_mirror`). Of several versions of a
    package the newest is the candidate.
    """

    def __init__(self, packages: Iterable[DebianPackage], *, arch: str, where: str = "") -> None:
        self.arch = arch
        self.where = where or "the package indexes"
        best: dict[str, DebianPackage] = {}
        for pkg in packages:
            if pkg.architecture not in (arch, "all"):
                continue
            old = best.get(pkg.name)
            if old is None or compare_versions(pkg.version, old.version) > 0:
                best[pkg.name] = pkg
        self.packages = dict(sorted(best.items()))
        providers: dict[str, list[tuple[str, str | None]]] = {}
        for pkg in self.packages.values():
            for group in pkg.relations("Provides"):
                for rel in group:
                    providers.setdefault(rel.name, []).append((pkg.name, rel.version))
        self.providers = providers

    @classmethod
    def from_stanzas(cls, stanzas: Iterable[str], *, arch: str, where: str = "") -> PackageIndex:
        """From raw stanza texts; stanzas with an invalid name or version are skipped (logged)."""
        packages = []
        for text in stanzas:
            try:
                fields = parse_control(text)
            except GuestError as err:
                log.warning("%s: skipping a malformed stanza: %s", where, err)
                continue
            name, version = fields.get("Package", ""), fields.get("Version", "")
            if not is_package_name(name) or not is_version(version):
                log.warning("%s: skipping a stanza with package %r version %r", where, name,
                            version)  # fmt: skip
                continue
            packages.append(DebianPackage.from_fields(fields))
        return cls(packages, arch=arch, where=where)

    @classmethod
    def from_text(cls, text: str, *, arch: str, where: str = "") -> PackageIndex:
        """From the text of a whole ``Packages`` file."""
        return cls.from_stanzas(text.split("\n\n"), arch=arch, where=where)

    @classmethod
    def from_mirror(cls, mirror: DebianMirror) -> PackageIndex:
        """From every source of ``mirror`` (loaded, i.e. fetched and verified, on first use)."""
        where = ", ".join(f"{s.dists}/{s.component}" for s in mirror.sources)
        texts = (text for _, text in mirror.stanzas())
        return cls.from_stanzas(texts, arch=mirror.debarch, where=where)

    def exists(self, name: str) -> bool:
        return name in self.packages or name in self.providers

    def close_names(self, name: str) -> list[str]:
        pool = sorted(set(self.packages) | set(self.providers))
        return difflib.get_close_matches(name, pool, n=3, cutoff=0.75)


@dataclass(frozen=True, slots=True)
class Resolution:
    """The resolved set, sorted by name; why each package is in it; and ``core``, the names of
    the required set's closure (what the second stage configures first)."""

    packages: tuple[DebianPackage, ...]
    reasons: Mapping[str, str]
    core: frozenset[str]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.packages)


class _Resolver:
    def __init__(self, index: PackageIndex) -> None:
        self.index = index
        self.selected: dict[str, DebianPackage] = {}
        self.why: dict[str, tuple[str | None, str]] = {}  # name -> (needed by, as what)
        self.queue: deque[str] = deque()

    def select(self, name: str, parent: str | None, reason: str) -> None:
        if name not in self.selected:
            self.selected[name] = self.index.packages[name]
            self.why[name] = (parent, reason)
            self.queue.append(name)

    def _arch_ok(self, rel: Relation) -> bool:
        return rel.arch in (None, "any", "native", self.index.arch)

    def satisfied(self, rel: Relation) -> bool:
        """Whether a selected package (real or by Provides) meets ``rel``."""
        if not self._arch_ok(rel):
            return False
        pkg = self.selected.get(rel.name)
        if pkg is not None and _satisfies(pkg.version, rel):
            return True
        return any(
            provider in self.selected and (rel.op is None or _satisfies(version, rel))
            for provider, version in self.index.providers.get(rel.name, ())
        )

    def candidate(self, rel: Relation) -> str | None:
        """The package to select for ``rel``: the real one, else the best provider."""
        if not self._arch_ok(rel):
            return None
        pkg = self.index.packages.get(rel.name)
        if pkg is not None and _satisfies(pkg.version, rel):
            return pkg.name
        providers = [
            provider
            for provider, version in self.index.providers.get(rel.name, ())
            if rel.op is None or _satisfies(version, rel)
        ]
        if not providers:
            return None
        rank = _PRIORITY_RANK
        return min(providers, key=lambda p: (rank.get(self.index.packages[p].priority, 9), p))

    def chain(self, name: str | None) -> list[str]:
        lines: list[str] = []
        while name is not None:
            parent, reason = self.why[name]
            lines.append(f"{parent} needs {reason}" if parent else f"{name} ({reason})")
            name = parent
        return lines[::-1]

    def explain(self, rel: Relation) -> str:
        """Why ``rel`` has no candidate, in one phrase."""
        if not self._arch_ok(rel):
            return f"{rel.name}:{rel.arch} is for another architecture than {self.index.arch}"
        pkg = self.index.packages.get(rel.name)
        if pkg is not None:
            return f"only {rel.name} {pkg.version} is available"
        if rel.name in self.index.providers:
            provided = ", ".join(f"{p} ({v or 'unversioned'})"
                                 for p, v in self.index.providers[rel.name])  # fmt: skip
            return f"{rel.name} is virtual and no provider matches: {provided}"
        return f"there is no package {rel.name}"

    def close(self) -> None:
        while self.queue:
            name = self.queue.popleft()
            pkg = self.selected[name]
            for field in ("Pre-Depends", "Depends"):
                for group in pkg.relations(field):
                    self._meet(name, group)

    def _meet(self, name: str, group: list[Relation]) -> None:
        if any(self.satisfied(rel) for rel in group):
            return
        text = " | ".join(str(rel) for rel in group)
        for rel in group:
            chosen = self.candidate(rel)
            if chosen is not None:
                self.select(chosen, name, text)
                return
        reasons = "; ".join(self.explain(rel) for rel in group)
        chain = [*self.chain(name), f"{name} needs {text}"]
        raise UnsatisfiableError(
            f"cannot install {chain[0].split(' ')[0]}: {name} needs {text}, but {reasons}.\n"
            "  " + "\n  ".join(chain) + "\n(drop the package that needs it, or use another "
            "suite or mirror that has it)",
            chain,
        )

    def check_conflicts(self) -> None:
        for name, pkg in self.selected.items():
            for field in ("Conflicts", "Breaks"):
                for group in pkg.relations(field):
                    for rel in group:
                        for other in self._matching(rel):
                            if other != name:
                                self._refuse_conflict(name, field, rel, other)

    def _matching(self, rel: Relation) -> list[str]:
        found = []
        pkg = self.selected.get(rel.name)
        if pkg is not None and _satisfies(pkg.version, rel):
            found.append(rel.name)
        for provider, version in self.index.providers.get(rel.name, ()):
            if provider in self.selected and (rel.op is None or _satisfies(version, rel)):
                found.append(provider)
        return found

    def _refuse_conflict(self, name: str, field: str, rel: Relation, other: str) -> None:
        raise UnsatisfiableError(
            f"{name} {field.lower()} {rel}, which {other} is or provides; both are needed:\n  "
            + "\n  ".join([*self.chain(name), *self.chain(other)])
            + "\n(drop one of the packages that pull them in)",
            [*self.chain(name), *self.chain(other)],
        )


def _check_requested(index: PackageIndex, names: Sequence[str]) -> None:
    for name in names:
        if not is_package_name(name):
            raise PackageNotFoundError(name, [], index.where)
        if not index.exists(name):
            raise PackageNotFoundError(name, index.close_names(name), index.where)


def resolve(
    index: PackageIndex, packages: Sequence[str] = (), *, base: Sequence[str] = BASE_PACKAGES
) -> Resolution:
    """The closed package set for ``packages`` on top of required, essential and ``base``.

    Raises PackageNotFoundError (also a ValueError) for a requested name no index has, with
    close names as suggestions, and UnsatisfiableError, with the chain of who needs what,
    for a dependency or conflict that cannot be met.
    """
    _check_requested(index, [*base, *packages])
    resolver = _Resolver(index)
    for pkg in index.packages.values():
        if pkg.priority == "required":
            resolver.select(pkg.name, None, "Priority: required")
        elif pkg.essential:
            resolver.select(pkg.name, None, "Essential: yes")
    if "usr-is-merged" in index.packages:
        resolver.select("usr-is-merged", None, "the tree is merged-/usr")
    resolver.close()
    core = frozenset(resolver.selected)
    for name, reason in [*((n, "base set") for n in base), *((n, "requested") for n in packages)]:
        rel = Relation(name)
        if resolver.satisfied(rel):
            continue
        chosen = resolver.candidate(rel)
        if chosen is None:  # pragma: no cover - _check_requested saw it exist
            raise PackageNotFoundError(name, [], index.where)
        resolver.select(chosen, None, reason if chosen == name else f"{reason}, provides {name}")
    resolver.close()
    resolver.check_conflicts()
    reasons = {}
    for name in sorted(resolver.selected):
        parent, reason = resolver.why[name]
        reasons[name] = f"{parent} needs {reason}" if parent else reason
    return Resolution(
        packages=tuple(resolver.selected[n] for n in sorted(resolver.selected)),
        reasons=reasons,
        core=core,
    )
