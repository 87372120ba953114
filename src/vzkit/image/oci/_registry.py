"""The client of the OCI distribution spec: manifests and blobs from a registry, over HTTP(S).

Written on the standard library (``urllib.request``), as the rest of vzkit's downloads are
(:mod:`vzkit.image._download`, whose resumable, verified transfer :meth:`fetch_blob` reuses):
a pull needs four requests (``/v2/``-style GETs of manifests and blobs, a token GET), and
the parts a library would add (a connection pool, HTTP/2) buy little for a handful of large
streamed blobs. See ``docs/oci.md``, "Registry client".

What the client does for each request:

- auth: anonymous first; on ``401`` it answers the ``WWW-Authenticate`` challenge (Bearer
  tokens cached per repository scope and fetched again when one expires, or Basic) with the
  credentials from a :class:`CredentialStore`; the ``Authorization`` header never follows a
  redirect to another server (blobs are often served from a storage bucket);
- ``429`` and ``5xx`` (and a connection that fails) are retried with exponential backoff,
  honouring ``Retry-After``, each wait bounded by ``max_wait_s``;
- errors: ``401``/``403`` -> :class:`RegistryAuthError` (saying where credentials are read
  from), ``404`` and others -> :class:`RegistryError` with the registry's error code
  (``MANIFEST_UNKNOWN``, ``NAME_UNKNOWN``, ...);
- plain HTTP only with ``insecure=True`` or to this machine (:func:`._auth.check_transport`).

Docker Hub is ``docker.io`` in references and credentials; its registry is
``registry-1.docker.io``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import BinaryIO, cast

from ...errors import SpecError
from .._download import USER_AGENT, ChecksumError, download, read_limited
from ._auth import (
    basic_authorization,
    check_transport,
    parse_challenge,
    token_from_body,
    token_url,
)
from ._credentials import DOCKER_HUB, Credential, CredentialStore
from ._errors import RegistryAuthError, RegistryError

__all__ = ["MANIFEST_MEDIA_TYPES", "RegistryClient", "check_digest", "registry_endpoint"]

log = logging.getLogger(__name__)

MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
MANIFEST_LIMIT = 4 << 20
"""The largest manifest or index accepted (containerd's limit too)."""
_SMALL_LIMIT = 1 << 20
_HUB_ENDPOINT = "registry-1.docker.io"
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def registry_endpoint(host: str) -> str:
    """The server that answers for ``host`` (Docker Hub's names go to its registry)."""
    return _HUB_ENDPOINT if host in (DOCKER_HUB, "index.docker.io") else host


def check_digest(digest: str) -> str:
    """The hex of a ``sha256:`` digest; SpecError for anything else."""
    if not _DIGEST.fullmatch(digest):
        raise SpecError(f"{digest!r} is not a sha256 digest (sha256: and 64 lower-case hex digits)")
    return digest.partition(":")[2]


def _check_repository(repository: str) -> None:
    if len(repository) > 255 or not _REPOSITORY.fullmatch(repository):
        raise SpecError(
            f"{repository!r} is not a repository name (lower-case path components such as "
            "library/debian)"
        )


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta or HTTP date), or None when absent or unreadable."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _error_detail(body: bytes) -> tuple[str | None, str]:
    """The registry's first error code and message from a distribution error body."""
    try:
        first = json.loads(body)["errors"][0]
        code, message = first.get("code"), first.get("message")
        return (code if isinstance(code, str) else None), (
            message if isinstance(message, str) else ""
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None, body[:200].decode(errors="replace").strip()


class _GiveUp(Exception):
    """Carries a final RegistryError through :func:`download`, which would retry it."""

    def __init__(self, error: RegistryError) -> None:
        super().__init__(str(error))
        self.error = error


class _NoAuthOnRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to URLs the client may use (the Authorization header is added
    unredirected, so it never reaches the next server)."""

    def __init__(self, insecure_host: str | None) -> None:
        self.insecure_host = insecure_host

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: object,
        code: int,
        msg: str,
        headers: object,
        newurl: str,
    ) -> urllib.request.Request | None:
        try:
            check_transport(newurl, insecure_host=self.insecure_host)
        except RegistryError:
            close = getattr(fp, "close", None)
            if close is not None:
                close()  # the redirect's own response: nobody else will
            raise
        return super().redirect_request(req, fp, code, msg, headers, newurl)  # type: ignore[arg-type]


class RegistryClient:
    """One registry (``host[:port]``, ``docker.io`` for Docker Hub); safe to share between
    threads (a pull fetches layers in parallel).

    ``insecure=True`` speaks plain HTTP to it; ``credentials`` default to the standard
    files (:class:`CredentialStore`). ``retries``, ``backoff_s``, ``max_wait_s`` and
    ``sleep`` shape the retries of ``429``/``5xx``/failed connections.
    """

    def __init__(
        self,
        host: str,
        *,
        insecure: bool = False,
        credentials: CredentialStore | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        max_wait_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not _HOST.fullmatch(host):
            raise SpecError(f"{host!r} is not a registry host (HOST or HOST:PORT)")
        self.host = host
        self.insecure = insecure
        self.credentials = CredentialStore() if credentials is None else credentials
        endpoint = registry_endpoint(host)
        self._base = f"{'http' if insecure else 'https'}://{endpoint}"
        self._insecure_host = urllib.parse.urlsplit(self._base).hostname if insecure else None
        self._timeout = timeout
        self._retries = retries
        self._backoff_s = backoff_s
        self._max_wait_s = max_wait_s
        self._sleep = sleep
        self._opener = urllib.request.build_opener(_NoAuthOnRedirect(self._insecure_host))
        self._lock = threading.Lock()
        self._tokens: dict[str, str] = {}
        self._basic = False
        self._creds: dict[str, Credential | None] = {}

    def __repr__(self) -> str:
        return f"RegistryClient({self.host!r}, insecure={self.insecure})"

    # -- the three operations --------------------------------------------------------------

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        """``(body, media type, digest)`` of a manifest or index, by tag or digest.

        The digest is the body's SHA256; it must equal ``reference`` when that is a digest,
        and the registry's ``Docker-Content-Digest`` when it sends one (ChecksumError).
        """
        _check_repository(repository)
        by_digest = reference.startswith("sha256:")
        if by_digest:
            check_digest(reference)
        elif not _TAG.fullmatch(reference):
            raise SpecError(f"{reference!r} is not a tag or a sha256 digest")
        path = f"manifests/{reference}"
        accept = ", ".join(MANIFEST_MEDIA_TYPES)
        with self._open(repository, path, accept=accept) as response:
            url = response.geturl()
            body = read_limited(response, url, MANIFEST_LIMIT, error=RegistryError)
            announced = response.headers.get("Docker-Content-Digest", "")
            content_type = response.headers.get_content_type()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        for expected, who in ((reference if by_digest else "", "asked for"), (announced, "sent")):
            if expected.startswith("sha256:") and expected != digest:
                raise ChecksumError(
                    f"{url}: the manifest's digest is {digest}, not the {expected} "
                    f"{who}; the registry or something between is serving altered content",
                    url=url,
                )
        return body, self._media_type(body, content_type, url), digest

    def open_blob(self, repository: str, digest: str, *, offset: int = 0) -> BinaryIO:
        """A streaming read of a blob from byte ``offset`` (the caller checks the digest)."""
        response = self._blob_response(repository, digest, offset)
        if offset and response.status != 206:  # Range ignored: skip to the offset ourselves
            left = offset
            while left > 0:
                chunk = response.read(min(left, 1 << 20))
                if not chunk:
                    response.close()
                    raise RegistryError(
                        f"{response.geturl()}: the blob ended before byte {offset}",
                        url=response.geturl(),
                    )
                left -= len(chunk)
        return cast(BinaryIO, response)

    def fetch_blob(
        self,
        repository: str,
        digest: str,
        dest: Path,
        *,
        size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Download a blob into ``dest``, verified against ``digest`` (and ``size``).

        The bytes arrive in ``dest`` + ``.part`` (0600), which a later call continues with a
        ``Range`` request; ``dest`` appears only when complete and verified (``dest`` +
        ``.lock`` is held meanwhile, so two processes never write one blob). ``progress(n)``
        gets each chunk's length (negative when a restart discards bytes). A blob that does
        not match its digest raises ChecksumError and leaves neither file.
        """
        hex_digest = check_digest(digest)
        _check_repository(repository)
        url = self._url(repository, f"blobs/{digest}")

        def opener(offset: int) -> http.client.HTTPResponse:
            try:
                return self._blob_response(repository, digest, offset)
            except RegistryError as err:
                if err.status == 416:  # the partial is no prefix of the blob: download restarts
                    raise
                raise _GiveUp(err) from err  # retried here already: download must not again

        lock = dest.with_name(dest.name + ".lock")  # per blob: layers come in parallel
        try:
            download(
                url, dest, size=size, sha256=hex_digest, timeout=self._timeout,
                on_bytes=progress, opener=opener, lock=lock,
            )  # fmt: skip
        except _GiveUp as stop:
            raise stop.error from stop.error.__cause__
        except ChecksumError as err:
            raise ChecksumError(
                f"blob {digest} of {self.host}/{repository} does not match its digest or "
                f"size ({err}); nothing was kept. The registry or something between serves "
                "altered content: try again, or another mirror",
                url=url,
            ) from err
        finally:
            lock.unlink(missing_ok=True)

    # -- requests ---------------------------------------------------------------------------

    def _url(self, repository: str, path: str) -> str:
        return f"{self._base}/v2/{repository}/{path}"

    def _blob_response(self, repository: str, digest: str, offset: int) -> http.client.HTTPResponse:
        check_digest(digest)
        _check_repository(repository)
        return self._open(repository, f"blobs/{digest}", offset=offset)

    def _open(
        self, repository: str, path: str, *, accept: str | None = None, offset: int = 0
    ) -> http.client.HTTPResponse:
        """The response of a GET under ``/v2/REPOSITORY/``, authenticated as the registry asks."""
        url = self._url(repository, path)
        scope = f"repository:{repository}:pull"
        headers = {"Accept": accept} if accept else {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        answered = False
        while True:
            answer, attempts = self._send(url, headers, self._authorization(scope, repository))
            if isinstance(answer, http.client.HTTPResponse):
                return answer
            if answer.code == 401 and not answered:
                challenge = answer.headers.get("WWW-Authenticate", "")
                answer.close()
                self._answer(challenge, scope, repository, url)
                answered = True
                continue
            raise self._error(answer, url, repository, attempts)

    def _send(
        self, url: str, headers: dict[str, str], authorization: str | None
    ) -> tuple[http.client.HTTPResponse | urllib.error.HTTPError, int]:
        """One GET, retried on 429/5xx and failed connections; an HTTP error is returned."""
        for attempt in range(1, self._retries + 2):
            check_transport(url, insecure_host=self._insecure_host)
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
            if authorization:
                request.add_unredirected_header("Authorization", authorization)
            wait = min(self._backoff_s * 2 ** (attempt - 1), self._max_wait_s)
            try:
                response: http.client.HTTPResponse = self._opener.open(
                    request, timeout=self._timeout
                )
                return response, attempt
            except urllib.error.HTTPError as err:
                if not (err.code == 429 or err.code >= 500) or attempt > self._retries:
                    return err, attempt
                after = _retry_after(err.headers.get("Retry-After"))
                wait = wait if after is None else min(after, self._max_wait_s)
                log.info("%s: HTTP %d; retrying in %.1f s", url, err.code, wait)
                err.close()
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                reason = getattr(err, "reason", err)
                if isinstance(reason, ssl.SSLError) and not isinstance(
                    reason, ssl.SSLCertVerificationError
                ):  # not a passing fault: the server does not speak TLS here
                    raise RegistryError(
                        f"the registry {self.host} does not answer over TLS ({url}: "
                        f"{reason}); if it serves plain HTTP and the way to it is trusted "
                        "(e.g. a registry on 127.0.0.1), pass --insecure-registry "
                        "(insecure=True in Python)",
                        url=url,
                    ) from err
                if attempt > self._retries:
                    raise RegistryError(
                        f"cannot reach the registry {self.host} ({url}): {reason}; check the "
                        "host name and port and that the registry is up",
                        url=url,
                    ) from err
                log.info("%s: %s; retrying in %.1f s", url, reason, wait)
            self._sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _media_type(self, body: bytes, content_type: str, url: str) -> str:
        if content_type in MANIFEST_MEDIA_TYPES:
            return content_type
        try:  # a registry may send application/json: the body names its own type
            declared = json.loads(body).get("mediaType")
        except (ValueError, AttributeError):
            declared = None
        if isinstance(declared, str) and declared:
            return declared
        raise RegistryError(
            f"{url}: the registry sent a manifest of type {content_type!r} that does not say "
            f"what it is; vzkit reads {', '.join(MANIFEST_MEDIA_TYPES)}",
            url=url,
        )

    # -- auth -------------------------------------------------------------------------------

    def _credential(self, repository: str) -> Credential | None:
        with self._lock:
            if repository in self._creds:
                return self._creds[repository]
        found = self.credentials.lookup(self.host, repository)
        with self._lock:
            self._creds[repository] = found
        return found

    def _authorization(self, scope: str, repository: str) -> str | None:
        with self._lock:
            token, basic = self._tokens.get(scope), self._basic
        if token:
            return f"Bearer {token}"
        credential = self._credential(repository) if basic else None
        return basic_authorization(credential) if credential else None

    def _answer(self, header: str, scope: str, repository: str, url: str) -> None:
        """Act on a 401's challenge: fetch a token, or switch to Basic."""
        challenge = parse_challenge(header)
        credential = self._credential(repository)
        if challenge is not None and challenge.scheme == "bearer":
            where = token_url(challenge, scope, url=url)
            auth = basic_authorization(credential) if credential else None
            answer, attempts = self._send(where, {}, auth)
            if not isinstance(answer, http.client.HTTPResponse):
                raise self._error(answer, where, repository, attempts, token=True)
            with answer:
                body = read_limited(answer, where, _SMALL_LIMIT, error=RegistryError)
                token = token_from_body(body, url=where)
            with self._lock:
                self._tokens[scope] = token
        elif challenge is None or challenge.scheme == "basic":
            if credential is None:
                raise self._auth_error(url, repository, None, 401)
            with self._lock:
                self._basic = True
        else:
            raise RegistryError(
                f"{url}: the registry wants authentication of a kind vzkit does not speak "
                f"({header[:80]!r}; it knows Bearer and Basic)",
                url=url,
                status=401,
            )

    def _auth_error(
        self, url: str, repository: str, code: str | None, status: int
    ) -> RegistryAuthError:
        credential = self._credential(repository)
        name = f"{self.host}/{repository}"
        if credential is None:
            message = (
                f"{name}: the registry wants credentials and none were found for {self.host} "
                f"in {self.credentials.describe()}; log in with `skopeo login {self.host}` "
                "(or docker login), or point REGISTRY_AUTH_FILE at an auth.json. (Some "
                "registries answer so for a repository that does not exist: check the name.)"
            )
        else:
            refused = "refused" if status == 401 else "do not allow pulling"
            message = (
                f"{name}: the credentials for {credential.username!r} from "
                f"{credential.source} are {refused}; log in again (skopeo login {self.host}) "
                "or check the repository name"
            )
        return RegistryAuthError(message, url=url, status=status, code=code)

    # -- errors -----------------------------------------------------------------------------

    def _error(
        self,
        answer: urllib.error.HTTPError,
        url: str,
        repository: str,
        attempts: int,
        *,
        token: bool = False,
    ) -> RegistryError:
        with answer:
            try:
                body = answer.read(64 << 10)
            except (OSError, http.client.HTTPException):
                body = b""
        status = answer.code
        code, message = _error_detail(body)
        said = f"{code}: {message}" if code else message or answer.reason
        if status in (401, 403):
            error = self._auth_error(url, repository, code, status)
            if token:
                error = RegistryAuthError(
                    f"the token service at {url} refused: {said}. {error}",
                    url=url, status=status, code=code,
                )  # fmt: skip
            return error
        if status == 404:
            thing = "manifest" if "/manifests/" in url else "blob" if "/blobs/" in url else url
            return RegistryError(
                f"{self.host}/{repository}: no such {thing} ({said}, HTTP 404 for {url}); "
                f"check the repository name and tag (`skopeo list-tags "
                f"docker://{self.host}/{repository}` lists the tags)",
                url=url, status=status, code=code,
            )  # fmt: skip
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        hint = (
            "it is failing or overloaded: try again later"
            if status >= 429
            else ("the registry refused the request")
        )
        return RegistryError(
            f"{url}: HTTP {status} ({said}){tries}; {hint}", url=url, status=status, code=code
        )
