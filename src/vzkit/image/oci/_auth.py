"""The registry's side of authentication: challenges, tokens, and where plain HTTP may go.

A registry that wants credentials answers ``401`` with ``WWW-Authenticate``:

- ``Basic realm="..."``: the client sends ``Authorization: Basic base64(user:secret)``;
- ``Bearer realm="URL",service="S",scope="repository:R:pull"`` (the distribution token
  spec): the client GETs ``URL?service=S&scope=...`` (with Basic credentials when it has
  them, anonymously otherwise) and sends the ``token`` (or ``access_token``) it gets back as
  ``Authorization: Bearer TOKEN``.

Plain HTTP carries credentials and image bytes in the clear, so a URL with ``http:`` is only
followed (the registry, a token realm, a redirect) to this machine (``localhost``,
``127.0.0.0/8``, ``::1``) or, when the client was made ``insecure``, to the registry's own
host name (a token realm or a redirect elsewhere over plain HTTP is still refused).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import urllib.parse
from dataclasses import dataclass

from ._credentials import Credential
from ._errors import RegistryAuthError, RegistryError

__all__ = [
    "Challenge",
    "basic_authorization",
    "check_transport",
    "is_loopback",
    "parse_challenge",
    "token_from_body",
    "token_url",
]

_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*(?:,|$)')


@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: ``scheme`` in lower case and its parameters."""

    scheme: str
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """The challenge in a ``WWW-Authenticate`` value (quoted values may hold commas), or None."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        match = _PARAM.match(rest, pos)
        if match is None or match.end() == pos:
            break
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[match.group(1).lower()] = value
        pos = match.end()
    return Challenge(scheme=scheme.lower(), params=params)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address, no port) is this machine."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_transport(url: str, *, insecure_host: str | None) -> None:
    """Refuse a URL the client must not follow: not HTTP(S), or plain HTTP to another machine
    than ``insecure_host`` (the registry's host name, when the client was made insecure)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return
    host = (parts.hostname or "").lower()
    if parts.scheme == "http" and (is_loopback(host) or host == insecure_host):
        return
    if parts.scheme == "http":
        raise RegistryError(
            f"refusing plain HTTP to {parts.netloc} ({url}): credentials and image bytes "
            "would cross the network in the clear; allow it only for a registry you trust on "
            "a network you trust (insecure=True, vzkit's --insecure-registry), which covers "
            "that registry's own host name and no other",
            url=url,
        )
    raise RegistryError(f"refusing to follow {url}: a registry speaks only HTTP(S)", url=url)


def basic_authorization(credential: Credential) -> str:
    """The ``Authorization`` value for HTTP Basic."""
    pair = f"{credential.username}:{credential.secret}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def token_url(challenge: Challenge, scope: str, *, url: str) -> str:
    """Where to ask for a token: the challenge's realm with its service and scope."""
    realm = challenge.params.get("realm", "")
    if not realm.startswith(("https://", "http://")):
        raise RegistryError(
            f"{url}: the registry's Bearer challenge has no usable realm ({realm!r}); "
            "it breaks the distribution token protocol",
            url=url,
        )
    query = [("scope", challenge.params.get("scope") or scope)]
    if "service" in challenge.params:
        query.insert(0, ("service", challenge.params["service"]))
    joiner = "&" if urllib.parse.urlsplit(realm).query else "?"
    return realm + joiner + urllib.parse.urlencode(query)


def token_from_body(body: bytes, *, url: str) -> str:
    """The token in a token service's JSON answer (``token``, else ``access_token``)."""
    try:
        answer = json.loads(body)
        token = answer.get("token") or answer.get("access_token")
    except (ValueError, AttributeError):
        token = None
    if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
        raise RegistryAuthError(
            f"the token service at {url} answered without a usable token", url=url
        )
    return token
