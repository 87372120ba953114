"""``python -m tests.support.tty_cli ARGS``: the ``vzkit`` command line whose VMs' guest is the
host-run agent (:class:`AgentBackend`), so ``vzkit run -t`` can be driven on a real pty in a
unit test without booting anything (``tests/unit/test_cli_tty.py``)."""

from __future__ import annotations

import sys
from typing import Any

import vzkit

from .agent_vm import AgentBackend, host_agent


def main() -> None:
    real = vzkit.VirtualMachine
    backend = AgentBackend(host_agent())

    def machine(config: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["backend"] = backend
        return real(config, *args[1:], **kwargs)

    vzkit.VirtualMachine = machine  # type: ignore[misc, assignment]
    from vzkit.cli import main as cli

    cli(sys.argv[1:], prog_name="vzkit")


if __name__ == "__main__":
    main()
