"""The registry client against the real registry: resolve, verified reads, multi-range reads, pushes,
Basic and token auth, TLS and mTLS from hosts.toml, and a pull-through mirror."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from fuse.registry import (
    CredentialStore,
    HostsConfig,
    ManifestError,
    NotFound,
    Options,
    Platform,
    RangeNotSatisfiable,
    Reference,
    RegistryClient,
    Unauthorized,
    Unavailable,
)
from tests.harness import images as im
from tests.harness.auth import TestPKI, TokenIssuer, htpasswd_config, tls_config, token_config
from tests.harness.registry import Registry

BLOB = im.pseudo_random(3 << 20, seed=7)


def small_image(tag: str = "x") -> im.Image:
    return im.Image([im.Layer([im.File("etc/hello", tag.encode()), im.File("data/big", BLOB)])])


def client_for(
    workdir: Path, *, hosts: dict[str, str] | None = None, auths: dict | None = None, **options
) -> RegistryClient:
    """A client whose hosts.toml files and docker config.json are written into workdir."""
    certs_d = workdir / "certs.d"
    certs_d.mkdir(parents=True, exist_ok=True)
    for host, text in (hosts or {}).items():
        (certs_d / host).mkdir(parents=True, exist_ok=True)
        (certs_d / host / "hosts.toml").write_text(text)
    docker_config = workdir / "docker-config.json"
    docker_config.write_text(json.dumps({"auths": auths or {}}))
    return RegistryClient(
        hosts=HostsConfig(certs_d),
        credentials=CredentialStore(docker_config),
        options=Options(**({"deadline": 30.0} | options)),
    )


def _auth_entry(user: str, password: str) -> dict:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_resolve_and_read(registry: Registry, workdir: Path) -> None:
    image = small_image()
    digest = await im.push_image_async(registry.url, "lzs/app", "v1", image)
    async with client_for(workdir) as client:
        resolved = await client.resolve(f"{registry.host}/lzs/app:v1")
        assert resolved.digest == digest
        assert resolved.index_digest is None
        config = json.loads(await client.get_blob(resolved.reference, resolved.config_descriptor["digest"]))
        assert config["rootfs"]["diff_ids"] == [image.layers[0].diff_id]

        layer = resolved.layers[0]
        blob = image.layers[0].blob("gzip")
        assert await client.blob_size(resolved.reference, layer["digest"]) == len(blob) == layer["size"]
        spans = [(0, 10), (1000, 4096), (len(blob) - 51, 51)]
        parts = await client.read_ranges(resolved.reference, layer["digest"], spans)
        assert parts == [blob[o : o + n] for o, n in spans]
        # one multi-range request, exactly the spans asked for
        assert registry.ranges_requested(layer["digest"]) == [(o, o + n - 1) for o, n in spans]
        assert registry.blob_bytes_sent(layer["digest"]) > sum(n for _, n in spans)  # multipart framing

        with pytest.raises(RangeNotSatisfiable):
            await client.read_range(resolved.reference, layer["digest"], len(blob) + 10, 5)
        with pytest.raises(NotFound):
            await client.read_range(resolved.reference, "sha256:" + "0" * 64, 0, 5)
        with pytest.raises(NotFound):
            await client.resolve(f"{registry.host}/lzs/app:nope")


async def test_docker_manifests_and_platform_selection(registry: Registry, workdir: Path) -> None:
    index = await im.push_index_async(
        registry.url,
        "lzs/multi",
        "v1",
        {"linux/amd64": small_image("amd"), "linux/arm64/v8": small_image("arm")},
        manifest_format="docker",
    )
    async with client_for(workdir) as client:
        ref = Reference.parse(f"{registry.host}/lzs/multi:v1")
        arm = await client.resolve(ref, Platform.parse("linux/arm64"))
        amd = await client.resolve(ref, Platform.parse("linux/amd64"))
        assert arm.index_digest == amd.index_digest == index
        assert arm.digest != amd.digest
        assert arm.media_type == "application/vnd.docker.distribution.manifest.v2+json"
        config = json.loads(await client.get_blob(arm.reference, arm.config_descriptor["digest"]))
        assert config["architecture"] == "arm64"
        with pytest.raises(ManifestError, match="linux/amd64, linux/arm64/v8"):
            await client.resolve(ref, Platform.parse("linux/s390x"))
        # by digest: the same manifest, verified against the digest asked for
        again = await client.resolve(ref.with_digest(arm.digest))
        assert again.manifest == arm.manifest


@pytest.mark.parametrize("chunk", [0, 1 << 20])
async def test_push_blob_manifest_and_mount(registry: Registry, workdir: Path, chunk: int) -> None:
    layer = small_image().layers[0].blob("gzip")
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [small_image().layers[0].diff_id]},
        }
    ).encode()
    async with client_for(workdir, upload_chunk=chunk) as client:
        ref = Reference.parse(f"{registry.host}/lzs/pushed:v1")
        layer_digest = await client.push_blob(ref, layer)
        config_digest = await client.push_blob(ref, config)
        assert await client.blob_exists(ref, layer_digest)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer_digest,
                        "size": len(layer),
                    }
                ],
            }
        ).encode()
        digest = await client.push_manifest(ref, manifest, "application/vnd.oci.image.manifest.v1+json")
        assert digest == "sha256:" + hashlib.sha256(manifest).hexdigest()
        assert (await client.resolve(ref)).digest == digest
        patches = [e for e in registry.access_log() if e.method == "PATCH"]
        expected_patches = sum(-(-len(b) // chunk) for b in (layer, config)) if chunk else 0
        assert len(patches) == expected_patches

        # a second repository gets the layer by cross-repository mount, without an upload
        other = Reference.parse(f"{registry.host}/lzs/other:v1")
        await client.push_blob(other, layer, mount_from="lzs/pushed")
        mounts = [e for e in registry.access_log() if e.method == "POST" and "mount=" in e.path]
        assert [e.status for e in mounts] == [201]
        assert await client.read_range(other, layer_digest, 0, 100) == layer[:100]


async def test_basic_auth_from_docker_config(
    registry_factory: Callable[..., Registry], workdir: Path
) -> None:
    reg = registry_factory(config=htpasswd_config(workdir, {"alice": "wonderland"}))
    async with client_for(workdir / "a", auths={reg.host: _auth_entry("alice", "wonderland")}) as client:
        ref = Reference.parse(f"{reg.host}/lzs/auth:v1")
        digest = await client.push_blob(ref, b"secret layer")
        assert await client.read_range(ref, digest, 0, 6) == b"secret"
    async with client_for(workdir / "b", auths={reg.host: _auth_entry("alice", "wrong")}) as client:
        with pytest.raises(Unauthorized) as e:
            await client.read_range(ref, digest, 0, 6)
        assert "wrong" not in str(e.value) and "wonderland" not in str(e.value)
    async with client_for(workdir / "c") as client:
        with pytest.raises(Unauthorized, match="none are configured"):
            await client.read_range(ref, digest, 0, 6)

    # requests sent at once by a new client, before any has seen the challenge (a layer's suffix read
    # and the image manifest): each is answered 401, then sent again with the credentials
    async with client_for(workdir / "d", auths={reg.host: _auth_entry("alice", "wonderland")}) as client:
        got: list[bytes] = []

        async def read(offset: int) -> None:
            got.append(await client.read_range(ref, digest, offset, 1))

        async with trio.open_nursery() as nursery:
            for offset in range(4):
                nursery.start_soon(read, offset)
        assert sorted(got) == sorted(b"secret layer"[i : i + 1] for i in range(4))


async def test_token_auth_caches_tokens(
    registry_factory: Callable[..., Registry], issuer_factory: Callable[..., TokenIssuer], workdir: Path
) -> None:
    issuer = issuer_factory(users={"bob": "builder"}, user_actions={"bob": {"pull", "push"}})
    reg = registry_factory(config=token_config(issuer))
    async with client_for(workdir, auths={reg.host: _auth_entry("bob", "builder")}) as client:
        ref = Reference.parse(f"{reg.host}/lzs/tok:v1")
        digest = await client.push_blob(ref, BLOB)
        fetches = len(issuer.requests)
        for i in range(20):
            assert await client.read_range(ref, digest, i * 1000, 100) == BLOB[i * 1000 : i * 1000 + 100]
        pulls = [r for r in issuer.requests[fetches:]]
        assert len(pulls) == 1, pulls  # one token for the pull scope, reused for all 20 reads
        assert pulls[0].user == "bob"


async def test_token_refused_push(
    registry_factory: Callable[..., Registry], issuer_factory: Callable[..., TokenIssuer], workdir: Path
) -> None:
    issuer = issuer_factory(anonymous_pull=True)
    reg = registry_factory(config=token_config(issuer))
    async with client_for(workdir) as client:
        with pytest.raises(Unauthorized):
            await client.push_blob(Reference.parse(f"{reg.host}/lzs/ro:v1"), b"nope")


async def test_tls_and_mtls_from_hosts_toml(
    registry_factory: Callable[..., Registry], pki: TestPKI, workdir: Path
) -> None:
    reg = registry_factory(config=tls_config(pki, client_cas=True), record=False)
    client_pair = pki.client_cert()
    trusted = (
        f'server = "https://{reg.host}"\nca = "{pki.ca_cert}"\n'
        f'client = [["{client_pair.cert}", "{client_pair.key}"]]\n'
    )
    async with client_for(workdir / "ok", hosts={reg.host: trusted}) as client:
        ref = Reference.parse(f"{reg.host}/lzs/tls:v1")
        digest = await client.push_blob(ref, b"over tls")
        assert await client.read_range(ref, digest, 5, 3) == b"tls"
    no_client_cert = f'server = "https://{reg.host}"\nca = "{pki.ca_cert}"\n'
    async with client_for(workdir / "nocert", hosts={reg.host: no_client_cert}, max_attempts=1) as client:
        with pytest.raises(Unavailable) as e:
            await client.read_range(ref, digest, 0, 3)
        assert "failed" in str(e.value)  # the server drops a handshake without a client certificate
    untrusted = f'server = "https://{reg.host}"\n'
    async with client_for(workdir / "noca", hosts={reg.host: untrusted}, max_attempts=1) as client:
        with pytest.raises(Unavailable, match="not trusted.*CERTIFICATE_VERIFY_FAILED"):
            await client.read_range(ref, digest, 0, 3)


async def test_pull_through_mirror(registry_factory: Callable[..., Registry], workdir: Path) -> None:
    origin = registry_factory()
    image = small_image("mirrored")
    await im.push_image_async(origin.url, "lzs/mirrored", "v1", image)
    mirror = registry_factory(config={"proxy": {"remoteurl": f"http://127.0.0.1:{origin.port}"}})
    hosts = {
        origin.host: f'server = "http://{origin.host}"\n[host."http://{mirror.host}"]\n'
        'capabilities = ["pull", "resolve"]\n'
    }
    async with client_for(workdir, hosts=hosts) as client:
        resolved = await client.resolve(f"{origin.host}/lzs/mirrored:v1")
        layer = resolved.layers[0]["digest"]
        blob = image.layers[0].blob("gzip")
        assert await client.read_range(resolved.reference, layer, 0, len(blob)) == blob
        deadline = time.monotonic() + 10  # the registry writes its access log line after answering
        while not mirror.blob_gets(layer) and time.monotonic() < deadline:
            await trio.sleep(0.05)
        assert mirror.blob_gets(layer), "the blob was read through the mirror"
        # the recorder in front of the origin sees only clients that bypass the mirror (the mirror
        # itself talks to the origin's own port)
        assert not [r for r in origin.requests() if layer in r.path and r.method == "GET"]
        assert [r.path for r in mirror.requests() if "ns=" in r.path], "mirror requests carry ?ns="

        # the pull-through cache stores what it proxied in the background: wait until it has the blob
        stored = mirror.workdir / "storage/docker/registry/v2/blobs/sha256" / layer[7:9] / layer[7:] / "data"
        deadline = time.monotonic() + 20
        while not (stored.exists() and stored.stat().st_size == len(blob)) and time.monotonic() < deadline:
            await trio.sleep(0.1)
        assert stored.exists(), "the mirror did not store the blob it proxied"
        origin.stop()  # cached content keeps being served by the mirror, by digest
        assert await client.read_range(resolved.reference, layer, 10, 20) == blob[10:30]
        again = await client.resolve(resolved.reference)
        assert again.digest == resolved.digest
