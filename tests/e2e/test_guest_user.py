"""Commands run as a guest user (``user=``) in the real default guest under QEMU (x86_64, TCG
where there is no KVM): the agent in the guest resolves names against the guest's own
``/etc/passwd`` and ``/etc/group`` (the busybox guest has none until the test writes them)."""

from __future__ import annotations

import pytest

import vzkit
from vzkit.agent import AgentError
from vzkit.image import GuestImage

PASSWD = b"root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\n"
GROUP = b"root:x:0:\nalice:x:1000:\nwheel:x:10:alice\naudio:x:29:bob\n"
WHO = 'id -u; id -g; id -G; echo "$HOME|$USER|$LOGNAME"; touch mine; stat -c %u:%g mine'


@pytest.fixture(autouse=True)
def built_image(guest_images: dict[str, GuestImage]) -> None:
    """The default guest image is built (cached) before the clock of a test starts."""


def test_guest_run_as_a_user_of_the_guests_passwd() -> None:
    with vzkit.start(timeout=120) as vm:
        guest = vm.guest
        # no entries yet: a name is unknown, numeric ids work without one
        with pytest.raises(AgentError, match=r"no user \"alice\" in the guest's /etc/passwd"):
            guest.run(["id"], user="alice")
        bare = guest.run(["sh", "-c", WHO], user="1000:1000", cwd="/tmp", text=True)
        assert bare.stdout.splitlines() == ["1000", "1000", "1000", "/|1000|1000", "1000:1000"]
        guest.write_file("/etc/passwd", PASSWD)
        guest.write_file("/etc/group", GROUP)
        guest.run(["sh", "-c", "mkdir -p /home/alice && chown 1000:1000 /home/alice"], check=True)
        named = guest.run(["sh", "-c", WHO], user="alice", cwd="/home/alice", text=True)
        assert named.returncode == 0, named.stderr
        uid, gid, groups, login, owner = named.stdout.splitlines()
        assert (uid, gid, set(groups.split()), login, owner) == (
            "1000", "1000", {"1000", "10"}, "/home/alice|alice|alice", "1000:1000",
        )  # fmt: skip
        as_group = guest.run(["id", "-G"], user="alice:audio", text=True)
        assert as_group.stdout.split() == ["29"]
        assert guest.run(["id", "-u"], text=True).stdout == "0\n"  # the default: root
