"""OCI images made with umoci (a real tool vzkit did not write), read back from their layout.

:func:`umoci_image` makes a two-layer image: ``base`` fills the first layer's rootfs, ``top``
changes an unpacked copy of it (a deleted file becomes a whiteout in the second layer).
:func:`layout_image` reads an image layout's only manifest into what the OCI store converts.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import IO

from vzkit.image.oci._store import OciLayer, PulledLayers


def _umoci(*args: str | Path) -> None:
    subprocess.run(["umoci", *map(str, args)], check=True, capture_output=True)


def umoci_image(
    work: Path, base: Callable[[Path], None], top: Callable[[Path], None], tag: str = "t"
) -> Path:
    """A layout in ``work/layout`` with ``tag``: layer 1 what ``base(rootfs)`` wrote, layer 2
    what ``top(rootfs)`` changed (unpacked again, so umoci diffs against layer 1)."""
    layout = work / "layout"
    _umoci("init", "--layout", layout)
    _umoci("new", "--image", f"{layout}:{tag}")
    for step, change in enumerate((base, top)):
        bundle = work / f"bundle{step}"
        _umoci("unpack", "--rootless", "--image", f"{layout}:{tag}", bundle)
        change(bundle / "rootfs")
        _umoci("repack", "--image", f"{layout}:{tag}", bundle)
    return layout


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / digest.replace(":", "/")


def _opener(path: Path) -> Callable[[], IO[bytes]]:
    return lambda: path.open("rb")


def layout_image(layout: Path, refs: tuple[str, ...] = ()) -> PulledLayers:
    """The layout's only image as the OCI store's input (blobs read from the layout)."""
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    manifest = json.loads(blob_path(layout, entry["digest"]).read_text())
    config_digest = manifest["config"]["digest"]
    layers = [OciLayer(d["digest"], d["mediaType"], _opener(blob_path(layout, d["digest"])))
              for d in manifest["layers"]]  # fmt: skip
    return PulledLayers(
        config_digest=config_digest,
        config=json.loads(blob_path(layout, config_digest).read_text()),
        layers=layers,
        manifest_digest=entry["digest"],
        refs=refs,
    )
