"""Verified, resumable HTTP(S) downloads into a cache, with the standard library only.

:func:`download` fetches one file whose size and SHA256 are known in advance (from a Debian
``Release`` or ``Packages`` index) and stores it atomically: bytes go to ``NAME.part``, which
is hashed, fsync'd and renamed to ``NAME`` only when size and SHA256 match. So the cache holds
either a complete, verified file or none; a ``.part`` left by a lost connection (or a killed
process) is continued next time with an HTTP ``Range`` request. A server that ignores
``Range`` (``200`` instead of ``206``) restarts the file cleanly. A file that arrives complete
but does not verify is deleted and fetched once more from scratch before giving up.

Failures raise :class:`DownloadError` (a :class:`~vzkit.errors.GuestError`) naming the URL;
:class:`ChecksumError` when the bytes did not match what the index promised.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from vzkit._fsutil import fsync_dir
from vzkit.errors import GuestError

__all__ = [
    "ChecksumError",
    "DownloadError",
    "download",
    "fetch_bytes",
    "open_url",
    "read_limited",
]

log = logging.getLogger(__name__)

USER_AGENT = "vzkit (+https://github.com/vzkit; Debian guest image builder)"
_CHUNK = 1 << 16
_STALLED_ATTEMPTS = 4
"""Give up after this many attempts in a row that brought no new bytes."""
_MAX_ATTEMPTS = 50
_BACKOFF_S = 0.25


class DownloadError(GuestError):
    """A download failed: unreachable server, HTTP error, or repeated interruptions.

    ``url`` is what was asked for; ``status`` the HTTP status when the server answered one.
    """

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class ChecksumError(DownloadError):
    """A download completed but its size or SHA256 differs from the repository's index."""


class _Interrupted(Exception):
    """The transfer broke off; what arrived so far is kept for a ``Range`` request."""


def open_url(url: str, *, offset: int = 0, timeout: float = 30.0) -> http.client.HTTPResponse:
    """GET ``url`` (from byte ``offset``); HTTP errors and network failures -> DownloadError."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        raise DownloadError(
            f"{url}: HTTP {err.code} {err.reason}", url=url, status=err.code
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, FileNotFoundError):  # a file: URL (a mirror on disk)
            raise DownloadError(f"{url}: not found", url=url, status=404) from None
        raise DownloadError(f"cannot reach {url}: {reason}", url=url) from err
    return response


def _open_plain(url: str, offset: int, *, timeout: float) -> http.client.HTTPResponse:
    return open_url(url, offset=offset, timeout=timeout)


def read_limited(
    response: IO[bytes], url: str, limit: int, *, error: type[DownloadError] = DownloadError
) -> bytes:
    """A whole response body of at most ``limit`` bytes; ``error`` naming ``url`` when the
    transfer fails or the body is larger."""
    try:
        data = response.read(limit + 1)
    except (OSError, http.client.HTTPException) as err:
        raise error(f"{url}: transfer failed: {err}", url=url) from err
    if len(data) > limit:
        raise error(f"{url}: larger than {limit} bytes", url=url)
    return data


def fetch_bytes(url: str, *, timeout: float = 30.0, limit: int = 64 << 20) -> bytes:
    """The whole body of a small file (a ``Release``); DownloadError naming ``url`` on failure."""
    with open_url(url, timeout=timeout) as response:
        return read_limited(response, url, limit)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One downloader per lock file across processes (a second one waits its turn)."""
    with open(path, "w", opener=_private_opener) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _content_total(response: http.client.HTTPResponse, offset: int) -> int | None:
    """The full file size the response announces (``Content-Range`` or ``Content-Length``)."""
    crange = response.headers.get("Content-Range", "")
    if crange:
        total = crange.rpartition("/")[2].strip()
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


Opener = Callable[[int], http.client.HTTPResponse]
"""Opens the file from a byte offset (:func:`open_url` with auth, retries, ... around it)."""


def _transfer(
    url: str,
    part: Path,
    size: int | None,
    opener: Opener,
    on_bytes: Callable[[int], None] | None,
) -> None:
    """Bring ``part`` up to the end of the file once, continuing from what it already holds.

    Raises _Interrupted when the connection broke (what arrived stays in ``part``),
    ChecksumError when the server's file has another size than expected.
    """
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset >= size:
        return
    try:
        response = opener(offset)
    except DownloadError as err:
        if err.status == 416 and offset:  # our .part is no prefix of the file: start over
            part.unlink()
            raise _Interrupted(str(err)) from err
        if err.status is None or err.status >= 500:
            raise _Interrupted(str(err)) from err
        raise
    with response:
        status = response.status if url.startswith(("http:", "https:")) else 200
        if offset and status != 206:
            log.info("%s: server ignored the Range request; restarting the file", url)
            if on_bytes is not None:
                on_bytes(-offset)
            offset = 0
        total = _content_total(response, offset)
        if size is not None and total is not None and total != size:
            raise ChecksumError(
                f"{url}: size mismatch: the index says {size} bytes, the server has {total}",
                url=url,
            )
        with open(part, "r+b" if offset else "wb", opener=_private_opener) as out:
            out.seek(offset)
            out.truncate()
            _copy(response, out, url, size, on_bytes)
            out.flush()
            os.fsync(out.fileno())
        # http.client returns b"" rather than raising when a body ends short: compare sizes
        got, end = part.stat().st_size, total if total is not None else size
        if end is not None and got < end:
            raise _Interrupted(f"{url}: connection closed at byte {got} of {end}")


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)  # what a download holds may be a guest's data


def _copy(
    response: IO[bytes],
    out: IO[bytes],
    url: str,
    size: int | None,
    on_bytes: Callable[[int], None] | None,
) -> None:
    written = out.tell()
    while True:
        try:
            chunk = response.read(_CHUNK)
        except (OSError, http.client.HTTPException) as err:
            out.flush()
            raise _Interrupted(f"{url}: transfer broke off at byte {written}: {err!r}") from err
        if not chunk:
            return
        written += len(chunk)
        if size is not None and written > size:
            raise ChecksumError(
                f"{url}: size mismatch: the index says {size} bytes, the server sent more",
                url=url,
            )
        out.write(chunk)
        if on_bytes is not None:
            on_bytes(len(chunk))


def _verify(url: str, path: Path, size: int | None, sha256: str | None) -> None:
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(
            f"{url}: size mismatch: the index says {size} bytes, got {actual_size}", url=url
        )
    if sha256 is not None:
        actual = _sha256_file(path)
        if actual != sha256.lower():
            raise ChecksumError(
                f"{url}: SHA256 mismatch: the index says {sha256}, got {actual}", url=url
            )


def download(
    url: str,
    dest: Path | str,
    *,
    size: int | None = None,
    sha256: str | None = None,
    timeout: float = 30.0,
    on_bytes: Callable[[int], None] | None = None,
    opener: Opener | None = None,
    lock: Path | None = None,
) -> Path:
    """Download ``url`` to ``dest`` unless ``dest`` already holds the verified file.

    ``size`` and ``sha256`` (hex) are checked before ``dest`` appears; ``on_bytes(n)`` is
    called as bytes arrive (negative when a restart discards some). Interruptions are retried
    with ``Range`` requests while they make progress; a mismatch is retried once from
    scratch. ``opener(offset)`` opens the transfer when plain :func:`open_url` will not do
    (a registry's blob with its auth; it raises DownloadError like open_url). ``lock`` is the
    file held while downloading (default ``.download.lock`` beside ``dest``: one download at
    a time per directory, across processes). Raises
    DownloadError / ChecksumError naming ``url``; on a mismatch no file is left.
    """
    if opener is None:
        opener = functools.partial(_open_plain, url, timeout=timeout)
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    with _lock(lock or target.parent / ".download.lock"):
        if target.exists():
            try:
                _verify(url, target, size, sha256)
                return target
            except ChecksumError:
                log.info("%s: cached copy does not verify; downloading again", target)
                target.unlink()
        if on_bytes is not None and part.exists():
            on_bytes(part.stat().st_size)
        fresh_starts = 0
        stalled = 0
        for attempt in range(_MAX_ATTEMPTS):
            before = part.stat().st_size if part.exists() else 0
            try:
                _transfer(url, part, size, opener, on_bytes)
                _verify(url, part, size, sha256)
            except _Interrupted as err:
                after = part.stat().st_size if part.exists() else 0
                stalled = 0 if after > before else stalled + 1
                if stalled >= _STALLED_ATTEMPTS:
                    raise DownloadError(
                        f"{url}: download failed {stalled} times in a row without progress "
                        f"(last: {err}); {after} bytes kept in {part} to resume later",
                        url=url,
                    ) from err
                log.info("%s: interrupted (%s); resuming at byte %d", url, err, after)
                time.sleep(_BACKOFF_S * min(stalled, 4))
                continue
            except ChecksumError:
                discarded = part.stat().st_size if part.exists() else 0
                part.unlink(missing_ok=True)
                if on_bytes is not None:
                    on_bytes(-discarded)
                fresh_starts += 1
                if fresh_starts > 1:
                    raise
                log.warning("%s: verification failed; downloading once more from scratch", url)
                continue
            except BaseException:
                if part.exists() and part.stat().st_size == 0:
                    part.unlink()
                raise
            os.replace(part, target)
            fsync_dir(target.parent)
            log.debug("%s: stored as %s after %d attempt(s)", url, target, attempt + 1)
            return target
        raise DownloadError(f"{url}: gave up after {_MAX_ATTEMPTS} attempts", url=url)
