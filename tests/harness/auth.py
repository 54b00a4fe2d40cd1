"""Authentication and TLS variants of the test registry: a throwaway PKI, htpasswd, and a token server.

Each helper returns a config fragment that `Registry(config=...)` deep-merges, so a variant is one line:

    pki = TestPKI(workdir / "pki")
    reg = registry_factory(record=False, config=combine(tls_config(pki), htpasswd_config(workdir, USERS)))

    with TokenIssuer(workdir / "token", users={"alice": "secret"}, anonymous_pull=True) as issuer:
        reg = registry_factory(config=token_config(issuer))

`TokenIssuer` implements the Docker registry token flow in-process (a `ThreadingHTTPServer` in a
background thread): `GET /token?service=..&scope=..` with optional Basic auth, and the OAuth2
`POST /token` (password and refresh_token grants) that containerd tries first. Its JWTs are ES256 and
carry either a libtrust `kid` (the signing certificate is in the registry's `rootcertbundle`) or an
`x5c` chain (the test CA is the bundle); distribution 2.8 accepts both.

Distribution 2.8 allows 60 s of clock skew on `exp`/`nbf` (`REGISTRY_TOKEN_LEEWAY`): a token that the
issuer says `expires_in=1` is still accepted by the registry for a minute. Tests that need a token the
registry rejects as expired mint it in the past with `TokenIssuer.mint(..., issued_at=...)`.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import secrets
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .procs import free_port

REGISTRY_TOKEN_LEEWAY = 60
"""Seconds of clock skew distribution 2.8 tolerates on a token's exp and nbf claims."""

DEFAULT_SERVICE = "lazysnap-registry"
DEFAULT_ISSUER = "lazysnap-token-issuer"
DEFAULT_REALM = "lazysnap-registry"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

# ---------------------------------------------------------------------------------------------------
# PKI
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertPair:
    """A PEM certificate and its PEM (PKCS#8, unencrypted) private key, on disk."""

    cert: Path
    key: Path

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert.read_bytes())

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key


class TestPKI:
    """A test CA (ECDSA P-256) in `directory`, issuing server, client and token-signing certificates.

    Certificates are made once per name and reused (the same name returns the same files).
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, directory: Path, *, ca_name: str = "lazysnap test CA", days: int = 2):
        self.directory = directory
        self.days = days
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = CertPair(directory / "ca.crt", directory / "ca.key")
        if not self.ca.cert.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
            builder = (
                self._builder(name, name, key.public_key())
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(_key_usage(cert_sign=True), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            )
            _write(self.ca, builder.sign(key, hashes.SHA256()), key)

    @property
    def ca_cert(self) -> Path:
        return self.ca.cert

    @property
    def ca_key(self) -> Path:
        return self.ca.key

    def server_cert(self, name: str = "server", hosts: Sequence[str] = LOCAL_HOSTS) -> CertPair:
        """A TLS server certificate for `hosts` (IP addresses become IP SANs, the rest DNS SANs)."""
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        return self._issue(
            name,
            hosts[0],
            [
                (x509.SubjectAlternativeName(sans), False),
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            ],
        )

    def client_cert(self, name: str = "client", common_name: str = "lazysnap-client") -> CertPair:
        """A TLS client certificate (for registries configured with clientcas)."""
        return self._issue(
            name, common_name, [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)]
        )

    def signing_cert(self, name: str = "token-signer") -> CertPair:
        """A certificate for a token issuer's JWT signing key."""
        return self._issue(name, name, [])

    def other_ca(self, name: str = "other") -> TestPKI:
        """An unrelated CA (in a subdirectory), for 'signed by someone else' tests."""
        return TestPKI(self.directory / name, ca_name=f"lazysnap untrusted CA {name}", days=self.days)

    def client_context(self, client: CertPair | None = None, *, trust: bool = True) -> ssl.SSLContext:
        """An SSL context for httpx (`verify=`): trusts this CA (unless trust=False), presents `client`."""
        ctx = ssl.create_default_context(cafile=str(self.ca.cert) if trust else None)
        if client is not None:
            ctx.load_cert_chain(str(client.cert), str(client.key))
        return ctx

    def _issue(
        self, name: str, common_name: str, extensions: list[tuple[x509.ExtensionType, bool]]
    ) -> CertPair:
        pair = CertPair(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        if pair.cert.exists():
            return pair
        ca_cert, ca_key = self.ca.certificate(), self.ca.private_key()
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (
            self._builder(subject, ca_cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        _write(pair, builder.sign(ca_key, hashes.SHA256()), key)
        return pair

    def _builder(
        self, subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
    ) -> x509.CertificateBuilder:
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=self.days))
        )


def _key_usage(*, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _write(pair: CertPair, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pair.key.chmod(0o600)
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# ---------------------------------------------------------------------------------------------------
# Registry config fragments
# ---------------------------------------------------------------------------------------------------


def combine(*fragments: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge config fragments (later ones win), e.g. combine(tls_config(pki), htpasswd_config(...))."""
    out: dict[str, Any] = {}
    for fragment in fragments:
        out = _merge(out, fragment)
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def htpasswd_hash(password: str, *, prefix: Literal["2y", "2a", "2b"] = "2y", rounds: int = 4) -> str:
    """A bcrypt hash as htpasswd -B writes it ($2y$, Apache's spelling); rounds=4 keeps tests fast."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()
    return f"${prefix}${hashed.split('$', 2)[2]}"


def htpasswd_config(
    workdir: Path,
    users: dict[str, str],
    *,
    realm: str = DEFAULT_REALM,
    prefix: Literal["2y", "2a", "2b"] = "2y",
    filename: str = "htpasswd",
) -> dict[str, Any]:
    """Write a bcrypt htpasswd file of `users` (name -> password) into workdir; return `auth.htpasswd`."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / filename
    path.write_text("".join(f"{user}:{htpasswd_hash(pw, prefix=prefix)}\n" for user, pw in users.items()))
    return {"auth": {"htpasswd": {"realm": realm, "path": str(path)}}}


def tls_config(
    pki: TestPKI,
    *,
    server: CertPair | None = None,
    client_cas: bool | Iterable[Path] = False,
) -> dict[str, Any]:
    """The `http.tls` fragment: pki's server certificate; client_cas=True requires client certificates
    signed by pki's CA (mTLS), or pass CA certificate paths. Start the registry with record=False."""
    server = server or pki.server_cert()
    tls: dict[str, Any] = {"certificate": str(server.cert), "key": str(server.key)}
    if client_cas:
        cas = [pki.ca_cert] if client_cas is True else list(client_cas)
        tls["clientcas"] = [str(p) for p in cas]
    return {"http": {"tls": tls}}


def token_config(issuer: TokenIssuer) -> dict[str, Any]:
    """The `auth.token` fragment that makes a registry trust `issuer` (its realm, service, key)."""
    return {
        "auth": {
            "token": {
                "realm": issuer.realm,
                "service": issuer.service,
                "issuer": issuer.issuer,
                "rootcertbundle": str(issuer.rootcertbundle),
            }
        }
    }


# ---------------------------------------------------------------------------------------------------
# Scopes, challenges, JWT
# ---------------------------------------------------------------------------------------------------


class Scope(NamedTuple):
    """One `type:name:actions` scope, e.g. repository:lzs/app:pull,push."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope:
        # Names may contain ':' (host:port/repo): the type is before the first, actions after the last.
        kind, _, rest = text.partition(":")
        name, _, actions = rest.rpartition(":")
        if not kind or not name:
            raise ValueError(f"not a scope: {text!r}")
        return cls(kind, name, tuple(a for a in actions.split(",") if a))

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


def scope(repository: str, *actions: str) -> str:
    """scope("lzs/app", "pull", "push") -> "repository:lzs/app:pull,push" (default: pull)."""
    return str(Scope("repository", repository, actions or ("pull",)))


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split a WWW-Authenticate value: 'Bearer realm="r",service="s"' -> ("bearer", {"realm": "r", ...})."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    i = 0
    while i < len(rest):
        eq = rest.find("=", i)
        if eq < 0:
            break
        key = rest[i:eq].strip(" ,").lower()
        i = eq + 1
        if rest[i : i + 1] == '"':
            j = i + 1
            value = []
            while j < len(rest) and rest[j] != '"':
                if rest[j] == "\\" and j + 1 < len(rest):
                    j += 1
                value.append(rest[j])
                j += 1
            params[key] = "".join(value)
            i = j + 1
        else:
            j = rest.find(",", i)
            j = len(rest) if j < 0 else j
            params[key] = rest[i:j].strip()
            i = j + 1
    return scheme.lower(), params


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """docker/libtrust's key ID: base32 of the first 240 bits of SHA-256(DER SPKI), 12 groups of 4."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(b32[i : i + 4] for i in range(0, 48, 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT, unverified: for assertions in tests."""
    header, claims, _ = token.split(".")
    return json.loads(_b64url_decode(header)), json.loads(_b64url_decode(claims))


def sign_es256(header: dict[str, Any], claims: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> str:
    """A compact JWS: ES256 signature as raw r||s (32 bytes each), as RFC 7518 requires."""
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def rfc3339(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------------
# Token server
# ---------------------------------------------------------------------------------------------------


class TokenRequest(NamedTuple):
    """A token the issuer served: who asked (None = anonymous) and the scopes asked for."""

    user: str | None
    scopes: tuple[str, ...]


Policy = Callable[[str | None, Scope], Collection[str]]
"""policy(user or None, requested scope) -> the actions granted on it (a subset of scope.actions)."""

KeyRef = Literal["kid", "x5c"]


class TokenIssuer:
    """A Docker registry token server running in a background thread on a free 127.0.0.1 port.

    Policy (unless `policy` is given): a user who authenticates gets the actions of `user_actions[user]`
    (default: everything asked); anonymous requests get "pull" if `anonymous_pull`, else nothing (they
    still get a token, with an empty access list, as Docker Hub does). A wrong password, or an unknown
    user, is answered 401. `expires_in` may be changed between requests.
    """

    def __init__(
        self,
        directory: Path,
        *,
        pki: TestPKI | None = None,
        users: dict[str, str] | None = None,
        user_actions: dict[str, Collection[str]] | None = None,
        anonymous_pull: bool = False,
        policy: Policy | None = None,
        expires_in: int = 300,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        key_ref: KeyRef = "kid",
        tls: bool = False,
    ):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.pki = pki or TestPKI(directory / "pki")
        self.users = dict(users or {})
        self.user_actions = dict(user_actions or {})
        self.anonymous_pull = anonymous_pull
        self.policy = policy
        self.expires_in = expires_in
        self.service = service
        self.issuer = issuer
        self.key_ref = key_ref
        self.tls = tls
        self.requests: list[TokenRequest] = []
        self.rejected: list[TokenRequest] = []
        self.port = free_port()
        self._lock = threading.Lock()
        self._refresh_tokens: dict[str, str] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

        signer = self.pki.signing_cert(f"token-signer-{key_ref}")
        self._key = signer.private_key()
        self._cert_der = signer.certificate().public_bytes(serialization.Encoding.DER)
        self.key_id = libtrust_key_id(self._key.public_key())
        # kid: the registry looks the key up among the bundle's keys, so the bundle is the signing cert;
        # x5c: the registry verifies the chain in the header, so the bundle is the CA.
        self.rootcertbundle = directory / f"rootcertbundle-{key_ref}.pem"
        bundle = signer.cert if key_ref == "kid" else self.pki.ca_cert
        self.rootcertbundle.write_bytes(bundle.read_bytes())

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """http(s)://127.0.0.1:PORT of the issuer."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        """The token endpoint, as the registry's challenge names it."""
        return f"{self.url}/token"

    def start(self) -> TokenIssuer:
        if self._server is not None:
            raise RuntimeError("token issuer already started")
        server = _QuietServer(("127.0.0.1", self.port), _handler(self))
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            cert = self.pki.server_cert()
            ctx.load_cert_chain(str(cert.cert), str(cert.key))
            # Handshake lazily, in the request thread (which has a timeout), not in accept().
            server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"token-issuer-{self.port}"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and join the server thread and its request threads."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        server.shutdown()
        server.server_close()  # also joins the request threads still running
        thread.join(10)
        if thread.is_alive():
            raise RuntimeError("token issuer thread did not stop")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> TokenIssuer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- tokens -------------------------------------------------------------------------------

    def grant(self, user: str | None, scopes: Iterable[str]) -> list[dict[str, Any]]:
        """The access claim the policy gives `user` (None = anonymous) for the requested scopes."""
        access: dict[tuple[str, str], list[str]] = {}
        for text in scopes:
            for part in text.split():
                requested = Scope.parse(part)
                allowed = set(self._allowed(user, requested))
                actions = access.setdefault((requested.type, requested.name), [])
                actions.extend(a for a in requested.actions if a in allowed and a not in actions)
        return [{"type": t, "name": n, "actions": a} for (t, n), a in access.items() if a]

    def _allowed(self, user: str | None, requested: Scope) -> Collection[str]:
        if self.policy is not None:
            return self.policy(user, requested)
        if user is None:
            return {"pull"} if self.anonymous_pull and requested.type == "repository" else set()
        return self.user_actions.get(user, requested.actions)

    def mint(
        self,
        user: str | None,
        access: Iterable[str] | list[dict[str, Any]] = (),
        *,
        issued_at: float | None = None,
        expires_in: int | None = None,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> str:
        """A signed token for `user` with `access` (scope strings, granted as asked, or access entries).

        Bypasses the policy: for tests that need a token the server would not hand out (expired:
        issued_at=time.time() - 3600; wrong audience or issuer).
        """
        access = list(access)
        entries = (
            access
            if access and isinstance(access[0], dict)
            else [
                {"type": s.type, "name": s.name, "actions": list(s.actions)} for s in map(Scope.parse, access)
            ]
        )
        now = int(time.time() if issued_at is None else issued_at)
        lifetime = self.expires_in if expires_in is None else expires_in
        claims = {
            "iss": issuer or self.issuer,
            "sub": user or "",
            "aud": audience or self.service,  # distribution 2.8 wants a string, not a list
            "exp": now + lifetime,
            "nbf": now,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": entries,
        }
        header: dict[str, Any] = {"typ": "JWT", "alg": "ES256"}
        if self.key_ref == "kid":
            header["kid"] = self.key_id
        else:
            header["x5c"] = [base64.b64encode(self._cert_der).decode()]
        return sign_es256(header, claims, self._key)

    def fetch(self, client: Any, scopes: Iterable[str] = (), *, auth: tuple[str, str] | None = None) -> str:
        """Fetch a token over HTTP with an httpx-like client (GET realm?service=..&scope=..)."""
        params = [("service", self.service)] + [("scope", s) for s in scopes]
        r = client.get(self.realm, params=params, auth=auth)
        r.raise_for_status()
        return str(r.json()["token"])

    # --- request handling (called from the server's threads) -----------------------------------

    def _authenticate(self, authorization: str | None) -> tuple[bool, str | None]:
        """(ok, user): no header is anonymous; a bad header or password is not ok."""
        if not authorization:
            return True, None
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False, None
        ok = user in self.users and secrets.compare_digest(self.users[user], password)
        return ok, user

    def _issue(self, user: str | None, scopes: list[str], *, refresh: bool = False) -> dict[str, Any]:
        now = time.time()
        token = self.mint(user, self.grant(user, scopes), issued_at=now)
        with self._lock:
            self.requests.append(TokenRequest(user, tuple(scopes)))
        body: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": rfc3339(now),
        }
        if refresh and user is not None:
            refresh_token = secrets.token_urlsafe(24)
            with self._lock:
                self._refresh_tokens[refresh_token] = user
            body["refresh_token"] = refresh_token
        return body

    def _reject(self, user: str | None, scopes: list[str]) -> None:
        with self._lock:
            self.rejected.append(TokenRequest(user, tuple(scopes)))

    def handle_get(
        self, query: dict[str, list[str]], authorization: str | None
    ) -> tuple[int, dict[str, Any]]:
        scopes = query.get("scope", [])
        ok, user = self._authenticate(authorization)
        if not ok:
            self._reject(user, scopes)
            return 401, {"details": "invalid username or password"}
        if query.get("service", [self.service])[0] != self.service:
            return 400, {"details": f"unknown service {query['service'][0]!r}"}
        offline = query.get("offline_token", ["false"])[0] == "true"
        return 200, self._issue(user, scopes, refresh=offline)

    def handle_post(self, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        """OAuth2 token endpoint (what containerd tries first when it has credentials)."""
        grant_type = form.get("grant_type", [""])[0]
        scopes = " ".join(form.get("scope", [])).split()
        if form.get("service", [self.service])[0] != self.service:
            return 400, {"error": "invalid_request", "error_description": "unknown service"}
        if grant_type == "password":
            user, password = form.get("username", [""])[0], form.get("password", [""])[0]
            if not (user in self.users and secrets.compare_digest(self.users[user], password)):
                self._reject(user, scopes)
                return 401, {"error": "invalid_grant"}
        elif grant_type == "refresh_token":
            with self._lock:
                user = self._refresh_tokens.get(form.get("refresh_token", [""])[0])
            if user is None:
                self._reject(None, scopes)
                return 401, {"error": "invalid_grant"}
        else:
            return 400, {"error": "unsupported_grant_type"}
        body = self._issue(user, scopes, refresh=form.get("access_type", [""])[0] == "offline")
        body.pop("token")
        body["scope"] = " ".join(scopes)
        return 200, body


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up or fail the TLS handshake (tests do that on purpose) print no traceback."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def _handler(issuer: TokenIssuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "lazysnap-token-issuer"
        timeout = 5  # a stalled client cannot hold up stop()

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/token":
                return self._send(404, {"details": "not found"})
            query = urllib.parse.parse_qs(url.query)
            self._send(*issuer.handle_get(query, self.headers.get("Authorization")))

        def do_POST(self) -> None:
            if urllib.parse.urlsplit(self.path).path != "/token":
                return self._send(404, {"details": "not found"})
            length = int(self.headers.get("Content-Length") or 0)
            form = urllib.parse.parse_qs(self.rfile.read(length).decode())
            self._send(*issuer.handle_post(form))

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", f'Basic realm="{issuer.service}"')
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
            pass

    return Handler
