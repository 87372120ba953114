"""A Debian suite's Release file, fetched and verified: the root of the mirror's trust chain.

:func:`fetch_release` reads ``dists/SUITE/InRelease`` (or ``Release`` and ``Release.gpg``).
When a keyring is given (:func:`resolve_keyring`: ``gpgv`` and the Debian archive keyring
installed, or ``VZKIT_DEBIAN_KEYRING``) the OpenPGP signature is checked by ``gpgv`` as apt
does; without one the clearsigned text is only unwrapped (:func:`strip_clearsign`). A Release
past its ``Valid-Until`` or dated more than an hour ahead is refused
(:class:`ExpiredReleaseError`), and every line of its SHA256 list is checked before it names a
path (:func:`parse_hashes`). The errors of the whole Debian client live here too:
:class:`MirrorError` and its subclasses, :func:`refuse` for a malformed or unsafe field.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Literal

from ..errors import GuestError
from ._deb import parse_control
from ._download import DownloadError, fetch_bytes

__all__ = [
    "DEBIAN_KEYRING",
    "SHA256_HEX",
    "SIZE_DIGITS",
    "DebianSource",
    "ExpiredReleaseError",
    "Keyring",
    "MirrorError",
    "MirrorFieldError",
    "SignatureError",
    "fetch_release",
    "parse_hashes",
    "plain_path",
    "refuse",
    "resolve_keyring",
    "strip_clearsign",
]

log = logging.getLogger(__name__)

DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
_GPGV_TIMEOUT = 60.0
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
SIZE_DIGITS = re.compile(r"[0-9]{1,15}")
_RELEASE_PART = re.compile(r"[A-Za-z0-9+._~@-]+")  # dep11 icon tarballs have an @
_MAX_PATH = 1024
_MAX_FUTURE_S = 3600.0
"""How far a Release's ``Date`` may lie ahead of our clock (apt allows only seconds)."""

Keyring = Path | Literal["auto"] | None


class MirrorError(DownloadError):
    """A Debian mirror lacks what we need or serves something malformed (``.url`` says where)."""


class SignatureError(MirrorError):
    """A Release file's OpenPGP signature is missing or does not verify with the keyring."""


class ExpiredReleaseError(MirrorError):
    """A Release file is past its ``Valid-Until`` or dated in the future (check the clock)."""


class MirrorFieldError(MirrorError):
    """A name, version, path, size or hash from the mirror is malformed or unsafe.

    ``field`` names it (``Package``, ``Version``, ``Filename``, ``SHA256``...), ``value`` is
    what the mirror sent. Nothing is downloaded or written on its account.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str,
        status: int | None = None,
        field: str = "",
        value: str = "",
    ) -> None:
        super().__init__(message, url=url, status=status)
        self.field = field
        self.value = value


def refuse(field: str, value: str, url: str, rule: str) -> MirrorFieldError:
    shown = value if len(value) <= 120 else value[:120] + "..."
    return MirrorFieldError(
        f"{url}: refusing {field} {shown!r}: {rule}; the mirror serves malformed or tampered "
        "data (try another mirror)",
        url=url,
        field=field,
        value=value,
    )


def plain_path(value: str, part: re.Pattern[str]) -> bool:
    """A relative path of ``part`` components, none of them ``.`` or ``..``."""
    if not value or len(value) > _MAX_PATH:
        return False
    return all(c not in (".", "..") and part.fullmatch(c) is not None for c in value.split("/"))


@dataclass(frozen=True, slots=True, kw_only=True)
class DebianSource:
    """One ``deb URL SUITE COMPONENT`` line. An optional source may be absent from its mirror."""

    url: str
    suite: str
    component: str = "main"
    optional: bool = False

    @property
    def dists(self) -> str:
        return f"{self.url.rstrip('/')}/dists/{self.suite}"


def resolve_keyring(keyring: Keyring) -> Path | None:
    if keyring == "auto":
        configured = os.environ.get("VZKIT_DEBIAN_KEYRING", "").strip()
        if configured.lower() in ("none", "off", "no"):
            return None
        if configured:
            return Path(configured)
        return DEBIAN_KEYRING if DEBIAN_KEYRING.is_file() and shutil.which("gpgv") else None
    return keyring


def strip_clearsign(text: str, url: str) -> str:
    """The signed text of an OpenPGP clearsigned message (``InRelease``), unverified."""
    lines = text.lstrip("\n").splitlines()
    if not lines or lines[0] != "-----BEGIN PGP SIGNED MESSAGE-----":
        raise MirrorError(f"{url}: not an OpenPGP clearsigned message", url=url)
    try:
        start = lines.index("", 1) + 1
        end = lines.index("-----BEGIN PGP SIGNATURE-----", start)
    except ValueError:
        raise MirrorError(f"{url}: truncated clearsigned message", url=url) from None
    body = [line[2:] if line.startswith("- ") else line for line in lines[start:end]]
    return "\n".join(body) + "\n"


def _gpgv(keyring: Path, url: str, files: dict[str, bytes], args: list[str]) -> bytes:
    if not keyring.is_file():
        raise SignatureError(f"{url}: keyring {keyring} does not exist", url=url)
    with tempfile.TemporaryDirectory(prefix="vzkit-gpgv-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            done = subprocess.run(
                ["gpgv", "--keyring", str(keyring), *args],
                cwd=tmp,
                capture_output=True,
                timeout=_GPGV_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            raise SignatureError(f"{url}: cannot run gpgv: {err}", url=url) from err
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip()
        raise SignatureError(f"{url}: bad or unknown signature (gpgv: {detail})", url=url)
    return done.stdout


def _parse_release(
    raw: bytes, url: str, *, clearsigned: bool, check_valid_until: bool = True
) -> dict[str, str]:
    try:
        text = raw.decode()
        fields = parse_control(strip_clearsign(text, url) if clearsigned else text)
    except (UnicodeDecodeError, GuestError) as err:
        if isinstance(err, MirrorError):
            raise
        raise MirrorError(f"{url}: not a Debian Release file ({err})", url=url) from err
    if "SHA256" not in fields:
        raise MirrorError(f"{url}: not a Debian Release file (no SHA256 list)", url=url)
    _check_dates(fields, url, time.time(), check_valid_until=check_valid_until)
    return fields


def _release_time(fields: dict[str, str], name: str, url: str) -> float | None:
    value = fields.get(name)
    if value is None:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        raise refuse(name, value, url, "not an RFC 2822 date") from None
    if when.tzinfo is None:  # Debian writes UTC; a date without a zone is read as UTC
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _check_dates(
    fields: dict[str, str], url: str, now: float, *, check_valid_until: bool = True
) -> None:
    """Refuse a Release past its ``Valid-Until``, or dated more than an hour ahead."""
    date = _release_time(fields, "Date", url)
    if date is not None and date > now + _MAX_FUTURE_S:
        hours = math.ceil((date - now) / 3600)
        raise ExpiredReleaseError(
            f"{url}: the Release file is dated {fields['Date']}, {hours} h ahead of this "
            "machine's clock: check the system clock (date -u), or use another mirror",
            url=url,
        )
    until = _release_time(fields, "Valid-Until", url)
    if until is None or now <= until:
        return
    days = (now - until) / 86400
    if not check_valid_until:
        until_text = fields["Valid-Until"]
        log.warning(
            "%s: expired %.1f day(s) ago (Valid-Until: %s); accepted because "
            "VZKIT_DEBIAN_CHECK_VALID_UNTIL=no",
            url,
            days,
            until_text,
        )
        return
    raise ExpiredReleaseError(
        f"{url}: the Release file expired {days:.1f} day(s) ago (Valid-Until: "
        f"{fields['Valid-Until']}): the mirror is out of date or serves an old, replayed "
        "Release. Use another mirror (--mirror URL or VZKIT_DEBIAN_MIRROR), or check the "
        "system clock (date -u); for an archived snapshot mirror set "
        "VZKIT_DEBIAN_CHECK_VALID_UNTIL=no",
        url=url,
    )


def parse_hashes(release: dict[str, str], url: str) -> dict[str, tuple[str, int]]:
    """The Release's SHA256 list, every line checked: ``HASH SIZE relative/path``."""
    hashes = {}
    for line in release.get("SHA256", "").splitlines():
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3:
            raise refuse("SHA256", line, url, "a line of the list is not 'HASH SIZE PATH'")
        sha256, size, path = parts
        if SHA256_HEX.fullmatch(sha256) is None:
            raise refuse("SHA256", sha256, url, f"not a SHA-256 hex digest (for {path!r})")
        if SIZE_DIGITS.fullmatch(size) is None:
            raise refuse("SHA256", size, url, f"not a size in bytes (for {path!r})")
        if not plain_path(path, _RELEASE_PART):
            raise refuse("SHA256", path, url, "not a relative path of plain names")
        hashes[path] = (sha256.lower(), int(size))
    return hashes


def fetch_release(
    source: DebianSource, *, keyring: Path | None, timeout: float, check_valid_until: bool
) -> dict[str, str] | None:
    """The verified Release fields of ``source``; None if an optional suite is missing.

    ``InRelease`` first, else ``Release`` (with ``Release.gpg``); with a ``keyring`` the
    OpenPGP signature is checked by ``gpgv``, without one the file is only parsed.
    """
    inrelease = f"{source.dists}/InRelease"
    try:
        raw = fetch_bytes(inrelease, timeout=timeout)
    except DownloadError as err:
        if err.status != 404:
            raise
    else:
        if keyring is not None:
            signed = _gpgv(keyring, inrelease, {"InRelease": raw}, ["-o", "-", "InRelease"])
            return _parse_release(
                signed, inrelease, clearsigned=False, check_valid_until=check_valid_until
            )
        return _parse_release(raw, inrelease, clearsigned=True, check_valid_until=check_valid_until)
    url = f"{source.dists}/Release"
    try:
        raw = fetch_bytes(url, timeout=timeout)
    except DownloadError as err:
        if err.status == 404 and source.optional:
            log.info("%s: no such suite on this mirror; skipped", source.dists)
            return None
        if err.status == 404:
            raise MirrorError(
                f"{source.dists}: no InRelease or Release file: not a Debian mirror, or "
                f"no suite {source.suite!r} there",
                url=url,
                status=404,
            ) from None
        raise
    if keyring is not None:
        try:
            signature = fetch_bytes(f"{url}.gpg", timeout=timeout)
        except DownloadError as err:
            raise SignatureError(
                f"{url}: unsigned (no InRelease, no Release.gpg); set "
                "VZKIT_DEBIAN_KEYRING=none to trust it over HTTPS alone",
                url=url,
            ) from err
        _gpgv(keyring, url, {"Release": raw, "Release.gpg": signature},
              ["Release.gpg", "Release"])  # fmt: skip
    return _parse_release(raw, url, clearsigned=False, check_valid_until=check_valid_until)
