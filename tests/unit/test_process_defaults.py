"""ProcessDefaults: an image's env, working directory, user and default command, as frozen
data on the VM config, and what every guest command starts from (the real agent on the
host, through the public API)."""

from __future__ import annotations

import os
import platform
import pwd
import sys
from pathlib import Path

import pytest

import vzkit
from vzkit._config import LinuxVMConfig
from vzkit._process_defaults import ProcessDefaults
from vzkit.errors import ConfigError

from ..support.agent_vm import AgentBackend, host_agent


def test_env_takes_pairs_a_mapping_or_the_oci_form_in_order() -> None:
    oci = ProcessDefaults(env=("PATH=/usr/bin:/bin", "A=x=y"))  # type: ignore[arg-type]
    assert oci.env == (("PATH", "/usr/bin:/bin"), ("A", "x=y"))
    assert ProcessDefaults(env={"B": "1"}).env == (("B", "1"),)  # type: ignore[arg-type]
    assert oci.environment({"A": "call"}) == {"PATH": "/usr/bin:/bin", "A": "call"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"env": ("NOEQUALS",)},
        {"env": (("", "v"),)},
        {"env": (("A\x00", "v"),)},
        {"cwd": "relative/dir"},
        {"user": 1000},
        {"entrypoint": "sh -c"},  # a string, not a list: would run 's', 'h', ...
        {"cmd": ["ok", 3]},
    ],
)
def test_bad_values_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="process"):
        ProcessDefaults(**kwargs)  # type: ignore[arg-type]


def test_the_command_follows_docker_run() -> None:
    image = ProcessDefaults(entrypoint=("/entry.sh",), cmd=("serve", "--port", "80"))
    assert image.command() == ["/entry.sh", "serve", "--port", "80"]
    assert image.command(["shell"]) == ["/entry.sh", "shell"]  # args replace cmd
    assert image.command(entrypoint=["sh"]) == ["sh"]  # --entrypoint drops the image's cmd
    assert image.command(["-c", "id"], entrypoint=["sh"]) == ["sh", "-c", "id"]
    assert ProcessDefaults(cmd=("python3",)).command() == ["python3"]
    assert ProcessDefaults().command() == []
    assert not ProcessDefaults()
    assert ProcessDefaults(user="1")


def test_the_config_keeps_them_and_writes_them_only_when_set(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    plain = LinuxVMConfig(kernel_path=kernel)
    assert "process" not in plain.to_dict()
    cfg = LinuxVMConfig(
        kernel_path=kernel,
        process=ProcessDefaults(env=(("A", "1"),), cwd="/srv", user="app", cmd=("run",)),
    )
    assert cfg.to_dict()["process"] == {"env": ["A=1"], "cwd": "/srv", "user": "app",
                                        "cmd": ["run"]}  # fmt: skip
    for again in (LinuxVMConfig.from_toml(cfg.to_toml()), LinuxVMConfig.from_json(cfg.to_json())):
        assert again.process == cfg.process
    with pytest.raises(ConfigError, match="process"):
        LinuxVMConfig.from_dict({"kernel_path": str(kernel), "process": {"shell": "bash"}})
    with pytest.raises(ConfigError, match="ProcessDefaults"):
        LinuxVMConfig(kernel_path=kernel, process={"cwd": "/"})  # type: ignore[arg-type]


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64" or os.geteuid() != 0,
    reason="runs the x86_64 Linux agent binary on the host, as root (to change users)",
)
def test_every_guest_command_starts_from_them_and_the_call_wins(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    work = Path("/usr/share")  # one the daemon user can enter (pytest's tmp dirs are 0700)
    process = ProcessDefaults(
        env=(("GREETING", "from-the-image"), ("LEVEL", "image")), cwd=str(work), user="daemon"
    )
    daemon = str(pwd.getpwnam("daemon").pw_uid)
    script = 'echo "$GREETING $LEVEL"; pwd; id -u'
    with vzkit.start(backend=AgentBackend(host_agent()), kernel_path=kernel,
                     process=process) as vm:  # fmt: skip
        ran = vm.guest.run(["sh", "-c", script], text=True)
        assert ran.stdout.splitlines() == ["from-the-image image", str(work), daemon]
        mine = vm.guest.run(["sh", "-c", script], text=True, env={"LEVEL": "call"},
                            cwd="/", user="root")  # fmt: skip
        assert mine.stdout.splitlines() == ["from-the-image call", "/", "0"]
        with vm.guest.popen(["sh", "-c", script], stdin=False) as proc:
            out = proc.communicate()[0].decode()
        assert out.splitlines() == ["from-the-image image", str(work), daemon]
