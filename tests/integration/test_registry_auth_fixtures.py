"""The auth harness against the real registry: htpasswd, TLS, mTLS and the Docker token flow.

Plain httpx on purpose: these tests prove the fixtures, not a client.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.harness.auth import (
    REGISTRY_TOKEN_LEEWAY,
    Scope,
    TestPKI,
    TokenIssuer,
    combine,
    htpasswd_config,
    jwt_parts,
    libtrust_key_id,
    parse_challenge,
    scope,
    tls_config,
    token_config,
)
from tests.harness.registry import Registry

USERS = {"alice": "wonderland", "bob": "builder"}
REPO = "lzs/app"


@pytest.fixture
def issuer_factory(issuer_factory: Callable[..., TokenIssuer]) -> Callable[..., TokenIssuer]:
    """conftest's issuer_factory with this file's users."""
    return functools.partial(issuer_factory, users=USERS)


@pytest.fixture(autouse=True)
def no_issuer_threads_left() -> Iterator[None]:
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith("token-issuer-")]
    assert not left, f"token issuer threads still running: {left}"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _push_blob(client: httpx.Client, repo: str, data: bytes, headers: dict[str, str]) -> httpx.Response:
    """POST an upload and PUT the data; returns the first refused response, or the PUT's."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = client.post(f"/v2/{repo}/blobs/uploads/", headers=headers)
    if r.status_code != 202:
        return r
    location = r.headers["location"]
    # String concatenation: httpx's params= would re-encode _state and the registry would refuse it.
    sep = "&" if "?" in location else "?"
    return client.put(f"{location}{sep}digest={digest}", content=data, headers=headers)


# --- htpasswd ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["2y", "2a", "2b"])
def test_htpasswd_basic_auth(registry_factory: Callable[..., Registry], workdir: Path, prefix: str) -> None:
    config = htpasswd_config(workdir, USERS, realm="lzs-test-realm", prefix=prefix)
    assert (workdir / "htpasswd").read_text().startswith(f"alice:${prefix}$04$")
    reg = registry_factory(config=config)
    with httpx.Client(base_url=reg.url) as client:
        anonymous = client.get("/v2/")
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"] == 'Basic realm="lzs-test-realm"'
        assert client.get("/v2/", auth=("alice", "wonderland")).status_code == 200
        assert client.get("/v2/", auth=("bob", "builder")).status_code == 200
        assert client.get("/v2/", auth=("alice", "builder")).status_code == 401
        assert client.get("/v2/", auth=("mallory", "wonderland")).status_code == 401
        pushed = _push_blob(client, REPO, b"htpasswd blob", {"Authorization": _basic("alice", "wonderland")})
        assert pushed.status_code == 201, pushed.text
    # The registry's own record (the first entry is the harness's readiness probe).
    assert [e.status for e in reg.access_log() if e.path == "/v2/"][-5:] == [401, 200, 200, 401, 401]


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- TLS and mTLS ------------------------------------------------------------------------------


def test_tls_with_htpasswd(registry_factory: Callable[..., Registry], workdir: Path, pki: TestPKI) -> None:
    reg = registry_factory(record=False, config=combine(tls_config(pki), htpasswd_config(workdir, USERS)))
    assert reg.url == f"https://127.0.0.1:{reg.port}"
    trusted = pki.client_context()
    with httpx.Client(base_url=reg.url, verify=trusted, auth=("alice", "wonderland")) as client:
        assert client.get("/v2/").status_code == 200
    # The DNS SAN works as well as the IP SAN.
    assert httpx.get(f"https://localhost:{reg.port}/v2/", verify=trusted).status_code == 401
    # Not trusted by the system store, nor by another CA.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{reg.url}/v2/")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{reg.url}/v2/", verify=pki.other_ca().client_context())
    # Plain HTTP to a TLS port is answered with a 400, not served.
    assert httpx.get(f"http://127.0.0.1:{reg.port}/v2/").status_code == 400


def test_mtls_requires_a_client_cert_from_the_ca(
    registry_factory: Callable[..., Registry], pki: TestPKI
) -> None:
    reg = registry_factory(record=False, config=tls_config(pki, client_cas=True))
    good = pki.client_context(pki.client_cert())
    assert httpx.get(f"{reg.url}/v2/", verify=good).status_code == 200
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{reg.url}/v2/", verify=pki.client_context())  # no client certificate
    with pytest.raises(httpx.TransportError):
        foreign = pki.other_ca().client_cert()  # signed by a CA the registry does not list
        httpx.get(f"{reg.url}/v2/", verify=pki.client_context(foreign))
    # A server certificate is not a client certificate (extended key usage serverAuth only).
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{reg.url}/v2/", verify=pki.client_context(pki.server_cert()))


# --- token auth --------------------------------------------------------------------------------


@pytest.mark.parametrize("key_ref", ["kid", "x5c"])
def test_token_flow_pull_and_push(
    registry_factory: Callable[..., Registry],
    issuer_factory: Callable[..., TokenIssuer],
    workdir: Path,
    pki: TestPKI,
    key_ref: str,
) -> None:
    issuer = issuer_factory(key_ref=key_ref)
    reg = registry_factory(config=token_config(issuer))
    blob = b"token-flow blob " * 64
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with httpx.Client(base_url=reg.url) as client:
        base = client.get("/v2/")
        assert base.status_code == 401
        assert base.headers["www-authenticate"] == f'Bearer realm="{issuer.realm}",service="{issuer.service}"'

        # Follow the challenge of a repository endpoint, as a client would.
        challenge = client.get(f"/v2/{REPO}/tags/list")
        assert challenge.status_code == 401
        kind, params = parse_challenge(challenge.headers["www-authenticate"])
        assert (kind, params) == ("bearer", {**_realm(issuer), "scope": scope(REPO, "pull")})
        wanted = scope(REPO, "pull", "push")
        answer = client.get(
            params["realm"],
            params={"service": params["service"], "scope": wanted},
            auth=("alice", "wonderland"),
        )
        assert answer.status_code == 200
        body = answer.json()
        token = body["token"]
        assert body["access_token"] == token and body["expires_in"] == 300
        issued = dt.datetime.strptime(body["issued_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        assert abs(issued.timestamp() - time.time()) < 5

        header, claims = jwt_parts(token)
        assert header["alg"] == "ES256"
        if key_ref == "kid":
            # The registry trusts exactly the key of the one certificate in its bundle.
            bundled = x509.load_pem_x509_certificate(issuer.rootcertbundle.read_bytes())
            assert header["kid"] == libtrust_key_id(bundled.public_key())
            assert len(header["kid"]) == 59 and header["kid"].count(":") == 11 and "x5c" not in header
        else:
            # The registry's bundle is the CA only: the leaf in x5c must chain to it.
            (leaf_der,) = header["x5c"]
            leaf = x509.load_der_x509_certificate(base64.b64decode(leaf_der))
            assert leaf.issuer == pki.ca.certificate().subject and "kid" not in header
            assert issuer.rootcertbundle.read_bytes() == pki.ca_cert.read_bytes()
        assert claims["iss"] == issuer.issuer and claims["sub"] == "alice" and claims["aud"] == issuer.service
        assert claims["exp"] - claims["iat"] == 300 and claims["nbf"] == claims["iat"]
        assert claims["access"] == [{"type": "repository", "name": REPO, "actions": ["pull", "push"]}]
        assert len(claims["jti"]) >= 16

        pushed = _push_blob(client, REPO, blob, _bearer(token))
        assert pushed.status_code == 201, pushed.text
        got = client.get(f"/v2/{REPO}/blobs/{digest}", headers=_bearer(token))
        assert (got.status_code, got.content) == (200, blob)
        assert client.get("/v2/", headers=_bearer(token)).status_code == 200

        # The registry checks the signature: same claims, a key it does not trust, refused.
        impostor = TokenIssuer(workdir / "impostor", key_ref=key_ref)  # its own PKI, never started
        forged = impostor.mint("alice", [wanted])
        assert jwt_parts(forged)[1]["access"] == claims["access"]
        assert client.get(f"/v2/{REPO}/blobs/{digest}", headers=_bearer(forged)).status_code == 401
        # ... and the audience.
        other_aud = issuer.mint("alice", [wanted], audience="some-other-registry")
        assert client.get(f"/v2/{REPO}/blobs/{digest}", headers=_bearer(other_aud)).status_code == 401

    assert issuer.requests == [("alice", (wanted,))]
    assert issuer.rejected == []


def _realm(issuer: TokenIssuer) -> dict[str, str]:
    return {"realm": issuer.realm, "service": issuer.service}


def test_token_issuer_refuses_a_wrong_password(issuer_factory: Callable[..., TokenIssuer]) -> None:
    issuer = issuer_factory(anonymous_pull=True)
    wanted = scope(REPO, "pull")
    with httpx.Client() as client:
        params = {"service": issuer.service, "scope": wanted}
        wrong = client.get(issuer.realm, params=params, auth=("alice", "builder"))
        assert wrong.status_code == 401 and "token" not in wrong.json()
        assert parse_challenge(wrong.headers["www-authenticate"])[0] == "basic"
        unknown = client.get(issuer.realm, params=params, auth=("mallory", "x"))
        assert unknown.status_code == 401
        assert client.get(issuer.realm, params={**params, "service": "elsewhere"}).status_code == 400
    assert issuer.rejected == [("alice", (wanted,)), ("mallory", (wanted,))]
    assert issuer.requests == []


def test_pull_only_tokens_cannot_push(
    registry_factory: Callable[..., Registry], issuer_factory: Callable[..., TokenIssuer]
) -> None:
    issuer = issuer_factory(anonymous_pull=True, user_actions={"bob": {"pull"}})
    reg = registry_factory(config=token_config(issuer))
    both = scope(REPO, "pull", "push")
    blob = b"pull-only"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with httpx.Client(base_url=reg.url) as client:
        alice = issuer.fetch(client, [both], auth=("alice", "wonderland"))
        assert _push_blob(client, REPO, blob, _bearer(alice)).status_code == 201

        bob = issuer.fetch(client, [both], auth=("bob", "builder"))
        anonymous = issuer.fetch(client, [both])
        for token, who in ((bob, "bob"), (anonymous, "")):
            claims = jwt_parts(token)[1]
            assert claims["sub"] == who
            assert claims["access"] == [{"type": "repository", "name": REPO, "actions": ["pull"]}]
            assert client.get(f"/v2/{REPO}/blobs/{digest}", headers=_bearer(token)).content == blob
            refused = _push_blob(client, REPO, b"not allowed", _bearer(token))
            assert refused.status_code == 401
            _, params = parse_challenge(refused.headers["www-authenticate"])
            assert params.pop("error") == "insufficient_scope"
            assert sorted(Scope.parse(params.pop("scope")).actions) == ["pull", "push"]  # in any order
            assert params == _realm(issuer)
            assert refused.json()["errors"][0]["code"] == "UNAUTHORIZED"

        # A token for one repository does not open another.
        other = client.get(f"/v2/lzs/other/blobs/{digest}", headers=_bearer(alice))
        assert other.status_code == 401
        assert parse_challenge(other.headers["www-authenticate"])[1]["error"] == "insufficient_scope"

    assert [r.user for r in issuer.requests] == ["alice", "bob", None]


def test_anonymous_gets_nothing_unless_allowed(
    registry_factory: Callable[..., Registry], issuer_factory: Callable[..., TokenIssuer]
) -> None:
    issuer = issuer_factory()  # anonymous_pull=False
    reg = registry_factory(config=token_config(issuer))
    with httpx.Client(base_url=reg.url) as client:
        token = issuer.fetch(client, [scope(REPO, "pull")])
        assert jwt_parts(token)[1]["access"] == []
        refused = client.get(f"/v2/{REPO}/tags/list", headers=_bearer(token))
        assert refused.status_code == 401
        assert parse_challenge(refused.headers["www-authenticate"])[1]["error"] == "insufficient_scope"
        # The catalog needs registry:catalog:*; users get what they ask for by default.
        catalog = issuer.fetch(client, ["registry:catalog:*"], auth=("alice", "wonderland"))
        assert client.get("/v2/_catalog", headers=_bearer(catalog)).json() == {"repositories": []}
    assert issuer.requests == [(None, (scope(REPO, "pull"),)), ("alice", ("registry:catalog:*",))]


def test_expired_tokens_are_rejected(
    registry_factory: Callable[..., Registry], issuer_factory: Callable[..., TokenIssuer]
) -> None:
    issuer = issuer_factory(expires_in=300)
    reg = registry_factory(config=token_config(issuer))
    wanted = [scope(REPO, "pull")]
    path = f"/v2/{REPO}/tags/list"
    with httpx.Client(base_url=reg.url) as client:
        fresh = issuer.mint("alice", wanted)
        assert client.get(path, headers=_bearer(fresh)).status_code == 404  # authorized; no such repo yet

        # Expired beyond the registry's clock-skew leeway: refused, with a fresh challenge.
        lifetime = 30
        expired = issuer.mint(
            "alice", wanted, issued_at=time.time() - lifetime - REGISTRY_TOKEN_LEEWAY - 5, expires_in=lifetime
        )
        assert jwt_parts(expired)[1]["exp"] < time.time() - REGISTRY_TOKEN_LEEWAY
        refused = client.get(path, headers=_bearer(expired))
        assert refused.status_code == 401
        assert parse_challenge(refused.headers["www-authenticate"])[1]["scope"] == wanted[0]
        # Expired, but within the leeway: still accepted (clients cannot rely on the registry to refuse).
        recent = issuer.mint("alice", wanted, issued_at=time.time() - lifetime - 10, expires_in=lifetime)
        assert client.get(path, headers=_bearer(recent)).status_code == 404
        # Not valid yet, beyond the leeway.
        future = issuer.mint("alice", wanted, issued_at=time.time() + REGISTRY_TOKEN_LEEWAY + 30)
        assert client.get(path, headers=_bearer(future)).status_code == 401

        # The issuer's lifetime is configurable between fetches; expires_in and exp agree.
        issuer.expires_in = 2
        answer = client.get(issuer.realm, params={"service": issuer.service, "scope": wanted[0]}).json()
        assert answer["expires_in"] == 2
        claims = jwt_parts(answer["token"])[1]
        assert claims["exp"] - claims["iat"] == 2


def test_oauth_post_token_endpoint(
    registry_factory: Callable[..., Registry], issuer_factory: Callable[..., TokenIssuer]
) -> None:
    issuer = issuer_factory()
    reg = registry_factory(config=token_config(issuer))
    both = scope(REPO, "pull", "push")
    form = {"grant_type": "password", "service": issuer.service, "client_id": "lazysnap-tests", "scope": both}
    with httpx.Client(base_url=reg.url) as client:
        wrong = client.post(issuer.realm, data={**form, "username": "alice", "password": "nope"})
        assert wrong.status_code == 401
        answer = client.post(
            issuer.realm,
            data={**form, "username": "alice", "password": "wonderland", "access_type": "offline"},
        )
        assert answer.status_code == 200
        body = answer.json()
        assert body["scope"] == both and body["expires_in"] == 300 and "refresh_token" in body
        assert _push_blob(client, REPO, b"oauth", _bearer(body["access_token"])).status_code == 201

        refreshed = client.post(
            issuer.realm,
            data={
                "grant_type": "refresh_token",
                "refresh_token": body["refresh_token"],
                "service": issuer.service,
                "scope": scope(REPO, "pull"),
            },
        ).json()
        assert jwt_parts(refreshed["access_token"])[1]["sub"] == "alice"
        bad = client.post(issuer.realm, data={"grant_type": "refresh_token", "refresh_token": "forged"})
        assert bad.status_code == 401
    assert issuer.requests == [("alice", (both,)), ("alice", (scope(REPO, "pull"),))]


def test_issuer_over_tls_and_stop(issuer_factory: Callable[..., TokenIssuer], pki: TestPKI) -> None:
    issuer = issuer_factory(tls=True, anonymous_pull=True)
    assert issuer.realm.startswith("https://127.0.0.1:")
    with httpx.Client(verify=pki.client_context()) as client:
        assert jwt_parts(issuer.fetch(client, [scope(REPO)]))[1]["access"][0]["actions"] == ["pull"]
    with pytest.raises(httpx.ConnectError):
        httpx.get(issuer.realm)  # not trusted without the test CA

    assert issuer.running
    issuer.stop()
    assert not issuer.running
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", issuer.port)) != 0  # the port is closed
    issuer.stop()  # idempotent
