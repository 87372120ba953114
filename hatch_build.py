"""Build hook (hatchling): every wheel ships vzkit-agent prebuilt for each guest architecture.

The agents are compiled from ``src/vzkit/agent/c`` with zig (``ziglang``, a build requirement
in ``pyproject.toml``) by ``vzkit.image._agent_build.build_shipped_agents`` and land in the
wheel as ``vzkit/agent/bin/vzkit-agent-<arch>`` plus ``manifest.json`` (SHA-256 and agent key
per arch), so an installed vzkit never needs zig. The source tree is not written to. Editable
installs (``pip install -e``) ship nothing: a source checkout builds its agent with zig.

zig's caches go to ``$VZKIT_CACHE_DIR/zig`` (else the user cache, as at run time); they never
change the output, which depends only on the sources, the zig version and the flags.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SHIPPED_PREFIX = "vzkit/agent/bin"


def _load(root: Path, relative: str, name: str) -> ModuleType:
    """A module of the source tree, loaded alone: importing ``vzkit.image`` would pull the
    runtime dependencies, which a build environment does not have."""
    spec = importlib.util.spec_from_file_location(name, root / relative)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {relative} from {root}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class AgentBuildHook(BuildHookInterface):  # type: ignore[type-arg]  # generic in hatchling
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        root = Path(self.root)
        sys.path.insert(0, str(root / "src"))  # for vzkit.errors and vzkit.agent's sources
        try:
            cache = _load(root, "src/vzkit/_cache.py", "_vzkit_build_cache")
            agent_build = _load(root, "src/vzkit/image/_agent_build.py", "_vzkit_build_agent")
            self._out = Path(tempfile.mkdtemp(prefix="vzkit-agents-"))
            built = agent_build.build_shipped_agents(
                self._out, cache_dir=cache.user_cache_dir() / "zig"
            )
        finally:
            sys.path.remove(str(root / "src"))
        for path in built:
            build_data["force_include"][str(path)] = f"{SHIPPED_PREFIX}/{path.name}"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        out = getattr(self, "_out", None)
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
