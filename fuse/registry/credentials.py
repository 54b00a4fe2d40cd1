"""Registry credentials, as docker and containerd users keep them, and as kubelet sends them with pulls.

Looked up per registry host and repository, first match wins: the credentials the image's last pull
brought for that very repository (`PullCredentials`, filled by the CRI proxy from kubelet's PullImage;
never used for another repository or registry), then, per host, credentials given to the client
directly (lazysnap's own configuration), then docker's config.json: `credHelpers[host]`, `auths[host]`
(`auth` = base64 "user:password", or `username`/`password`, or `identitytoken`), then `credsStore`.
Helpers are the `docker-credential-<name>` executables, run with `get` and the host on stdin. Secrets
stay in memory; `Credentials.__repr__` never shows them.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .errors import ConfigError
from .reference import DOCKER_HUB

HELPER_TIMEOUT = 10.0
MAX_PULL_CREDENTIALS = 10_000  # (registry, repository) entries PullCredentials keeps at most
_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io", DOCKER_HUB)


@dataclass(frozen=True)
class Credentials:
    username: str
    secret: str = field(repr=False)
    identity_token: bool = False  # secret is an OAuth2 refresh token, not a password
    registry_token: bool = False  # secret is a bearer token, sent to the registry as it is

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, secret=<hidden>)"

    @property
    def kind(self) -> str:
        """What the secret is, for logs and metrics: password, identity_token or registry_token."""
        if self.identity_token:
            return "identity_token"
        return "registry_token" if self.registry_token else "password"


def decode_auth(value: str) -> tuple[str, str] | None:
    """(user, password) from an `auth` value, base64 of "user:password"; None when it is not one.
    NUL padding after the password is dropped, as containerd does."""
    try:
        user, sep, password = base64.b64decode(value).decode().partition(":")
    except (ValueError, TypeError):  # binascii.Error and UnicodeDecodeError are ValueErrors
        return None
    return (user, password.strip("\x00")) if sep else None


class PullCredentials:
    """The credentials that came with image pulls, per (registry host, repository), in memory only.

    Each entry expires `ttl` seconds after it was last stored (every pull of the repository stores it
    again); beyond `limit` entries the least recently stored goes first. Stored from the CRI proxy's
    gRPC threads and read on the trio loop, hence the lock.
    """

    def __init__(
        self, ttl: float, limit: int = MAX_PULL_CREDENTIALS, clock: Callable[[], float] = time.monotonic
    ):
        if ttl <= 0 or limit < 1:
            raise ValueError("PullCredentials needs a positive ttl and limit")
        self.ttl, self.limit, self._clock = ttl, limit, clock
        self._entries: OrderedDict[tuple[str, str], tuple[Credentials, float]] = OrderedDict()
        self._lock = threading.Lock()

    def store(self, registry_host: str, repository: str, creds: Credentials) -> Callable[[], None]:
        """Keep `creds` for this repository (refreshing its expiry); returns a function that undoes
        this store (for a pull that failed): what was there before comes back, unless a later store
        for the repository replaced this one meanwhile."""
        key = (normalize_registry(registry_host), repository)
        with self._lock:
            self._drop_expired()
            previous = self._entries.pop(key, None)
            entry = (creds, self._clock() + self.ttl)
            self._entries[key] = entry
            while len(self._entries) > self.limit:
                self._entries.popitem(last=False)

        def undo() -> None:
            with self._lock:
                if self._entries.get(key) is not entry:
                    return
                del self._entries[key]
                if previous is not None and previous[1] > self._clock():
                    self._entries[key] = previous
                    self._entries.move_to_end(key, last=False)  # stored long ago: first to go

        return undo

    def get(self, registry_host: str, repository: str) -> Credentials | None:
        """The unexpired credentials of this repository, if a pull brought some."""
        key = (normalize_registry(registry_host), repository)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[1] <= self._clock():
                del self._entries[key]
                return None
            return entry[0]

    def __len__(self) -> int:
        """Repositories whose credentials are kept (and not expired)."""
        with self._lock:
            self._drop_expired()
            return len(self._entries)

    def _drop_expired(self) -> None:
        """Forget expired credentials (a scan of at most `limit` entries, at each pull)."""
        now = self._clock()
        for key in [k for k, (_, expires) in self._entries.items() if expires <= now]:
            del self._entries[key]


def default_docker_config() -> Path:
    base = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    return Path(base) / "config.json"


class CredentialStore:
    def __init__(
        self,
        docker_config: Path | None = None,
        static: dict[str, Credentials] | None = None,
        pulled: PullCredentials | None = None,
    ):
        self.docker_config = docker_config if docker_config is not None else default_docker_config()
        self.static = {normalize_registry(k): v for k, v in (static or {}).items()}
        self.pulled = pulled
        self._doc: dict | None = None
        self._cache: dict[str, Credentials | None] = {}

    def _load(self) -> dict:
        if self._doc is None:
            try:
                text = self.docker_config.read_text()
            except FileNotFoundError:
                text = "{}"
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read docker config {self.docker_config}: {e}") from e
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{self.docker_config}: not valid JSON (line {e.lineno}): {e.msg}") from e
            if not isinstance(doc, dict):
                raise ConfigError(f"{self.docker_config}: must hold a JSON object")
            for key in ("auths", "credHelpers"):
                if not isinstance(doc.get(key) or {}, dict):
                    raise ConfigError(f"{self.docker_config}: {key!r} must be a JSON object")
            self._doc = doc
        return self._doc

    async def lookup(self, registry_host: str, repository: str | None = None) -> Credentials | None:
        """The credentials for a repository of a registry: those its last pull brought, else the
        host's (configuration, docker config, helpers); None for anonymous access."""
        if repository is not None and self.pulled is not None:
            if (creds := self.pulled.get(registry_host, repository)) is not None:
                return creds
        host = normalize_registry(registry_host)
        if host not in self._cache:
            self._cache[host] = await self._find(host)
        return self._cache[host]

    def forget(self, registry_host: str) -> None:
        """Drop cached credentials (after the registry refused them), so helpers are asked again."""
        self._cache.pop(normalize_registry(registry_host), None)

    async def _find(self, host: str) -> Credentials | None:
        if host in self.static:
            return self.static[host]
        doc = self._load()
        helpers = doc.get("credHelpers") or {}
        helper = next((v for k, v in helpers.items() if normalize_registry(k) == host), None)
        if helper:
            return await _run_helper(helper, host)
        for key, entry in (doc.get("auths") or {}).items():
            if normalize_registry(key) == host and isinstance(entry, dict):
                creds = _from_auth_entry(entry, key, self.docker_config)
                if creds:
                    return creds
        if store := doc.get("credsStore"):
            return await _run_helper(store, host)
        return None


def normalize_registry(key: str) -> str:
    """The registry host a docker config key or a CRI server_address names:
    "https://index.docker.io/v1/" -> "docker.io"; "http://h:5000/v2/" -> "h:5000"."""
    k = key.split("://", 1)[-1].split("/", 1)[0].lower()
    return DOCKER_HUB if key in _HUB_KEYS or k in _HUB_KEYS else k


def _from_auth_entry(entry: dict, key: str, source: Path) -> Credentials | None:
    if token := entry.get("identitytoken"):
        return Credentials(entry.get("username", "<token>"), token, identity_token=True)
    if auth := entry.get("auth"):
        decoded = decode_auth(auth)
        if decoded is None:
            raise ConfigError(f"{source}: auths[{key!r}].auth is not base64 of 'user:password'")
        return Credentials(*decoded)
    if entry.get("username") and entry.get("password"):
        return Credentials(entry["username"], entry["password"])
    return None


async def _run_helper(name: str, host: str) -> Credentials | None:
    program = f"docker-credential-{name}"
    server = "https://index.docker.io/v1/" if host == DOCKER_HUB else host
    try:
        with trio.fail_after(HELPER_TIMEOUT):
            proc = await trio.run_process(
                [program, "get"], stdin=server.encode(), capture_stdout=True, capture_stderr=True, check=False
            )
    except FileNotFoundError as e:
        raise ConfigError(f"credential helper {program} (for {host}) is not installed") from e
    except OSError as e:  # e.g. not executable
        raise ConfigError(f"credential helper {program} (for {host}) cannot be run: {e.strerror}") from e
    except trio.TooSlowError as e:
        raise ConfigError(
            f"credential helper {program} did not answer for {host} within {HELPER_TIMEOUT:.0f}s"
        ) from e
    out = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        if "credentials not found" in (out + proc.stderr.decode(errors="replace")).lower():
            return None
        raise ConfigError(f"credential helper {program} failed for {host} (exit {proc.returncode})")
    try:
        data = json.loads(out)
        user, secret = data["Username"], data["Secret"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"credential helper {program} gave no Username/Secret for {host}") from e
    return Credentials(user, secret, identity_token=user == "<token>")
