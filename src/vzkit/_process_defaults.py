"""What every command run in a guest starts from: an image's environment, working directory,
user and default command (an OCI image config's ``Env``, ``WorkingDir``, ``User``,
``Entrypoint`` and ``Cmd``), as frozen data on the VM's config.

``guest.run``/``guest.popen`` start from ``env`` (a call's ``env`` adds to it and wins),
``cwd`` and ``user`` (a call's own win); ``vzkit run`` with no command runs
:meth:`ProcessDefaults.command`, as ``docker run IMAGE`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, SpecError

__all__ = ["GUEST_PATH", "ProcessDefaults"]

#: The guest ``PATH`` of a command given its own environment (``vzkit run``/``exec -e``): the
#: agent's default, which a root disk's userland (``/usr/local/bin``) needs as well.
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_KEYS = ("env", "cwd", "user", "entrypoint", "cmd")


def _strings(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ConfigError(f"process.{name} must be a list of strings, got {value!r}")
    out = tuple(value)
    if not all(isinstance(v, str) and "\x00" not in v for v in out):
        raise ConfigError(f"process.{name} must hold strings without NUL bytes, got {value!r}")
    return out


@dataclass(frozen=True)
class ProcessDefaults:
    """``env``: ``NAME=VALUE`` pairs in order (a mapping is taken too); ``cwd``: an absolute
    guest path or empty (the agent's own, ``/``); ``user``: ``USER[:GROUP]`` (names resolved in
    the guest, or numeric ids) or empty (root); ``entrypoint`` + ``cmd``: the default command
    (see :meth:`command`)."""

    env: tuple[tuple[str, str], ...] = ()
    cwd: str = ""
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        env = self.env
        pairs = list(env.items()) if isinstance(env, Mapping) else list(env)
        checked = []
        for pair in pairs:
            if isinstance(pair, str) and "=" in pair:  # the OCI form, "NAME=VALUE"
                pair = tuple(pair.split("=", 1))
            if (
                not isinstance(pair, tuple | list)
                or len(pair) != 2
                or not all(isinstance(p, str) and "\x00" not in p for p in pair)
                or not pair[0]
                or "=" in pair[0]
            ):
                raise ConfigError(f"process.env: not a NAME=VALUE pair: {pair!r}")
            checked.append((pair[0], pair[1]))
        object.__setattr__(self, "env", tuple(checked))
        for name in ("cwd", "user"):
            value = getattr(self, name)
            if not isinstance(value, str) or "\x00" in value:
                raise ConfigError(f"process.{name} must be a string, got {value!r}")
        if self.cwd and not self.cwd.startswith("/"):
            raise ConfigError(f"process.cwd must be an absolute guest path, got {self.cwd!r}")
        object.__setattr__(self, "entrypoint", _strings("entrypoint", self.entrypoint))
        object.__setattr__(self, "cmd", _strings("cmd", self.cmd))

    def command(
        self, args: Sequence[str] = (), *, entrypoint: Sequence[str] | None = None
    ) -> list[str]:
        """The argv ``docker run`` would run: the entrypoint (``entrypoint`` replaces the
        image's, and then the image's ``cmd`` is dropped, as ``--entrypoint`` does) followed
        by ``args``, or by ``cmd`` when there are none. Empty when there is nothing to run."""
        if entrypoint is not None:
            return [*entrypoint, *args]
        return [*self.entrypoint, *(args or self.cmd)]

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """``env`` with ``extra`` added (``extra`` wins)."""
        return {**dict(self.env), **(extra or {})}

    def command_environment(
        self, items: Sequence[str], user: str | None = None
    ) -> dict[Any, Any] | None:
        """The environment of a command given ``NAME=VALUE`` items (``vzkit run -e``, ``vzkit
        exec -e``, :func:`vzkit.exec_call`'s ``env``), to pass as the call's ``env`` (str to
        str): ``None`` without items (the guest's default); else a plain one with the agent's
        ``PATH`` unless the image sets one and ``HOME=/root`` for root unless the image sets
        one (else the guest's passwd entry says), the items last. The image's ``env`` still
        applies beneath it, as for every call. A :class:`~vzkit.errors.SpecError` for an item
        without ``=`` or a name."""
        if not items:
            return None
        image = dict(self.env)
        out: dict[Any, Any] = {} if "PATH" in image else {"PATH": GUEST_PATH}
        if not (user or self.user or "HOME" in image):
            out["HOME"] = "/root"
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise SpecError(f"--env wants NAME=VALUE, got {item!r}")
            out[name] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain data; empty fields left out."""
        out: dict[str, Any] = {}
        if self.env:
            out["env"] = [f"{k}={v}" for k, v in self.env]
        for name in ("cwd", "user"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        for name in ("entrypoint", "cmd"):
            if getattr(self, name):
                out[name] = list(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProcessDefaults:
        if not isinstance(data, Mapping) or set(data) - set(_KEYS):
            raise ConfigError(f"process must be a table with keys among {_KEYS}, got {data!r}")
        return cls(**dict(data))

    def __bool__(self) -> bool:
        return any(getattr(self, name) for name in _KEYS)
