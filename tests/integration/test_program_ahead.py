"""The program an image's containers run (its config's Entrypoint and Cmd) is fetched, with what its
loader reads after it, as soon as the image's top layer is mounted: before containerd has created the
container, with no read of ours (RemoteLayers, `prefetch_program`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from fuse.cache import ChunkCache
from fuse.fetch import Fetcher, FetchOptions
from fuse.fs import LazyFS
from fuse.layers import LayerRequest, RemoteLayers
from fuse.registry import Reference
from tests.harness import images as im
from tests.harness.accelerate import accelerate
from tests.harness.registry import Registry, anonymous_client
from tests.unit.test_ahead import APP, BASE, MIB, local, tool_and_its_libraries_arrive
from tests.unit.test_fetch import frozen_link

ENV = ["PATH=/usr/local/bin:/app/bin:/usr/bin"]  # the program is in the second directory


@pytest.mark.parametrize("prefetch_program", [True, False])
def test_the_program_is_fetched_once_the_top_layer_is_mounted(
    registry: Registry, tmp_path: Path, prefetch_program: bool
) -> None:
    image = im.Image([im.Layer(BASE), im.Layer(APP)], cmd=["tool"], env=ENV)
    ref = Reference.parse(accelerate(registry, "ahead/app", image, chunk_size=MIB))

    async def pull() -> None:
        async with anonymous_client() as client:
            layers = (await client.resolve(ref)).layers
            cache = ChunkCache(tmp_path / "cache", 1 << 30, fsync=False)
            await cache.open()
            fetcher = Fetcher(cache, FetchOptions(merge_min=0, merge_cap=0, background=False))
            fetcher.links[ref.host] = frozen_link(0.004)  # 100 Mbit/s and near: each chunk on its own
            fs = LazyFS(fetcher)
            root = tmp_path / "root"
            root.mkdir()
            remote = RemoteLayers(
                root, root / "mnt", fs, fetcher, client, background=False, prefetch_program=prefetch_program
            )
            digests = tuple(d["digest"] for d in layers)
            async with trio.open_nursery() as nursery:
                await nursery.start(fetcher.run)
                await nursery.start(remote.run)
                names = []
                for digest in digests:  # bottom up, as containerd prepares them
                    req = LayerRequest(f"t-{digest}", ref, digest, None, None, digests)
                    names.append(await remote.acquire(req, [remote.path(n) for n in reversed(names)]))
                    if len(names) == 1:  # the image is not whole yet: nothing is guessed
                        await trio.sleep(0.3)
                        bottom = remote._layers[names[0]].handle
                        assert not any(local(fetcher, bottom, "usr/lib/x86_64-linux-gnu/libc-2.36.so"))
                base, app = (remote._layers[n].handle for n in names)
                if prefetch_program:
                    await tool_and_its_libraries_arrive(fetcher, app, base)
                else:
                    await trio.sleep(0.5)
                    assert not any(local(fetcher, app, "app/bin/tool"))
                    assert not any(local(fetcher, base, "usr/lib/x86_64-linux-gnu/libc-2.36.so"))
                nursery.cancel_scope.cancel()

    trio.run(pull)
