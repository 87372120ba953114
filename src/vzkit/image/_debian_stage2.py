"""What a host-unpacked Debian tree needs to finish its install inside the guest.

The host unpacks every package's files (:mod:`vzkit.image._debian_unpack`) but runs no
maintainer script: that needs the guest's own binaries, so it happens in a VM booted on the
tree, as debootstrap's ``--second-stage`` does. :func:`lay_down_second_stage` writes:

- ``/var/lib/dpkg/`` with an empty ``status`` and ``available`` and ``info/``, ``updates/``
  (dpkg's database, which the second stage fills by installing each package again);
- the .debs in ``/var/cache/apt/archives/`` (``apt-get clean`` removes them at the end);
- ``/etc/apt/sources.list`` naming the sources the packages came from (Debian's own mirrors
  as ``http://``, see :func:`sources_list`), so ``apt-get install`` works in the guest later;
  ``/etc/hostname`` and ``/etc/hosts``;
- ``/usr/sbin/policy-rc.d`` answering 101, so no maintainer script starts a daemon while the
  image is built (removed at the end); ``/usr/bin/awk`` -> ``mawk`` until mawk is configured
  (debootstrap does the same);
- :data:`STAGE2_PATH`, the script (:func:`stage2_script`), run as root in the guest as
  ``/bin/sh /var/lib/vzkit/stage2 [DEBDIR]`` (DEBDIR defaults to :data:`ARCHIVES`):
  debootstrap's order: ``base-passwd``, ``base-files``, ``dpkg``, ``libc6``, ``perl-base``,
  ``mawk`` installed one by one with ``--force-depends``; the rest of the required set
  unpacked and configured with ``--force-depends`` (its dependency cycles have no order); then
  every other package unpacked and ``dpkg --configure -a``, with no forcing (a failure is real
  and its maintainer script's output is on the console); ``dpkg --audit`` must be empty.
  ``SOURCE_DATE_EPOCH`` is exported (shadow's password dates, Python's byte code honour it) and
  logs and ``-old`` files that carry the build's time are removed, for reproducible images.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from ._debian_unpack import TreeWriter
from ._mirror import DEFAULT_MIRROR, DEFAULT_SECURITY_MIRROR, DebianSource

__all__ = [
    "ARCHIVES",
    "CORE_ORDER",
    "STAGE2_PATH",
    "lay_down_second_stage",
    "layers",
    "sources_list",
    "stage2_script",
]

STAGE2_PATH = "/var/lib/vzkit/stage2"
"""Where the second-stage script lies in the tree; run it as ``/bin/sh /var/lib/vzkit/stage2``."""
ARCHIVES = "/var/cache/apt/archives"
CORE_ORDER = ("base-passwd", "base-files", "dpkg", "libc6", "perl-base", "mawk")
"""Installed first, one at a time, in this order (debootstrap's ``x_core_install`` order)."""
HOSTNAME = "debian"
UNSAFE_IO_CFG = "/etc/dpkg/dpkg.cfg.d/vzkit-build-unsafe-io"
"""dpkg's ``force-unsafe-io`` (dpkg(1): no fsync per unpacked file) while the image is built;
removed at the end. A crash mid-build loses only the build, which is thrown away anyway."""


def _words(names: Sequence[str]) -> str:
    return " \\\n    ".join(shlex.quote(n) for n in names)


def layers(names: Sequence[str], pre_depends: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """``names`` in groups so that each package comes after those it pre-depends on.

    A group only pre-depends on earlier groups (a cycle, which Debian forbids, ends up in one
    group); each group is sorted by name.
    """
    level: dict[str, int] = {}

    def depth(name: str, seen: frozenset[str]) -> int:
        if name not in level:
            deps = [d for d in pre_depends.get(name, ()) if d in wanted and d not in seen]
            level[name] = 1 + max((depth(d, seen | {name}) for d in deps), default=-1)
        return level[name]

    wanted = set(names)
    for name in sorted(wanted):
        depth(name, frozenset())
    out: list[list[str]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for name in sorted(wanted):
        out[level[name]].append(name)
    return out


def stage2_script(
    debs: dict[str, str],
    core: Sequence[str],
    *,
    epoch: int,
    pre_depends: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The second-stage shell script. ``debs``: package name -> .deb file name in
    :data:`ARCHIVES`; ``core``: the required set's closure (configured before the rest);
    ``pre_depends``: package -> the packages it pre-depends on (the rest is installed in
    :func:`layers`: dpkg refuses to unpack a package before what it pre-depends on is
    configured)."""
    first = [n for n in CORE_ORDER if n in debs]
    required = sorted(n for n in core if n in debs and n not in first)
    rest = sorted(n for n in debs if n not in core and n not in first)
    lines = [
        "#!/bin/sh",
        "# vzkit's second stage: register and configure the packages vzkit unpacked on the",
        "# host (like debootstrap --second-stage). Runs once, as root, inside the guest.",
        "set -eu",
        "export PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        "export DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true",
        "export LC_ALL=C.UTF-8 LANG=C.UTF-8 LANGUAGE=",
        f"export SOURCE_DATE_EPOCH={epoch}",
        f'cd "${{1:-{ARCHIVES}}}"  # where the .debs are: in the tree, or a share',
        "[ -e /var/lib/dpkg/status ] && [ ! -s /var/lib/dpkg/status ] || "
        "{ echo 'vzkit stage2: dpkg status is not empty: already run?' >&2; exit 1; }",
        'step() { echo "vzkit stage2: $*"; }',
        "# No fsync per unpacked file (the build syncs the disk once at the end; a crash loses",
        "# the build, never a finished image): most of the unpack time under emulation.",
        f"mkdir -p /etc/dpkg/dpkg.cfg.d && echo force-unsafe-io > {UNSAFE_IO_CFG}",
        'core() { dpkg --force-depends --force-confold --install "$1"; }',
    ]
    for name in first:
        if name == "libc6":
            lines.append(
                "[ -e /etc/localtime ] || ln -sf /usr/share/zoneinfo/Etc/UTC /etc/localtime"
            )
        if name == "mawk":
            lines.append("rm -f /usr/bin/awk")
        lines += [f"step 'installing {name}'", f"core {shlex.quote(debs[name])}"]
    if required:
        lines += [
            "step 'unpacking the required set'",
            "dpkg --force-depends --force-confold --force-overwrite --skip-same-version \\\n"
            f"  --unpack \\\n    {_words([debs[n] for n in required])}",
            "step 'configuring the required set'",
            "dpkg --force-depends --force-configure-any --configure --pending",
        ]
    for number, group in enumerate(layers(rest, pre_depends or {}), 1):
        lines += [
            f"step 'unpacking and configuring the other packages, group {number}'",
            "dpkg --force-depends --force-confold --skip-same-version --unpack \\\n    "
            f"{_words([debs[n] for n in group])}",
            "dpkg --force-depends --configure --pending",
        ]
    lines += [
        "step 'configuring everything, checking every dependency'",
        "dpkg --configure -a",
        "problems=$(dpkg --audit) || true",
        'if [ -n "$problems" ]; then echo "$problems" >&2; exit 1; fi',
        "apt-get check -q",
        "apt-get clean",
        f"rm -f {UNSAFE_IO_CFG}",
        "rm -f /usr/sbin/policy-rc.d /var/log/dpkg.log /var/log/alternatives.log \\",
        "  /var/log/apt/history.log /var/log/apt/term.log /var/log/apt/eipp.log.xz \\",
        "  /var/lib/dpkg/status-old /var/lib/dpkg/diversions-old /var/lib/dpkg/statoverride-old \\",
        "  /var/cache/debconf/config.dat-old /var/cache/debconf/templates.dat-old \\",
        "  /var/cache/ldconfig/aux-cache",
        "rm -rf /var/lib/vzkit",
        "step done",
        "",
    ]
    return "\n".join(lines)


def _guest_url(url: str) -> str:
    """Debian's own mirrors over plain HTTP, as Debian's installer writes them: apt checks the
    Release signatures itself, and TLS in a fresh guest depends on its clock and on the
    network not re-signing certificates (a proxy's CA is the host's, not the guest's). Other
    mirrors stay as given (one may serve HTTPS only)."""
    url = url.rstrip("/")
    if url in (DEFAULT_MIRROR, DEFAULT_SECURITY_MIRROR):
        return "http://" + url.removeprefix("https://")
    return url


def sources_list(sources: Sequence[DebianSource]) -> str:
    """``deb URL SUITE COMPONENT`` for each source, in order (see :func:`_guest_url`)."""
    return "".join(f"deb {_guest_url(s.url)} {s.suite} {s.component}\n" for s in sources)


def lay_down_second_stage(
    writer: TreeWriter,
    debs: dict[str, Path],
    core: Sequence[str],
    sources: Sequence[DebianSource],
    pre_depends: Mapping[str, Sequence[str]] | None = None,
    *,
    copy_debs: bool = True,
) -> str:
    """Write the dpkg database, the .debs, apt's sources and the script (see the module docs)
    into ``writer``'s tree; returns the script's text. ``debs``: package name -> .deb file.

    ``copy_debs=False`` leaves the .debs out of the tree (43 MB for bookworm that the disk
    would otherwise hold as freed blocks after ``apt-get clean``): the guest then runs the
    script with the directory holding them, e.g. a share of the cache, as its argument."""
    for path in ("/var/lib/dpkg/info", "/var/lib/dpkg/updates", "/var/lib/vzkit"):
        writer.directory(path, 0o755)
    writer.file("/var/lib/dpkg/status", b"", 0o644)
    writer.file("/var/lib/dpkg/available", b"", 0o644)
    writer.directory("/var/cache/apt", 0o755)
    writer.directory(ARCHIVES, 0o755)
    names: dict[str, str] = {}
    for name in sorted(debs):
        names[name] = debs[name].name
        if copy_debs:
            with debs[name].open("rb") as fh:
                writer.file(f"{ARCHIVES}/{debs[name].name}", fh, 0o644)
    writer.directory("/etc/apt", 0o755)
    writer.file("/etc/apt/sources.list", sources_list(sources).encode(), 0o644)
    writer.file("/etc/hostname", f"{HOSTNAME}\n".encode(), 0o644)
    hosts = (
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    writer.file("/etc/hosts", hosts.encode(), 0o644)
    writer.file("/usr/sbin/policy-rc.d", b"#!/bin/sh\nexit 101\n", 0o755)
    awk = writer.host(writer.resolve("/usr/bin/awk"))
    if "mawk" in debs and not (awk.exists() or awk.is_symlink()):
        writer.symlink("/usr/bin/awk", "mawk")
    script = stage2_script(names, core, epoch=writer.epoch, pre_depends=pre_depends)
    writer.file(STAGE2_PATH, script.encode(), 0o755)
    return script
