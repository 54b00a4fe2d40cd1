"""Registry authentication: the WWW-Authenticate challenge, Basic, and the Bearer token flow.

An `Authorizer` remembers, per endpoint host, the challenge it last answered with, so later requests
carry credentials up front instead of collecting a 401 first. Bearer tokens are cached per
(endpoint, scope) until shortly before they expire. A token is asked of the realm with GET
(`service`, `scope`, Basic credentials when there are any) or, for an identity token, with the OAuth2
refresh-token POST; a registry token (kubelet's `registry_token`) is the bearer token itself. Credentials
are looked up for the repository the request's first scope names, so credentials a pull brought for one
repository never serve another. Tokens and passwords never appear in errors or logs.
"""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from .bodies import read_capped
from .credentials import Credentials, CredentialStore
from .errors import ProtocolViolation, Unauthorized

if TYPE_CHECKING:
    from .hosts import Endpoint

EXPIRY_MARGIN = 10.0  # seconds: renew a token this long before it expires
DEFAULT_TOKEN_LIFETIME = 60.0  # the distribution spec's default for a missing expires_in
MAX_TOKEN_RESPONSE = 256 << 10  # a token answer is a small JSON object; a bigger one is refused unread
_PARAM = re.compile(r'\s*([a-zA-Z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*(,|$)')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "basic" or "bearer"
    params: dict[str, str]


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate value; several challenges may share one header."""
    out: list[Challenge] = []
    pos = 0
    header = header.strip()
    while pos < len(header):
        m = re.compile(r"\s*([A-Za-z][A-Za-z0-9_-]*)\s*").match(header, pos)
        if not m:
            break
        scheme, pos = m[1].lower(), m.end()
        params: dict[str, str] = {}
        while pos < len(header):
            p = _PARAM.match(header, pos)
            if not p:
                break
            value = p[2]
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[p[1].lower()] = value
            pos = p.end()
        out.append(Challenge(scheme, params))
        if not params:  # a scheme without parameters ("Basic, Bearer ..."): skip to the next challenge
            comma = header.find(",", pos)
            pos = comma + 1 if comma >= 0 else len(header)
        # else the last parameter ended at the end or took its comma: pos is at the next challenge
    return out


def _basic(username: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{secret}".encode()).decode()


def scope_for(repository: str, actions: str) -> str:
    return f"repository:{repository}:{actions}"


def repository_of(scopes: tuple[str, ...]) -> str | None:
    """The repository of the first scope (the one `scope_for` made for the request's own image)."""
    kind, _, rest = scopes[0].partition(":") if scopes else ("", "", "")
    if kind != "repository":
        return None
    return rest.rpartition(":")[0] or None


class Authorizer:
    def __init__(self, credentials: CredentialStore):
        self.credentials = credentials
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self.token_fetches = 0  # for tests and metrics

    async def header(self, endpoint: Endpoint, scopes: tuple[str, ...]) -> dict[str, str]:
        """The Authorization header to send up front, if the endpoint has challenged before."""
        challenge = self._challenges.get(endpoint.host)
        if challenge is None:
            return {}
        if challenge.scheme == "basic":
            creds = await self._basic_credentials(endpoint, scopes)
            if creds is None:
                return {}
            return {"Authorization": _basic(creds.username, creds.secret)}
        key = (endpoint.host, " ".join(scopes))
        cached = self._tokens.get(key)
        if cached and cached[1] > time.monotonic():
            return {"Authorization": f"Bearer {cached[0]}"}
        return {}

    async def challenged(
        self, endpoint: Endpoint, response: httpx.Response, scopes: tuple[str, ...], client: httpx.AsyncClient
    ) -> None:
        """Handle a 401: remember the challenge and obtain what it asks for (raises Unauthorized when
        nothing can satisfy it)."""
        where = f"{endpoint.registry} ({endpoint.base_url})"
        challenges = parse_challenges(response.headers.get("www-authenticate", ""))
        usable = [c for c in challenges if c.scheme in ("bearer", "basic")]
        if not usable:
            raise Unauthorized(f"{where} answered 401 without a Basic or Bearer challenge")
        challenge = next((c for c in usable if c.scheme == "bearer"), usable[0])
        self._challenges[endpoint.host] = challenge
        key = (endpoint.host, " ".join(scopes))
        if challenge.scheme == "basic":
            creds = await self._basic_credentials(endpoint, scopes)
            if creds is None:
                raise Unauthorized(
                    f"{where} requires credentials and none are configured for it "
                    "(docker config.json, credential helper, lazysnap config, or a kubelet pull of the "
                    "image through lazysnap's CRI proxy)"
                )
            # refused only when this request carried them: another one sent at the same time without them
            # (before either had seen the challenge) is simply sent again with them
            if response.request.headers.get("authorization", "").lower().startswith("basic "):
                raise Unauthorized(f"{where} refused the configured credentials for user {creds.username!r}")
            return
        self._tokens.pop(key, None)
        creds = await self.credentials.lookup(endpoint.registry, repository_of(scopes))
        if creds is not None and creds.registry_token:
            token, lifetime = creds.secret, DEFAULT_TOKEN_LIFETIME  # re-read from the store after that
        else:
            token, lifetime = await self._fetch_token(endpoint, challenge, scopes, client, creds)
        self._tokens[key] = (token, time.monotonic() + max(lifetime - EXPIRY_MARGIN, 1.0))

    async def _basic_credentials(self, endpoint: Endpoint, scopes: tuple[str, ...]) -> Credentials | None:
        """The credentials to send with Basic auth (a registry token is no use there)."""
        creds = await self.credentials.lookup(endpoint.registry, repository_of(scopes))
        return None if creds is None or creds.registry_token else creds

    async def _fetch_token(
        self,
        endpoint: Endpoint,
        challenge: Challenge,
        scopes: tuple[str, ...],
        client: httpx.AsyncClient,
        creds: Credentials | None,
    ) -> tuple[str, float]:
        where = f"{endpoint.registry}"
        realm = challenge.params.get("realm")
        if not realm or not realm.startswith(("http://", "https://")):
            raise Unauthorized(f"{where}: Bearer challenge without a usable realm")
        service = challenge.params.get("service", "")
        self.token_fetches += 1
        if creds and creds.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": creds.secret,
                "service": service,
                "scope": " ".join(scopes),
                "client_id": "lazysnap",
            }
            request = client.build_request("POST", realm, data=form)
        else:
            params = [("service", service)] if service else []
            params += [("scope", s) for s in scopes]
            basic = {"Authorization": _basic(creds.username, creds.secret)} if creds else {}
            request = client.build_request("GET", realm, params=params, headers=basic)
        try:
            r = await client.send(request, stream=True)
            try:
                if r.status_code in (401, 403):
                    who = f"user {creds.username!r}" if creds else "anonymous access"
                    raise Unauthorized(f"{where}: token service refused {who} for {' '.join(scopes)}")
                if r.status_code != 200:
                    raise Unauthorized(f"{where}: token service {realm} answered HTTP {r.status_code}")
                raw = await read_capped(r, MAX_TOKEN_RESPONSE, f"{where}: token answer of {realm}")
            finally:
                await r.aclose()
        except httpx.TransportError as e:
            raise Unauthorized(f"{where}: token service {realm} unreachable: {type(e).__name__}") from e
        except ProtocolViolation as e:
            raise Unauthorized(str(e)) from e
        try:
            body = json.loads(raw)
            token = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError) as e:
            raise Unauthorized(f"{where}: token service {realm} sent no JSON token") from e
        if not token or not isinstance(token, str):
            raise Unauthorized(f"{where}: token service {realm} sent no token")
        return token, lifetime

    def forget(self, endpoint: Endpoint, scopes: tuple[str, ...]) -> None:
        self._tokens.pop((endpoint.host, " ".join(scopes)), None)
