"""``vzkit.doctor``: the typed report the backends contribute to, and how ``vzkit doctor``
prints it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vzkit import Arch, doctor
from vzkit.backends.qemu import _discover, _passt
from vzkit.cli import main
from vzkit.cli._doctor import render
from vzkit.errors import BackendUnavailableError


def test_report_lists_every_backend_in_order_and_says_why_not() -> None:
    report = doctor.report()
    assert [b.name for b in report.backends] == ["vz", "qemu"]
    vz = report.backend("vz")
    if sys.platform != "darwin":
        assert not vz.available
        assert vz.detail == f"the vz backend needs macOS (this is {sys.platform})"
        assert vz.checks == ()
        assert not vz.ok
    with pytest.raises(KeyError):
        report.backend("xen")


def test_qemu_contributes_typed_checks() -> None:
    qemu = doctor.report(["qemu"]).backend("qemu")
    assert qemu.available
    names = [c.name for c in qemu.checks]
    for arch in Arch:
        assert f"{arch.value} QEMU" in names
        assert f"{arch.value} sandbox" in names
        assert f"{arch.value} EFI firmware" in names
    assert "vsock" in names
    assert "shares" in names
    binary = next(c for c in qemu.checks if c.name == "x86_64 QEMU")
    assert binary.ok
    assert Path(binary.detail).is_file()
    accel = next(c for c in qemu.checks if c.name == "x86_64 accelerators")
    assert "tcg" in accel.detail.split(", ")


def test_a_missing_binary_and_a_refused_sandbox_are_failed_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = _discover.find_qemu

    def find_qemu(arch: Arch) -> Path:
        if arch is Arch.AARCH64:
            raise BackendUnavailableError("no qemu-system-aarch64 here; install qemu")
        return real(arch)

    async def sandbox_probe(binary: Path) -> _discover.SandboxProbe:
        return _discover.SandboxProbe(False, "built without libseccomp")

    monkeypatch.setattr(_discover, "find_qemu", find_qemu)
    monkeypatch.setattr(_discover, "sandbox_probe", sandbox_probe)
    monkeypatch.setattr(_passt, "find_passt", lambda: None)
    checks = {c.name: c for c in doctor.report(["qemu"]).backend("qemu").checks}
    missing = checks["aarch64 QEMU"]
    assert (missing.ok, missing.detail) == (False, "no qemu-system-aarch64 here; install qemu")
    assert "aarch64 sandbox" not in checks  # nothing more to say about a missing binary
    sandbox = checks["x86_64 sandbox"]
    assert not sandbox.ok
    assert sandbox.detail == (
        "QEMU runs WITHOUT a seccomp sandbox (this binary cannot: built without libseccomp)"
    )
    nat = checks["nat"]
    assert (nat.ok, nat.hint) == (False, "install passt to close that")
    out = CliRunner().invoke(main, ["doctor"]).output
    assert "    ! aarch64 QEMU: no qemu-system-aarch64 here; install qemu\n" in out
    assert (
        "    ! nat: QEMU's user-mode network, where the guest CAN reach the host's loopback "
        "services at 10.0.2.2 (install passt to close that)\n"
    ) in out


def test_render_marks_failed_checks_and_adds_hints() -> None:
    report = doctor.Report(
        backends=(
            doctor.BackendReport(name="vz", available=False, detail="needs macOS"),
            doctor.BackendReport(
                name="qemu",
                available=True,
                checks=(
                    doctor.Check(name="x86_64 KVM", ok=True, detail="works"),
                    doctor.Check(name="nat", ok=False, detail="slirp", hint="install passt"),
                ),
            ),
        )
    )
    assert render(report) == [
        "vz    unavailable: needs macOS",
        "qemu  available",
        "      x86_64 KVM: works",
        "    ! nat: slirp (install passt)",
    ]
    assert report.backend("qemu").available
    assert not report.backend("qemu").ok
