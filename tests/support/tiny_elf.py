"""The smallest static Linux programs: each writes a line and exits 0.

Made byte by byte here (an ELF64 header, one loadable segment, a few instructions), so the
Rosetta tests have an x86_64 program, and a stand-in for Rosetta itself (an aarch64 ELF,
which binfmt_misc's ``O`` flag needs), without downloading either.
"""

from __future__ import annotations

import struct

BASE = 0x400000
_EHDR, _PHDR = 64, 56
_MACHINES = {"x86_64": 0x3E, "aarch64": 0xB7}


def _x86_64(message: bytes, code_at: int) -> bytes:
    code = bytearray()
    code += b"\xb8\x01\x00\x00\x00"  # mov eax, 1 (write)
    code += b"\xbf\x01\x00\x00\x00"  # mov edi, 1 (stdout)
    lea_at = len(code)
    code += b"\x48\x8d\x35\x00\x00\x00\x00"  # lea rsi, [rip + message]
    code += b"\xba" + struct.pack("<I", len(message))  # mov edx, len
    code += b"\x0f\x05"  # syscall
    code += b"\xb8\x3c\x00\x00\x00"  # mov eax, 60 (exit)
    code += b"\x31\xff"  # xor edi, edi
    code += b"\x0f\x05"  # syscall
    struct.pack_into("<i", code, lea_at + 3, len(code) - (lea_at + 7))
    return bytes(code)


def _movz(register: int, value: int) -> int:
    return 0xD2800000 | (value << 5) | register


def _aarch64(message: bytes, code_at: int) -> bytes:
    words = [
        _movz(0, 1),  # x0 = 1 (stdout)
        0,  # adr x1, message (below)
        _movz(2, len(message)),  # x2 = len
        _movz(8, 64),  # x8 = write
        0xD4000001,  # svc #0
        _movz(0, 0),  # x0 = 0
        _movz(8, 93),  # x8 = exit
        0xD4000001,  # svc #0
    ]
    offset = 4 * len(words) - 4  # from the adr instruction to the message
    words[1] = 0x10000000 | ((offset & 3) << 29) | ((offset >> 2) << 5) | 1
    return struct.pack(f"<{len(words)}I", *words)


def hello_elf(arch: str, message: bytes = b"hello\n") -> bytes:
    """A program for ``arch`` (``x86_64`` or ``aarch64``; mode it 0755) that writes
    ``message`` to stdout and exits 0."""
    code_at = _EHDR + _PHDR
    code = (_x86_64 if arch == "x86_64" else _aarch64)(message, code_at)
    size = code_at + len(code) + len(message)
    ehdr = struct.pack(
        "<4sBBBBB7xHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0,  # 64-bit, little-endian, version 1, System V
        2, _MACHINES[arch], 1,  # ET_EXEC, the machine, version
        BASE + code_at, _EHDR, 0,  # entry, program headers, no section headers
        0, _EHDR, _PHDR, 1, 0, 0, 0,
    )  # fmt: skip
    phdr = struct.pack(
        "<IIQQQQQQ",
        1,
        5,
        0,
        BASE,
        BASE,
        size,
        size,
        0x1000,  # PT_LOAD, R+X, the whole file
    )
    return ehdr + phdr + code + message
