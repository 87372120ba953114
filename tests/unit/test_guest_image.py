"""The default image cache: content-addressed, reused, rebuilt on change, never half-written."""

from __future__ import annotations

from pathlib import Path

import pytest

import vzkit
from vzkit.image import _image, read_cpio

from .test_guest_initramfs import KVER, MODULES, make_deb, make_elf


@pytest.fixture
def debs(tmp_path: Path) -> Path:
    """A kernel and busybox-static for amd64, synthetic (see test_guest_initramfs)."""
    deb_dir = tmp_path / "debs"
    deb_dir.mkdir()
    files = {f"./lib/modules/{KVER}/{rel}": data for rel, data in MODULES.items()}
    files[f"./boot/vmlinuz-{KVER}"] = b"MZ fake bzImage"
    make_deb(deb_dir, f"linux-image-{KVER}", "6.1.1-1", "amd64", files)
    make_deb(deb_dir, "busybox-static", "1:1.35.0-4", "amd64", {"./bin/busybox": make_elf(62)})
    return deb_dir


@pytest.fixture
def fake_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    agent = tmp_path / "vzkit-agent"
    agent.write_bytes(b"\x7fELF fake agent v1")
    agent.chmod(0o755)
    calls: list[str] = []

    def build_agent(arch: str, out_dir: Path, *, cache_dir: Path) -> Path:
        calls.append(arch)
        return agent

    import vzkit.image._agent_build as agent_build

    monkeypatch.setattr(agent_build, "build_agent", build_agent)
    return agent


def test_image_is_built_once_and_then_reused(debs: Path, fake_agent: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _image.default_image("x86_64", cache_dir=cache, deb_dir=debs)
    entries = {e.name: e for e in read_cpio(first.initrd.read_bytes())}
    assert entries["bin/vzkit-agent"].data == fake_agent.read_bytes()
    assert entries["bin/vzkit-agent"].permissions & 0o111
    mtime = first.initrd.stat().st_mtime_ns
    again = _image.default_image("x86_64", cache_dir=cache, deb_dir=debs)
    assert again == first
    assert again.initrd.stat().st_mtime_ns == mtime  # reused, not rebuilt
    [(directory, listed)] = _image.list_images(cache)
    assert listed == first
    assert directory.name.startswith("x86_64-")


def test_changed_input_gives_a_new_image(debs: Path, fake_agent: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _image.default_image("x86_64", cache_dir=cache, deb_dir=debs)
    fake_agent.write_bytes(b"\x7fELF fake agent v2")
    second = _image.default_image("x86_64", cache_dir=cache, deb_dir=debs)
    assert second.initrd.parent != first.initrd.parent
    assert len(_image.list_images(cache)) == 2
    assert len(_image.remove_images(cache, arch="x86_64")) == 2
    assert _image.list_images(cache) == []


def test_a_failed_build_leaves_no_half_image(
    debs: Path,
    fake_agent: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "cache"

    def broken_build(*args: object, **kwargs: object) -> None:
        out = Path(str(kwargs["out_dir"]))
        (out / "initrd.partial").write_bytes(b"half")
        raise vzkit.GuestError("disk full")

    monkeypatch.setattr(_image, "build_guest", broken_build)
    with pytest.raises(vzkit.GuestError, match="disk full"):
        _image.default_image("x86_64", cache_dir=cache, deb_dir=debs)
    leftovers = [p for p in (cache / "images").iterdir() if p.name != ".lock"]
    assert leftovers == []


def test_default_guest_config_uses_the_image(
    debs: Path, fake_agent: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VZKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(
        _image, "fetch_guest_debs", lambda *a, **k: _image.find_guest_debs(debs, "x86_64")
    )
    cfg = vzkit.default_guest_config(arch="x86_64", memory_gb=0.25)
    assert cfg.kernel_path is not None
    assert cfg.kernel_path.read_bytes() == b"MZ fake bzImage"
    assert cfg.cmdline == "console=ttyS0 quiet init_on_alloc=0 preempt=none"
    assert (cfg.cpus, cfg.memory_gb) == (1, 0.25)
