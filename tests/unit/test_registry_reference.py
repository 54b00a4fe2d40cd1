"""Image references: Docker Hub normalization, hosts, tags, digests and the errors for bad input."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fuse.registry.errors import ReferenceError, RegistryError
from fuse.registry.reference import DOCKER_HUB, Reference

SHA = "sha256:" + "0123456789abcdef" * 4
SHA512 = "sha512:" + "ab" * 64


@pytest.mark.parametrize(
    ("text", "host", "repository", "tag", "digest"),
    [
        ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
        ("library/ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("docker.io/library/ubuntu:jammy", "docker.io", "library/ubuntu", "jammy", None),
        ("index.docker.io/x/y", "docker.io", "x/y", "latest", None),
        ("index.docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("bitnami/redis:7.2", "docker.io", "bitnami/redis", "7.2", None),
        ("ghcr.io/org/team/app:v1.2.3", "ghcr.io", "org/team/app", "v1.2.3", None),
        ("registry.example.com:5000/app:1.0", "registry.example.com:5000", "app", "1.0", None),
        ("Registry.Example.com/app", "Registry.Example.com", "app", "latest", None),
        (
            "my-registry.local/a-b/c_d/e.f/g__h/i---j",
            "my-registry.local",
            "a-b/c_d/e.f/g__h/i---j",
            "latest",
            None,
        ),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/app:dev", "localhost:5000", "app", "dev", None),
        ("127.0.0.1:5000/a/b", "127.0.0.1:5000", "a/b", "latest", None),
        ("[::1]:5000/x", "[::1]:5000", "x", "latest", None),
        ("[::1]:5000/x:v2", "[::1]:5000", "x", "v2", None),
        ("[2001:db8::1]/x", "[2001:db8::1]", "x", "latest", None),
        # no "/" after it: "localhost" alone is an image name on Docker Hub, not a host
        ("localhost", "docker.io", "library/localhost", "latest", None),
        ("localhost:5000", "docker.io", "library/localhost", "5000", None),
        (f"ubuntu@{SHA}", "docker.io", "library/ubuntu", None, SHA),
        (f"ubuntu:22.04@{SHA}", "docker.io", "library/ubuntu", "22.04", SHA),
        (f"localhost:5000/app@{SHA512}", "localhost:5000", "app", None, SHA512),
        (f"quay.io/a/b:t@{SHA}", "quay.io", "a/b", "t", SHA),
        ("app:_underscore.Tag-9", "docker.io", "library/app", "_underscore.Tag-9", None),
        ("app:" + "t" * 128, "docker.io", "library/app", "t" * 128, None),
    ],
)
def test_parse_valid(text: str, host: str, repository: str, tag: str | None, digest: str | None) -> None:
    ref = Reference.parse(text)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (host, repository, tag, digest)
    assert ref.name == f"{host}/{repository}"
    assert Reference.parse(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ubuntu", "docker.io/library/ubuntu:latest"),
        ("index.docker.io/x/y:1", "docker.io/x/y:1"),
        (f"ubuntu@{SHA}", f"docker.io/library/ubuntu@{SHA}"),
        (f"ubuntu:22.04@{SHA}", f"docker.io/library/ubuntu:22.04@{SHA}"),
        ("[::1]:5000/x", "[::1]:5000/x:latest"),
    ],
)
def test_str(text: str, expected: str) -> None:
    assert str(Reference.parse(text)) == expected


def test_object_is_digest_when_there_is_one_else_tag() -> None:
    assert Reference.parse("ubuntu").object == "latest"
    assert Reference.parse("ubuntu:22.04").object == "22.04"
    assert Reference.parse(f"ubuntu@{SHA}").object == SHA
    assert Reference.parse(f"ubuntu:22.04@{SHA}").object == SHA
    assert Reference("docker.io", "library/x").object == "latest"


def test_with_tag_drops_the_digest() -> None:
    ref = Reference.parse(f"ghcr.io/a/b:old@{SHA}").with_tag("new")
    assert (ref.host, ref.repository, ref.tag, ref.digest) == ("ghcr.io", "a/b", "new", None)
    assert ref.object == "new"
    assert str(ref) == "ghcr.io/a/b:new"


def test_with_digest_keeps_the_tag_and_pins_the_object() -> None:
    base = Reference.parse("ghcr.io/a/b:v1")
    ref = base.with_digest(SHA)
    assert (ref.tag, ref.digest, ref.object) == ("v1", SHA, SHA)
    assert str(ref) == f"ghcr.io/a/b:v1@{SHA}"
    assert base.digest is None  # frozen: the original is unchanged
    assert Reference.parse(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        (" ubuntu", "spaces"),
        ("ubuntu ", "spaces"),
        ("ubuntu\n", "spaces"),
        ("ubu ntu", "repository"),
        ("Ubuntu", "repository"),
        ("library/Ubuntu", "repository"),
        ("ghcr.io/Org/app", "repository"),
        ("ubuntu\n:latest", "repository"),
        ("foo/../bar", "repository"),
        ("foo..bar", "repository"),
        ("foo//bar", "repository"),
        ("foo/", "repository"),
        ("/foo", "repository"),
        ("foo-/bar", "repository"),
        ("foo___bar", "repository"),
        ("ghcr.io/", "repository"),
        ("ubuntu:", "bad tag"),
        ("ubuntu:-dash", "bad tag"),
        ("ubuntu:.dot", "bad tag"),
        ("ubuntu:a+b", "bad tag"),
        ("ubuntu:v\u00e9", "bad tag"),
        ("ubuntu:" + "t" * 129, "bad tag"),
        ("ubuntu:latest\n@" + SHA, "bad tag"),
        ("ubuntu@", "bad digest"),
        ("ubuntu@sha256", "bad digest"),
        ("ubuntu@sha256:abc", "bad digest"),
        ("ubuntu@sha256:" + "0" * 31, "bad digest"),
        ("ubuntu@sha256:" + "z" * 64, "bad digest"),
        ("ubuntu@sha256:" + "0" * 63 + "=", "bad digest"),
        ("ubuntu@:" + "0" * 64, "bad digest"),
        ("ubuntu@256:" + "0" * 64, "bad digest"),
        (f"ubuntu@{SHA}@{SHA}", "bad digest"),
        ("a..b/c", "bad registry host"),
        ("-a.com/x", "bad registry host"),
        ("a.com-/x", "bad registry host"),
        (".a.com/x", "bad registry host"),
        ("a.com./x", "bad registry host"),
        ("a_b.com/x", "bad registry host"),
        ("example.com:port/x", "bad registry host"),
        ("[::g]:5000/x", "bad registry host"),
        ("[::1]:/x", "bad registry host"),
    ],
)
def test_parse_invalid(text: str, fragment: str) -> None:
    with pytest.raises(ReferenceError) as info:
        Reference.parse(text)
    message = str(info.value)
    assert message.startswith(f"invalid image reference {text!r}")
    assert fragment in message


def test_reference_error_is_a_registry_error_and_a_value_error() -> None:
    with pytest.raises(RegistryError):
        Reference.parse("UPPER")
    with pytest.raises(ValueError):
        Reference.parse("UPPER")


_component = st.from_regex(r"[a-z0-9]{1,4}(?:(?:[._]|__|-{1,3})[a-z0-9]{1,4}){0,2}", fullmatch=True)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_host = st.sampled_from(
    ["", "ghcr.io/", "localhost/", "localhost:5000/", "r.example.com:443/", "[::1]:5000/"]
)
_digest = st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(
    host=_host,
    components=st.lists(_component, min_size=1, max_size=3),
    tag=st.none() | _tag,
    digest=st.none() | _digest,
)
def test_round_trip_of_generated_references(
    host: str, components: list[str], tag: str | None, digest: str | None
) -> None:
    # "a.b/c" names registry a.b: without a host, only a component without "." stays on Docker Hub
    assume(host or len(components) == 1 or "." not in components[0])
    text = host + "/".join(components) + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    ref = Reference.parse(text)
    assert ref.digest == digest
    assert ref.tag == (tag if tag or digest else "latest")
    if host:
        assert ref.host == host.rstrip("/")
        assert ref.repository == "/".join(components)
    else:
        assert ref.host == DOCKER_HUB
        expected = "/".join(components)
        assert ref.repository == (expected if "/" in expected else f"library/{expected}")
    assert Reference.parse(str(ref)) == ref
