"""Converted images stay ordinary images: containerd pulls them in full (its own overlayfs snapshotter,
no lazy loading) and a container sees exactly the tree of the original image. And our eStargz TOCs match
what `ctr-remote image convert` writes for the same image, entry for entry (offsets aside)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import trio

from fuse.registry import CredentialStore, HostsConfig, RegistryClient
from snapshotter.convert.converter import ConvertResult, convert_image
from tests.harness import images as im
from tests.harness import trees
from tests.harness.containerd import Containerd
from tests.harness.containers import RUNTIME_PATHS, container_tree, feature_image
from tests.harness.registry import Registry, anonymous_client
from tests.unit.test_writer import read_toc

# What the formats add to a layer's tar, visible after a full pull: the landmarks, eStargz's TOC entry.
FORMAT_FILES = [".no.prefetch.landmark", ".prefetch.landmark", "stargz.index.json"]


def convert(registry: Registry, src: str, dst: str | None = None, **kw) -> ConvertResult:
    async def go() -> ConvertResult:
        client = anonymous_client()
        async with client:
            return await convert_image(
                client, f"{registry.host}/{src}", dst and f"{registry.host}/{dst}", **kw
            )

    return trio.run(go)


@pytest.mark.parametrize("fmt", ["estargz", "estargz-zstd", "zstd-chunked"])
def test_full_pull_of_a_converted_image_runs_the_same_tree(
    registry: Registry, containerd: Containerd, fmt: str
) -> None:
    image = feature_image()
    im.push_image(registry.url, "e2e/conv", "v1", image)
    result = convert(registry, "e2e/conv:v1", format=fmt, chunk_size=1 << 20, prioritize=["/bin/busybox"])
    ref = result.destination
    containerd.ctr("image", "pull", "--plain-http", ref)
    tree = container_tree(containerd, ref)
    trees.assert_same(image.expected_tree(), tree, ignore=RUNTIME_PATHS + FORMAT_FILES)
    # the only additions are the format's own files, at the root
    extra = {p for p in tree.nodes if p not in image.expected_tree().nodes} - set(RUNTIME_PATHS)
    assert {p for p in extra if not p.startswith(tuple(f"{r}/" for r in RUNTIME_PATHS))} <= set(FORMAT_FILES)


def content(containerd: Containerd, digest: str) -> bytes:
    argv = ["ctr", "-a", str(containerd.address), "-n", containerd.namespace, "content", "get", digest]
    return subprocess.run(argv, capture_output=True, check=True, timeout=60).stdout


def comparable(toc: dict) -> list[dict]:
    """TOC entries without what legitimately differs: blob offsets, and user/group names, which stargz
    writes only when they change."""
    drop = {"offset", "userName", "groupName"}
    return [{k: v for k, v in e.items() if k not in drop} for e in toc["entries"]]


@pytest.mark.parametrize(("flag", "fmt"), [("--estargz", "estargz"), ("--zstdchunked", "estargz-zstd")])
def test_toc_matches_ctr_remote_convert(
    registry: Registry, containerd: Containerd, flag: str, fmt: str
) -> None:
    image = feature_image()
    im.push_image(registry.url, "e2e/ref", "v1", image)
    src = f"{registry.host}/e2e/ref:v1"
    theirs_ref = f"{registry.host}/e2e/ref:ctr-remote"
    containerd.ctr("image", "pull", "--plain-http", src)
    options = ["--oci", "--estargz-chunk-size", str(1 << 20)]
    containerd.ctr_remote("image", "convert", flag, "--oci", *options[1:], src, theirs_ref)
    line = next(
        x for x in containerd.ctr("image", "ls").stdout.splitlines() if x.startswith(theirs_ref + " ")
    )
    theirs = json.loads(content(containerd, line.split()[2]))
    ours = convert(registry, "e2e/ref:v1", format=fmt, chunk_size=1 << 20)
    ours_manifest = json.loads(content_of_registry(registry, ours.destination))
    assert len(theirs["layers"]) == len(ours_manifest["layers"]) == 3
    for t, o in zip(theirs["layers"], ours_manifest["layers"], strict=True):
        assert t["mediaType"] == o["mediaType"]
        assert set(t["annotations"]) == set(o["annotations"])
        their_toc, _, _ = read_toc(content(containerd, t["digest"]), fmt)
        our_toc, _, _ = read_toc(blob_of_registry(registry, ours.destination, o["digest"]), fmt)
        assert comparable(our_toc) == comparable(their_toc)


def content_of_registry(registry: Registry, ref: str) -> bytes:
    async def go() -> bytes:
        from fuse.registry import Reference

        async with RegistryClient(hosts=HostsConfig(None), credentials=CredentialStore(Path("/x"))) as c:
            body, _, _ = await c.get_manifest(Reference.parse(ref))
            return body

    return trio.run(go)


def blob_of_registry(registry: Registry, ref: str, digest: str) -> bytes:
    async def go() -> bytes:
        from fuse.registry import Reference

        async with RegistryClient(hosts=HostsConfig(None), credentials=CredentialStore(Path("/x"))) as c:
            return await c.get_blob(Reference.parse(ref), digest, max_size=1 << 30)

    return trio.run(go)
