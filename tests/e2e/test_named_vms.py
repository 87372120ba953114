"""Named VMs across processes, on the real default guest under QEMU (TCG here): a supervisor
owns each VM; other processes reach it by name (``vzkit.connect``), and it leaves nothing
behind when stopped, killed or removed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import vzkit
from tests.support.polling import wait_until
from vzkit.image import GuestImage

BOOT_S = 180.0


@pytest.fixture(autouse=True)
def home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, guest_images: dict[str, GuestImage]
) -> Iterator[Path]:
    """A private VZKIT_HOME per test; every VM left in it is removed (forced) at the end."""
    path = tmp_path / "home"
    monkeypatch.setenv("VZKIT_HOME", str(path))
    yield path
    for info in vzkit.list_vms():
        vzkit.remove_vm(info.name, force=True)


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _other_process(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``code`` run by a new Python process (it did not make the VM)."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
        env={**os.environ}, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _connect_as(uid: int, path: Path) -> str:
    """Try to connect to ``path`` from a child process running as ``uid``."""
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        code = 2
        try:
            os.setgid(uid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(str(path))
                code = 0
            except PermissionError:
                code = 13
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {0: "connected", 13: "refused"}.get(os.waitstatus_to_exitcode(status), "error")


def _info(name: str) -> vzkit.VMInfo:
    (info,) = [i for i in vzkit.list_vms() if i.name == name]
    return info


def test_a_named_vm_lives_on_and_another_process_runs_commands_in_it(home: Path) -> None:
    vm = vzkit.create(vzkit.default_guest_config(), "t1", timeout=BOOT_S)
    assert (vm.name, vm.state) == ("t1", vzkit.VMState.RUNNING)
    vm.guest.wait_ready(timeout=BOOT_S)
    vm.guest.write_file("/root/note", b"from the maker\n")
    vm.close()  # disconnects: the VM runs on
    info = _info("t1")
    assert info.state is vzkit.VMState.RUNNING
    assert _alive(info.supervisor_pid)
    assert _alive(info.vmm_pid)

    other = _other_process(
        "import vzkit\n"
        "with vzkit.connect('t1') as vm:\n"
        "    print(vm.name, vm.state.value, vm.backend)\n"
        "    print(vm.guest.run(['sh', '-c', 'echo $((6*7)); cat /root/note'], text=True).stdout)\n"
        "    vm.guest.write_file('/root/reply', b'from another process')\n"
    )
    assert other.returncode == 0, other.stderr
    assert other.stdout.split("\n")[:3] == ["t1 running qemu", "42", "from the maker"]
    assert _info("t1").state is vzkit.VMState.RUNNING  # the other process's close left it up

    with vzkit.connect("t1") as again:
        assert again.guest.read_file("/root/reply") == b"from another process"
        assert again.balloon.info().has_balloon
        again.stop(timeout=60)
        assert again.state is vzkit.VMState.STOPPED
    # stopped: every process of the VM is gone, the record says so, the socket too
    assert not _alive(info.supervisor_pid)
    assert not _alive(info.vmm_pid)
    stopped = _info("t1")
    assert (stopped.state, stopped.supervisor_pid, stopped.error) == (
        vzkit.VMState.STOPPED,
        None,
        None,
    )
    assert not (home / "vms" / "t1" / "control.sock").exists()
    with vzkit.connect("t1") as cold, pytest.raises(vzkit.StateError, match="needs a running VM"):
        cold.guest.run(["true"])
    vzkit.remove_vm("t1")
    assert not (home / "vms" / "t1").exists()
    assert vzkit.list_vms() == []


def test_names_files_and_sockets_are_checked_and_private(home: Path) -> None:
    cfg = vzkit.default_guest_config()
    for bad in ("a/b", "has space", "x" * 65, "", ".hidden", "-x"):
        with pytest.raises(vzkit.SpecError):
            vzkit.create(cfg, bad, start=False)
    with pytest.raises(vzkit.VMNotFoundError, match="no VM named 'nope'"):
        vzkit.connect("nope")
    vm = vzkit.create(cfg, "p1", timeout=BOOT_S)
    with pytest.raises(vzkit.VMExistsError, match="a VM named 'p1' exists"):
        vzkit.create(cfg, "p1", start=False)
    with pytest.raises(vzkit.StateError, match="is running"):
        vzkit.remove_vm("p1")
    directory = home / "vms" / "p1"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "vms").stat().st_mode) == 0o700
    for name in ("control.sock", "vm.json", "state.json", "supervisor.log"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    # another user cannot reach the control socket (the directory is 0700): refused
    assert _connect_as(65534, directory / "control.sock") == "refused"
    vm.close()
    vzkit.remove_vm("p1", force=True)
    assert not directory.exists()


def test_a_killed_supervisor_leaves_no_orphan_and_the_vm_comes_back(home: Path) -> None:
    vm = vzkit.create(vzkit.default_guest_config(), "k1", timeout=BOOT_S)
    vm.guest.wait_ready(timeout=BOOT_S)
    info = _info("k1")
    proc = vm.guest.popen(["sleep", "600"])
    os.kill(info.supervisor_pid, signal.SIGKILL)  # type: ignore[arg-type]
    wait_until(lambda: not _alive(info.vmm_pid), "QEMU to die with its supervisor", 30)
    with pytest.raises(vzkit.VzkitError):  # the client's command had its VM taken away
        proc.wait(timeout=60)
    wait_until(lambda: vm.state is vzkit.VMState.ERROR, "the client to see the VM gone", 30)
    vm.close()
    dead = _info("k1")
    assert dead.state is vzkit.VMState.ERROR
    assert "supervisor" in (dead.error or "")
    assert "vzkit start" in (dead.error or "")
    with vzkit.connect("k1") as again:  # start recovers it
        again.start(timeout=BOOT_S)
        assert again.guest.run(["echo", "back"], text=True).stdout == "back\n"
    vzkit.remove_vm("k1", force=True)
    assert not _alive(_pid_or_none(dead))
    assert not (home / "vms" / "k1").exists()


def _pid_or_none(info: vzkit.VMInfo) -> int | None:
    return info.vmm_pid


def test_qemu_killed_under_its_supervisor_is_an_error_with_the_reason(home: Path) -> None:
    vm = vzkit.create(vzkit.default_guest_config(), "q1", timeout=BOOT_S)
    info = _info("q1")
    os.kill(info.vmm_pid, signal.SIGKILL)  # type: ignore[arg-type]
    assert vm.wait(timeout=60) is vzkit.VMState.ERROR
    vm.close()
    wait_until(lambda: not _alive(info.supervisor_pid), "the supervisor to exit", 30)
    after = _info("q1")
    assert after.state is vzkit.VMState.ERROR, after
    assert after.error
    assert "QEMU" in after.error or "qemu" in after.error, after.error
    assert not (home / "vms" / "q1" / "control.sock").exists()


def test_two_racing_starts_one_wins_the_other_is_told(home: Path) -> None:
    vzkit.create(vzkit.default_guest_config(), "r1", start=False).close()
    results: list[object] = []

    def start() -> None:
        try:
            with vzkit.connect("r1") as vm:
                vm.start(timeout=BOOT_S)
                results.append("started")
        except vzkit.StateError as err:
            results.append(err)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOOT_S)
    assert sorted(map(str, results))[-1] == "started"
    told = [r for r in results if isinstance(r, vzkit.StateError)]
    assert len(told) == 1, results
    assert "already running" in str(told[0])
    assert _info("r1").state is vzkit.VMState.RUNNING


def test_the_main_command_runs_logs_and_stops_the_vm(home: Path) -> None:
    vm = vzkit.create(
        vzkit.default_guest_config(), "c1", timeout=BOOT_S,
        command=vzkit.GuestCommand(("sh", "-c", "echo out; echo err >&2; echo $GREETING; exit 3"),
                                   env=("GREETING=hello",)),
    )  # fmt: skip
    assert vm.wait(timeout=BOOT_S) is vzkit.VMState.STOPPED
    vm.close()
    info = _info("c1")
    assert (info.state, info.exit_code, info.command) == (
        vzkit.VMState.STOPPED, 3, ("sh", "-c", "echo out; echo err >&2; echo $GREETING; exit 3"),
    )  # fmt: skip
    log = (home / "vms" / "c1" / "command.log").read_text()
    assert {"out", "err", "hello"} <= set(log.split())
    assert json.loads(json.dumps(info.to_json()))["exit_code"] == 3
    assert info.command_log == home / "vms" / "c1" / "command.log"
    assert info.auto_remove is False


def test_vsock_both_ways_through_the_supervisor(home: Path) -> None:
    """Streams the supervisor opens or accepts reach the client as descriptors."""
    relay = "/bin/vzkit-agent relay"
    vzkit.create(vzkit.default_guest_config(), "v1", timeout=BOOT_S).close()
    with vzkit.connect("v1") as vm:
        with vm.vsock.listen(7000) as listener:
            proc = vm.guest.popen(
                ["sh", "-c", f"{relay} --connect-vsock 2:7000 --exec 'echo hello-host'"],
                stdin=False,
            )
            stream, peer = listener.accept(timeout=60)
            with stream:
                assert isinstance(stream, socket.socket)
                assert stream.makefile("rb").readline() == b"hello-host\n"
            assert peer >= 1024
            assert proc.wait(timeout=60) == 0
        vm.guest.popen(["sh", "-c", f"{relay} --listen-vsock 5000 --exec cat"], stdin=False)
        wait_until(lambda: _echoes(vm), "the guest relay to listen and echo", 60)


def _echoes(vm: vzkit.VirtualMachine) -> bool:
    try:
        sock = vm.vsock.connect(5000, timeout=10)
    except ConnectionRefusedError:
        return False
    with sock:
        sock.sendall(b"ping\n")
        return sock.makefile("rb").readline() == b"ping\n"


def test_two_clients_at_once_and_eight_vms_on_two_cores(home: Path, tmp_path: Path) -> None:
    """Eight named VMs run at once; on one of them a tree is copied out by one client while
    another runs commands."""
    names = [f"n{i}" for i in range(8)]
    cfg = vzkit.default_guest_config(memory_gb=0.25)
    for name in names:
        vzkit.create(cfg, name, timeout=BOOT_S).close()
    assert [i.name for i in vzkit.list_vms() if i.state is vzkit.VMState.RUNNING] == names
    answers: dict[str, str] = {}

    def ask(name: str) -> None:
        with vzkit.connect(name) as vm:
            vm.guest.wait_ready(timeout=BOOT_S * 2)
            answers[name] = vm.guest.run(["sh", "-c", f"echo {name}"], text=True).stdout.strip()

    threads = [threading.Thread(target=ask, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOOT_S * 3)
    assert answers == {name: name for name in names}

    with vzkit.connect("n0") as writer, vzkit.connect("n0") as reader:
        writer.guest.run(
            ["sh", "-c", "mkdir -p /tmp/t && head -c 20971520 /dev/urandom > /tmp/t/blob"],
            check=True,
        )
        want = writer.guest.run(["sha256sum", "/tmp/t/blob"], text=True).stdout.split()[0]
        copied: list[object] = []
        copy = threading.Thread(
            target=lambda: copied.append(reader.guest.copy_out("/tmp/t", tmp_path / "out"))
        )
        copy.start()
        seen = [writer.guest.run(["echo", str(i)], text=True).stdout for i in range(5)]
        copy.join(120)
        assert seen == [f"{i}\n" for i in range(5)]
        assert copied, "the copy did not finish"
        got = hashlib.sha256((tmp_path / "out" / "blob").read_bytes()).hexdigest()
        assert got == want
    for name in names:
        with vzkit.connect(name) as vm:
            vm.stop(timeout=60)
    assert all(i.state is vzkit.VMState.STOPPED for i in vzkit.list_vms())


def test_snapshots_of_a_named_vm_save_and_restore_through_its_supervisor(
    home: Path, tmp_path: Path
) -> None:
    snaps = vzkit.SnapshotManager(tmp_path / "snaps")
    vzkit.create(vzkit.default_guest_config(), "s1", timeout=BOOT_S).close()
    with vzkit.connect("s1") as vm:
        vm.guest.run(["sh", "-c", "echo before > /tmp/mark"], check=True)
        meta = snaps.save(vm, "warm", timeout=120)
        assert meta.name == "warm"
        assert vm.state is vzkit.VMState.RUNNING  # resumed after the save
        vm.guest.run(["sh", "-c", "echo after > /tmp/mark"], check=True)
        vm.stop(timeout=60)
    supervisor = _info("s1").supervisor_pid
    assert supervisor is None
    # another process restores it: a new supervisor loads the files this one checked
    other = _other_process(
        "import sys, vzkit\n"
        f"snaps = vzkit.SnapshotManager({str(tmp_path / 'snaps')!r})\n"
        "vm = vzkit.connect('s1')\n"
        "snaps.restore(vm, 'warm', timeout=120)\n"
        "print(vm.state.value)\n"
        "vm.resume(timeout=60)\n"
        "print(vm.guest.read_file('/tmp/mark').decode().strip())\n"
        "vm.close()\n"
    )
    assert other.returncode == 0, other.stderr
    assert other.stdout.split() == ["paused", "before"]
    info = _info("s1")
    assert info.state is vzkit.VMState.RUNNING
    assert _alive(info.supervisor_pid)
    with vzkit.connect("s1") as vm:  # the restored VM is an ordinary named VM
        assert vm.guest.run(["cat", "/tmp/mark"], text=True).stdout == "before\n"


def test_a_named_vm_on_a_root_disk_keeps_its_writes_across_stop_and_start(
    home: Path, tmp_path: Path, guest_images: dict[str, GuestImage]
) -> None:
    from tests.e2e.test_root_disks import make_tree

    tree = make_tree(tmp_path / "tree", guest_images["x86_64"])
    vm = vzkit.create(vzkit.default_guest_config(rootfs=tree), "d1", timeout=BOOT_S)
    layer = home / "vms" / "d1" / "root-layer.qcow2"
    vm.guest.run(["/bin/busybox", "sh", "-c", "echo kept > /root/kept; sync"], check=True)
    vm.stop(timeout=60)
    assert layer.is_file()
    assert stat.S_IMODE(layer.stat().st_mode) == 0o600
    vm.start(timeout=BOOT_S)  # a new supervisor, the same layer
    assert vm.guest.read_file("/root/kept") == b"kept\n"
    assert vm.guest.read_file("/etc/marker") == b"from the image\n"
    vm.stop(timeout=60)
    vm.close()
    vzkit.remove_vm("d1")
    assert not layer.exists()


def test_auto_remove_leaves_nothing_once_the_main_command_ends(home: Path) -> None:
    vm = vzkit.create(
        vzkit.default_guest_config(), "a1", timeout=BOOT_S, auto_remove=True,
        command=["sh", "-c", "echo bye"],
    )  # fmt: skip
    assert vm.wait(timeout=BOOT_S) is vzkit.VMState.STOPPED
    vm.close()
    # the supervisor removes the directory after it has said "stopped", on its way out
    wait_until(lambda: not (home / "vms" / "a1").exists(), "a1's directory removed", 30)
    assert vzkit.list_vms() == []


def test_exec_call_runs_a_command_on_this_process_descriptors(home: Path, tmp_path: Path) -> None:
    """``vzkit.exec_call`` (what ``vzkit exec`` runs): the supervisor runs the command and
    copies straight into the caller's descriptors; the caller going away kills it."""
    vm = vzkit.create(vzkit.default_guest_config(), "x1", timeout=BOOT_S)
    vm.guest.wait_ready(timeout=BOOT_S)
    vm.close()
    payload = os.urandom(1 << 20)
    src, out, err = tmp_path / "in", tmp_path / "out", tmp_path / "err"
    src.write_bytes(payload)
    with src.open("rb") as i, out.open("wb") as o, err.open("wb") as e:
        script = "cat; echo oops >&2; exit 3"
        assert vzkit.exec_call("x1", ["sh", "-c", script], stdin=i, stdout=o, stderr=e) == 3
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(payload).digest()
    assert err.read_bytes() == b"oops\n"
    with out.open("wb") as o:
        code = vzkit.exec_call(
            "x1", ["sh", "-c", 'echo "$X $HOME $(id -u) $(pwd)"'], env=["X=y"],
            user="1000:1000", cwd="/tmp", stdout=o,
        )  # fmt: skip
    assert (code, out.read_bytes()) == (0, b"y / 1000 /tmp\n")
    with out.open("wb") as o:
        code = asyncio.run(vzkit.aio.exec_call("x1", ["sh", "-c", "kill -TERM $$"], stdout=o))
    assert code == -signal.SIGTERM
    with pytest.raises(vzkit.GuestError, match="nobody"):
        vzkit.exec_call("x1", ["id"], user="nobody")  # the busybox guest has no passwd entry

    count = ["sh", "-c", "ps | grep -c '[s]leep 4242'"]
    caller = subprocess.Popen(
        [sys.executable, "-c", "import vzkit; vzkit.exec_call('x1', ['sleep', '4242'])"],
        env={**os.environ}, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    with vzkit.connect("x1") as again:
        wait_until(lambda: again.guest.run(count).stdout == b"1\n", "sleep runs", timeout=60)
        caller.kill()  # SIGKILL: only its connection's end tells the supervisor
        caller.wait(timeout=30)
        wait_until(lambda: again.guest.run(count).stdout == b"0\n", "sleep killed", timeout=60)
        assert again.state is vzkit.VMState.RUNNING


def test_a_named_vms_ports_are_forwarded_by_its_supervisor(home: Path) -> None:
    """``run -d -p`` without a NIC: the supervisor's core forwards the port through the agent,
    after the client that made the VM has gone; stopping the VM frees the port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = vzkit.default_guest_config(
        network=vzkit.NetworkConfig(vzkit.NetworkMode.NONE),
        publish=(vzkit.parse_port_spec(f"{port}:8000"),),
    )
    vm = vzkit.create(cfg, "p1", timeout=BOOT_S)
    vm.guest.wait_ready(timeout=BOOT_S)
    vm.guest.run(
        ["sh", "-c", "(while :; do echo hello-from-p1 | nc -l -p 8000; done) >/dev/null 2>&1 &"],
        check=True,
    )
    vm.close()  # the maker goes; the supervisor serves the port

    def greeted() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                return conn.makefile("rb").readline() == b"hello-from-p1\n"
        except OSError:
            return False

    wait_until(greeted, "the published port to reach the guest service", 60)
    with vzkit.connect("p1") as again:
        again.stop(timeout=60)
    with socket.socket() as probe:  # SO_REUSEADDR: a served connection's TIME_WAIT is no listener
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))  # free again: the supervisor closed it
