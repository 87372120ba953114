"""The agent's wire constants, one source of truth per side: ``agent.h`` (C) against
``vzkit.agent._protocol`` (Python).

The header is parsed here (enums and ``#define``s, comments stripped, values evaluated as
integer or string constant expressions), so a message type, flag, size, port or version changed
on one side alone fails this file.
"""

from __future__ import annotations

import ast
import enum
import importlib.resources
import operator
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

import vzkit.agent
from vzkit.agent import _protocol as proto

HEADER_TEXT = importlib.resources.files("vzkit.agent").joinpath("c", "agent.h").read_text()

_COMMENTS = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(.+?)[ \t]*$", re.M)
_ENUM = re.compile(r"\benum\s*(\w*)\s*\{([^}]*)\}", re.S)
_INT_SUFFIX = re.compile(r"\b(0[xX][0-9a-fA-F]+|\d+)[uUlL]+\b")
_OPS: Mapping[type, Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.LShift: operator.lshift,
    ast.BitOr: operator.or_,
}


def _value(expr: str, known: Mapping[str, int | str]) -> int | str:
    """A C constant expression: an integer (with u/l suffixes, + - * << |, names defined
    before) or a string literal."""
    tree = ast.parse(_INT_SUFFIX.sub(r"\1", expr.strip()), mode="eval")

    def ev(node: ast.AST) -> int | str:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | str):
            return node.value
        if isinstance(node, ast.Name) and node.id in known:
            return known[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(left, int) and isinstance(right, int):
                return _OPS[type(node.op)](left, right)
        raise ValueError(f"not a constant expression: {expr!r}")

    return ev(tree.body)


def parse_header(text: str) -> tuple[dict[str, int | str], dict[str, dict[str, int]]]:
    """``(defines, enums)`` of a C header: each constant ``#define`` by name (function-like
    macros and the include guard skipped); each enum's members by name, keyed by the enum's
    tag, or by its first member for an anonymous one."""
    text = _COMMENTS.sub(" ", text)
    defines: dict[str, int | str] = {}
    for name, expr in _DEFINE.findall(text):
        try:
            defines[name] = _value(expr, defines)
        except (SyntaxError, ValueError):
            continue  # e.g. __attribute__ or a type; not a wire constant
    enums: dict[str, dict[str, int]] = {}
    for tag, body in _ENUM.findall(text):
        members: dict[str, int] = {}
        following = 0
        for item in filter(None, (part.strip() for part in body.split(","))):
            name, _, expr = (s.strip() for s in item.partition("="))
            following = int(_value(expr, {**defines, **members})) if expr else following
            members[name] = following
            following += 1
        enums[tag or next(iter(members))] = members
    return defines, enums


def _by_prefix(members: Mapping[str, int], prefix: str) -> dict[str, int]:
    return {name.removeprefix(prefix): value for name, value in members.items()}


def _enum_members(cls: type[enum.Enum]) -> dict[str, int]:
    return {m.name: int(m.value) for m in cls if m.value}  # flags: NONE is no C member


def mismatches(text: str) -> list[str]:
    """Every constant ``text`` (an agent.h) and the Python protocol module disagree on."""
    defines, enums = parse_header(text)
    out: list[str] = []

    def same(what: str, c_value: object, py_value: object) -> None:
        if c_value != py_value:
            out.append(f"{what}: agent.h has {c_value!r}, Python has {py_value!r}")

    c_types = _by_prefix(enums.get("msg_type", {}), "T_")
    same("message types", c_types, {m.name: int(m.value) for m in proto.MsgType})
    c_exec = _by_prefix(enums.get("EXEC_STDIN", {}), "EXEC_")
    same("EXEC flags", c_exec, _enum_members(proto.ExecFlag))
    c_exit = _by_prefix(enums.get("EXIT_TIMED_OUT", {}), "EXIT_")
    same("EXIT flags", c_exit, _enum_members(proto.ExitFlag))
    c_streams = _by_prefix(enums.get("STREAM_OUT", {}), "STREAM_")
    same("streams", c_streams, {m.name: int(m.value) for m in proto.Stream})
    c_sock = _by_prefix(enums.get("SOCK_TCP", {}), "SOCK_")
    same("CONNECT protocols", c_sock, {m.name: int(m.value) for m in proto.SockProto})
    c_clock = _by_prefix(enums.get("CLOCK_DRY_RUN", {}), "CLOCK_")
    same("CLOCK flags", c_clock, _enum_members(proto.ClockFlag))
    kill_flags = int.from_bytes(proto.KillRequest(9, group=True).encode()[4:8], "little")
    same("KILL flags", enums.get("KILL_GROUP"), {"KILL_GROUP": kill_flags})
    same("magic", defines.get("PROTO_MAGIC"), proto.MAGIC.decode())
    same("magic length", defines.get("PROTO_MAGIC_LEN"), len(proto.MAGIC))
    c_version = (defines.get("PROTO_MAJOR"), defines.get("PROTO_MINOR"))
    same("protocol version", c_version, proto.PROTOCOL_VERSION)
    same("nonce size", defines.get("PROTO_NONCE_LEN"), proto.NONCE_SIZE)
    same("header size", defines.get("HDR_SIZE"), proto.HEADER_SIZE)
    same("maximum payload", defines.get("MAX_PAYLOAD"), proto.MAX_PAYLOAD)
    same("vsock port", defines.get("AGENT_VSOCK_PORT"), proto.DEFAULT_VSOCK_PORT)
    same("console port name", defines.get("AGENT_PORT_NAME"), proto.CONSOLE_PORT_NAME)
    key_max = defines.get("AUTH_KEY_MAX")
    if not isinstance(key_max, int) or not 0 < proto.KEY_SIZE <= key_max:
        out.append(f"key size: Python sends {proto.KEY_SIZE} bytes, agent.h takes {key_max!r}")
    else:
        try:  # the host refuses exactly what the agent would
            proto.encode_auth(bytes(key_max))
        except ValueError:
            out.append(f"key size: Python refuses a key of AUTH_KEY_MAX={key_max} bytes")
        if _encodes(lambda: proto.encode_auth(bytes(key_max + 1))):
            out.append(f"key size: Python sends keys above AUTH_KEY_MAX={key_max}")
    hdr, max_payload = defines.get("HDR_SIZE"), defines.get("MAX_PAYLOAD")
    preamble = len(proto.RESYNC_PREAMBLE)
    ends_a_frame = (
        isinstance(hdr, int)
        and isinstance(max_payload, int)
        and preamble % hdr == 0
        and preamble >= hdr + max_payload
    )
    if not ends_a_frame:
        out.append(f"resync preamble: {preamble} bytes do not end a {max_payload}-byte frame")
    return out


def _encodes(fn: Callable[[], object]) -> bool:
    try:
        fn()
    except ValueError:
        return False
    return True


def test_agent_h_and_the_python_protocol_agree() -> None:
    assert mismatches(HEADER_TEXT) == []


def test_the_parser_reads_every_message_type() -> None:
    """Not vacuous: the header's enum is there, with the 29 types of protocol 2.3."""
    _, enums = parse_header(HEADER_TEXT)
    assert enums["msg_type"]["T_HELLO"] == 0x01
    assert enums["msg_type"]["T_POWEROFF"] == 0x31
    assert enums["msg_type"]["T_RESIZE"] == 0x17
    assert enums["msg_type"]["T_CONNECT"] == 0x40
    assert len(enums["msg_type"]) == len(proto.MsgType) == 29


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ("T_POWEROFF = 0x31,", "T_POWEROFF = 0x32,", "message types"),
        ("T_POWEROFF = 0x31,", "T_POWEROFF = 0x31,\n    T_REBOOT = 0x33,", "message types"),
        ("T_SYNC = 0x30,", "", "message types"),
        ("EXEC_MERGE_STDERR = 4", "EXEC_MERGE_STDERR = 8", "EXEC flags"),
        ("EXIT_CORE_DUMPED = 2", "EXIT_CORE_DUMPED = 2, EXIT_OOM = 4", "EXIT flags"),
        ("STREAM_ERR = 1", "STREAM_ERR = 2", "streams"),
        ("KILL_GROUP = 1", "KILL_GROUP = 2", "KILL flags"),
        ('#define PROTO_MAGIC "VZKAGENT"', '#define PROTO_MAGIC "VZKAGEN2"', "magic"),
        ("#define PROTO_MAJOR 2", "#define PROTO_MAJOR 3", "protocol version"),
        ("#define PROTO_MINOR 3", "#define PROTO_MINOR 4", "protocol version"),
        ("T_SOCK_CLOSE = 0x43,", "T_SOCK_CLOSE = 0x44,", "message types"),
        ("SOCK_UDP = 17", "SOCK_UDP = 18", "CONNECT protocols"),
        ("CLOCK_DRY_RUN = 1", "CLOCK_DRY_RUN = 2", "CLOCK flags"),
        ("T_RESIZE = 0x17,", "T_RESIZE = 0x18,", "message types"),
        ("EXEC_TTY = 8", "EXEC_TTY = 16", "EXEC flags"),
        ("#define PROTO_NONCE_LEN 16", "#define PROTO_NONCE_LEN 32", "nonce size"),
        ("#define HDR_SIZE 12", "#define HDR_SIZE 16", "header size"),
        ("#define MAX_PAYLOAD 65536u", "#define MAX_PAYLOAD 65536u * 2", "resync preamble"),
        ("#define MAX_PAYLOAD 65536u", "#define MAX_PAYLOAD (128u * 1024u)", "maximum payload"),
        ("#define AGENT_VSOCK_PORT 1024", "#define AGENT_VSOCK_PORT 1025", "vsock port"),
        ('"org.vzkit.agent.0"', '"org.vzkit.agent.1"', "console port name"),
        ("#define AUTH_KEY_MAX 64", "#define AUTH_KEY_MAX 16", "key size"),
        ("#define AUTH_KEY_MAX 64", "#define AUTH_KEY_MAX 128", "key size"),
    ],
)
def test_a_change_on_one_side_alone_fails(old: str, new: str, complaint: str) -> None:
    assert old in HEADER_TEXT
    found = mismatches(HEADER_TEXT.replace(old, new))
    assert any(line.startswith(complaint) for line in found), found


def test_a_change_on_the_python_side_alone_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proto, "DEFAULT_VSOCK_PORT", 2048)
    monkeypatch.setattr(proto, "PROTOCOL_VERSION", (2, 4))
    found = mismatches(HEADER_TEXT)
    assert [line.split(":")[0] for line in found] == ["protocol version", "vsock port"]


def test_one_python_home_for_the_agent_constants() -> None:
    """``vzkit.agent`` re-exports the protocol module's constants (no second copy), and no
    other module of ``src/vzkit`` spells the port name or assigns the agent's port itself."""
    assert vzkit.agent.DEFAULT_VSOCK_PORT is proto.DEFAULT_VSOCK_PORT
    assert vzkit.agent.CONSOLE_PORT_NAME is proto.CONSOLE_PORT_NAME
    assert vzkit.agent.PROTOCOL_VERSION is proto.PROTOCOL_VERSION
    assert vzkit.agent.KEY_SIZE is proto.KEY_SIZE
    root = Path(vzkit.agent.__file__).parent.parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if path == root / "agent" / "_protocol.py":
            continue
        if proto.CONSOLE_PORT_NAME in text.replace(f"``{proto.CONSOLE_PORT_NAME}``", ""):
            offenders.append(f"{path}: the console port name")
        if re.search(r"^\s*\w*AGENT\w*PORT\w*\s*=\s*\d", text, re.M):
            offenders.append(f"{path}: an agent port number")
    assert offenders == []
