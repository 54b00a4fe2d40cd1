"""Pull credentials kept from kubelet's PullImage: the in-memory store (expiry, one repository's
credentials never serving another, the bound, the undo of a failed pull, the order against docker's
config), what the registry client's Authorizer sends with them, how the CRI AuthConfig is read (the
subset .proto checked against the CRI compiled into containerd), and the proxy's forwarding (bytes,
metadata, deadline, status, cancellation, credentials usable while the pull is in flight) against a
stand-in backend on a unix socket. Real containerd: tests/e2e/test_cri_proxy.py."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest

from fuse.registry.auth import Authorizer, repository_of, scope_for
from fuse.registry.credentials import Credentials, CredentialStore, PullCredentials
from fuse.registry.hosts import Endpoint
from snapshotter.api.k8s.cri.v1 import api_subset_pb2 as cri_pb
from snapshotter.daemon import metrics
from snapshotter.daemon.config import Config, load
from snapshotter.daemon.cri import CriProxy, credentials_from
from snapshotter.errors import ConfigError, StartupError
from tests.harness.godescriptors import descriptors_in_binary

HOST = "reg.example.com"
ALICE = Credentials("alice", "alice-pw")
BOB = Credentials("bob", "bob-pw")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the store ------------------------------------------------------------------------------------


def test_credentials_expire_ttl_after_their_last_pull() -> None:
    clock = Clock()
    pulled = PullCredentials(ttl=60, clock=clock)
    pulled.store(HOST, "team/app", ALICE)
    clock.now += 59
    assert pulled.get(HOST, "team/app") == ALICE
    pulled.store(HOST, "team/app", ALICE)  # a new pull of the repository refreshes them
    clock.now += 59
    assert pulled.get(HOST, "team/app") == ALICE
    pulled.store(HOST, "team/other", BOB)
    clock.now += 1
    assert len(pulled) == 1  # expired ones are forgotten, not merely hidden
    assert pulled.get(HOST, "team/app") is None
    assert pulled.get(HOST, "team/other") == BOB


def test_credentials_serve_only_their_own_repository_and_registry() -> None:
    pulled = PullCredentials(ttl=60)
    pulled.store(HOST, "team/app", ALICE)
    pulled.store(HOST, "team/other", BOB)
    assert pulled.get(HOST, "team/app") == ALICE
    assert pulled.get(HOST, "team/other") == BOB
    assert pulled.get(HOST, "team") is None
    assert pulled.get(HOST, "team/app/sub") is None
    assert pulled.get("other.example.com", "team/app") is None
    assert pulled.get("REG.example.com", "team/app") == ALICE  # host names are case-insensitive


def test_the_least_recently_refreshed_go_first_beyond_the_limit() -> None:
    pulled = PullCredentials(ttl=60, limit=3)
    for repo in ("a", "b", "c"):
        pulled.store(HOST, repo, ALICE)
    pulled.store(HOST, "a", ALICE)  # refreshed: now b is the oldest
    pulled.store(HOST, "d", ALICE)
    assert len(pulled) == 3
    assert [r for r in "abcd" if pulled.get(HOST, r)] == ["a", "c", "d"]


def test_a_failed_pull_puts_back_what_was_kept_before() -> None:
    pulled = PullCredentials(ttl=60)
    pulled.store(HOST, "team/app", ALICE)
    undo = pulled.store(HOST, "team/app", BOB)  # wrong credentials, say
    assert pulled.get(HOST, "team/app") == BOB  # usable while the pull is in flight
    undo()
    assert pulled.get(HOST, "team/app") == ALICE
    undo_first = pulled.store(HOST, "team/new", BOB)
    undo_first()
    assert pulled.get(HOST, "team/new") is None
    # a newer pull replaced them meanwhile: undoing the older one leaves the newer alone
    older = pulled.store(HOST, "team/app", BOB)
    pulled.store(HOST, "team/app", Credentials("carol", "c"))
    older()
    assert pulled.get(HOST, "team/app") == Credentials("carol", "c")


async def test_lookup_takes_the_repositorys_pull_credentials_before_docker_config(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {HOST: {"username": "node", "password": "node-pw"}}}))
    pulled = PullCredentials(ttl=60)
    store = CredentialStore(config, pulled=pulled)
    assert await store.lookup(HOST, "team/app") == Credentials("node", "node-pw")
    pulled.store(HOST, "team/app", ALICE)
    assert await store.lookup(HOST, "team/app") == ALICE
    assert await store.lookup(HOST, "team/other") == Credentials("node", "node-pw")
    assert await store.lookup(HOST) == Credentials("node", "node-pw")  # host-wide: never a pull's
    bare = CredentialStore(tmp_path / "absent.json", pulled=pulled)
    assert await bare.lookup(HOST, "team/other") is None
    assert await bare.lookup("other.example.com", "team/app") is None


# --- what the registry client sends ---------------------------------------------------------------


def _challenge(value: str) -> httpx.Response:
    """A registry's 401 to a request sent without credentials."""
    request = httpx.Request("GET", f"https://{HOST}/v2/team/app/manifests/v1")
    return httpx.Response(401, headers={"www-authenticate": value}, request=request)


async def test_basic_auth_sends_each_repositorys_own_credentials(tmp_path: Path) -> None:
    pulled = PullCredentials(ttl=60)
    pulled.store(HOST, "team/app", ALICE)
    auth = Authorizer(CredentialStore(tmp_path / "absent.json", pulled=pulled))
    endpoint = Endpoint("https", HOST, "/v2", registry=HOST)
    app, other = (scope_for("team/app", "pull"),), (scope_for("team/other", "pull"),)
    async with httpx.AsyncClient() as client:
        await auth.challenged(endpoint, _challenge('Basic realm="r"'), app, client)
    assert await auth.header(endpoint, app) == {"Authorization": "Basic YWxpY2U6YWxpY2UtcHc="}
    assert await auth.header(endpoint, other) == {}


async def test_a_registry_token_is_the_bearer_token(tmp_path: Path) -> None:
    pulled = PullCredentials(ttl=60)
    pulled.store(HOST, "team/app", credentials_from(cri_pb.AuthConfig(registry_token="bearer-xyz")))
    auth = Authorizer(CredentialStore(tmp_path / "absent.json", pulled=pulled))
    endpoint = Endpoint("https", HOST, "/v2", registry=HOST)
    scopes = (scope_for("team/app", "pull"),)
    challenge = _challenge('Bearer realm="https://auth.example.com/token",service="reg"')
    async with httpx.AsyncClient() as client:
        await auth.challenged(endpoint, challenge, scopes, client)
    assert await auth.header(endpoint, scopes) == {"Authorization": "Bearer bearer-xyz"}
    assert auth.token_fetches == 0  # the token service was not asked


def test_repository_of_scopes() -> None:
    assert repository_of((scope_for("team/app", "pull"), "repository:x:pull")) == "team/app"
    assert repository_of(("registry:catalog:*",)) is None
    assert repository_of(()) is None


# --- kubelet's AuthConfig -------------------------------------------------------------------------


def test_auth_config_is_read_in_containerds_order() -> None:
    full = cri_pb.AuthConfig(
        username="u", password="p", auth="dzpx", identity_token="id", registry_token="rt"
    )
    assert credentials_from(full) == Credentials("u", "p")
    token = credentials_from(cri_pb.AuthConfig(identity_token="id", auth="dzpx", registry_token="rt"))
    assert token is not None and token.identity_token and token.secret == "id"
    assert credentials_from(cri_pb.AuthConfig(auth="dTpwOnc=", registry_token="rt")) == Credentials(
        "u", "p:w"
    )
    bearer = credentials_from(cri_pb.AuthConfig(registry_token="rt"))
    assert bearer is not None and bearer.registry_token and bearer.secret == "rt"
    assert credentials_from(cri_pb.AuthConfig(auth="not base64 of user:pass")) is None
    assert credentials_from(cri_pb.AuthConfig(password="no-user")) is None
    assert credentials_from(cri_pb.AuthConfig()) is None
    assert "pw-123" not in repr(credentials_from(cri_pb.AuthConfig(username="u", password="pw-123")))


def test_the_subset_proto_is_wire_compatible_with_containerds_cri() -> None:
    theirs = {m.name: m for m in descriptors_in_binary()["api.proto"].message_type}
    assert descriptors_in_binary()["api.proto"].package == "runtime.v1"
    for ours in cri_pb.DESCRIPTOR.message_types_by_name.values():
        their_fields = {f.number: f for f in theirs[ours.name].field}
        for field in ours.fields:
            t = their_fields[field.number]
            assert (field.name, field.type, t.type_name.rpartition(".")[2]) == (
                t.name,
                t.type,
                t.type_name.rpartition(".")[2],
            ), f"{ours.name}.{field.name}"
            if field.message_type is not None:
                assert field.message_type.name == t.type_name.rpartition(".")[2]


# --- configuration --------------------------------------------------------------------------------


def test_the_proxy_is_off_by_default_and_its_keys_are_checked(tmp_path: Path) -> None:
    assert Config().cri_address == ""
    path = tmp_path / "c.toml"
    path.write_text('cri_address = "/run/lazysnap/cri.sock"\ncri_credentials_ttl = "90m"\n')
    config = load(path)
    assert (config.cri_address, config.cri_credentials_ttl) == ("/run/lazysnap/cri.sock", 5400.0)
    assert config.cri_backend == "/run/containerd/containerd.sock"
    assert Config().cri_credentials_ttl == 12 * 3600
    for text, message in (
        ('cri_credentials_ttl = "0"', "cri_credentials_ttl must be a positive"),
        ('cri_credentials_ttl = "soon"', "not a duration"),
        ('cri_address = "cri.sock"', "absolute socket path"),
        ('cri_address = "/run/lazysnap/lazysnap.sock"', "must differ from address"),
        (f'cri_address = "/{"x" * 120}"', "limit of unix socket paths"),
    ):
        path.write_text(text + "\n")
        with pytest.raises(ConfigError, match=message):
            load(path)


# --- the proxy, against a stand-in for containerd ------------------------------------------------


class Backend(grpc.GenericRpcHandler):
    """Answers every method with the request bytes reversed, and records what it saw; `fail` makes it
    answer with that (code, details) and a trailing metadata entry; `hold` makes it wait until the call
    is cancelled."""

    def __init__(self, pulled: PullCredentials) -> None:
        self.pulled = pulled
        self.seen: list[dict] = []
        self.fail: tuple[grpc.StatusCode, str] | None = None
        self.hold = False
        self.cancelled = threading.Event()

    def service(self, details):
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.seen.append(
                {
                    "method": details.method,
                    "request": request,
                    "metadata": dict(context.invocation_metadata()),
                    "remaining": context.time_remaining(),
                    "kept": self.pulled.get("reg.example.com", "team/app"),
                }
            )
            if self.hold:
                context.add_callback(self.cancelled.set)
                self.cancelled.wait(10)
                return b""
            context.send_initial_metadata((("x-initial", "i"),))
            context.set_trailing_metadata((("x-trailing", "t"), ("x-detail-bin", b"\x00\x01")))
            if self.fail:
                context.abort(*self.fail)
            return request[::-1]

        return grpc.unary_unary_rpc_method_handler(handle)


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short directory for unix sockets (their paths must stay under 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="lzs-cri-"))
    yield d
    shutil.rmtree(d)


@pytest.fixture
def proxied(sockets: Path) -> Iterator[tuple[CriProxy, Backend, grpc.Channel]]:
    pulled = PullCredentials(ttl=60)
    backend = Backend(pulled)
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[backend])
    server.add_insecure_port(f"unix:{sockets / 'containerd.sock'}")
    server.start()
    proxy = CriProxy(sockets / "cri.sock", sockets / "containerd.sock", pulled)
    proxy.start()
    channel = grpc.insecure_channel(f"unix://{sockets / 'cri.sock'}")
    yield proxy, backend, channel
    channel.close()
    proxy.stop()
    server.stop(0).wait()


def pull_request(image: str, **auth: str) -> bytes:
    return cri_pb.PullImageRequest(
        image=cri_pb.ImageSpec(image=image), auth=cri_pb.AuthConfig(**auth)
    ).SerializeToString()


def test_calls_are_forwarded_as_they_are(proxied) -> None:
    proxy, backend, channel = proxied
    assert proxy.address.stat().st_mode & 0o777 == 0o600
    for path in ("/runtime.v1.ImageService/ListImages", "/runtime.v1alpha2.ImageService/ImageFsInfo"):
        response, call = channel.unary_unary(path).with_call(
            b"\x0a\x03abc\xff", metadata=(("x-request", "r"),), timeout=7
        )
        assert response == b"\xffcba\x03\x0a"
        assert backend.seen[-1]["method"] == path and backend.seen[-1]["request"] == b"\x0a\x03abc\xff"
        assert backend.seen[-1]["metadata"]["x-request"] == "r"
        assert 5 < backend.seen[-1]["remaining"] < 7.5  # the caller's deadline went along (rounded)
        assert ("x-initial", "i") in call.initial_metadata()
        assert ("x-detail-bin", b"\x00\x01") in call.trailing_metadata()
    channel.unary_unary("/runtime.v1.ImageService/ListImages")(b"")
    assert backend.seen[-1]["remaining"] > 1e6  # no deadline: none added


def test_errors_come_back_with_containerds_code_message_and_metadata(proxied) -> None:
    _, backend, channel = proxied
    backend.fail = (grpc.StatusCode.NOT_FOUND, 'image "x" not found')
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/runtime.v1.ImageService/ImageStatus")(b"")
    assert (info.value.code(), info.value.details()) == backend.fail
    assert ("x-trailing", "t") in info.value.trailing_metadata()
    with pytest.raises(grpc.RpcError) as info:  # kubelet's RuntimeService is not ours to serve
        channel.unary_unary("/runtime.v1.RuntimeService/Version")(b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and len(backend.seen) == 1  # not forwarded


def test_a_cancelled_call_cancels_containerds(proxied) -> None:
    _, backend, channel = proxied
    backend.hold = True
    call = channel.unary_unary("/runtime.v1.ImageService/PullImage").future(pull_request("reg.example.com/a"))
    deadline = time.monotonic() + 5
    while not backend.seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.seen, "the call never reached containerd"
    call.cancel()
    assert backend.cancelled.wait(5), "containerd's call went on after kubelet gave up"


def _calls(method: str, code: str) -> float:
    samples = [s for m in metrics.CRI_CALLS.collect() for s in m.samples if s.name.endswith("_total")]
    return sum(s.value for s in samples if s.labels == {"method": method, "code": code})


def test_pull_credentials_are_kept_for_the_pull_and_after(proxied) -> None:
    proxy, backend, channel = proxied
    pull = channel.unary_unary("/runtime.v1.ImageService/PullImage")
    before = _calls("runtime.v1.ImageService/PullImage", "OK")
    pull(pull_request("reg.example.com/team/app:v1", username="alice", password="alice-pw"))
    assert backend.seen[-1]["kept"] == ALICE  # usable while containerd was pulling
    assert proxy.credentials.get(HOST, "team/app") == ALICE
    assert proxy.credentials.get(HOST, "team/other") is None
    assert _calls("runtime.v1.ImageService/PullImage", "OK") == before + 1

    # a refused pull takes back what it brought
    backend.fail = (grpc.StatusCode.UNKNOWN, "401 Unauthorized")
    with pytest.raises(grpc.RpcError):
        pull(pull_request("reg.example.com/team/app:v1", username="alice", password="wrong"))
    assert backend.seen[-1]["kept"] == Credentials("alice", "wrong")
    assert proxy.credentials.get(HOST, "team/app") == ALICE
    backend.fail = None

    # credentials for another registry are not kept; Docker Hub short names are normalised
    pull(
        pull_request(
            "reg.example.com/team/x", username="u", password="p", server_address="https://evil.example"
        )
    )
    assert proxy.credentials.get(HOST, "team/x") is None
    pull(pull_request("nginx", username="u", password="p", server_address="https://index.docker.io/v1/"))
    assert proxy.credentials.get("docker.io", "library/nginx") == Credentials("u", "p")
    pull(b"\xff\xff")  # not a PullImageRequest: forwarded all the same, containerd answers
    assert backend.seen[-1]["request"] == b"\xff\xff"


def test_the_socket_is_refused_when_live_and_replaced_when_stale(proxied, sockets: Path) -> None:
    proxy, _, _ = proxied
    other = CriProxy(proxy.address, sockets / "containerd.sock", PullCredentials(ttl=60))
    with pytest.raises(StartupError, match="in use by a live server; stop it or choose another cri_address"):
        other.start()
    stale = sockets / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a crash leaves
    replacement = CriProxy(stale, sockets / "containerd.sock", PullCredentials(ttl=60))
    replacement.start()
    try:
        assert stale.stat().st_mode & 0o777 == 0o600
    finally:
        replacement.stop()
    assert not stale.exists()
