"""WWW-Authenticate parsing on headers real registries send, and token scopes."""

from __future__ import annotations

import pytest

from fuse.registry.auth import Challenge, parse_challenges, scope_for


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (  # Docker Hub
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/ubuntu:pull"',
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://auth.docker.io/token",
                        "service": "registry.docker.io",
                        "scope": "repository:library/ubuntu:pull",
                    },
                )
            ],
        ),
        (  # GHCR
            'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:user/image:pull"',
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://ghcr.io/token",
                        "service": "ghcr.io",
                        "scope": "repository:user/image:pull",
                    },
                )
            ],
        ),
        ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
        ('basic realm="x"', [Challenge("basic", {"realm": "x"})]),
        (
            'BEARER Realm="https://t/token", Service="s"',
            [Challenge("bearer", {"realm": "https://t/token", "service": "s"})],
        ),
        ("Basic", [Challenge("basic", {})]),
        ("", []),
        ("   ", []),
    ],
)
def test_single_challenges(header: str, expected: list[Challenge]) -> None:
    assert parse_challenges(header) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Basic realm="x", Bearer realm="y",service="z"',
            [Challenge("basic", {"realm": "x"}), Challenge("bearer", {"realm": "y", "service": "z"})],
        ),
        (
            'Bearer realm="y",service="z", Basic realm="x"',
            [Challenge("bearer", {"realm": "y", "service": "z"}), Challenge("basic", {"realm": "x"})],
        ),
        (
            'Basic realm="a, b", Bearer realm="https://t/token",service="reg,istry",scope="repository:a:pull,push"',
            [
                Challenge("basic", {"realm": "a, b"}),
                Challenge(
                    "bearer",
                    {"realm": "https://t/token", "service": "reg,istry", "scope": "repository:a:pull,push"},
                ),
            ],
        ),
        (
            'Negotiate, Bearer realm="https://t/token"',
            [Challenge("negotiate", {}), Challenge("bearer", {"realm": "https://t/token"})],
        ),
        (
            'Bearer realm="https://t/token" , Basic realm="b"',
            [Challenge("bearer", {"realm": "https://t/token"}), Challenge("basic", {"realm": "b"})],
        ),
    ],
)
def test_several_challenges_in_one_header(header: str, expected: list[Challenge]) -> None:
    assert parse_challenges(header) == expected


def test_insufficient_scope_error_with_commas_inside_quotes() -> None:
    [challenge] = parse_challenges(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:samalba/my-app:pull,push",error="insufficient_scope"'
    )
    assert challenge.scheme == "bearer"
    assert challenge.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:samalba/my-app:pull,push",
        "error": "insufficient_scope",
    }


def test_escaped_quotes_and_backslashes() -> None:
    [challenge] = parse_challenges(r'Basic realm="say \"hi\" to C:\\registry", charset="UTF-8"')
    assert challenge.params == {"realm": 'say "hi" to C:\\registry', "charset": "UTF-8"}


def test_unquoted_values() -> None:
    [challenge] = parse_challenges(
        "Bearer realm=https://t.example/token,service=t.example,error=insufficient_scope"
    )
    assert challenge.params == {
        "realm": "https://t.example/token",
        "service": "t.example",
        "error": "insufficient_scope",
    }


def test_whitespace_around_separators() -> None:
    [challenge] = parse_challenges('  Bearer   realm = "https://t/token" ,  service="s" ,scope="x"  ')
    assert challenge == Challenge("bearer", {"realm": "https://t/token", "service": "s", "scope": "x"})


def test_empty_quoted_value() -> None:
    assert parse_challenges('Bearer realm="https://t/token",service=""') == [
        Challenge("bearer", {"realm": "https://t/token", "service": ""})
    ]


@pytest.mark.parametrize(
    ("repository", "actions", "scope"),
    [
        ("library/ubuntu", "pull", "repository:library/ubuntu:pull"),
        ("org/team/app", "pull,push", "repository:org/team/app:pull,push"),
    ],
)
def test_scope_for(repository: str, actions: str, scope: str) -> None:
    assert scope_for(repository, actions) == scope
    # what a token service receives back from a challenge is the same string
    [challenge] = parse_challenges(f'Bearer realm="https://t/token",scope="{scope}"')
    assert challenge.params["scope"] == scope
