"""``python -m tests.support.named_cli ARGS``: the ``vzkit`` command line with one running
named VM, ``t1``, whose guest is the host-run agent (:mod:`.named_fake`), so ``vzkit exec -t``
and ``vzkit shell`` can be driven on a real pty in a unit test (``tests/unit/test_cli_vms.py``).
``$VZKIT_HOME`` is where its files go."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import vzkit

from .named_fake import Named, install


def main() -> None:
    home = Path(os.environ["VZKIT_HOME"])
    kernel = home / "vmlinuz"
    kernel.write_bytes(b"k")
    named = Named(home)
    install(named)
    named.create(vzkit.LinuxVMConfig(kernel_path=kernel), "t1")
    from vzkit.cli import main as cli

    try:
        cli(sys.argv[1:], prog_name="vzkit")
    finally:
        named.close()


if __name__ == "__main__":
    main()
