"""Registry credentials, as docker and containerd users keep them.

Looked up per registry host, first match wins: credentials given to the client directly (lazysnap's own
configuration), then docker's config.json: `credHelpers[host]`, `auths[host]` (`auth` = base64
"user:password", or `username`/`password`, or `identitytoken`), then `credsStore`. Helpers are the
`docker-credential-<name>` executables, run with `get` and the host on stdin. Secrets stay in memory;
`Credentials.__repr__` never shows them.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .errors import ConfigError
from .reference import DOCKER_HUB

HELPER_TIMEOUT = 10.0
_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io", DOCKER_HUB)


@dataclass(frozen=True)
class Credentials:
    username: str
    secret: str = field(repr=False)
    identity_token: bool = False  # secret is an OAuth2 refresh token, not a password

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, secret=<hidden>)"


def default_docker_config() -> Path:
    base = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    return Path(base) / "config.json"


class CredentialStore:
    def __init__(
        self,
        docker_config: Path | None = None,
        static: dict[str, Credentials] | None = None,
    ):
        self.docker_config = docker_config if docker_config is not None else default_docker_config()
        self.static = {_normalize(k): v for k, v in (static or {}).items()}
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

    async def lookup(self, registry_host: str) -> Credentials | None:
        host = _normalize(registry_host)
        if host not in self._cache:
            self._cache[host] = await self._find(host)
        return self._cache[host]

    def forget(self, registry_host: str) -> None:
        """Drop cached credentials (after the registry refused them), so helpers are asked again."""
        self._cache.pop(_normalize(registry_host), None)

    async def _find(self, host: str) -> Credentials | None:
        if host in self.static:
            return self.static[host]
        doc = self._load()
        helpers = doc.get("credHelpers") or {}
        helper = next((v for k, v in helpers.items() if _normalize(k) == host), None)
        if helper:
            return await _run_helper(helper, host)
        for key, entry in (doc.get("auths") or {}).items():
            if _normalize(key) == host and isinstance(entry, dict):
                creds = _from_auth_entry(entry, key, self.docker_config)
                if creds:
                    return creds
        if store := doc.get("credsStore"):
            return await _run_helper(store, host)
        return None


def _normalize(key: str) -> str:
    """ "https://index.docker.io/v1/" -> "docker.io"; "http://h:5000/v2/" -> "h:5000"."""
    k = key.split("://", 1)[-1].split("/", 1)[0].lower()
    return DOCKER_HUB if key in _HUB_KEYS or k in _HUB_KEYS else k


def _from_auth_entry(entry: dict, key: str, source: Path) -> Credentials | None:
    if token := entry.get("identitytoken"):
        return Credentials(entry.get("username", "<token>"), token, identity_token=True)
    if auth := entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(auth).decode().partition(":")
        except (ValueError, TypeError):  # binascii.Error and UnicodeDecodeError are ValueErrors
            sep = ""
        if not sep:
            raise ConfigError(f"{source}: auths[{key!r}].auth is not base64 of 'user:password'")
        return Credentials(user, password)
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
