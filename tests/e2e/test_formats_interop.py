"""lazysnap's reader reads layers made by other tools exactly: ctr-remote's eStargz (default and 64 KiB
chunks), its zstd variant and its optimizer (landmark), and skopeo's zstd:chunked. Every file's
content and metadata, read lazily through range requests and verified, equals the source layer."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuse.formats import (
    ESTARGZ,
    ESTARGZ_ZSTD,
    ZSTD_CHUNKED,
    ChunkStream,
    RegistrySource,
    decode_chunk,
    open_layer,
)
from fuse.formats.annotations import expected_toc_digest
from fuse.formats.index import GZIP
from tests.harness import images as im
from tests.harness import trees
from tests.harness.accelerate import (
    ctr_remote_convert,
    ctr_remote_optimize,
    sample_image,
    skopeo_zstd_chunked,
)
from tests.harness.containerd import Containerd
from tests.harness.layers import tree_of
from tests.harness.registry import Registry, anonymous_client


@pytest.fixture
def source_image(registry: Registry, containerd: Containerd) -> tuple[im.Image, str]:
    image = sample_image()
    im.push_image(registry.url, "interop/src", "v1", image)
    ref = f"{registry.host}/interop/src:v1"
    containerd.ctr("image", "pull", "--plain-http", ref)
    return image, ref


async def check_layers(
    registry: Registry, ref: str, image: im.Image, fmt: str | tuple[str, ...], workdir: Path
) -> list:
    """Open every layer of `ref` lazily and compare it with the source layer; returns the layers."""
    client = anonymous_client()
    opened = []
    async with client:
        resolved = await client.resolve(ref)
        assert len(resolved.layers) == len(image.layers)
        for desc, src in zip(resolved.layers, image.layers, strict=True):
            expected = expected_toc_digest(desc.get("annotations"))
            assert expected, f"no TOC digest annotation in {desc}"
            layer = await open_layer(
                RegistrySource(client, resolved.reference, desc["digest"], desc["size"]), expected
            )
            assert layer.format in ((fmt,) if isinstance(fmt, str) else fmt)
            trees.assert_same(src.overlay_tree(), await tree_of(layer), ignore_mtime_of=("dir", "char"))
            opened.append(layer)
    return opened


async def streamed_as_decoded(layer, source: RegistrySource) -> int:
    """Read the span of all the layer's gzip chunks in one range from the registry and decode it as the
    fetcher decodes a miss's range (`ChunkStream`, fed the pieces the client receives): each chunk
    equals what `decode_chunk` makes of its bytes. Returns how many chunks were compared."""
    ix = layer.index
    chunks = [ix.chunk(c) for c in range(len(ix.c_start)) if ix.c_storage[c] == GZIP]
    if not chunks:
        return 0
    start, end = min(c.start for c in chunks), max(c.end for c in chunks)
    stream = ChunkStream(start, chunks, "interop")
    streamed: dict[int, bytes | Exception] = {}

    def tap(offset: int, piece: bytes) -> None:
        streamed.update((c.id, result) for c, result in stream.feed(offset, piece))

    blob = await source.read(start, end - start, tap)
    for c in chunks:
        assert streamed[c.id] == decode_chunk(c, blob[c.start - start : c.end - start], "interop"), c
    return len(chunks)


@pytest.mark.parametrize(
    ("args", "fmt"),
    [
        (["--estargz"], ESTARGZ),
        (["--estargz", "--estargz-chunk-size", "65536"], ESTARGZ),
        (["--zstdchunked"], ESTARGZ_ZSTD),
    ],
)
async def test_ctr_remote_convert(
    registry: Registry, containerd: Containerd, source_image, workdir: Path, args: list[str], fmt: str
) -> None:
    image, ref = source_image
    dst = ctr_remote_convert(containerd, ref, f"{registry.host}/interop/conv:{fmt}-{len(args)}", *args)
    layers = await check_layers(registry, dst, image, fmt, workdir)
    async with anonymous_client() as client:
        for layer in layers:  # a miss's range decoded as it arrives, on ctr-remote's members
            src = layer.source
            compared = await streamed_as_decoded(layer, RegistrySource(client, src.ref, src.digest, src.size))
            assert compared > 0 or fmt == ESTARGZ_ZSTD
    if "65536" in args:  # the 5 MiB file is split into 64 KiB chunks
        big = layers[0].index.find("data/big")
        assert len(layers[0].index.chunks_of(big)) == 80
    assert all(layer.index.no_prefetch for layer in layers)


async def test_ctr_remote_optimize_landmark(
    registry: Registry, containerd: Containerd, source_image, workdir: Path
) -> None:
    image, ref = source_image
    dst = ctr_remote_optimize(
        containerd, ref, f"{registry.host}/interop/opt:v1", "cat /etc/motd /data/big > /dev/null"
    )
    layers = await check_layers(registry, dst, image, ESTARGZ, workdir)
    base = layers[0]
    span = base.prefetch_span()
    assert span is not None, "the optimizer's .prefetch.landmark was not found"
    # the files the workload read lie in the prioritized region, the others after it
    ix = base.index
    for path, inside in [("etc/motd", True), ("data/big", True), ("data/zeros", False)]:
        first = ix.chunk(ix.chunks_of(ix.find(path))[0])
        assert (first.start < span[1]) == inside, path


async def test_skopeo_zstd_chunked(registry: Registry, workdir: Path) -> None:
    image = sample_image()
    await im.push_image_async(registry.url, "interop/src", "v1", image)
    dst = skopeo_zstd_chunked(registry, workdir, "interop/src:v1", "interop/chunked:v1")
    # skopeo 1.9 (containers/storage of its time) writes the 40-byte "GnUlInUx" footer that stargz's
    # zstd variant also uses; newer ones the 64-byte "GNUlInUx" footer: both are read.
    layers = await check_layers(registry, dst, image, (ESTARGZ_ZSTD, ZSTD_CHUNKED), workdir)
    assert all(layer.toc.compressed_digest for layer in layers)


async def test_ctr_remote_toc_beyond_the_suffix_read_is_indexed_while_it_downloads(
    registry: Registry, containerd: Containerd, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A layer of 6,000 files: ctr-remote's TOC (Go's indented JSON) is larger than the suffix read, so
    its head comes in a second range request from the registry and is indexed as it arrives; the index
    is the one the whole TOC gives, and the layer reads as the source."""
    import logging

    from fuse.formats import fetch_layer, read_toc

    files = [im.Dir(f"lib/pkg{d}") for d in range(60)]
    files += [im.File(f"lib/pkg{i // 100}/mod_{i}.py", b"# module %d\n" % i) for i in range(6000)]
    image = im.Image([im.Layer(files)])
    await im.push_image_async(registry.url, "interop/many", "v1", image)
    ref = f"{registry.host}/interop/many:v1"
    containerd.ctr("image", "pull", "--plain-http", ref)
    dst = ctr_remote_convert(containerd, ref, f"{registry.host}/interop/many:esgz", "--estargz")
    client = anonymous_client()
    async with client:
        resolved = await client.resolve(dst)
        [desc] = resolved.layers
        source = RegistrySource(client, resolved.reference, desc["digest"], desc["size"])
        expected = expected_toc_digest(desc.get("annotations"))
        with caplog.at_level(logging.DEBUG, logger="lazysnap.formats"):
            footer_bytes, raw, layer = await fetch_layer(source, expected)
        assert "TOC indexed while it downloaded" in caplog.text
        assert len(raw) > 256 << 10
        whole, info = read_toc(layer.footer, raw, expected, "whole")
        assert info == layer.toc
        assert [whole.stat(i) for i in range(1, whole.inode_count + 1)] == [
            layer.index.stat(i) for i in range(1, layer.index.inode_count + 1)
        ]
        trees.assert_same(
            image.layers[0].overlay_tree(), await tree_of(layer), ignore_mtime_of=("dir", "char")
        )
