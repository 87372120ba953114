"""A real registry for tests, and images made with real tools to put in it.

:func:`local_registry` runs Debian's ``docker-registry`` (the CNCF distribution registry,
``/usr/bin/docker-registry serve CONFIG``) on 127.0.0.1 on a port the kernel picks, storing
in a temporary directory, optionally behind htpasswd Basic auth (``htpasswd -Bbn``). It owns
the process: it waits until ``/v2/`` answers, and at the end stops it (SIGTERM, then SIGKILL),
reaps it and removes the directory.

Images are made with ``umoci`` (:func:`umoci_image`) in an OCI layout, with a hand-written
image index over several of them for a multi-arch image (:func:`add_index`; umoci makes
no indexes), and pushed with ``skopeo copy`` (:meth:`LocalRegistry.push`). Nothing reaches
the network beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from vzkit._process import PREEXEC

REGISTRY = "/usr/bin/docker-registry"
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")

CONFIG = """\
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}/data
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:0
  secret: vzkit-test-secret
{auth}"""

AUTH = """\
auth:
  htpasswd:
    realm: vzkit-test
    path: {root}/htpasswd
"""


@dataclass(frozen=True)
class LocalRegistry:
    host: str  # 127.0.0.1:PORT
    root: Path
    log: Path
    user: str | None = None
    password: str | None = None

    def push(self, source: str, dest: str, *, all_images: bool = False) -> None:
        """``skopeo copy SOURCE docker://HOST/DEST`` (``--all`` for a whole index)."""
        argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
        if self.user is not None:
            argv += ["--dest-creds", f"{self.user}:{self.password}"]
        if all_images:
            argv.append("--all")
        run([*argv, source, f"docker://{self.host}/{dest}"])

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def run(argv: list[str]) -> str:
    """Run a tool; its output, or an AssertionError that shows what it said."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{argv} failed ({done.returncode}): {done.stderr}"
    return done.stdout


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError as err:
        err.close()
        return err.code == 401  # up, and wanting credentials
    except OSError:
        return False


@contextlib.contextmanager
def local_registry(
    *, user: str | None = None, password: str | None = None, timeout: float = 30.0
) -> Iterator[LocalRegistry]:
    """A running registry; Basic auth with ``user``/``password`` when given."""
    root = Path(tempfile.mkdtemp(prefix="vzkit-registry-"))
    try:
        auth = ""
        if user is not None:
            line = run(["htpasswd", "-Bbn", user, password or ""])
            (root / "htpasswd").write_text(line)
            auth = AUTH.format(root=root)
        config = root / "config.yml"
        config.write_text(CONFIG.format(root=root, auth=auth))
        log = root / "registry.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [REGISTRY, "serve", str(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=PREEXEC,
            )  # fmt: skip
        try:
            host = _wait_until_up(proc, log, timeout)
            yield LocalRegistry(host=host, root=root, log=log, user=user, password=password)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(root)


def _wait_until_up(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    """The registry's ``127.0.0.1:PORT`` once ``/v2/`` answers there."""
    deadline = time.monotonic() + timeout
    host = None
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"docker-registry exited ({proc.returncode}): {log.read_text()}")
        if host is None:
            found = _LISTENING.search(log.read_text(errors="replace"))
            host = f"127.0.0.1:{found.group(1)}" if found else None
        if host is not None and _answers(f"http://{host}/v2/"):
            return host
        if time.monotonic() > deadline:
            raise AssertionError(
                f"docker-registry did not answer in {timeout} s: {log.read_text()}"
            )
        time.sleep(0.05)  # poll interval while the registry starts


def umoci_image(
    layout: Path,
    tag: str,
    files: Mapping[str, bytes],
    *,
    arch: str = "amd64",
    env: Mapping[str, str] | None = None,
) -> None:
    """An image ``layout:tag`` made by umoci: one layer holding ``files`` (guest paths), a
    config for linux/``arch`` (with ``env``)."""
    if not (layout / "index.json").exists():
        run(["umoci", "init", "--layout", str(layout)])
    image = f"{layout}:{tag}"
    run(["umoci", "new", "--image", image])
    with tempfile.TemporaryDirectory(prefix="vzkit-umoci-") as tmp:
        tree = Path(tmp)
        for name, data in files.items():
            path = tree / name.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        run(["umoci", "insert", "--rootless", "--image", image, str(tree), "/"])
    argv = ["umoci", "config", "--image", image, "--os", "linux", "--architecture", arch]
    for key, value in (env or {}).items():
        argv += ["--config.env", f"{key}={value}"]
    run(argv)


def layout_manifest(layout: Path, tag: str) -> dict[str, object]:
    """The descriptor of ``tag`` in the layout's ``index.json``."""
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return dict(entry)
    raise KeyError(tag)


def layout_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def add_index(layout: Path, tag: str, platforms: Mapping[str, Mapping[str, str]]) -> str:
    """An OCI image index ``layout:tag`` over the layout's images ``platforms`` names (tag ->
    ``{"architecture": ..., "os": ...}``); its digest."""
    manifests = []
    for name, platform in platforms.items():
        entry = layout_manifest(layout, name)
        entry.pop("annotations", None)
        manifests.append({**entry, "platform": dict(platform)})
    body = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }).encode()  # fmt: skip
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(body)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"].append({
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": digest,
        "size": len(body),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    })  # fmt: skip
    (layout / "index.json").write_text(json.dumps(index))
    return digest
