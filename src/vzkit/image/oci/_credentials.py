"""Registry credentials from the files skopeo, podman and docker write when one logs in.

The files are read in the order of containers-auth.json(5), then docker's:

1. ``$REGISTRY_AUTH_FILE``;
2. ``$XDG_RUNTIME_DIR/containers/auth.json``;
3. ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``.

The first file with something for the registry wins. In a file, ``credHelpers[HOST]`` names
a helper program, else an ``auths`` entry holds ``auth`` (base64 ``user:password``) or
``username``/``password``, else ``credsStore`` names the helper for every registry. A helper
``NAME`` is the program ``docker-credential-NAME`` on ``PATH``, asked with ``get`` and the
server on its standard input (docker's credential-helper protocol); one that is not
installed is skipped with a log line, as skopeo does. ``auths`` keys may be a host
(``quay.io``), a URL (``https://index.docker.io/v1/``) or a host with a repository path
(``quay.io/org``, the most specific match wins). Docker Hub answers to ``docker.io``,
``index.docker.io``, ``registry-1.docker.io`` and docker's ``https://index.docker.io/v1/``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import RegistryAuthError

__all__ = ["DOCKER_HUB", "Credential", "CredentialStore", "default_auth_files"]

log = logging.getLogger(__name__)

DOCKER_HUB = "docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_HUB_HELPER_URL = "https://index.docker.io/v1/"
_HELPER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HELPER_TIMEOUT_S = 30.0
_MAX_FILE = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Credential:
    """A user name and secret for one registry, and where they came from (for messages)."""

    username: str
    secret: str
    source: str

    def __repr__(self) -> str:  # never the secret in a log or traceback
        return f"Credential(username={self.username!r}, source={self.source!r})"


def default_auth_files(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The files credentials are read from, in order (``$VAR`` kept for an unset one)."""
    env = os.environ if env is None else env
    files = [env.get("REGISTRY_AUTH_FILE") or "$REGISTRY_AUTH_FILE"]
    runtime = env.get("XDG_RUNTIME_DIR")
    files.append(f"{runtime}/containers/auth.json" if runtime else "$XDG_RUNTIME_DIR")
    docker = env.get("DOCKER_CONFIG")
    if docker:
        files.append(f"{docker}/config.json")
    else:
        home = env.get("HOME") or str(Path.home())
        files.append(f"{home}/.docker/config.json")
    return tuple(files)


def _canonical_host(host: str) -> str:
    return DOCKER_HUB if host in _HUB_ALIASES else host


def _key_name(key: str) -> str:
    """An ``auths`` key as ``host[/path]``: no scheme, no docker ``/v1/`` suffix."""
    name = key.strip()
    for prefix in ("https://", "http://"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    name = name.rstrip("/")
    if name.endswith(("/v1", "/v2")):
        name = name[:-3]
    host, sep, path = name.partition("/")
    return _canonical_host(host) + sep + path


class CredentialStore:
    """Where a :class:`~vzkit.image.oci._registry.RegistryClient` finds credentials.

    ``CredentialStore()`` reads the standard files (:func:`default_auth_files`) when asked;
    ``files=[...]`` names others; ``explicit={"host": ("user", "secret")}`` takes them as
    given (e.g. from ``--creds``) ahead of any file. Files are read on each lookup, so a
    login in another shell counts at once.
    """

    def __init__(
        self,
        files: Sequence[Path | str] | None = None,
        *,
        explicit: Mapping[str, tuple[str, str]] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._env = os.environ if env is None else env
        self._files = None if files is None else tuple(str(f) for f in files)
        self._explicit = {_canonical_host(h): pair for h, pair in (explicit or {}).items()}

    @property
    def files(self) -> tuple[str, ...]:
        """The files searched, in order (``$VAR`` for one whose variable is unset)."""
        return default_auth_files(self._env) if self._files is None else self._files

    def describe(self) -> str:
        """Where credentials are read from, for an error message."""
        where = ", ".join(self.files) or "no files"
        return f"given credentials, then {where}" if self._explicit else where

    def lookup(self, host: str, repository: str = "") -> Credential | None:
        """The credential for ``host`` (and ``repository``, for path-scoped entries), or None.

        Raises RegistryAuthError when a file is malformed or a helper fails (not when a
        helper merely has nothing for the host).
        """
        host = _canonical_host(host)
        if host in self._explicit:
            user, secret = self._explicit[host]
            return Credential(username=user, secret=secret, source="the given credentials")
        for name in self.files:
            if name.startswith("$"):
                continue
            config = _read_config(Path(name))
            if config is None:
                continue
            found = _from_config(config, name, host, repository, self._env)
            if found is not None:
                return found
        return None


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise RegistryAuthError(
            f"cannot read the registry credentials in {path}: {err.strerror}",
            url=str(path),
        ) from err
    try:
        if len(data) > _MAX_FILE:
            raise ValueError(f"larger than {_MAX_FILE} bytes")
        config = json.loads(data)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise RegistryAuthError(
            f"{path} is not a valid registry credentials file ({err}); fix or remove it",
            url=str(path),
        ) from None
    return config


def _candidates(host: str, repository: str) -> list[str]:
    """``host/a/b``, ``host/a``, ``host``: the keys that may hold ``host``'s credentials."""
    parts = [p for p in repository.split("/") if p]
    return [f"{host}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)] + [host]


def _from_config(
    config: dict[str, Any], path: str, host: str, repository: str, env: Mapping[str, str]
) -> Credential | None:
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        named = {_key_name(k): v for k, v in helpers.items() if isinstance(v, str)}
        if host in named:
            return _from_helper(named[host], host, path, env)
    auths = config.get("auths")
    if isinstance(auths, dict):
        entries = {_key_name(k): v for k, v in auths.items() if isinstance(v, dict)}
        for key in _candidates(host, repository):
            if key in entries:
                found = _from_entry(entries[key], path, key)
                if found is not None:
                    return found
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        return _from_helper(store, host, path, env)
    return None


def _from_entry(entry: dict[str, Any], path: str, key: str) -> Credential | None:
    source = f"{path} (auths {key!r})"
    user, secret = entry.get("username"), entry.get("password")
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            user, sep, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            sep = ""
        if not sep:
            raise RegistryAuthError(
                f"{source}: 'auth' is not base64 of user:password; log in again "
                "(skopeo login / docker login) to rewrite it",
                url=path,
            )
    if isinstance(user, str) and isinstance(secret, str) and (user or secret):
        return Credential(username=user, secret=secret, source=source)
    return None


def _from_helper(name: str, host: str, path: str, env: Mapping[str, str]) -> Credential | None:
    if not _HELPER_NAME.fullmatch(name):
        raise RegistryAuthError(
            f"{path}: credential helper name {name!r} is not a plain program name", url=path
        )
    program = shutil.which(f"docker-credential-{name}", path=env.get("PATH"))
    source = f"docker-credential-{name} (named in {path})"
    if program is None:
        log.info("%s is not installed; skipping it", source)
        return None
    server = _HUB_HELPER_URL if host == DOCKER_HUB else host
    try:
        done = subprocess.run(
            [program, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=_HELPER_TIMEOUT_S,
            env=dict(env),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RegistryAuthError(f"{source} failed: {err}", url=path) from err
    out = done.stdout.decode(errors="replace").strip()
    if done.returncode != 0:
        said = out or done.stderr.decode(errors="replace").strip()
        if "credentials not found" in said.lower():
            return None
        raise RegistryAuthError(
            f"{source} failed for {server} (exit {done.returncode}): {said[:200]}", url=path
        )
    try:
        answer = json.loads(out)
        user, secret = answer["Username"], answer["Secret"]
        if not isinstance(user, str) or not isinstance(secret, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise RegistryAuthError(
            f"{source} answered something other than Username/Secret JSON", url=path
        ) from None
    return Credential(username=user, secret=secret, source=source)
