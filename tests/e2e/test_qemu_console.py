"""The serial console on stdio: the guest's console is this process's stdin/stdout."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import vzkit

from .conftest import VMFactory

SCRIPT = textwrap.dedent(
    """
    import sys, vzkit
    cfg = vzkit.LinuxVMConfig.from_json(sys.argv[1])
    with vzkit.VirtualMachine(cfg, backend="qemu") as vm:
        vm.start(timeout=60)
        print("state", vm.wait(timeout=90).value, file=sys.stderr)
    """
)


def test_stdio_console_carries_the_guest_shell(vms: VMFactory) -> None:
    cfg = vms.config("x86_64", console=vzkit.ConsoleMode.STDIO)
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, cfg.to_json()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + 90
    while b"VZKIT-GUEST-READY" not in seen and time.monotonic() < deadline:
        chunk = proc.stdout.read1(65536)
        if not chunk:
            break
        seen += chunk
    assert b"VZKIT-GUEST-READY" in seen, seen[-2000:]
    # Keep saying hello until the shell answers, then power the guest off from inside.
    for _ in range(60):
        proc.stdin.write(b"echo hello-$((40+2))\n")
        proc.stdin.flush()
        time.sleep(0.5)  # poll interval: say hello again until the shell answers
        chunk = proc.stdout.read1(65536)
        seen += chunk
        if b"hello-42" in seen:
            break
    assert b"hello-42" in seen
    proc.stdin.write(b"poweroff -f\n")
    proc.stdin.flush()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert b"state stopped" in err
