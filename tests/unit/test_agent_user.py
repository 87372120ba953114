"""Commands run as another user (``user="USER[:GROUP]"``, protocol 2.1) by the real agent.

The agent runs on the host, so the host is the guest: names resolve against this machine's
``/etc/passwd`` and ``/etc/group``, and what a command should see comes from Python's
:mod:`pwd` and :mod:`grp`. A second agent runs in a mount namespace whose ``/etc/passwd`` and
``/etc/group`` are the test's own files (a user with supplementary groups, an empty home).
Changing users needs root, as the agent has in a guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import grp
import os
import platform
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vzkit
import vzkit.aio
from vzkit.agent import AgentClient, AgentError, _connection
from vzkit.errors import SpecError

from ..support.agent_vm import AgentBackend, host_agent

pytestmark = [
    pytest.mark.skipif(
        sys.platform != "linux" or platform.machine() != "x86_64",
        reason="runs the x86_64 Linux agent binary on the host",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="the agent changes users only as root"),
]

#: What a command tells about who it runs as: uid, gid, every group, the login variables.
WHO = 'id -u; id -g; id -G; echo "$HOME|$USER|$LOGNAME"'
#: The agent's own environment: root's, which a command run as a user must not keep.
AGENT_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/root", "USER": "root", "LOGNAME": "root"}


@dataclasses.dataclass(frozen=True)
class Who:
    uid: int
    gid: int
    groups: frozenset[int]
    login: str  # "HOME|USER|LOGNAME"


def who(client: AgentClient, user: str | None, **kwargs: Any) -> Who:
    done = client.run(["sh", "-c", WHO], user=user, text=True, **kwargs)
    assert done.returncode == 0, done.stderr
    uid, gid, groups, login = done.stdout.splitlines()
    return Who(int(uid), int(gid), frozenset(map(int, groups.split())), login)


def expected(name: str) -> Who:
    entry = pwd.getpwnam(name)
    groups = frozenset(os.getgrouplist(name, entry.pw_gid))
    return Who(entry.pw_uid, entry.pw_gid, groups, f"{entry.pw_dir}|{name}|{name}")


@pytest.fixture(scope="module")
def agent() -> Path:
    return host_agent()


@contextlib.contextmanager
def serving(argv: list[str], **popen: Any) -> Iterator[AgentClient]:
    """An agent client over ``argv`` (which ends up running ``serve --stdio``)."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(argv, stdin=theirs, stdout=theirs, env=AGENT_ENV, **popen)
    theirs.close()
    try:
        with AgentClient(ours, timeout=10) as client:
            yield client
    finally:
        ours.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)  # the stdio session is over: the agent exits by itself
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(agent: Path) -> Iterator[AgentClient]:
    with serving([str(agent), "serve", "--stdio"]) as c:
        assert c.protocol_version == (2, 3)
        yield c


def _unused_uid() -> int:
    uid = 54321
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


# ---- the host's users ---------------------------------------------------------------------------


def test_without_a_user_the_command_runs_as_the_agent_root(client: AgentClient) -> None:
    assert who(client, None) == Who(0, 0, frozenset({0}), "/root|root|root")


@pytest.mark.parametrize("name", ["nobody", "daemon"])
def test_a_named_user_runs_with_its_ids_groups_and_home(client: AgentClient, name: str) -> None:
    assert who(client, name) == expected(name)


def test_numeric_ids_run_with_the_entry_they_have(client: AgentClient) -> None:
    nobody = pwd.getpwnam("nobody")
    spec = f"{nobody.pw_uid}:{nobody.pw_gid}"
    login = f"{nobody.pw_dir}|nobody|nobody"
    assert who(client, spec) == Who(nobody.pw_uid, nobody.pw_gid, frozenset({nobody.pw_gid}), login)
    # a uid alone takes its entry's group and supplementary groups, as the name would
    assert who(client, str(nobody.pw_uid)) == expected("nobody")


def test_a_uid_without_an_entry_runs_with_group_0_and_home_slash(client: AgentClient) -> None:
    uid = _unused_uid()
    assert who(client, str(uid)) == Who(uid, 0, frozenset({0}), f"/|{uid}|{uid}")
    gid = grp.getgrnam("nogroup").gr_gid if _has_group("nogroup") else 65534
    assert who(client, f"{uid}:{gid}") == Who(uid, gid, frozenset({gid}), f"/|{uid}|{uid}")


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_a_group_name_replaces_the_users_groups(client: AgentClient) -> None:
    daemon = pwd.getpwnam("daemon")
    other = grp.getgrgid(pwd.getpwnam("nobody").pw_gid)
    got = who(client, f"daemon:{other.gr_name}")
    assert got == Who(daemon.pw_uid, other.gr_gid, frozenset({other.gr_gid}), got.login)
    assert got.login == f"{daemon.pw_dir}|daemon|daemon"


def test_the_requests_env_wins_over_the_entry(client: AgentClient) -> None:
    replaced = who(client, "nobody", env={"PATH": "/usr/bin:/bin", "HOME": "/elsewhere"})
    assert replaced.login == "/elsewhere|nobody|nobody"  # USER and LOGNAME still the entry's
    plain = who(client, "nobody", env={"PATH": "/usr/bin:/bin"})  # a replaced env gets them too
    assert plain.login == expected("nobody").login


def test_the_working_directory_is_entered_and_files_are_made_as_the_user(
    client: AgentClient,
) -> None:
    nobody = pwd.getpwnam("nobody")
    work = Path(tempfile.mkdtemp(prefix="vzkit-user-", dir="/tmp"))  # 0700, root's
    try:
        denied = client.run(["touch", "made"], cwd=work, user="nobody")
        assert denied.returncode == 126  # chdir after the user change: as nobody, refused
        assert denied.stderr == f"vzkit-agent: chdir {work}: Permission denied\n".encode()
        os.chown(work, nobody.pw_uid, nobody.pw_gid)
        made = client.run(["touch", "made"], cwd=work, user="nobody")
        assert made.returncode == 0, made.stderr
        info = (work / "made").stat()
        assert (info.st_uid, info.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    finally:
        shutil.rmtree(work)


def test_popen_runs_as_the_user_too(client: AgentClient) -> None:
    with client.popen(["id", "-u"], user="daemon", stdin=False) as proc:
        out, _ = proc.communicate()
    assert out.decode().strip() == str(pwd.getpwnam("daemon").pw_uid)


# ---- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "what"),
    [
        ("no-such-user", 'no user "no-such-user" in the guest\'s /etc/passwd: add it there, '
         "or give a numeric uid"),
        ("nobody:no-such-group", 'no group "no-such-group" in the guest\'s /etc/group: add it '
         "there, or give a numeric gid"),
    ],
)  # fmt: skip
def test_an_unknown_name_fails_the_request_saying_what_to_do(
    client: AgentClient, user: str, what: str
) -> None:
    marker = Path(tempfile.gettempdir()) / f"vzkit-user-ran-{os.getpid()}"
    with pytest.raises(AgentError) as info:
        client.run(["touch", str(marker)], user=user)
    assert str(info.value) == f"exec touch: {what}"
    assert info.value.errno == errno.ENOENT
    assert not marker.exists(), "nothing ran"
    assert client.run(["true"]).returncode == 0  # the session goes on


@pytest.mark.parametrize("user", ["", ":", ":0", "nobody:", "a:b:c", " nobody", "no body", "x\0"])
def test_a_malformed_spec_is_refused_before_anything_is_sent(
    client: AgentClient, user: str
) -> None:
    with pytest.raises(SpecError, match="user must be USER or USER:GROUP"):
        client.run(["true"], user=user)
    with pytest.raises(vzkit.ArgumentError, match="user must be a str"):
        client.run(["true"], user=1000)  # type: ignore[arg-type]


def test_the_agent_refuses_a_malformed_spec_on_its_own(
    client: AgentClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_connection, "user_spec", lambda user: user.encode())  # no host check
    for spec in (":0", "nobody:", "a:b:c"):
        with pytest.raises(AgentError, match="is not USER or USER:GROUP") as info:
            client.run(["true"], user=spec)
        assert info.value.errno == errno.EINVAL


def test_an_agent_older_than_2_1_is_refused_before_the_request(client: AgentClient) -> None:
    conn = client._c
    hello = conn.hello
    conn.hello = dataclasses.replace(hello, minor=0)
    try:
        with pytest.raises(AgentError, match=r"protocol 2\.0\) cannot run commands as another"):
            client.run(["true"], user="nobody")
        assert client.run(["true"]).returncode == 0  # without user= it still works
    finally:
        conn.hello = hello


def test_an_agent_that_is_not_root_refuses_to_change_users(agent: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    where = Path(tempfile.mkdtemp(prefix="vzkit-user-", dir="/tmp"))  # nobody can run it there
    try:
        where.chmod(0o755)
        copy = shutil.copy(agent, where / "vzkit-agent")
        as_nobody = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        with serving([copy, "serve", "--stdio"], **as_nobody) as client:
            with pytest.raises(AgentError, match=f"runs as uid {nobody.pw_uid}, not root") as info:
                client.run(["true"], user="daemon")
            assert info.value.errno == errno.EPERM
            assert client.run(["id", "-u"]).stdout == f"{nobody.pw_uid}\n".encode()
    finally:
        shutil.rmtree(where)


# ---- a passwd and group of the test's own --------------------------------------------------------

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
alice:x:4242:4242:Alice:/home/alice:/bin/sh
homeless:x:4343:4343:No home::/bin/sh
"""
GROUP = """\
root:x:0:
alice:x:4242:
homeless:x:4343:
staff:x:50:bob,alice
audio:x:29:alice
video:x:44:bob
"""


@pytest.fixture(scope="module")
def own_users(agent: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentClient]:
    """An agent whose /etc/passwd and /etc/group are PASSWD and GROUP (bind-mounted over the
    host's in a mount namespace of its own)."""
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed"
    etc = tmp_path_factory.mktemp("etc")
    (etc / "passwd").write_text(PASSWD)
    (etc / "group").write_text(GROUP)
    script = (
        'mount --bind "$1/passwd" /etc/passwd && mount --bind "$1/group" /etc/group && '
        'exec "$2" serve --stdio'
    )
    argv = [unshare, "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    with serving([*argv, str(etc), str(agent)]) as client:
        yield client


def test_a_user_gets_its_supplementary_groups(own_users: AgentClient) -> None:
    alice = Who(4242, 4242, frozenset({4242, 50, 29}), "/home/alice|alice|alice")
    assert who(own_users, "alice") == alice
    assert who(own_users, "4242") == alice


def test_user_colon_group_has_only_that_group(own_users: AgentClient) -> None:
    login = "/home/alice|alice|alice"
    assert who(own_users, "alice:staff") == Who(4242, 50, frozenset({50}), login)
    assert who(own_users, "alice:video") == Who(4242, 44, frozenset({44}), login)  # not hers
    assert who(own_users, "alice:7") == Who(4242, 7, frozenset({7}), login)


def test_an_entry_without_a_home_gets_home_slash(own_users: AgentClient) -> None:
    assert who(own_users, "homeless") == Who(4343, 4343, frozenset({4343}), "/|homeless|homeless")


# ---- every API passes user= on -----------------------------------------------------------------


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"k")
    return path


def test_user_through_the_blocking_apis(agent: Path, kernel: Path) -> None:
    backend = AgentBackend(agent)
    daemon = str(pwd.getpwnam("daemon").pw_uid)
    done = vzkit.run(["id", "-u"], user="daemon", text=True, backend=backend, kernel_path=kernel)
    assert done.stdout.strip() == daemon
    with pytest.raises(SpecError):
        vzkit.run(["id"], user="a:b:c", backend=backend, kernel_path=kernel)
    assert len(backend.machines) == 1  # refused before a VM was made
    with vzkit.start(backend=backend, kernel_path=kernel) as vm:
        assert vm.guest.run(["id", "-u"], user="daemon", text=True).stdout.strip() == daemon
        with vm.guest.popen(["id", "-u"], user="daemon", stdin=False) as proc:
            assert proc.communicate()[0].decode().strip() == daemon
        with pytest.raises(AgentError, match="no user"):
            vm.guest.run(["id"], user="no-such-user")


def test_user_through_the_asyncio_apis(agent: Path, kernel: Path) -> None:
    backend = AgentBackend(agent)
    daemon = str(pwd.getpwnam("daemon").pw_uid)

    async def main() -> list[str]:
        done = await vzkit.aio.run(
            ["id", "-u"], user="daemon", text=True, backend=backend, kernel_path=kernel
        )
        async with vzkit.aio.start(backend=backend, kernel_path=kernel) as vm:
            ran = await vm.guest.run(["id", "-u"], user="daemon", text=True)
            proc = await vm.guest.popen(["id", "-u"], user="daemon", stdin=False)
            out, _ = await proc.communicate()
        return [done.stdout.strip(), ran.stdout.strip(), out.decode().strip()]

    assert asyncio.run(main()) == [daemon] * 3
