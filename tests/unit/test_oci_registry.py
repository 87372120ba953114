"""The registry client against an in-test registry on 127.0.0.1 (``http.server``).

The fake speaks the parts of the distribution spec the client uses: manifests, blobs with
``Range``, error bodies, Basic auth and a Bearer token endpoint; each test scripts the faults
it needs (429 with Retry-After, 5xx, a blob cut off midway, a blob that does not match its
digest, a redirect to another server). Waits between retries go to a list, not to sleep.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vzkit.errors import SpecError
from vzkit.image._download import ChecksumError
from vzkit.image.oci import _registry
from vzkit.image.oci._auth import check_transport, parse_challenge
from vzkit.image.oci._credentials import CredentialStore
from vzkit.image.oci._errors import RegistryAuthError, RegistryError
from vzkit.image.oci._registry import MANIFEST_MEDIA_TYPES, RegistryClient, registry_endpoint

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class FakeRegistry:
    """What the in-test registry holds and how it misbehaves."""

    port: int = 0
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    script: list[Reply] = field(default_factory=list)
    """Replies sent, in order, before any request is served normally."""
    auth: str | None = None  # None, "basic" or "bearer"
    users: dict[str, str] = field(default_factory=dict)
    token: str = "token-1"
    token_needs_user: bool = False
    cut_blob_at: int | None = None  # the next blob response stops after this many bytes
    ignore_range: bool = False
    redirect_blobs_to: str | None = None
    served_digest: dict[str, str] = field(default_factory=dict)  # a lying Docker-Content-Digest
    barrier: threading.Barrier | None = None  # blob responses wait for each other

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def push(self, repo: str, tag: str, body: bytes, media_type: str = OCI_MANIFEST) -> str:
        digest = digest_of(body)
        self.manifests[(repo, tag)] = self.manifests[(repo, digest)] = (body, media_type)
        return digest

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


class _Handler(http.server.BaseHTTPRequestHandler):
    fake: FakeRegistry

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        fake = self.fake
        fake.requests.append((self.path, dict(self.headers.items())))
        if fake.script:
            reply = fake.script.pop(0)
            return self._send(reply.status, reply.body, reply.headers)
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/token":
            return self._token()
        if not self._authorized():
            return None
        parts = url.path.split("/")
        if len(parts) >= 5 and parts[1] == "v2" and parts[-2] == "manifests":
            return self._manifest("/".join(parts[2:-2]), parts[-1])
        if len(parts) >= 5 and parts[1] == "v2" and parts[-2] == "blobs":
            return self._blob(parts[-1])
        self._error(404, "NAME_UNKNOWN", "repository name not known to registry")
        return None

    def _user_ok(self) -> bool:
        given = self.headers.get("Authorization", "")
        if not given.startswith("Basic "):
            return False
        user, _, password = base64.b64decode(given[6:]).decode().partition(":")
        return self.fake.users.get(user) == password

    def _authorized(self) -> bool:
        fake = self.fake
        if fake.auth == "basic" and not self._user_ok():
            self._error(401, "UNAUTHORIZED", "authentication required",
                        {"WWW-Authenticate": 'Basic realm="fake"'})  # fmt: skip
            return False
        if fake.auth == "bearer" and self.headers.get("Authorization") != f"Bearer {fake.token}":
            challenge = (
                f'Bearer realm="http://{fake.host}/token",service="x",scope="repository:r:pull"'
            )
            self._error(401, "UNAUTHORIZED", "authentication required",
                        {"WWW-Authenticate": challenge})  # fmt: skip
            return False
        return True

    def _token(self) -> None:
        if self.fake.token_needs_user and not self._user_ok():
            return self._error(401, "UNAUTHORIZED", "bad credentials")
        self._send(200, json.dumps({"token": self.fake.token, "expires_in": 60}).encode())
        return None

    def _manifest(self, repo: str, ref: str) -> None:
        if (repo, ref) not in self.fake.manifests:
            return self._error(404, "MANIFEST_UNKNOWN", "manifest unknown")
        body, media_type = self.fake.manifests[(repo, ref)]
        digest = self.fake.served_digest.get(ref, digest_of(body))
        self._send(200, body, {"Content-Type": media_type, "Docker-Content-Digest": digest})
        return None

    def _blob(self, digest: str) -> None:
        fake = self.fake
        if fake.redirect_blobs_to:
            return self._send(307, b"", {"Location": fake.redirect_blobs_to + self.path})
        if digest not in fake.blobs:
            return self._error(404, "BLOB_UNKNOWN", "blob unknown to registry")
        if fake.barrier is not None:
            fake.barrier.wait(timeout=10)
        data = fake.blobs[digest]
        start = 0
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes=") and not fake.ignore_range:
            start = int(ranged[6:].rstrip("-"))
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        body = data[start:]
        if fake.cut_blob_at is not None:
            body, fake.cut_blob_at = body[: fake.cut_blob_at], None
        self.wfile.write(body)
        return None

    def _error(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def serve() -> Iterator[type[FakeRegistry]]:
    """Starts fake registries on 127.0.0.1 (as many as a test wants); stops them after."""
    servers: list[http.server.ThreadingHTTPServer] = []
    threads: list[threading.Thread] = []

    def start(**kwargs: object) -> FakeRegistry:
        fake = FakeRegistry(**kwargs)  # type: ignore[arg-type]
        handler = type("Handler", (_Handler,), {"fake": fake})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        fake.port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
        thread.start()
        servers.append(server)
        threads.append(thread)
        return fake

    yield start  # type: ignore[misc]
    for server in servers:
        server.shutdown()
        server.server_close()
    for thread in threads:
        thread.join()


@pytest.fixture
def fake(serve: type[FakeRegistry]) -> FakeRegistry:
    return serve()


@dataclass
class Sleeps:
    waits: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def client(fake: FakeRegistry, sleeps: Sleeps | None = None, **kwargs: object) -> RegistryClient:
    kwargs.setdefault("credentials", CredentialStore(files=[]))
    return RegistryClient(
        fake.host, insecure=True, retries=2, backoff_s=0.01,
        sleep=sleeps if sleeps is not None else Sleeps(), **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


# -- manifests ------------------------------------------------------------------------------


def test_manifest_by_tag_and_by_digest(fake: FakeRegistry) -> None:
    body = b'{"schemaVersion": 2}'
    digest = fake.push("library/deb", "1", body)
    reg = client(fake)
    assert reg.get_manifest("library/deb", "1") == (body, OCI_MANIFEST, digest)
    assert reg.get_manifest("library/deb", digest) == (body, OCI_MANIFEST, digest)
    accept = fake.requests[0][1]["Accept"]
    assert [t.strip() for t in accept.split(",")] == list(MANIFEST_MEDIA_TYPES)
    assert fake.paths() == ["/v2/library/deb/manifests/1", f"/v2/library/deb/manifests/{digest}"]


def test_manifest_that_does_not_match_the_digest_asked_for(fake: FakeRegistry) -> None:
    digest = fake.push("r", "1", b'{"a": 1}')
    fake.manifests[("r", digest)] = (b'{"a": 2}', OCI_MANIFEST)  # altered on the way
    fake.served_digest[digest] = digest
    with pytest.raises(ChecksumError, match=f"not the {digest} asked for"):
        client(fake).get_manifest("r", digest)


def test_manifest_whose_announced_digest_is_wrong(fake: FakeRegistry) -> None:
    fake.push("r", "1", b"{}")
    fake.served_digest["1"] = "sha256:" + "0" * 64
    with pytest.raises(ChecksumError, match="sent; the registry or something between"):
        client(fake).get_manifest("r", "1")


def test_manifest_media_type_from_the_body_when_the_header_is_generic(
    fake: FakeRegistry,
) -> None:
    body = json.dumps({"mediaType": MANIFEST_MEDIA_TYPES[2]}).encode()
    fake.push("r", "1", body, media_type="application/json")
    assert client(fake).get_manifest("r", "1")[1] == MANIFEST_MEDIA_TYPES[2]


def test_manifest_size_is_bounded(fake: FakeRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "MANIFEST_LIMIT", 100)
    fake.push("r", "1", b"{" + b" " * 200 + b"}")
    with pytest.raises(RegistryError, match="larger than 100 bytes"):
        client(fake).get_manifest("r", "1")


def test_404_names_the_registry_code_and_what_to_do(fake: FakeRegistry) -> None:
    with pytest.raises(RegistryError) as caught:
        client(fake).get_manifest("library/nothing", "1")
    err = caught.value
    assert (err.status, err.code) == (404, "MANIFEST_UNKNOWN")
    assert str(err) == (
        f"{fake.host}/library/nothing: no such manifest (MANIFEST_UNKNOWN: manifest unknown, "
        f"HTTP 404 for http://{fake.host}/v2/library/nothing/manifests/1); check the "
        f"repository name and tag (`skopeo list-tags docker://{fake.host}/library/nothing` "
        "lists the tags)"
    )


@pytest.mark.parametrize(
    ("repo", "ref"),
    [("Library/x", "1"), ("../x", "1"), ("x", "a/b"), ("x", "sha256:abc"), ("x", "-x")],
)
def test_bad_names_are_refused_before_any_request(fake: FakeRegistry, repo: str, ref: str) -> None:
    with pytest.raises(SpecError):
        client(fake).get_manifest(repo, ref)
    assert fake.requests == []


# -- retries --------------------------------------------------------------------------------


def test_429_waits_as_retry_after_says_then_succeeds(fake: FakeRegistry) -> None:
    fake.push("r", "1", b"{}")
    fake.script = [Reply(429, {"Retry-After": "7"}), Reply(429, {"Retry-After": "2"})]
    sleeps = Sleeps()
    reg = client(fake, sleeps, max_wait_s=5.0)
    assert reg.get_manifest("r", "1")[0] == b"{}"
    assert sleeps.waits == [5.0, 2.0]  # the first bounded by max_wait_s
    assert len(fake.requests) == 3


def test_5xx_is_retried_with_backoff_then_a_clear_error(fake: FakeRegistry) -> None:
    fake.script = [Reply(503, body=b"busy")] * 3
    sleeps = Sleeps()
    with pytest.raises(RegistryError) as caught:
        client(fake, sleeps).get_manifest("r", "1")
    assert caught.value.status == 503
    assert str(caught.value) == (
        f"http://{fake.host}/v2/r/manifests/1: HTTP 503 (busy) after 3 attempts; "
        "it is failing or overloaded: try again later"
    )
    assert sleeps.waits == [0.01, 0.02]
    assert len(fake.requests) == 3


def test_5xx_then_success(fake: FakeRegistry) -> None:
    fake.push("r", "1", b"{}")
    fake.script = [Reply(502), Reply(500)]
    assert client(fake).get_manifest("r", "1")[0] == b"{}"


def test_unreachable_registry_is_retried_then_named(fake: FakeRegistry) -> None:
    import socket

    with socket.socket() as sock:  # a port on which nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sleeps = Sleeps()
    reg = RegistryClient(f"127.0.0.1:{port}", insecure=True, retries=1, backoff_s=0.01,
                         sleep=sleeps, credentials=CredentialStore(files=[]))  # fmt: skip
    with pytest.raises(RegistryError, match=r"cannot reach the registry 127\.0\.0\.1:\d+ .*"
                       "Connection refused.*check the host name and port"):  # fmt: skip
        reg.get_manifest("r", "1")
    assert sleeps.waits == [0.01]


# -- auth -----------------------------------------------------------------------------------


def test_bearer_token_flow_anonymous_and_cached(fake: FakeRegistry) -> None:
    fake.auth = "bearer"
    fake.push("r", "1", b"{}")
    reg = client(fake)
    reg.get_manifest("r", "1")
    reg.get_manifest("r", "1")
    assert fake.paths() == [
        "/v2/r/manifests/1",
        "/token?service=x&scope=repository%3Ar%3Apull",
        "/v2/r/manifests/1",
        "/v2/r/manifests/1",  # the token is reused
    ]
    assert "Authorization" not in fake.requests[1][1]  # anonymous: no credentials found
    assert fake.requests[3][1]["Authorization"] == "Bearer token-1"


def test_bearer_token_with_credentials_and_renewed_when_it_expires(fake: FakeRegistry) -> None:
    fake.auth, fake.token_needs_user, fake.users = "bearer", True, {"u": "p w"}
    fake.push("r", "1", b"{}")
    reg = client(fake, credentials=CredentialStore(files=[], explicit={fake.host: ("u", "p w")}))
    reg.get_manifest("r", "1")
    token_request = fake.requests[1][1]
    assert token_request["Authorization"] == "Basic " + base64.b64encode(b"u:p w").decode()
    fake.token = "token-2"  # the first one expired
    reg.get_manifest("r", "1")
    assert fake.paths()[3:] == [
        "/v2/r/manifests/1",
        "/token?service=x&scope=repository%3Ar%3Apull",
        "/v2/r/manifests/1",
    ]


def test_token_service_refusing_the_credentials(fake: FakeRegistry) -> None:
    fake.auth, fake.token_needs_user, fake.users = "bearer", True, {"u": "p"}
    reg = client(fake, credentials=CredentialStore(files=[], explicit={fake.host: ("u", "x")}))
    with pytest.raises(RegistryAuthError, match=r"the token service at .*/token\?.* refused: "
                       "UNAUTHORIZED: bad credentials.*'u' from the given credentials are "
                       "refused"):  # fmt: skip
        reg.get_manifest("r", "1")


def test_token_realm_over_plain_http_elsewhere_is_refused(fake: FakeRegistry) -> None:
    fake.script = [Reply(401, {"WWW-Authenticate": 'Bearer realm="http://192.0.2.1/token"'})]
    with pytest.raises(RegistryError, match=r"refusing plain HTTP to 192\.0\.2\.1"):
        client(fake).get_manifest("r", "1")
    assert len(fake.requests) == 1  # nothing was sent to the other host


def test_basic_auth(fake: FakeRegistry) -> None:
    fake.auth, fake.users = "basic", {"u": "p"}
    fake.push("r", "1", b"{}")
    reg = client(fake, credentials=CredentialStore(files=[], explicit={fake.host: ("u", "p")}))
    reg.get_manifest("r", "1")
    reg.get_manifest("r", "1")
    assert [h.get("Authorization", "-")[:6] for _, h in fake.requests] == [
        "-", "Basic ", "Basic ",  # challenged once, then sent from the start
    ]  # fmt: skip


def test_401_without_credentials_says_where_they_are_read_from(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    fake.auth = "basic"
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    with pytest.raises(RegistryAuthError) as caught:
        client(fake, credentials=CredentialStore(env=env)).get_manifest("r", "1")
    assert caught.value.status == 401
    assert str(caught.value).startswith(
        f"{fake.host}/r: the registry wants credentials and none were found for {fake.host} "
        f"in $REGISTRY_AUTH_FILE, {tmp_path}/run/containers/auth.json, "
        f"{tmp_path}/.docker/config.json; log in with `skopeo login {fake.host}`"
    )


def test_wrong_credentials_are_refused_naming_their_source(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    fake.auth, fake.users = "basic", {"u": "p"}
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {fake.host: {"auth": base64.b64encode(b"u:x").decode()}}}))
    with pytest.raises(RegistryAuthError, match=f"'u' from {auth} .* are refused"):
        client(fake, credentials=CredentialStore(files=[auth])).get_manifest("r", "1")


def test_401_without_a_challenge_is_basic_auth(fake: FakeRegistry) -> None:
    fake.script = [Reply(401), Reply(401)]
    with pytest.raises(RegistryAuthError, match="wants credentials and none were found"):
        client(fake).get_manifest("r", "1")
    reg = client(fake, credentials=CredentialStore(files=[], explicit={fake.host: ("u", "p")}))
    fake.push("r", "1", b"{}")
    assert reg.get_manifest("r", "1")[0] == b"{}"
    assert fake.requests[-1][1]["Authorization"] == "Basic " + base64.b64encode(b"u:p").decode()


def test_403_is_an_auth_error(fake: FakeRegistry) -> None:
    fake.script = [Reply(403, body=b'{"errors":[{"code":"DENIED","message":"no"}]}')]
    with pytest.raises(RegistryAuthError) as caught:
        client(fake).get_manifest("r", "1")
    assert (caught.value.status, caught.value.code) == (403, "DENIED")


def test_parse_challenge_keeps_commas_inside_quotes() -> None:
    challenge = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg",'
        'scope="repository:a/b:pull,push",error="insufficient_scope"'
    )
    assert challenge is not None
    assert challenge.scheme == "bearer"
    assert challenge.params == {
        "realm": "https://auth.example/token",
        "service": "reg",
        "scope": "repository:a/b:pull,push",
        "error": "insufficient_scope",
    }


def test_plain_http_only_to_this_machine_unless_insecure() -> None:
    check_transport("https://registry.example/v2/", insecure_host=None)
    check_transport("http://127.0.0.1:5000/v2/", insecure_host=None)
    check_transport("http://localhost:5000/v2/", insecure_host=None)
    check_transport("http://[::1]:5000/v2/", insecure_host=None)
    check_transport("http://registry.example:5000/v2/", insecure_host="registry.example")
    with pytest.raises(RegistryError, match=r"refusing plain HTTP to registry\.example"):
        check_transport("http://registry.example/v2/", insecure_host=None)
    with pytest.raises(RegistryError, match=r"refusing plain HTTP to auth\.example"):
        check_transport("http://auth.example/token", insecure_host="registry.example")
    with pytest.raises(RegistryError, match="only HTTP"):
        check_transport("file:///etc/passwd", insecure_host="registry.example")
    assert RegistryClient("registry.example")._base == "https://registry.example"
    assert RegistryClient("registry.example:5000", insecure=True)._base == (
        "http://registry.example:5000"
    )


def test_docker_hub_names() -> None:
    assert registry_endpoint("docker.io") == "registry-1.docker.io"
    assert registry_endpoint("quay.io") == "quay.io"
    with pytest.raises(SpecError):
        RegistryClient("https://quay.io")


# -- blobs ----------------------------------------------------------------------------------


def test_blob_cut_off_midway_is_resumed_with_range(fake: FakeRegistry, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    digest = digest_of(data)
    fake.blobs[digest] = data
    fake.cut_blob_at = 100_000
    got: list[int] = []
    dest = tmp_path / "blob"
    client(fake).fetch_blob("r", digest, dest, size=len(data), progress=got.append)
    assert dest.read_bytes() == data
    assert sum(got) == len(data)
    assert [h.get("Range") for _, h in fake.requests] == [None, "bytes=100000-"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob"]
    assert dest.stat().st_mode & 0o777 == 0o600


def test_partial_blob_from_an_earlier_run_is_continued(fake: FakeRegistry, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    digest = digest_of(data)
    fake.blobs[digest] = data
    dest = tmp_path / "blob"
    (tmp_path / "blob.part").write_bytes(data[:20_000])
    client(fake).fetch_blob("r", digest, dest)
    assert dest.read_bytes() == data
    assert [h.get("Range") for _, h in fake.requests] == ["bytes=20000-"]


def test_blob_that_does_not_match_its_digest_leaves_nothing(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    digest = digest_of(b"the real bytes")
    fake.blobs[digest] = b"other bytes!!!"
    dest = tmp_path / "blob"
    with pytest.raises(ChecksumError, match=f"blob {digest} of {fake.host}/r does not match"):
        client(fake).fetch_blob("r", digest, dest, size=14)
    assert list(tmp_path.iterdir()) == []


def test_blobs_download_in_parallel_into_one_directory(fake: FakeRegistry, tmp_path: Path) -> None:
    blobs = [os.urandom(10_000), os.urandom(20_000)]
    for data in blobs:
        fake.blobs[digest_of(data)] = data
    fake.barrier = threading.Barrier(2)  # neither answer goes out before both were asked
    reg = client(fake)
    errors: list[BaseException] = []

    def fetch(n: int) -> None:
        try:
            reg.fetch_blob("r", digest_of(blobs[n]), tmp_path / f"b{n}")
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=fetch, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [(tmp_path / f"b{n}").read_bytes() for n in range(2)] == blobs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b0", "b1"]


def test_blob_404(fake: FakeRegistry, tmp_path: Path) -> None:
    digest = digest_of(b"x")
    with pytest.raises(RegistryError) as caught:
        client(fake).fetch_blob("r", digest, tmp_path / "blob")
    assert caught.value.code == "BLOB_UNKNOWN"
    assert "no such blob" in str(caught.value)


def test_open_blob_from_an_offset_even_when_range_is_ignored(fake: FakeRegistry) -> None:
    data = bytes(range(256)) * 100
    digest = digest_of(data)
    fake.blobs[digest] = data
    reg = client(fake)
    with reg.open_blob("r", digest, offset=1000) as stream:
        assert stream.read() == data[1000:]
    fake.ignore_range = True
    with reg.open_blob("r", digest, offset=1000) as stream:
        assert stream.read() == data[1000:]


def test_blob_redirect_does_not_carry_the_credentials(
    serve: type[FakeRegistry], tmp_path: Path
) -> None:
    storage = serve()
    registry = serve(auth="basic", users={"u": "p"})
    registry.redirect_blobs_to = f"http://{storage.host}"
    data = b"layer bytes"
    storage.blobs[digest_of(data)] = data
    creds = CredentialStore(files=[], explicit={registry.host: ("u", "p")})
    client(registry, credentials=creds).fetch_blob("r", digest_of(data), tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == data
    assert registry.requests[-1][1]["Authorization"].startswith("Basic ")
    assert [h.get("Authorization") for _, h in storage.requests] == [None]


def test_redirect_to_plain_http_elsewhere_is_refused(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.redirect_blobs_to = "http://192.0.2.1"
    with pytest.raises(RegistryError, match=r"refusing plain HTTP to 192\.0\.2\.1"):
        client(fake).fetch_blob("r", digest_of(b"x"), tmp_path / "b")


# -- credentials ----------------------------------------------------------------------------


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


HELPER = """#!/bin/sh
[ "$1" = get ] || exit 3
read -r server
echo "$server" >> "{log}"
case "$server" in
  helped.example) echo '{{"ServerURL":"helped.example","Username":"hu","Secret":"hs"}}' ;;
  https://index.docker.io/v1/) echo '{{"Username":"hub","Secret":"hubs"}}' ;;
  broken.example) echo 'backend locked' >&2; exit 1 ;;
  *) echo 'credentials not found in native keychain'; exit 1 ;;
esac
"""


@pytest.fixture
def helper_env(tmp_path: Path) -> dict[str, str]:
    """A fake ``docker-credential-test`` on PATH (real program, real protocol)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "docker-credential-test"
    script.write_text(HELPER.format(log=tmp_path / "helper.log"))
    script.chmod(0o755)
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
    }


def test_files_are_read_in_order_first_match_wins(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": str(tmp_path / "run"),
           "REGISTRY_AUTH_FILE": str(tmp_path / "explicit.json")}  # fmt: skip
    write_json(tmp_path / "home/.docker/config.json",
               {"auths": {"a.example": {"auth": b64("docker:1")},
                          "b.example": {"auth": b64("docker:2")},
                          "c.example": {"auth": b64("docker:3")}}})  # fmt: skip
    write_json(tmp_path / "run/containers/auth.json",
               {"auths": {"b.example": {"auth": b64("podman:2")},
                          "c.example": {"auth": b64("podman:3")}}})  # fmt: skip
    write_json(tmp_path / "explicit.json", {"auths": {"c.example": {"auth": b64("env:3")}}})
    store = CredentialStore(env=env)
    found = {h: store.lookup(h) for h in ("a.example", "b.example", "c.example", "d.example")}
    assert {h: c and (c.username, c.secret) for h, c in found.items()} == {
        "a.example": ("docker", "1"),
        "b.example": ("podman", "2"),
        "c.example": ("env", "3"),
        "d.example": None,
    }
    assert found["b.example"] is not None
    assert found["b.example"].source == f"{tmp_path}/run/containers/auth.json (auths 'b.example')"
    assert "secret" not in repr(found["a.example"])
    assert "'1'" not in repr(found["a.example"])


def test_docker_config_env_and_key_forms(tmp_path: Path) -> None:
    write_json(tmp_path / "dc/config.json", {"auths": {
        "https://index.docker.io/v1/": {"auth": b64("hub:x")},
        "http://quay.io": {"username": "q", "password": "qp"},
        "quay.io/org": {"auth": b64("org:y")},
    }})  # fmt: skip
    store = CredentialStore(env={"DOCKER_CONFIG": str(tmp_path / "dc")})
    assert store.files == ("$REGISTRY_AUTH_FILE", "$XDG_RUNTIME_DIR", f"{tmp_path}/dc/config.json")
    hub = store.lookup("docker.io", "library/debian")
    assert hub is not None
    assert (hub.username, hub.secret) == ("hub", "x")
    org = store.lookup("quay.io", "org/app")
    other = store.lookup("quay.io", "someone/app")
    assert org is not None
    assert org.username == "org"
    assert other is not None
    assert (other.username, other.secret) == ("q", "qp")


def test_credential_helpers_on_path(tmp_path: Path, helper_env: dict[str, str]) -> None:
    write_json(tmp_path / "home/.docker/config.json", {
        "auths": {"plain.example": {"auth": b64("p:q")}},
        "credHelpers": {"helped.example": "test", "broken.example": "test",
                        "missing.example": "not-installed"},
        "credsStore": "test",
    })  # fmt: skip
    store = CredentialStore(env=helper_env)
    helped = store.lookup("helped.example")
    assert helped is not None
    assert (helped.username, helped.secret) == ("hu", "hs")
    assert helped.source == (
        f"docker-credential-test (named in {tmp_path}/home/.docker/config.json)"
    )
    plain = store.lookup("plain.example")  # auths before credsStore
    assert plain is not None
    assert plain.username == "p"
    hub = store.lookup("docker.io")  # credsStore, asked with docker's Hub URL
    assert hub is not None
    assert hub.username == "hub"
    assert store.lookup("unknown.example") is None  # "credentials not found"
    assert store.lookup("missing.example") is None  # helper not installed: skipped
    with pytest.raises(RegistryAuthError, match="docker-credential-test .* failed for "
                       r"broken.example \(exit 1\): backend locked"):  # fmt: skip
        store.lookup("broken.example")
    asked = (tmp_path / "helper.log").read_text().split()
    assert asked == ["helped.example", "https://index.docker.io/v1/", "unknown.example",
                     "broken.example"]  # fmt: skip


def test_helper_names_must_be_plain(tmp_path: Path, helper_env: dict[str, str]) -> None:
    write_json(tmp_path / "home/.docker/config.json", {"credsStore": "../../bin/sh"})
    with pytest.raises(RegistryAuthError, match="is not a plain program name"):
        CredentialStore(env=helper_env).lookup("x.example")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not a valid registry credentials file"),
        ("[]", "not a JSON object"),
        ('{"auths": {"x.example": {"auth": "!!"}}}', "'auth' is not base64 of user:password"),
        ('{"auths": {"x.example": {"auth": "bm9jb2xvbg=="}}}', "not base64 of user:password"),
    ],
)
def test_malformed_credential_files_are_named(tmp_path: Path, content: str, message: str) -> None:
    bad = tmp_path / "auth.json"
    bad.write_text(content)
    with pytest.raises(RegistryAuthError, match=message) as caught:
        CredentialStore(files=[bad]).lookup("x.example")
    assert str(bad) in str(caught.value)


def test_client_uses_the_helpers_credentials(
    serve: type[FakeRegistry], tmp_path: Path, helper_env: dict[str, str]
) -> None:
    fake = serve(auth="basic", users={"hu": "hs"})
    fake.push("r", "1", b"{}")
    write_json(tmp_path / "home/.docker/config.json",
               {"credHelpers": {fake.host: "test"}})  # fmt: skip
    script = Path(helper_env["PATH"].split(":")[0]) / "docker-credential-test"
    script.write_text(script.read_text().replace("helped.example)", f"{fake.host})"))
    reg = client(fake, credentials=CredentialStore(env=helper_env))
    assert reg.get_manifest("r", "1")[0] == b"{}"
