"""Manifest and index parsing with validation, and platform selection."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fuse.registry import manifests
from fuse.registry.errors import ManifestError
from fuse.registry.manifests import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Platform,
    parse,
    select,
)

WHAT = "registry.example.com/app:v1"


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def descriptor(n: int, media_type: str = "application/vnd.oci.image.layer.v1.tar+gzip", **extra: Any) -> dict:
    return {"mediaType": media_type, "digest": digest(n), "size": 100 + n, **extra}


def image_manifest(media_type: str | None = OCI_MANIFEST, **changes: Any) -> dict:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "config": descriptor(0, "application/vnd.oci.image.config.v1+json"),
        "layers": [descriptor(1), descriptor(2)],
    }
    if media_type:
        doc["mediaType"] = media_type
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def index(platforms: list[dict], media_type: str | None = OCI_INDEX) -> dict:
    entries = [descriptor(10 + i, OCI_MANIFEST, platform=p) for i, p in enumerate(platforms)]
    doc: dict[str, Any] = {"schemaVersion": 2, "manifests": entries}
    if media_type:
        doc["mediaType"] = media_type
    return doc


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# --- Platform -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("linux/amd64", Platform("linux", "amd64")),
        ("linux/arm64", Platform("linux", "arm64")),
        ("linux/arm64/v8", Platform("linux", "arm64", "v8")),
        ("linux/arm/v7", Platform("linux", "arm", "v7")),
        ("windows/amd64", Platform("windows", "amd64")),
    ],
)
def test_platform_parse(text: str, expected: Platform) -> None:
    assert Platform.parse(text) == expected
    assert str(Platform.parse(text)) == text


@pytest.mark.parametrize(
    "text", ["", "linux", "linux/", "/amd64", "linux//v7", "linux/arm/v7/extra", "linux/arm/"]
)
def test_platform_parse_rejects(text: str) -> None:
    with pytest.raises(ManifestError, match="expected os/arch"):
        Platform.parse(text)


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", "linux/amd64"),
        ("AMD64", "linux/amd64"),
        ("aarch64", "linux/arm64"),
        ("arm64", "linux/arm64"),
        ("armv7l", "linux/arm/v7"),
        ("armv6l", "linux/arm/v6"),
        ("ppc64le", "linux/ppc64le"),
        ("s390x", "linux/s390x"),
        ("riscv64", "linux/riscv64"),
        ("i686", "linux/386"),
        ("mips64", "linux/mips64"),
    ],
)
def test_platform_host(monkeypatch: pytest.MonkeyPatch, machine: str, expected: str) -> None:
    monkeypatch.setattr(manifests._platform, "machine", lambda: machine)
    assert Platform.host() == Platform.parse(expected)


@pytest.mark.parametrize(
    ("want", "entry", "matches"),
    [
        ("linux/amd64", {"os": "linux", "architecture": "amd64"}, True),
        ("linux/amd64", {"os": "linux", "architecture": "amd64", "variant": "v3"}, True),
        ("linux/amd64", {"os": "windows", "architecture": "amd64"}, False),
        ("linux/amd64", {"os": "linux", "architecture": "arm64"}, False),
        ("linux/amd64", {}, False),
        # arm64: v8 is the default variant, absent on either side
        ("linux/arm64", {"os": "linux", "architecture": "arm64"}, True),
        ("linux/arm64", {"os": "linux", "architecture": "arm64", "variant": "v8"}, True),
        ("linux/arm64/v8", {"os": "linux", "architecture": "arm64"}, True),
        ("linux/arm64/v8", {"os": "linux", "architecture": "arm64", "variant": "v8"}, True),
        ("linux/arm64", {"os": "linux", "architecture": "arm64", "variant": "v9"}, False),
        ("linux/arm64/v9", {"os": "linux", "architecture": "arm64"}, False),
        # arm: the variant must match; an entry without one is v7
        ("linux/arm/v7", {"os": "linux", "architecture": "arm", "variant": "v7"}, True),
        ("linux/arm/v7", {"os": "linux", "architecture": "arm", "variant": "v6"}, False),
        ("linux/arm/v6", {"os": "linux", "architecture": "arm", "variant": "v7"}, False),
        ("linux/arm/v7", {"os": "linux", "architecture": "arm"}, True),
        ("linux/arm/v6", {"os": "linux", "architecture": "arm"}, False),
        ("linux/arm", {"os": "linux", "architecture": "arm", "variant": "v6"}, True),
        ("linux/arm/v7", {"os": "linux", "architecture": "arm64", "variant": "v7"}, False),
    ],
)
def test_platform_matches(want: str, entry: dict, matches: bool) -> None:
    assert Platform.parse(want).matches(entry) is matches


# --- parse ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
def test_parse_manifest_with_media_type_in_body(media_type: str) -> None:
    doc = image_manifest(media_type)
    assert parse(encode(doc), "application/octet-stream", WHAT) == (doc, media_type)


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        (OCI_MANIFEST, OCI_MANIFEST),
        (DOCKER_MANIFEST, DOCKER_MANIFEST),
        (f"{DOCKER_MANIFEST}; charset=utf-8", DOCKER_MANIFEST),
    ],
)
def test_parse_manifest_by_content_type(content_type: str, kind: str) -> None:
    doc = image_manifest(None)
    assert parse(encode(doc), content_type, WHAT) == (doc, kind)


@pytest.mark.parametrize(
    ("body_type", "content_type"), [(OCI_INDEX, OCI_INDEX), (DOCKER_LIST, OCI_INDEX), (None, DOCKER_LIST)]
)
def test_parse_index(body_type: str | None, content_type: str) -> None:
    doc = index([{"os": "linux", "architecture": "amd64"}], body_type)
    assert parse(encode(doc), content_type, WHAT) == (doc, body_type or content_type)


def test_media_type_in_body_wins_over_content_type() -> None:
    doc = index([{"os": "linux", "architecture": "amd64"}], OCI_INDEX)
    assert parse(encode(doc), OCI_MANIFEST, WHAT)[1] == OCI_INDEX
    doc = image_manifest(DOCKER_MANIFEST)
    assert parse(encode(doc), DOCKER_LIST, WHAT)[1] == DOCKER_MANIFEST


@pytest.mark.parametrize("content_type", ["application/json", "", "text/plain"])
def test_kind_is_inferred_from_the_shape_without_any_media_type(content_type: str) -> None:
    assert parse(encode(image_manifest(None)), content_type, WHAT)[1] == OCI_MANIFEST
    assert parse(encode(index([], None)), content_type, WHAT)[1] == OCI_INDEX


def test_schema1_is_rejected_with_a_clear_message() -> None:
    schema1 = {
        "schemaVersion": 1,
        "name": "app",
        "tag": "v1",
        "architecture": "amd64",
        "fsLayers": [{"blobSum": digest(1)}],
        "history": [{"v1Compatibility": "{}"}],
    }
    for content_type in ("application/vnd.docker.distribution.manifest.v1+prettyjws", "application/json"):
        with pytest.raises(ManifestError) as info:
            parse(encode(schema1), content_type, WHAT)
        assert str(info.value).startswith(WHAT)
        assert "schema 1" in str(info.value)
        assert "push the image again" in str(info.value)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'"manifest"', "not a JSON object"),
        (
            encode({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.config.v1+json"}),
            "unsupported",
        ),
        (encode({"schemaVersion": 2}), "unsupported"),
        (encode(image_manifest(layers=None)), "'layers'"),
        (encode(image_manifest(layers={"0": descriptor(1)})), "'layers'"),
        (encode(image_manifest(config=None)), "'layers'"),
        (encode(image_manifest(config=[descriptor(0)])), "'layers'"),
        (encode(image_manifest(layers=[{"mediaType": "x", "size": 1}])), "lacks a digest or size"),
        (encode(image_manifest(layers=[{"mediaType": "x", "digest": digest(1)}])), "lacks a digest or size"),
        (encode(image_manifest(layers=[{"digest": digest(1), "size": "12"}])), "lacks a digest or size"),
        (encode(image_manifest(layers=[descriptor(1), "sha256:abc"])), "lacks a digest or size"),
        (encode(image_manifest(config={"mediaType": "c", "size": 2})), "lacks a digest or size"),
        (encode(image_manifest(config={"mediaType": "c", "digest": digest(0)})), "lacks a digest or size"),
        (encode({"mediaType": OCI_INDEX, "schemaVersion": 2}), "'manifests'"),
        (encode({"mediaType": OCI_INDEX, "manifests": [{"digest": digest(1)}]}), "lacks a digest or size"),
        (encode({"mediaType": OCI_INDEX, "manifests": [{"size": 5}]}), "lacks a digest or size"),
    ],
)
def test_parse_rejects(body: bytes, fragment: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse(body, "application/json", WHAT)
    assert str(info.value).startswith(f"{WHAT}: ")
    assert fragment in str(info.value)


def test_a_manifest_body_served_as_an_index_is_validated_as_one() -> None:
    # no mediaType in the body: Content-Type says index, so "manifests" is required
    with pytest.raises(ManifestError, match="'manifests'"):
        parse(encode(image_manifest(None)), OCI_INDEX, WHAT)


# --- select ---------------------------------------------------------------------------------------

MULTI_ARCH = index(
    [
        {"os": "linux", "architecture": "amd64"},
        {"os": "linux", "architecture": "arm", "variant": "v6"},
        {"os": "linux", "architecture": "arm", "variant": "v7"},
        {"os": "linux", "architecture": "arm64", "variant": "v8"},
        {"os": "windows", "architecture": "amd64", "os.version": "10.0.17763.1"},
        {"os": "unknown", "architecture": "unknown"},
    ]
)


@pytest.mark.parametrize(
    ("want", "position"),
    [
        ("linux/amd64", 0),
        ("linux/arm/v6", 1),
        ("linux/arm/v7", 2),
        ("linux/arm64", 3),
        ("linux/arm64/v8", 3),
        ("windows/amd64", 4),
    ],
)
def test_select_picks_the_platform(want: str, position: int) -> None:
    entry = select(MULTI_ARCH, Platform.parse(want), WHAT)
    assert entry is MULTI_ARCH["manifests"][position]


def test_select_takes_the_first_match_in_index_order() -> None:
    doc = index(
        [{"os": "linux", "architecture": "amd64", "variant": "v2"}, {"os": "linux", "architecture": "amd64"}]
    )
    assert select(doc, Platform.parse("linux/amd64"), WHAT)["digest"] == digest(10)


def test_select_error_lists_the_available_platforms() -> None:
    with pytest.raises(ManifestError) as info:
        select(MULTI_ARCH, Platform.parse("linux/s390x"), WHAT)
    message = str(info.value)
    assert message.startswith(f"{WHAT}: no manifest for platform linux/s390x")
    have = "linux/amd64, linux/arm/v6, linux/arm/v7, linux/arm64/v8, windows/amd64, unknown/unknown"
    assert f"(the index has: {have})" in message


def test_select_error_with_entries_without_platform_and_empty_index() -> None:
    doc = {"manifests": [descriptor(1, OCI_MANIFEST)]}
    with pytest.raises(ManifestError, match=r"the index has: \?/\?"):
        select(doc, Platform.parse("linux/amd64"), WHAT)
    with pytest.raises(ManifestError, match="the index has: none"):
        select({"manifests": []}, Platform.parse("linux/amd64"), WHAT)


def config(**settings: Any) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "config": settings}).encode()


@pytest.mark.parametrize(
    ("body", "argv", "program"),
    [
        # Entrypoint, then Cmd as its arguments; a bare name is looked up in the image's PATH
        (
            config(Entrypoint=["tini", "--"], Cmd=["python3", "app.py"], Env=["A=1", "PATH=/opt/bin:/bin"]),
            ("tini", "--", "python3", "app.py"),
            ["/opt/bin/tini", "/bin/tini"],
        ),
        # Cmd alone; no PATH in Env: runc's default
        (
            config(Cmd=["python3", "/app/main.py"]),
            ("python3", "/app/main.py"),
            [f"{d}/python3" for d in manifests.DEFAULT_PATH.split(":")],
        ),
        # a relative path is the working directory's; an absolute one is itself
        (config(Cmd=["./run.sh"], WorkingDir="/srv/app/"), ("./run.sh",), ["/srv/app/./run.sh"]),
        (config(Entrypoint=["/bin/sh", "-c"], Cmd=["exec x"]), ("/bin/sh", "-c", "exec x"), ["/bin/sh"]),
        # a relative PATH directory is never searched (nothing to resolve it against)
        (config(Cmd=["x"], Env=["PATH=bin:/usr/bin"]), ("x",), ["/usr/bin/x"]),
    ],
)
def test_the_command_an_image_config_names(body: bytes, argv: tuple, program: list[str]) -> None:
    command = manifests.command(body)
    assert command is not None and command.argv == argv
    assert command.program() == program


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        json.dumps({"config": None}).encode(),
        config(),  # no command
        config(Cmd="python3"),  # a string, not a list
        config(Cmd=[1, 2]),
        config(Cmd=[""]),
        b"[" * 100_000,  # nested deeper than the parser goes
        b'{"a":' + b"1" * 5001 + b"}",  # an integer json.loads refuses with a plain ValueError
        b"\xff\xfe",
    ],
)
def test_configs_without_a_usable_command(body: bytes) -> None:
    assert manifests.command(body) is None


def test_a_program_path_too_long_to_execute_is_not_looked_up() -> None:
    long = "/" + "../" * 2000 + "bin/sh"  # execve would fail with ENAMETOOLONG
    command = manifests.command(config(Entrypoint=[long]))
    assert command is not None and command.program() == []
    command = manifests.command(config(Cmd=["sh"], Env=["PATH=/" + "d" * 5000 + ":/bin"]))
    assert command is not None and command.program() == ["/bin/sh"]
