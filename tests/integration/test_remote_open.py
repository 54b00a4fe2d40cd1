"""Opening an image's layers from a real registry (RemoteLayers): when containerd's labels say the image
is accelerated (they give the layer's TOC digest), each layer's suffix read (footer and TOC) goes out
with no size, `bytes=-N`, while the image manifest is still being fetched, and is the blob's only tail
read; without that hint, the tail is read once the manifest has given the layer's size."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from fuse.cache import ChunkCache
from fuse.fetch import Fetcher, FetchOptions
from fuse.formats.annotations import expected_toc_digest
from fuse.formats.reader import TAIL_READ
from fuse.fs import LazyFS
from fuse.layers import LayerRequest, RemoteLayers
from fuse.registry import Reference
from tests.harness import images as im
from tests.harness.accelerate import accelerate
from tests.harness.registry import Registry, anonymous_client
from tests.unit.test_ahead import APP, BASE, MIB


@pytest.mark.parametrize("labelled", [True, False])
def test_the_suffix_read_goes_with_the_manifest_when_the_labels_say_accelerated(
    registry: Registry, tmp_path: Path, labelled: bool
) -> None:
    image = im.Image([im.Layer(BASE), im.Layer(APP)], cmd=["tool"])
    ref = Reference.parse(accelerate(registry, "suffix/app", image, chunk_size=MIB))
    files: dict[str, bytes] = {}

    async def pull() -> list[dict]:
        async with anonymous_client() as client:
            layers = (await client.resolve(ref)).layers
            cache = ChunkCache(tmp_path / "cache", 1 << 30, fsync=False)
            await cache.open()
            fetcher = Fetcher(cache, FetchOptions(background=False))
            root = tmp_path / "root"
            root.mkdir()
            remote = RemoteLayers(root, root / "mnt", LazyFS(fetcher), fetcher, client, background=False)
            digests = tuple(d["digest"] for d in layers)
            toc = expected_toc_digest(layers[0]["annotations"]) if labelled else None
            async with trio.open_nursery() as nursery:
                await nursery.start(fetcher.run)
                await nursery.start(remote.run)
                name = await remote.acquire(LayerRequest("t-0", ref, digests[0], toc, None, digests))
                layer = remote._layers[name].handle.layer
                files["etc/ld.so.cache"] = await layer.read_file("etc/ld.so.cache")
                nursery.cancel_scope.cancel()
            return layers

    layers = trio.run(pull)
    assert files["etc/ld.so.cache"] == next(f.data for f in BASE if f.path == "etc/ld.so.cache")
    for desc in layers:  # the layer asked for, and the one opened ahead of its Prepare
        size = desc["size"]
        tails = [r for r in registry.ranges_requested(desc["digest"]) if r[1] in (None, size - 1)]
        assert tails == ([(-TAIL_READ, None)] if labelled else [(size - TAIL_READ, size - 1)])
