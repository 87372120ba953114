"""The Debian resolver on small synthetic ``Packages`` indexes, one rule per test."""

from __future__ import annotations

import random

import pytest

from vzkit.errors import GuestError
from vzkit.image._debian_resolve import (
    PackageIndex,
    PackageNotFoundError,
    Relation,
    ResolveError,
    UnsatisfiableError,
    parse_relations,
    resolve,
)


def stanza(name: str, version: str = "1.0", arch: str = "amd64", **fields: str) -> str:
    lines = [f"Package: {name}", f"Version: {version}", f"Architecture: {arch}"]
    lines += [f"{key.replace('_', '-')}: {value}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


def index(*stanzas: str, arch: str = "amd64") -> PackageIndex:
    return PackageIndex.from_text("\n".join(stanzas), arch=arch, where="test index")


BASE = (
    stanza("libc6", "2.36-9"),
    stanza("apt", "2.6.1", Priority="required", Depends="libc6 (>= 2.34)"),
    stanza("python3", "3.11.2-1", Pre_Depends="python3-minimal (= 3.11.2-1)"),
    stanza("python3-minimal", "3.11.2-1", Depends="libc6"),
    stanza("ca-certificates", "20230311", arch="all", Depends="openssl (>= 1.1.1)"),
    stanza("openssl", "3.0.11-1", Depends="libc6"),
    stanza("dash", "0.5.12", Priority="required", Essential="yes"),
    stanza("sed", "4.9", Essential="yes"),
    stanza("tool", "1.0", Priority="optional"),
)


def names(*extra: str, packages: tuple[str, ...] = ()) -> tuple[str, ...]:
    return resolve(index(*BASE, *extra), packages).names


def test_required_essential_base_and_the_closure_sorted_by_name() -> None:
    result = resolve(index(*BASE))
    assert result.names == (
        "apt", "ca-certificates", "dash", "libc6", "openssl", "python3", "python3-minimal",
        "sed",
    )  # fmt: skip
    assert result.reasons["apt"] == "Priority: required"
    assert result.reasons["sed"] == "Essential: yes"
    assert result.reasons["python3"] == "base set"
    assert result.reasons["python3-minimal"] == "python3 needs python3-minimal (= 3.11.2-1)"
    assert result.reasons["openssl"] == "ca-certificates needs openssl (>= 1.1.1)"
    # the required set's closure is configured first in the guest
    assert result.core == {"apt", "dash", "libc6", "sed"}
    assert "tool" not in result.names  # optional and unrequested


def test_user_packages_and_their_dependencies_are_added() -> None:
    extra = stanza("jq", "1.6-2.1", Depends="libjq1 (= 1.6-2.1)"), stanza("libjq1", "1.6-2.1")
    result = resolve(index(*BASE, *extra), ["jq"])
    assert {"jq", "libjq1"} <= set(result.names)
    assert result.reasons["jq"] == "requested"
    assert result.reasons["libjq1"] == "jq needs libjq1 (= 1.6-2.1)"


def test_alternatives_prefer_a_selected_package_else_the_first_that_exists() -> None:
    extra = (
        stanza("mawk", "1.3.4", Priority="required", Provides="awk"),
        stanza("gawk", "5.2", Provides="awk"),
        stanza("app", Depends="gawk | mawk, nonexistent | helper-b | helper-a"),
        stanza("helper-a"),
        stanza("helper-b"),
    )
    result = names(*extra, packages=("app",))
    assert "mawk" in result
    assert "gawk" not in result
    assert "helper-b" in result
    assert "helper-a" not in result


def test_version_constraints_are_checked_against_the_newest_candidate() -> None:
    extra = (
        stanza("lib", "2.0-1"),
        stanza("lib", "1:0.9"),  # epoch: the newest of the three
        stanza("lib", "1.0-1"),
        stanza("ok", Depends="lib (>= 1:0.1), lib (<< 2:0), lib (>> 1.0)"),
        stanza("too-new", Depends="lib (>= 2:0)"),
        stanza("exact", Depends="lib (= 2.0-1)"),
    )
    ix = index(*BASE, *extra)
    assert ix.packages["lib"].version == "1:0.9"
    assert "lib" in resolve(ix, ["ok"]).names
    with pytest.raises(UnsatisfiableError, match=r"only lib 1:0\.9 is available"):
        resolve(ix, ["too-new"])
    with pytest.raises(UnsatisfiableError, match=r"exact needs lib \(= 2\.0-1\)"):
        resolve(ix, ["exact"])  # apt would not go back to an older version either


def test_virtual_packages_through_provides_versioned_and_not() -> None:
    extra = (
        stanza("mta-real", Provides="mail-transport-agent"),
        stanza("libfoo-impl", "3.0", Provides="libfoo-abi (= 3)"),
        stanza("needs-mta", Depends="mail-transport-agent"),
        stanza("needs-abi", Depends="libfoo-abi (>= 2)"),
        stanza("needs-abi-4", Depends="libfoo-abi (>= 4)"),
        stanza("needs-mta-2", Depends="mail-transport-agent (>= 2)"),
    )
    ix = index(*BASE, *extra)
    assert "mta-real" in resolve(ix, ["needs-mta"]).names
    result = resolve(ix, ["needs-abi"])
    assert "libfoo-impl" in result.names
    assert result.reasons["libfoo-impl"] == "needs-abi needs libfoo-abi (>= 2)"
    with pytest.raises(UnsatisfiableError, match="no provider matches: libfoo-impl"):
        resolve(ix, ["needs-abi-4"])
    with pytest.raises(UnsatisfiableError, match=r"mta-real \(unversioned\)"):
        resolve(ix, ["needs-mta-2"])  # an unversioned Provides meets no versioned relation
    # a virtual name can be requested; the real package of a name beats its providers
    assert "mta-real" in resolve(ix, ["mail-transport-agent"]).names


def test_several_providers_the_highest_priority_then_the_first_name() -> None:
    extra = (
        stanza("zz-editor", Provides="editor", Priority="important"),
        stanza("aa-editor", Provides="editor", Priority="optional"),
        stanza("bb-editor", Provides="editor", Priority="optional"),
        stanza("wants-editor", Depends="editor"),
    )
    assert "zz-editor" in names(*extra, packages=("wants-editor",))
    result = names(*extra[1:], packages=("wants-editor",))
    assert "aa-editor" in result
    assert "bb-editor" not in result


def test_arch_qualifiers_and_architecture_all() -> None:
    extra = (
        stanza("perl", "5.36", arch="all"),
        stanza("uses-any", Depends="python3:any (>= 3.11), perl:native"),
        stanza("uses-i386", Depends="libc6:i386"),
        stanza("armonly", arch="arm64"),
    )
    ix = index(*BASE, *extra)
    assert {"uses-any", "perl"} <= set(resolve(ix, ["uses-any"]).names)
    with pytest.raises(UnsatisfiableError, match="libc6:i386 is for another architecture"):
        resolve(ix, ["uses-i386"])
    with pytest.raises(PackageNotFoundError):
        resolve(ix, ["armonly"])  # only arm64 has it
    assert "armonly" in index(*BASE, *extra, arch="arm64").packages


def test_usr_is_merged_is_chosen_over_the_usrmerge_converter() -> None:
    extra = (
        stanza("init-system-helpers", Priority="required", Depends="usrmerge | usr-is-merged"),
        stanza("usrmerge", Depends="perl"),
        stanza("usr-is-merged", arch="all"),
    )
    result = names(*extra)
    assert "usr-is-merged" in result
    assert "usrmerge" not in result


def test_an_unknown_package_suggests_close_names_and_is_a_value_error() -> None:
    with pytest.raises(PackageNotFoundError) as caught:
        resolve(index(*BASE), ["pyhton3"])
    assert caught.value.suggestions == ("python3",)
    assert "did you mean python3?" in str(caught.value)
    assert "'pyhton3' in test index" in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, GuestError)
    with pytest.raises(PackageNotFoundError, match="'Bad Name'"):
        resolve(index(*BASE), ["Bad Name"])


def test_an_unsatisfiable_dependency_shows_who_needs_what() -> None:
    extra = (
        stanza("top", Depends="middle"),
        stanza("middle", Pre_Depends="bottom (>= 2) | other"),
        stanza("bottom", "1.5"),
    )
    with pytest.raises(UnsatisfiableError) as caught:
        resolve(index(*BASE, *extra), ["top"])
    assert caught.value.chain == (
        "top (requested)",
        "top needs middle",
        "middle needs bottom (>= 2) | other",
    )
    message = str(caught.value)
    assert message.startswith("cannot install top: middle needs bottom (>= 2) | other, but ")
    assert "only bottom 1.5 is available; there is no package other" in message


def test_conflicts_and_breaks_between_selected_packages_are_refused() -> None:
    extra = (
        stanza("aa", Conflicts="bb", Provides="thing"),
        stanza("bb"),
        stanza("cc", Breaks="libc6 (<< 2.40)"),
        stanza("dd", Conflicts="thing, dd", Provides="thing"),  # itself: ignored
        stanza("ee", Breaks="libc6 (<< 2.30)"),
    )
    ix = index(*BASE, *extra)
    with pytest.raises(UnsatisfiableError, match="aa conflicts bb, which bb is or provides"):
        resolve(ix, ["aa", "bb"])
    with pytest.raises(UnsatisfiableError, match=r"cc breaks libc6 \(<< 2.40\)"):
        resolve(ix, ["cc"])
    with pytest.raises(UnsatisfiableError, match="dd conflicts thing, which aa is or provides"):
        resolve(ix, ["aa", "dd"])
    assert {"dd", "ee"} <= set(resolve(ix, ["dd", "ee"]).names)


def test_the_same_indexes_give_the_same_result_in_any_stanza_order() -> None:
    extra = (
        stanza("xx", Depends="yy | zz, ww"),
        stanza("yy", Provides="vv"),
        stanza("zz", Provides="vv"),
        stanza("ww", Depends="vv"),
    )
    stanzas = [*BASE, *extra]
    first = resolve(index(*stanzas), ["xx"])
    assert {"xx", "yy", "ww"} <= set(first.names)
    assert "zz" not in first.names
    for seed in range(5):
        random.Random(seed).shuffle(stanzas)
        again = resolve(index(*stanzas), ["xx"])
        assert again == first


def test_parse_relations() -> None:
    assert parse_relations("a (>= 1:2.0~rc1), b:any | c (<< 3) [amd64] <!nocheck>,, d:native") == [
        [Relation("a", None, ">=", "1:2.0~rc1")],
        [Relation("b", "any"), Relation("c", None, "<<", "3")],
        [Relation("d", "native")],
    ]
    assert str(Relation("c", "any", ">=", "1")) == "c:any (>= 1)"
    with pytest.raises(ResolveError, match=r"pkg 1 Depends: malformed relation 'a \(>= \)'"):
        parse_relations("a (>= )", where="pkg 1 Depends")


def test_malformed_stanzas_are_skipped_not_trusted() -> None:
    ix = index(*BASE, "Package: ../evil\nVersion: 1\nArchitecture: amd64\n",
               stanza("nover", "not a version"))  # fmt: skip
    assert "../evil" not in ix.packages
    assert "nover" not in ix.packages
