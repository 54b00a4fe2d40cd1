"""Lazy loading without conversion, through containerd: an ordinary gzip image indexed by `lazysnap
index` starts lazily from `ctr-remote image rpull` of the image itself (no layer blob pulled whole), the
container sees exactly the image's tree; once the layer is local the daemon checks the blob against the
layer digest and the zTOC against the blob, and a zTOC that lies is caught there: the layer's files then
fail with EIO. An image without an index is pulled in full, as before."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import trio

from fuse.formats import ztoc
from fuse.registry import Reference
from fuse.registry.referrers import fallback_tag
from snapshotter.convert.index import index_image
from tests.harness import images as im
from tests.harness import trees
from tests.harness.containers import RUNTIME_PATHS, container_tree, feature_image
from tests.harness.registry import Registry, anonymous_client

from .test_lazy_pull import PLUGIN, layer_bytes, lazysnap_with, rpull


def pushed_and_indexed(registry: Registry, repo: str, image: im.Image) -> str:
    im.push_image(registry.url, repo, "v1", image)
    ref = f"{registry.host}/{repo}:v1"

    async def index() -> None:
        async with anonymous_client() as client:
            await index_image(client, ref, span_out=256 << 10, min_layer_size=0)

    trio.run(index)
    return ref


def test_an_indexed_plain_image_starts_lazily(
    registry: Registry, snapshotter_factory, containerd_factory, workdir: Path
) -> None:
    snapshotter = lazysnap_with(snapshotter_factory, workdir, background=False)
    containerd = containerd_factory(snapshotter_socket=snapshotter.address)
    image = feature_image(big_files=0)
    big = im.Layer([im.File("data/blob", im.pseudo_random(6 << 20, seed=9))])
    image = im.Image([*image.layers, big], cmd=["/bin/sh"])
    ref = pushed_and_indexed(registry, "plain/app", image)
    indexing, _ = layer_bytes(registry, ref)  # `lazysnap index` streamed every layer once
    rpull(containerd, ref)
    fetched, total = layer_bytes(registry, ref)
    fetched -= indexing
    assert fetched < total / 4, f"rpull fetched {fetched} of {total} layer bytes: not lazy"
    log = snapshotter.log()
    assert log.count("(gzip+zran,") == len(image.layers), log[-3000:]
    tree = container_tree(containerd, ref, snapshotter=PLUGIN)
    trees.assert_same(image.expected_tree(), tree, ignore=RUNTIME_PATHS)
    out = containerd.run(ref, "/bin/busybox", "sha256sum", "/data/blob", snapshotter=PLUGIN).stdout
    assert out.split()[0] == hashlib.sha256(im.pseudo_random(6 << 20, seed=9)).hexdigest()
    # a restarted daemon serves the layers from their stored zTOCs
    snapshotter.stop()
    snapshotter.start()
    containerd.wait_snapshotter(PLUGIN)
    trees.assert_same(
        image.expected_tree(), container_tree(containerd, ref, snapshotter=PLUGIN), ignore=RUNTIME_PATHS
    )


def test_a_lying_ztoc_is_caught_and_the_layer_fails_loudly(
    registry: Registry, snapshotter_factory, containerd_factory, workdir: Path
) -> None:
    """Two files of the same size swap their data offsets in the zTOC: every span still matches its
    digest, so only the final check against the blob can tell. Once the layer is local it is marked
    bad, logged, and its files fail with EIO; nothing is served from it after that."""
    image = im.Image(
        [
            im.Layer([im.File("bin/busybox", (Path("/bin/busybox")).read_bytes(), mode=0o755)]),
            im.Layer([im.File("a", b"A" * 5000), im.File("b", b"B" * 5000)]),
        ],
        cmd=["/bin/busybox", "sh"],
    )
    ref = pushed_and_indexed(registry, "plain/lying", image)

    async def tamper() -> None:  # what someone with push access could publish
        async with anonymous_client() as client:
            r = Reference.parse(ref)
            _, _, manifest_digest = await client.get_manifest(r)
            tag = r.with_tag(fallback_tag(manifest_digest))
            body, _, _ = await client.get_manifest(tag)
            referrers_index = json.loads(body)
            (soci_desc,) = referrers_index["manifests"]
            soci_body, _, _ = await client.get_manifest(r.with_digest(soci_desc["digest"]))
            soci = json.loads(soci_body)
            for layer in soci["layers"]:
                z = ztoc.parse_ztoc(await client.read_range(r, layer["digest"], 0, layer["size"]))
                by_name = {e.name: e for e in z.entries}
                if "a" not in by_name:
                    continue
                swapped = {"a": by_name["b"].uncompressed_offset, "b": by_name["a"].uncompressed_offset}
                entries = [
                    dataclasses.replace(e, uncompressed_offset=swapped[e.name]) if e.name in swapped else e
                    for e in z.entries
                ]
                lying = ztoc.to_bytes(dataclasses.replace(z, entries=entries))
                layer["digest"], layer["size"] = await client.push_blob(r, lying), len(lying)
            new_body = json.dumps(soci).encode()
            new_digest = "sha256:" + hashlib.sha256(new_body).hexdigest()
            by_digest = Reference.parse(f"{ref.rsplit(':', 1)[0]}@{new_digest}")  # not under the tag
            await client.push_manifest(by_digest, new_body, soci["mediaType"])
            soci_desc["digest"], soci_desc["size"] = new_digest, len(new_body)
            await client.push_manifest(
                tag, json.dumps(referrers_index).encode(), referrers_index["mediaType"]
            )

    trio.run(tamper)
    snapshotter = lazysnap_with(snapshotter_factory, workdir)  # background fetch on: the final check runs
    containerd = containerd_factory(snapshotter_socket=snapshotter.address)
    rpull(containerd, ref)
    deadline = time.monotonic() + 60
    while "the layer is bad" not in snapshotter.log():
        assert time.monotonic() < deadline, "the lying zTOC was not caught"
        time.sleep(0.2)
    run = containerd.run(ref, "/bin/busybox", "cat", "/a", snapshotter=PLUGIN, check=False)
    assert run.returncode != 0 and "Input/output error" in run.stderr + run.stdout, run
    assert "its zTOC's file list is not the blob's" in snapshotter.log()
