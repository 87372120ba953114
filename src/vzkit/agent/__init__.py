"""The vzkit guest agent: its wire protocol, the host's client, and its C sources.

``vzkit-agent`` is a small static C program (sources in ``c/`` beside this file, built into the
default guest by :mod:`vzkit.image`) that runs commands and moves files for the host.
``docs/agent-protocol.md`` is the specification. This package is the host side:

- ``_protocol``: frames and message payloads (pure data and bytes), and the agent's constants
  (:data:`DEFAULT_VSOCK_PORT`, :data:`CONSOLE_PORT_NAME`, :data:`PROTOCOL_VERSION`,
  :data:`KEY_SIZE`), the one
  place every Python module takes them from; a unit test checks them against ``c/agent.h``.
- ``_connection``: one session over one stream socket (channels, flow control, HELLO and
  AUTH) on vzkit's shared loop.
- ``_command``: what a command is (argv, ``shell``, ``text``, ``user``); :func:`check_user`
  refuses a malformed ``USER[:GROUP]`` before anything is sent.
- ``_process``: :class:`GuestProcess` and :class:`AsyncGuestProcess`, the streaming processes.
- ``_client``: :class:`AgentClient` (blocking) and :class:`AsyncAgentClient` (asyncio).

Layering: this package imports the core (``vzkit.errors``, ``vzkit._loop``) only, never
:mod:`vzkit.image` or a backend. Importing it loads the constants; the clients load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._protocol import CONSOLE_PORT_NAME, DEFAULT_VSOCK_PORT, KEY_SIZE, PROTOCOL_VERSION

if TYPE_CHECKING:  # imported on first use (see __getattr__)
    from ._channel import AgentError, Args, GuestFileNotFoundError, StrOrBytes
    from ._client import AgentClient, AsyncAgentClient
    from ._command import check_user
    from ._connection import DEFAULT_MAX_OUTPUT, DEFAULT_WINDOW, authenticate
    from ._process import AsyncGuestProcess, GuestProcess

_LAZY = {
    "AgentError": "._channel",
    "Args": "._channel",
    "GuestFileNotFoundError": "._channel",
    "StrOrBytes": "._channel",
    "AgentClient": "._client",
    "AsyncAgentClient": "._client",
    "check_user": "._command",
    "DEFAULT_MAX_OUTPUT": "._connection",
    "DEFAULT_WINDOW": "._connection",
    "authenticate": "._connection",
    "AsyncGuestProcess": "._process",
    "GuestProcess": "._process",
}

__all__ = [
    "CONSOLE_PORT_NAME",
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_VSOCK_PORT",
    "DEFAULT_WINDOW",
    "KEY_SIZE",
    "PROTOCOL_VERSION",
    "AgentClient",
    "AgentError",
    "Args",
    "AsyncAgentClient",
    "AsyncGuestProcess",
    "GuestFileNotFoundError",
    "GuestProcess",
    "StrOrBytes",
    "authenticate",
    "check_user",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vzkit.agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
