"""RemoteLayers.restore after a restart: requests for a layer wait while it is restored (a taken-over
mount is served at once), and a layer that cannot be restored (a damaged record, a damaged TOC) fails
its readers with EIO instead of leaving them waiting; the other layers are served."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pyfuse3
import trio

from fuse.cache import ChunkCache
from fuse.fetch import Fetcher, FetchOptions
from fuse.formats import BytesSource, fetch_toc
from fuse.fs import SLOT_SHIFT, LazyFS
from fuse.layers import RemoteLayers
from snapshotter.convert.writer import convert_bytes
from tests.harness import images as im
from tests.harness.registry import anonymous_client


def record(root: Path, name: str, meta: dict, footer: bytes, toc: bytes) -> None:
    d = root / "layers" / name
    d.mkdir(parents=True)
    (d / "footer").write_bytes(footer)
    (d / "toc").write_bytes(toc)
    (d / "meta.json").write_text(json.dumps(meta))


async def test_restore_serves_good_layers_and_fails_the_others_with_eio(tmp_path: Path) -> None:
    layer = im.Layer([im.File("hello", b"hi\n"), im.File("dir/data", b"x" * 100)])
    blob, result = convert_bytes(layer.tar())
    footer, toc = await fetch_toc(BytesSource(blob))
    meta = {"ref": "127.0.0.1:1/r:v1", "digest": "sha256:" + "a" * 64, "size": len(blob)}
    meta["toc_digest"] = result.toc_digest
    root = tmp_path / "root"
    record(root, "sha256-good", {**meta, "slot": 3}, footer, toc)
    record(root, "sha256-badslot", {**meta, "slot": "x"}, footer, toc)
    record(root, "sha256-badtoc", {**meta, "slot": 5}, footer, toc[:-7] + b"garbage")
    cache = ChunkCache(tmp_path / "cache", 1 << 20, fsync=False)
    fs = LazyFS(Fetcher(cache, FetchOptions()))
    results: dict[str, object] = {}

    async def lookup(name: str) -> None:
        try:
            results[name] = await fs.lookup(pyfuse3.ROOT_INODE, name.encode())
        except pyfuse3.FUSEError as e:
            results[name] = e.errno

    async def getattr_of(slot: int) -> None:
        try:
            results[f"slot{slot}"] = await fs.getattr(slot << SLOT_SHIFT | 1)
        except pyfuse3.FUSEError as e:
            results[f"slot{slot}"] = e.errno

    refs = {"sha256-good": 1, "sha256-badslot": 1, "sha256-badtoc": 1}
    async with anonymous_client() as client:
        layers = RemoteLayers(root, root / "mnt", fs, fs.fetcher, client, background=False)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                fs.expect_layer("sha256-good", 3)  # what restore() announces first, before any reader
                fs.expect_layer("sha256-badtoc", 5)
                nursery.start_soon(getattr_of, 3)  # readers of a taken-over mount, arriving at once
                nursery.start_soon(getattr_of, 5)
                nursery.start_soon(lookup, "sha256-good")
                await trio.sleep(0.1)
                assert results == {}  # waiting for their layers, not failing
                failed = await layers.restore(refs)
    assert sorted(failed) == ["sha256-badslot", "sha256-badtoc"]
    assert results["slot3"].st_ino == results["sha256-good"].st_ino == 3 << SLOT_SHIFT | 1
    assert results["slot5"] == errno.EIO  # the damaged layer's readers fail, they do not hang


async def test_a_cancelled_restore_leaves_no_reader_waiting(tmp_path: Path) -> None:
    layer = im.Layer([im.File("hello", b"hi\n")])
    blob, result = convert_bytes(layer.tar())
    footer, toc = await fetch_toc(BytesSource(blob))
    meta = {"ref": "127.0.0.1:1/r:v1", "digest": "sha256:" + "b" * 64, "size": len(blob)}
    root = tmp_path / "root"
    record(root, "sha256-one", {**meta, "toc_digest": result.toc_digest, "slot": 7}, footer, toc)
    fs = LazyFS(Fetcher(ChunkCache(tmp_path / "cache", 1 << 20, fsync=False), FetchOptions()))
    got: list[object] = []
    async with anonymous_client() as client:
        layers = RemoteLayers(root, root / "mnt", fs, fs.fetcher, client, background=False)
        with trio.CancelScope() as scope:
            scope.cancel()  # the restore is cancelled at its first checkpoint
            await layers.restore({"sha256-one": 1})
        with trio.fail_after(5):
            try:
                got.append(await fs.getattr(7 << SLOT_SHIFT | 1))
            except pyfuse3.FUSEError as e:
                got.append(e.errno)
    assert got == [errno.EIO]


async def records(root: Path, layers: dict[str, dict]) -> None:
    """Records of one small layer under each name, slots from 1, each with its own extra fields."""
    blob, result = convert_bytes(im.Layer([im.File("hello", b"hi\n")]).tar())
    footer, toc = await fetch_toc(BytesSource(blob))
    meta = {"ref": "127.0.0.1:1/r:v1", "size": len(blob), "toc_digest": result.toc_digest}
    for slot, (name, extra) in enumerate(layers.items(), start=1):
        record(root, name, {**meta, "digest": "sha256:" + f"{slot}" * 64, "slot": slot, **extra}, footer, toc)


async def test_the_stack_a_reader_sees_is_the_chain_of_the_image_that_took_it_last(tmp_path: Path) -> None:
    # fuse.ahead finds a program's libraries in the layers its container sees: for a layer shared by
    # two images, the chain of the image whose snapshot took a layer last, top first
    root = tmp_path / "root"
    names = ["sha256-base", "sha256-app1", "sha256-app2", "sha256-alone"]
    await records(root, {name: {} for name in names})
    fs = LazyFS(Fetcher(ChunkCache(tmp_path / "cache", 1 << 20, fsync=False), FetchOptions()))
    async with anonymous_client() as client:
        layers = RemoteLayers(root, root / "mnt", fs, fs.fetcher, client, background=False)
        assert await layers.restore(dict.fromkeys(names, 1)) == []
        entry = layers._layers
        entry["sha256-app1"].lower = [layers.path("sha256-base"), "/var/lib/a/local-snapshot"]
        entry["sha256-app2"].lower = [layers.path("sha256-base")]
        entry["sha256-app1"].used, entry["sha256-app2"].used = 1, 2
        handles = {n: e.handle for n, e in entry.items()}
        stack = lambda name: [h.id for h in layers.stack(handles[name])]  # noqa: E731
        assert stack("sha256-base") == ["sha256-app2", "sha256-base"]  # app2 took a layer last
        assert stack("sha256-app1") == ["sha256-app1", "sha256-base"]  # a local snapshot is no lazy layer
        assert stack("sha256-alone") == ["sha256-alone"]
        entry["sha256-app1"].used = 3
        assert stack("sha256-base") == ["sha256-app1", "sha256-base"]


async def test_the_stack_survives_a_restart(tmp_path: Path) -> None:
    # the chain below a layer is in its record: after a restart its readers' libraries are found in
    # the layers below as before (fuse.ahead)
    root = tmp_path / "root"
    lower = [str(root / "mnt" / "sha256-base"), "/var/lib/a/local-snapshot"]
    await records(root, {"sha256-base": {}, "sha256-app": {"lower": lower}})
    fs = LazyFS(Fetcher(ChunkCache(tmp_path / "cache", 1 << 20, fsync=False), FetchOptions()))
    async with anonymous_client() as client:
        layers = RemoteLayers(root, root / "mnt", fs, fs.fetcher, client, background=False)
        assert await layers.restore({"sha256-base": 1, "sha256-app": 1}) == []
        base = layers._layers["sha256-base"].handle
        assert [h.id for h in layers.stack(base)] == ["sha256-app", "sha256-base"]
