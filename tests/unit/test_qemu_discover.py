"""Accelerator choice: explicit requests, and KVM only after a probe boot proved it works.

A stand-in ``qemu-system-x86_64`` script plays QEMU: it lists accelerators for ``-accel help``
and, for a KVM probe boot, either "boots to a panic" (writes it to the serial file and exits)
or hangs, as KVM does on hosts whose /dev/kvm exists but cannot run guests.
"""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import pytest

from vzkit import Arch, BackendUnavailableError, ConfigError, LinuxVMConfig
from vzkit._process import live_children, pid_alive
from vzkit.backends.qemu import _discover

FAKE_QEMU = """#!/bin/sh
if [ "$1" = "-accel" ]; then
  printf 'Accelerators supported in QEMU binary:\\ntcg\\nkvm\\n'; exit 0
fi
echo run >> "$(dirname "$0")/runs"
for arg in "$@"; do
  case "$arg" in file:*) serial="${arg#file:}" ;; esac
done
if [ "$(cat "$(dirname "$0")/mode")" = works ]; then
  echo "Kernel panic - not syncing: VFS: Unable to mount root fs" > "$serial"; exit 0
fi
if [ "$(cat "$(dirname "$0")/mode")" = fails ]; then
  echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69" >&2; exit 1
fi
exec sleep 60
"""


@pytest.fixture
def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    binary = tmp_path / "bin" / "qemu-system-x86_64"
    binary.parent.mkdir()
    binary.write_text(FAKE_QEMU)
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("VZKIT_QEMU_X86_64", str(binary))
    monkeypatch.setenv("VZKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VZKIT_QEMU_ACCEL", raising=False)
    monkeypatch.setattr(_discover, "_kvm_usable", lambda: True)
    monkeypatch.setattr(_discover, "host_arch", lambda: Arch.X86_64)
    monkeypatch.setattr(_discover.sys, "platform", "linux")
    monkeypatch.setattr(_discover, "PROBE_TIMEOUT_S", 1.0)
    _discover.accelerators.cache_clear()
    return binary


def _runs(binary: Path) -> int:
    runs = binary.parent / "runs"
    return len(runs.read_text().splitlines()) if runs.exists() else 0


def test_kvm_that_hangs_falls_back_to_tcg_and_is_remembered(
    fake_qemu: Path, tmp_path: Path
) -> None:
    (fake_qemu.parent / "mode").write_text("hangs")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    assert _discover.select_accelerator(fake_qemu, Arch.X86_64, "", kernel) == "tcg"
    assert _runs(fake_qemu) == 1
    assert _discover.cached_kvm_probe(fake_qemu) is False
    assert _discover.cached_kvm_detail(fake_qemu) == (
        "a probe boot under KVM hung (no result in 1 s)"
    )
    # The verdict is cached: no second probe.
    assert _discover.select_accelerator(fake_qemu, Arch.X86_64, "", kernel) == "tcg"
    assert _runs(fake_qemu) == 1


def test_kvm_that_fails_is_remembered_with_qemus_reason_and_doctor_shows_it(
    fake_qemu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vzkit.backends.qemu import _doctor

    (fake_qemu.parent / "mode").write_text("fails")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    assert _discover.select_accelerator(fake_qemu, Arch.X86_64, "", kernel) == "tcg"
    why = "QEMU under KVM failed (exit 1): qemu-system-x86_64: error: failed to set MSR 0x10a"
    assert _discover.cached_kvm_detail(fake_qemu).startswith(why)
    monkeypatch.setattr(_discover, "find_qemu", lambda guest: fake_qemu)
    [kvm] = [c for c in _doctor._arch_checks(Arch.X86_64) if c.name == "x86_64 KVM"]
    assert not kvm.ok
    assert kvm.detail.startswith(f"does not work here: {why}")
    assert "TCG" in kvm.hint


def test_a_verdict_recorded_by_an_older_vzkit_still_counts(fake_qemu: Path) -> None:
    _discover._write_json_map(
        _discover._probe_cache_file(), {_discover._probe_cache_key(fake_qemu): False}
    )
    assert _discover.cached_kvm_probe(fake_qemu) is False
    assert _discover.cached_kvm_detail(fake_qemu) == ""


def test_kvm_that_boots_is_used(fake_qemu: Path, tmp_path: Path) -> None:
    (fake_qemu.parent / "mode").write_text("works")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    assert _discover.select_accelerator(fake_qemu, Arch.X86_64, "", kernel) == "kvm"
    assert _discover.cached_kvm_probe(fake_qemu) is True


def test_without_a_kernel_to_probe_with_tcg_is_used_and_nothing_cached(fake_qemu: Path) -> None:
    (fake_qemu.parent / "mode").write_text("works")
    assert _discover.select_accelerator(fake_qemu, Arch.X86_64) == "tcg"
    assert _runs(fake_qemu) == 0
    assert _discover.cached_kvm_probe(fake_qemu) is None


def test_foreign_guest_arch_always_uses_tcg(fake_qemu: Path, tmp_path: Path) -> None:
    (fake_qemu.parent / "mode").write_text("works")
    assert _discover.select_accelerator(fake_qemu, Arch.AARCH64, "", tmp_path) == "tcg"
    assert _runs(fake_qemu) == 0


def test_explicit_accelerator_wins_and_is_checked(
    fake_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _discover.select_accelerator(fake_qemu, Arch.X86_64, "kvm") == "kvm"
    monkeypatch.setenv("VZKIT_QEMU_ACCEL", "tcg")  # feeds the config's default, read there only
    assert LinuxVMConfig(arch="x86_64").accelerator == "tcg"
    assert LinuxVMConfig(arch="x86_64", accelerator="kvm").accelerator == "kvm"
    with pytest.raises(ConfigError, match=r"accelerator 'hvf' is not offered .* kvm, tcg"):
        _discover.select_accelerator(fake_qemu, Arch.X86_64, "hvf")


def test_kvm_asked_for_by_name_is_refused_up_front_where_it_cannot_work(
    fake_qemu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--accel kvm`` on a host whose KVM hangs guests used to end in a QEMU assertion
    (issue 18 item 6); now the probe the automatic choice uses decides, and says what to do."""
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    (fake_qemu.parent / "mode").write_text("hangs")
    with pytest.raises(ConfigError, match=r"KVM does not work on this host.*--accel tcg"):
        _discover.select_accelerator(fake_qemu, Arch.X86_64, "kvm", kernel)
    assert _runs(fake_qemu) == 1
    with pytest.raises(ConfigError, match="KVM does not work"):  # remembered: no second probe
        _discover.select_accelerator(fake_qemu, Arch.X86_64, "kvm", kernel)
    assert _runs(fake_qemu) == 1
    with pytest.raises(ConfigError, match=r"runs only x86_64 guests on this host, not aarch64"):
        _discover.select_accelerator(fake_qemu, Arch.AARCH64, "kvm", kernel)
    monkeypatch.setattr(_discover, "_kvm_usable", lambda: False)
    monkeypatch.setattr(_discover.os.path, "exists", lambda path: False)
    with pytest.raises(ConfigError, match=r"/dev/kvm does not exist; use --accel tcg"):
        _discover.select_accelerator(fake_qemu, Arch.X86_64, "kvm", kernel)


def test_kvm_asked_for_by_name_where_the_probe_boots(fake_qemu: Path, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    (fake_qemu.parent / "mode").write_text("works")
    assert _discover.select_accelerator(fake_qemu, Arch.X86_64, "kvm", kernel) == "kvm"
    assert _runs(fake_qemu) == 1


def test_binary_override_must_be_executable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VZKIT_QEMU_AARCH64", str(tmp_path / "nope"))
    with pytest.raises(BackendUnavailableError, match="is not an executable"):
        _discover.find_qemu(Arch.AARCH64)


def test_missing_firmware_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_discover, "_FIRMWARE_CANDIDATES", {Arch.X86_64: [], Arch.AARCH64: []})
    monkeypatch.delenv("VZKIT_EFI_CODE", raising=False)
    with pytest.raises(BackendUnavailableError, match="apt-get install ovmf"):
        _discover.find_firmware(Arch.X86_64)


SANDBOX_QEMU = """#!/bin/sh
echo "$$" >> "$(dirname "$0")/sandbox-runs"
case " $* " in
  *" -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny "*) ;;
  *) echo "wrong sandbox option: $*" >&2; exit 2 ;;
esac
case "$(cat "$(dirname "$0")/mode")" in
  no-seccomp)
    echo "qemu-system-x86_64: -sandbox is not supported by this QEMU binary" >&2; exit 1 ;;
  hangs) exec sleep 60 ;;
esac
read -r caps; read -r quit
echo '{"QMP": {}}'; echo '{"return": {}}'; echo '{"return": {}}'
"""


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe results go to a cache of the test's own, and no verdict is known to start with."""
    monkeypatch.setenv("VZKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_discover, "_sandbox_verdicts", {})


def _sandbox_qemu(tmp_path: Path, mode: str) -> Path:
    binary = tmp_path / "qemu-system-x86_64"
    binary.write_text(SANDBOX_QEMU)
    binary.chmod(0o755)
    (tmp_path / "mode").write_text(mode)
    return binary


def _probe_runs(tmp_path: Path) -> list[int]:
    runs = tmp_path / "sandbox-runs"
    return [int(pid) for pid in runs.read_text().split()] if runs.exists() else []


@pytest.mark.parametrize("mode", ["works", "no-seccomp"])
def test_sandbox_probe_runs_the_filter_once_per_binary_version(tmp_path: Path, mode: str) -> None:
    binary = _sandbox_qemu(tmp_path, mode)
    first = asyncio.run(_discover.sandbox_probe(binary))
    if mode == "works":
        assert first == _discover.SandboxProbe(True)
    else:
        assert first == _discover.SandboxProbe(
            False, "qemu-system-x86_64: -sandbox is not supported by this QEMU binary"
        )
    assert asyncio.run(_discover.sandbox_probe(binary)) == first
    assert len(_probe_runs(tmp_path)) == 1
    binary.write_text(SANDBOX_QEMU + "\n# upgraded\n")  # another build is asked again
    asyncio.run(_discover.sandbox_probe(binary))
    assert len(_probe_runs(tmp_path)) == 2
    assert live_children() == {}


def test_a_sandbox_yes_is_remembered_on_disk_and_a_no_is_never_trusted_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = _sandbox_qemu(tmp_path, "works")
    assert asyncio.run(_discover.sandbox_probe(binary)).supported
    cache = tmp_path / "cache" / _discover.SANDBOX_CACHE
    assert cache.stat().st_mode & 0o777 == 0o600
    monkeypatch.setattr(_discover, "_sandbox_verdicts", {})  # a new process: no probe again
    assert asyncio.run(_discover.sandbox_probe(binary)).supported
    assert len(_probe_runs(tmp_path)) == 1

    (tmp_path / "mode").write_text("no-seccomp")  # the same binary after a kernel change
    entries = json.loads(cache.read_text())
    cache.write_text(json.dumps(dict.fromkeys(entries, False)))  # a planted "no"
    monkeypatch.setattr(_discover, "_sandbox_verdicts", {})
    assert not asyncio.run(_discover.sandbox_probe(binary)).supported
    assert len(_probe_runs(tmp_path)) == 2  # probed, not read
    assert json.loads(cache.read_text()) == dict.fromkeys(entries, False)  # no "no" written


def test_sandbox_cache_forgets_binaries_that_are_gone(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    old = _sandbox_qemu(tmp_path / "old", "works")
    assert asyncio.run(_discover.sandbox_probe(old)).supported
    old.unlink()
    new = _sandbox_qemu(tmp_path, "works")
    assert asyncio.run(_discover.sandbox_probe(new)).supported
    keys = json.loads((tmp_path / "cache" / _discover.SANDBOX_CACHE).read_text())
    assert [key.split("|")[0] for key in keys] == [str(new)]


def test_sandbox_probe_is_an_owned_process_a_cancelled_start_reaps(tmp_path: Path) -> None:
    binary = _sandbox_qemu(tmp_path, "hangs")

    async def start_gives_up() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await _discover.sandbox_probe(binary)

    asyncio.run(start_gives_up())
    (pid,) = _probe_runs(tmp_path)
    assert not pid_alive(pid)
    assert live_children() == {}


def test_sandbox_probe_that_times_out_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_discover, "PROBE_TIMEOUT_S", 0.3)
    binary = _sandbox_qemu(tmp_path, "hangs")
    probe = asyncio.run(_discover.sandbox_probe(binary))
    assert probe == _discover.SandboxProbe(False, "the probe did not finish in 0.3 s")
    (tmp_path / "mode").write_text("works")
    assert asyncio.run(_discover.sandbox_probe(binary)).supported


def test_sandbox_probe_of_a_missing_binary_says_why(tmp_path: Path) -> None:
    probe = asyncio.run(_discover.sandbox_probe(tmp_path / "nope"))
    assert not probe.supported
    assert "cannot run" in probe.detail
