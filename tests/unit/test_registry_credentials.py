"""Credentials from docker's config.json, credential helpers (real executables on PATH) and static ones."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from fuse.registry.credentials import Credentials, CredentialStore, default_docker_config
from fuse.registry.errors import ConfigError

HELPERS = {
    # prints credentials naming the server it was asked about, and counts its calls
    "good": """#!/bin/sh
[ "$1" = get ] || { echo "unexpected arguments: $*" >&2; exit 64; }
server=$(cat)
echo x >> "$(dirname "$0")/good.calls"
printf '{"ServerURL":"%s","Username":"user@%s","Secret":"helper-secret"}\\n' "$server" "$server"
""",
    "token": """#!/bin/sh
cat >/dev/null
printf '{"Username":"<token>","Secret":"refresh-token"}'
""",
    "notfound": """#!/bin/sh
cat >/dev/null
echo "credentials not found in native keychain"
exit 1
""",
    "broken": """#!/bin/sh
cat >/dev/null
echo "error getting credentials - err: exit status 1, out: dbus unavailable" >&2
exit 1
""",
    "garbage": """#!/bin/sh
cat >/dev/null
echo "this is not json"
""",
}


@pytest.fixture
def helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on PATH with docker-credential-<name> scripts; returns it."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, script in HELPERS.items():
        program = bindir / f"docker-credential-{name}"
        program.write_text(script)
        program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return bindir


def store_with(tmp_path: Path, config: Any, **kw: Any) -> CredentialStore:
    path = tmp_path / "docker" / "config.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return CredentialStore(path, **kw)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def calls(bindir: Path) -> int:
    path = bindir / "good.calls"
    return len(path.read_text().splitlines()) if path.exists() else 0


# --- auths ----------------------------------------------------------------------------------------


async def test_auth_base64(tmp_path: Path) -> None:
    store = store_with(tmp_path, {"auths": {"reg.example.com": {"auth": b64("alice:pa:ss")}}})
    assert await store.lookup("reg.example.com") == Credentials("alice", "pa:ss")


async def test_username_and_password(tmp_path: Path) -> None:
    store = store_with(tmp_path, {"auths": {"reg.example.com": {"username": "bob", "password": "hunter2"}}})
    creds = await store.lookup("reg.example.com")
    assert creds == Credentials("bob", "hunter2")
    assert creds is not None and not creds.identity_token


async def test_identity_token(tmp_path: Path) -> None:
    store = store_with(
        tmp_path,
        {
            "auths": {
                "reg.example.com": {"auth": b64("ignored:x"), "identitytoken": "refresh-123"},
                "other.example.com": {"username": "carol", "identitytoken": "refresh-456"},
            }
        },
    )
    assert await store.lookup("reg.example.com") == Credentials("<token>", "refresh-123", identity_token=True)
    assert await store.lookup("other.example.com") == Credentials("carol", "refresh-456", identity_token=True)


async def test_no_config_file_and_no_entry(tmp_path: Path) -> None:
    assert await CredentialStore(tmp_path / "absent.json").lookup("docker.io") is None
    store = store_with(tmp_path, {"auths": {"reg.example.com": {}, "other": {"username": "only-user"}}})
    assert await store.lookup("reg.example.com") is None
    assert await store.lookup("other") is None
    assert await store.lookup("unknown.example.com") is None


@pytest.mark.parametrize(
    ("key", "lookups"),
    [
        ("https://index.docker.io/v1/", ["docker.io", "index.docker.io", "registry-1.docker.io"]),
        ("index.docker.io", ["docker.io"]),
        ("docker.io", ["docker.io", "https://index.docker.io/v1/"]),
        ("http://reg.example.com:5000/v2/", ["reg.example.com:5000"]),
        ("reg.example.com:5000", ["reg.example.com:5000", "https://reg.example.com:5000/v2/"]),
        ("https://Reg.Example.com", ["reg.example.com"]),
    ],
)
async def test_key_normalization(tmp_path: Path, key: str, lookups: list[str]) -> None:
    store = store_with(tmp_path, {"auths": {key: {"auth": b64("u:p")}}})
    for host in lookups:
        assert await store.lookup(host) == Credentials("u", "p"), host


@pytest.mark.parametrize(
    ("key", "host"),
    [
        ("reg.example.com:5000", "reg.example.com:5001"),
        ("reg.example.com", "reg.example.com:5000"),
        ("https://index.docker.io/v1/", "ghcr.io"),
        ("ghcr.io", "docker.io"),
    ],
)
async def test_keys_for_other_hosts_do_not_match(tmp_path: Path, key: str, host: str) -> None:
    store = store_with(tmp_path, {"auths": {key: {"auth": b64("u:p")}}})
    assert await store.lookup(host) is None


async def test_static_credentials_take_precedence(tmp_path: Path, helpers: Path) -> None:
    static = {
        "https://index.docker.io/v1/": Credentials("static", "s1"),
        "reg.example.com": Credentials("st", "s2"),
    }
    store = store_with(
        tmp_path,
        {
            "auths": {"docker.io": {"auth": b64("file:f")}},
            "credHelpers": {"reg.example.com": "good"},
            "credsStore": "good",
        },
        static=static,
    )
    assert await store.lookup("docker.io") == Credentials("static", "s1")
    assert await store.lookup("reg.example.com") == Credentials("st", "s2")
    assert calls(helpers) == 0


# --- credential helpers -------------------------------------------------------------------------------


async def test_cred_helper_gets_the_host_on_stdin(tmp_path: Path, helpers: Path) -> None:
    store = store_with(
        tmp_path,
        {
            "credHelpers": {"reg.example.com:5000": "good", "https://index.docker.io/v1/": "good"},
            "auths": {"reg.example.com:5000": {"auth": b64("file:f")}},
        },
    )
    # credHelpers comes before auths
    assert await store.lookup("reg.example.com:5000") == Credentials(
        "user@reg.example.com:5000", "helper-secret"
    )
    # Docker Hub is asked for by its legacy server URL
    hub = await store.lookup("docker.io")
    assert hub == Credentials("user@https://index.docker.io/v1/", "helper-secret")


async def test_creds_store_is_the_fallback_after_auths(tmp_path: Path, helpers: Path) -> None:
    store = store_with(
        tmp_path,
        {"credsStore": "good", "auths": {"in-file.example.com": {"auth": b64("file:f")}, "ghcr.io": {}}},
    )
    assert await store.lookup("in-file.example.com") == Credentials("file", "f")
    assert await store.lookup("ghcr.io") == Credentials("user@ghcr.io", "helper-secret")
    assert await store.lookup("anything.example.com") == Credentials(
        "user@anything.example.com", "helper-secret"
    )


async def test_helper_token_username_means_identity_token(tmp_path: Path, helpers: Path) -> None:
    store = store_with(tmp_path, {"credsStore": "token"})
    assert await store.lookup("reg.example.com") == Credentials(
        "<token>", "refresh-token", identity_token=True
    )


async def test_helper_without_credentials_gives_none(tmp_path: Path, helpers: Path) -> None:
    store = store_with(
        tmp_path,
        {"credHelpers": {"reg.example.com": "notfound"}, "auths": {"reg.example.com": {"auth": b64("u:p")}}},
    )
    assert await store.lookup("reg.example.com") is None


@pytest.mark.parametrize("config_key", ["credHelpers", "credsStore"])
@pytest.mark.parametrize(
    ("helper", "fragment"),
    [("broken", "failed for reg.example.com (exit 1)"), ("garbage", "no Username/Secret")],
)
async def test_failing_helper_is_a_config_error(
    tmp_path: Path, helpers: Path, config_key: str, helper: str, fragment: str
) -> None:
    config: dict[str, Any] = {
        config_key: {"reg.example.com": helper} if config_key == "credHelpers" else helper
    }
    store = store_with(tmp_path, config)
    with pytest.raises(ConfigError) as info:
        await store.lookup("reg.example.com")
    assert f"docker-credential-{helper}" in str(info.value)
    assert fragment in str(info.value)


async def test_missing_helper_is_a_config_error(tmp_path: Path, helpers: Path) -> None:
    store = store_with(tmp_path, {"credHelpers": {"reg.example.com": "not-installed-anywhere"}})
    with pytest.raises(ConfigError, match="docker-credential-not-installed-anywhere .*is not installed"):
        await store.lookup("reg.example.com")


async def test_helper_that_cannot_be_run_is_a_config_error(tmp_path: Path, helpers: Path) -> None:
    (helpers / "docker-credential-good").chmod(0o644)
    store = store_with(tmp_path, {"credsStore": "good"})
    with pytest.raises(ConfigError, match="docker-credential-good"):
        await store.lookup("reg.example.com")


async def test_lookups_are_cached_until_forgotten(tmp_path: Path, helpers: Path) -> None:
    store = store_with(tmp_path, {"credsStore": "good"})
    first = await store.lookup("reg.example.com")
    assert await store.lookup("https://reg.example.com/v2/") == first
    assert calls(helpers) == 1
    store.forget("reg.example.com")
    assert await store.lookup("reg.example.com") == first
    assert calls(helpers) == 2


# --- malformed configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        "{not json",
        '{"auths": {}',
        "[]",
        '"text"',
        '{"auths": ["reg.example.com"]}',
        '{"auths": {"reg.example.com": {"auth": "%%%not base64%%%"}}}',
        '{"auths": {"reg.example.com": {"auth": "' + b64("no-colon") + '"}}}',
        '{"auths": {"reg.example.com": {"auth": 12345}}}',
        '{"credHelpers": ["good"]}',
    ],
)
async def test_malformed_config_names_the_file(tmp_path: Path, config: str) -> None:
    store = store_with(tmp_path, config)
    with pytest.raises(ConfigError) as info:
        await store.lookup("reg.example.com")
    assert str(store.docker_config) in str(info.value)


async def test_undecodable_config_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b'{"auths": {"\xff": {}}}')
    with pytest.raises(ConfigError, match=str(path)):
        await CredentialStore(path).lookup("reg.example.com")


async def test_bad_auth_entry_message_has_no_secret(tmp_path: Path) -> None:
    store = store_with(tmp_path, {"auths": {"reg.example.com": {"auth": b64("password-without-user")}}})
    with pytest.raises(ConfigError) as info:
        await store.lookup("reg.example.com")
    assert "password-without-user" not in str(info.value)
    assert b64("password-without-user") not in str(info.value)


# --- secrets never shown, DOCKER_CONFIG ------------------------------------------------------------------


def test_repr_never_shows_the_secret() -> None:
    for creds in (
        Credentials("alice", "s3cr3t-value"),
        Credentials("<token>", "s3cr3t-value", identity_token=True),
    ):
        for text in (repr(creds), str(creds), f"{creds}", repr([creds]), repr({"k": creds})):
            assert "s3cr3t-value" not in text
            assert creds.username in text
            assert "hidden" in text


def test_default_docker_config_honours_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dockercfg"))
    assert default_docker_config() == tmp_path / "dockercfg" / "config.json"
    monkeypatch.delenv("DOCKER_CONFIG")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_docker_config() == tmp_path / "home" / ".docker" / "config.json"
    monkeypatch.setenv("DOCKER_CONFIG", "")
    assert default_docker_config() == tmp_path / "home" / ".docker" / "config.json"


async def test_store_reads_docker_config_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "dockercfg"
    directory.mkdir()
    (directory / "config.json").write_text(
        json.dumps({"auths": {"reg.example.com": {"auth": b64("env:var")}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    store = CredentialStore()
    assert store.docker_config == directory / "config.json"
    assert await store.lookup("reg.example.com") == Credentials("env", "var")
