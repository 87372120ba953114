"""Finding QEMU: the system binary for a guest arch, its accelerators, and EFI firmware.

What is learned by running QEMU (its accelerator list, whether KVM really boots a guest,
whether its seccomp sandbox loads) is cached per binary in memory, and KVM and sandbox probe
results on disk under the user cache dir, keyed by the binary, its mtime and the host kernel,
so each fact costs one probe per machine.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..._cache import user_cache_dir
from ..._config import efi_override, qemu_binary_override
from ..._fsutil import write_atomic
from ..._process import PREEXEC, log_argv, spawn
from ..._state import Arch, host_arch
from ...errors import BackendUnavailableError, ConfigError
from ._argv import SANDBOX

__all__ = [
    "Firmware",
    "SandboxProbe",
    "accelerators",
    "find_firmware",
    "find_qemu",
    "sandbox_probe",
    "select_accelerator",
]

log = logging.getLogger(__name__)

_INSTALL_HINT = {
    Arch.X86_64: "Debian/Ubuntu: apt-get install qemu-system-x86; macOS: brew install qemu",
    Arch.AARCH64: "Debian/Ubuntu: apt-get install qemu-system-arm; macOS: brew install qemu",
}


def find_qemu(arch: Arch) -> Path:
    """The ``qemu-system-<arch>`` binary (``$VZKIT_QEMU_<ARCH>`` overrides the PATH search)."""
    variable, override = qemu_binary_override(arch)
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BackendUnavailableError(f"{variable}={override!r} is not an executable")
        return path
    found = shutil.which(f"qemu-system-{arch.value}")
    if found is None:
        raise BackendUnavailableError(
            f"qemu-system-{arch.value} was not found on PATH; install QEMU ({_INSTALL_HINT[arch]})"
        )
    return Path(found)


@functools.cache
def accelerators(binary: Path) -> frozenset[str]:
    """The accelerators this QEMU binary was built with (``-accel help``)."""
    try:
        proc = subprocess.run(
            [str(binary), "-accel", "help"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BackendUnavailableError(f"cannot run {binary}: {err}") from err
    names = {line.strip() for line in proc.stdout.splitlines()[1:] if line.strip()}
    return frozenset(names)


_SANDBOX_QMP = b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'


@dataclass(frozen=True, slots=True)
class SandboxProbe:
    """Whether a QEMU binary can run under its seccomp sandbox (``-sandbox``), and if not why."""

    supported: bool
    detail: str = ""


#: Verdicts of :func:`sandbox_probe` in this process, per binary path, mtime and size.
_sandbox_verdicts: dict[tuple[str, int, int], SandboxProbe] = {}
#: Binaries known to run under the filter, on disk (``_sandbox_cache_key`` → true).
SANDBOX_CACHE = "qemu-sandbox.json"


async def sandbox_probe(binary: Path) -> SandboxProbe:
    """Whether ``binary`` runs under ``-sandbox on,...``: asked once per binary version.

    A QEMU built without libseccomp has no ``-sandbox`` option; one on a kernel without
    seccomp filters fails to load it. The probe starts the binary with no machine and the
    filter VMs get (:data:`~._argv.SANDBOX`) loaded, and quits it over QMP on stdin (30-100 ms).
    The probe is an owned process: a start cancelled meanwhile kills and reaps it.

    A verdict is remembered in this process per binary version, and a *yes* also on disk
    (:data:`SANDBOX_CACHE` in the user cache dir, keyed by binary, mtime, size and host
    kernel), so each ``vzkit run`` does not pay the probe again. A *no* is never written down:
    a stale or planted entry could otherwise turn the filter off without a probe; at worst a
    wrong *yes* makes QEMU refuse to start, with its reason. A probe that times out is not
    remembered at all.
    """
    try:
        st = binary.stat()
    except OSError as err:
        return SandboxProbe(False, f"cannot run {binary}: {err}")
    key = (str(binary), st.st_mtime_ns, st.st_size)
    known = _sandbox_verdicts.get(key)
    if known is not None:
        return known
    disk_key = f"{binary}|{st.st_mtime_ns}|{st.st_size}|{platform.release()}"
    cache = user_cache_dir() / SANDBOX_CACHE
    if await asyncio.to_thread(_read_json_map(cache).get, disk_key) is True:
        _sandbox_verdicts[key] = SandboxProbe(True)
        return _sandbox_verdicts[key]
    verdict, final = await _run_sandbox_probe(binary)
    if final:
        _sandbox_verdicts[key] = verdict
        if verdict.supported:
            await asyncio.to_thread(_record_sandbox_yes, cache, disk_key)
    return verdict


def _read_json_map(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record_sandbox_yes(path: Path, key: str) -> None:
    """Add ``key``; entries for binaries that no longer exist are dropped on the way."""
    known = _read_json_map(path).items()
    data: dict[str, object] = {
        k: v for k, v in known if v is True and Path(k.split("|")[0]).exists()
    }
    data[key] = True
    _write_json_map(path, data)


def _write_json_map(path: Path, data: dict[str, object]) -> None:
    """Replace ``path`` atomically (a cache that cannot be written costs a probe next time)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data, indent=1).encode())
    except OSError as err:
        log.debug("cannot record a probe result in %s: %s", path, err)


async def _run_sandbox_probe(binary: Path) -> tuple[SandboxProbe, bool]:
    """The probe's verdict, and whether it is one (a timeout is not)."""
    argv = [
        str(binary), "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
        "-sandbox", SANDBOX, "-S", "-qmp", "stdio",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as qmp, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err:  # fmt: skip
        qmp.write(_SANDBOX_QMP)
        qmp.seek(0)
        try:
            proc = await spawn(argv, name="qemu-sandbox-probe", stdin=qmp, stdout=out, stderr=err)
        except OSError as error:
            return SandboxProbe(False, f"cannot run {binary}: {error}"), True
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                rc = await proc.wait()
        except TimeoutError:
            await proc.kill()
            return SandboxProbe(False, f"the probe did not finish in {PROBE_TIMEOUT_S:g} s"), False
        except BaseException:
            await proc.kill()
            raise
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if rc == 0 and b'"return"' in stdout:
        return SandboxProbe(True), True
    lines = stderr.decode(errors="replace").strip().splitlines()
    detail = lines[-1] if lines else f"exit status {rc}"
    log.debug("%s cannot run under -sandbox: %s", binary, detail)
    return SandboxProbe(False, detail), True


def _kvm_usable() -> bool:
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


def _probe_cache_key(binary: Path) -> str:
    st = binary.stat()
    return f"{binary}|{st.st_mtime_ns}|{platform.release()}"


def _probe_cache_file() -> Path:
    return user_cache_dir() / "kvm-probe.json"


def _kvm_record(binary: Path) -> dict[str, object] | None:
    try:
        data = json.loads(_probe_cache_file().read_text())
    except (OSError, ValueError):
        return None
    value = data.get(_probe_cache_key(binary)) if isinstance(data, dict) else None
    if isinstance(value, bool):  # written by vzkit before the verdict carried its reason
        return {"works": value, "detail": ""}
    if isinstance(value, dict) and isinstance(value.get("works"), bool):
        return value
    return None


def cached_kvm_probe(binary: Path) -> bool | None:
    """A recorded KVM probe result for this binary and host kernel, if any."""
    record = _kvm_record(binary)
    return None if record is None else bool(record["works"])


def cached_kvm_detail(binary: Path) -> str:
    """What the recorded KVM probe saw (why KVM does not work), or ``""``."""
    record = _kvm_record(binary)
    detail = record.get("detail") if record is not None else None
    return detail if isinstance(detail, str) else ""


def record_kvm_probe(binary: Path, works: bool, detail: str = "") -> None:
    path = _probe_cache_file()
    data = _read_json_map(path)
    data[_probe_cache_key(binary)] = {"works": works, "detail": detail}
    _write_json_map(path, data)


class KvmProbe(NamedTuple):
    """A probe boot's verdict, and what it saw when KVM did not work."""

    works: bool
    detail: str = ""


PROBE_TIMEOUT_S = 10.0


def probe_kvm(binary: Path, arch: Arch, kernel: Path, timeout: float | None = None) -> KvmProbe:
    """Boot ``kernel`` under KVM with no root file system and see it through to its panic.

    With ``panic=-1`` and ``-no-reboot`` a kernel that boots ends QEMU within a second or two;
    one that hangs (as on hosts whose ``/dev/kvm`` exists but does not work) times out, and a
    QEMU that cannot use KVM at all fails at once. Only a clean exit with kernel output counts.
    """
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    machine = "q35" if arch is Arch.X86_64 else "virt,gic-version=max"
    console = "ttyS0" if arch is Arch.X86_64 else "ttyAMA0"
    with tempfile.TemporaryDirectory(prefix="vzkit-kvm-probe-") as tmp:
        console_log = Path(tmp) / "console.log"
        argv = [
            str(binary), "-machine", f"{machine},accel=kvm", "-cpu", "host", "-m", "256M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", f"file:{console_log}", "-kernel", str(kernel),
            "-append", f"console={console} panic=-1 quiet",
        ]  # fmt: skip
        log_argv(argv)
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
                preexec_fn=PREEXEC,
            )
        except subprocess.TimeoutExpired:
            log.debug("KVM probe boot hung for %.0f s", timeout)
            return KvmProbe(False, f"a probe boot under KVM hung (no result in {timeout:g} s)")
        except OSError as err:
            log.debug("KVM probe could not run: %s", err)
            return KvmProbe(False, f"the probe could not run QEMU: {err.strerror or err}")
        output = console_log.read_bytes() if console_log.exists() else b""
        if proc.returncode == 0 and b"Kernel panic" in output:
            return KvmProbe(True)
        stderr = proc.stderr.decode(errors="replace")
        log.debug("KVM probe failed (exit %d): %s", proc.returncode, stderr[-500:])
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        if proc.returncode != 0:
            said = f": {lines[0][:200]}" if lines else ""
            return KvmProbe(False, f"QEMU under KVM failed (exit {proc.returncode}){said}")
        return KvmProbe(False, "a probe boot under KVM ended without the kernel's output")


def select_accelerator(
    binary: Path, guest: Arch, requested: str = "", probe_kernel: Path | None = None
) -> str:
    """Pick the accelerator: an explicit request (the config's, which ``$VZKIT_QEMU_ACCEL``
    feeds: see :func:`~vzkit._config.default_accelerator`), else
    ``hvf`` on macOS, ``kvm`` where a probe boot proved it works, else ``tcg``.

    KVM is never trusted because ``/dev/kvm`` exists: a host can offer the node and still hang
    guests. A short probe boot of ``probe_kernel`` (see :func:`probe_kvm`) decides, once per
    QEMU binary and host kernel; without a kernel to probe with, ``tcg`` is used.
    """
    available = accelerators(binary)
    choice = requested
    if choice:
        if choice not in available:
            raise ConfigError(
                f"accelerator {choice!r} is not offered by {binary.name} "
                f"(it has: {', '.join(sorted(available)) or 'none'})"
            )
        if choice == "kvm" and sys.platform.startswith("linux"):
            _check_requested_kvm(binary, guest, probe_kernel)
        return choice
    native = guest is host_arch()
    if native and sys.platform == "darwin" and "hvf" in available:
        return "hvf"
    if native and sys.platform.startswith("linux") and "kvm" in available and _kvm_usable():
        with _probe_lock:
            verdict = _probe_once(binary, guest, probe_kernel)
        if verdict:
            return "kvm"
        if verdict is None:
            log.info("KVM not probed yet (no kernel to probe with); using TCG")
    return "tcg"


_probe_lock = threading.Lock()

_NOT_KVM = (
    "use --accel tcg (config accelerator='tcg'), or leave it out: vzkit then picks what works"
)


def _check_requested_kvm(binary: Path, guest: Arch, probe_kernel: Path | None) -> None:
    """KVM asked for by name: refuse it up front where it cannot work, rather than let QEMU
    fail with an assertion or hang the guest. The probe is the same one the automatic choice
    uses (and shares its record)."""
    if guest is not host_arch():
        raise ConfigError(
            f"accelerator 'kvm' runs only {host_arch().value} guests on this host, not "
            f"{guest.value}; {_NOT_KVM}"
        )
    if not _kvm_usable():
        why = "does not exist" if not os.path.exists("/dev/kvm") else "is not readable and writable"
        raise ConfigError(f"accelerator 'kvm' was asked for but /dev/kvm {why}; {_NOT_KVM}")
    with _probe_lock:
        verdict = _probe_once(binary, guest, probe_kernel)
    if verdict is False:
        raise ConfigError(
            "accelerator 'kvm' was asked for but KVM does not work on this host: "
            f"{cached_kvm_detail(binary) or 'a probe boot under KVM failed'} (recorded in "
            f"{_probe_cache_file()}); {_NOT_KVM}"
        )


def _probe_once(binary: Path, guest: Arch, probe_kernel: Path | None) -> bool | None:
    verdict = cached_kvm_probe(binary)
    if verdict is None and probe_kernel is not None:
        t0 = time.monotonic()
        probe = probe_kvm(binary, guest, probe_kernel)
        verdict = probe.works
        log.info(
            "KVM probe boot %s in %.1f s; %s from now on on this host",
            "succeeded" if verdict else f"failed ({probe.detail})",
            time.monotonic() - t0,
            "using KVM" if verdict else "using TCG",
        )
        record_kvm_probe(binary, verdict, probe.detail)
    return verdict


@dataclass(frozen=True, slots=True)
class Firmware:
    """UEFI firmware: read-only code and a template for the per-VM variable store."""

    code: Path
    vars_template: Path


_FIRMWARE_CANDIDATES = {
    Arch.X86_64: [
        ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
        ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
        ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
        (
            "/opt/homebrew/share/qemu/edk2-x86_64-code.fd",
            "/opt/homebrew/share/qemu/edk2-i386-vars.fd",
        ),
        ("/usr/local/share/qemu/edk2-x86_64-code.fd", "/usr/local/share/qemu/edk2-i386-vars.fd"),
    ],
    Arch.AARCH64: [
        ("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"),
        (
            "/usr/share/edk2/aarch64/QEMU_EFI-pflash.raw",
            "/usr/share/edk2/aarch64/vars-template-pflash.raw",
        ),
        (
            "/opt/homebrew/share/qemu/edk2-aarch64-code.fd",
            "/opt/homebrew/share/qemu/edk2-arm-vars.fd",
        ),
        ("/usr/local/share/qemu/edk2-aarch64-code.fd", "/usr/local/share/qemu/edk2-arm-vars.fd"),
    ],
}
_FIRMWARE_HINT = {
    Arch.X86_64: "Debian/Ubuntu: apt-get install ovmf",
    Arch.AARCH64: "Debian/Ubuntu: apt-get install qemu-efi-aarch64",
}


def find_firmware(arch: Arch) -> Firmware:
    """UEFI firmware for EFI boot (``$VZKIT_EFI_CODE``/``$VZKIT_EFI_VARS`` override)."""
    code, template = efi_override()
    pairs = [(code, template)] if code and template else _FIRMWARE_CANDIDATES[arch]
    for code_path, vars_path in pairs:
        if os.path.isfile(code_path) and os.path.isfile(vars_path):
            return Firmware(Path(code_path), Path(vars_path))
    raise BackendUnavailableError(
        f"no UEFI firmware for {arch.value} guests was found (EFI boot needs it; "
        f"{_FIRMWARE_HINT[arch]}), or boot a kernel directly with kernel_path"
    )
