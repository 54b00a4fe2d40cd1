"""fuse.formats.zranlayer: a plain gzip layer made by GNU tar and GNU gzip, served from its checkpoint
index through the real data path (fetcher and chunk cache): every file reads back exactly, spans are
verified before a byte is served (a flipped byte in the blob is an error, never wrong data), and
entries that lie (data beyond the stream, a `..` name) are refused."""

from __future__ import annotations

import dataclasses
import io
import os
import random
import subprocess
import tarfile
from pathlib import Path

import pytest
import trio

from fuse.cache import ChunkCache
from fuse.fetch import Fetcher, FetchOptions, LayerHandle
from fuse.formats import BytesSource, FormatError, Unverified, zran, ztoc
from fuse.formats.zranlayer import FORMAT, open_zran_layer

SPAN = 256 << 10


@dataclasses.dataclass(frozen=True)
class Entry:
    """A tar entry as Python's tarfile lists it, in the shape of a zTOC entry."""

    name: str
    type: str
    size: int
    uncompressed_offset: int
    mode: int
    uid: int
    gid: int
    mtime: int
    linkname: str
    devmajor: int
    devminor: int
    xattrs: dict


TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.FIFOTYPE: "fifo",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
}


def entries_of(tar_bytes: bytes) -> list[Entry]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        for m in tar:
            xattrs = {
                k[len("SCHILY.xattr.") :]: v
                for k, v in m.pax_headers.items()
                if k.startswith("SCHILY.xattr.")
            }
            out.append(
                Entry(
                    m.name,
                    TYPES[m.type],
                    m.size if m.isreg() else 0,
                    m.offset_data,
                    m.mode,
                    m.uid,
                    m.gid,
                    int(m.mtime),
                    m.linkname,
                    m.devmajor,
                    m.devminor,
                    xattrs,
                )
            )
    return out


@pytest.fixture(scope="module")
def layer_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes, dict[str, bytes]]:
    """(gzip blob, tar, path -> content) of a rootfs packed by GNU tar (`./` entries, a long name, links,
    a 3 MB random file crossing many spans, text) and compressed by GNU gzip."""
    root = tmp_path_factory.mktemp("rootfs")
    rng = random.Random(17)
    files = {
        "bin/tool": rng.randbytes(3 << 20),
        "etc/config.txt": b"".join(b"key%d = value %d\n" % (i, i * i) for i in range(40_000)),
        "empty": b"",
        "deep/" + "d/" * 30 + "n" * 150: b"a long name\n",
        "data/zeros": bytes(700_000),
    }
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    os.symlink("tool", root / "bin/link")
    os.link(root / "bin/tool", root / "bin/hard")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "etc/config.txt", "user.kind", b"config")
    tar = subprocess.run(
        ["tar", "--xattrs", "--format=posix", "-C", str(root), "-cf", "-", "."],
        capture_output=True,
        check=True,
    ).stdout
    blob = subprocess.run(["gzip", "-6", "-n", "-c"], input=tar, capture_output=True, check=True).stdout
    return blob, tar, {**files, "bin/hard": files["bin/tool"]}


def index_for(blob: bytes) -> zran.Index:
    stream = io.BytesIO(blob)
    return zran.build_index(stream.read, span=SPAN, span_out=SPAN, what="test gzip layer")


async def test_every_file_reads_back_through_the_data_path(layer_files, tmp_path: Path) -> None:
    blob, tar, files = layer_files
    zindex = index_for(blob)
    assert len(zindex.points) > 10  # many spans: files cross them
    layer = await open_zran_layer(BytesSource(blob, "test gzip layer"), entries_of(tar), zindex)
    assert layer.format == FORMAT
    ix = layer.index
    assert ix.readlink(ix.find("bin/link")) == "tool"
    assert ix.find("bin/hard") == ix.find("bin/tool") and ix.nlink[ix.find("bin/tool")] == 2
    assert ix.xattr(ix.find("etc/config.txt"), "user.kind") == b"config"
    cache = ChunkCache(tmp_path / "cache", 100 << 20, fsync=False)
    await cache.open()
    fetcher = Fetcher(cache, FetchOptions(background=False))
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        handle = LayerHandle(layer, "sha256-zran", "test gzip layer")
        for path, data in files.items():
            ino = ix.find(path)
            assert ix.size[ino] == len(data)
            assert await fetcher.read(handle, ino, 0, len(data) + 10) == data, path
        rng = random.Random(5)
        tool = files["bin/tool"]
        for _ in range(50):  # random reads, from the cache or the blob
            off = rng.randrange(len(tool))
            n = rng.randrange(1, 300_000)
            assert await fetcher.read(handle, ix.find("bin/tool"), off, n) == tool[off : off + n]
        nursery.cancel_scope.cancel()


async def test_a_flipped_byte_is_an_error_never_wrong_bytes(layer_files) -> None:
    blob, tar, files = layer_files
    zindex = index_for(blob)
    layer = await open_zran_layer(BytesSource(blob, "test gzip layer"), entries_of(tar), zindex)
    ino = layer.index.find("bin/tool")
    c = layer.index.chunk(layer.index.first_chunk[ino] + 3)
    bad = bytearray(blob)
    bad[(c.start + c.end) // 2] ^= 0x40
    tampered = await open_zran_layer(BytesSource(bytes(bad), "tampered"), entries_of(tar), zindex)
    with pytest.raises((Unverified, FormatError)):
        await tampered.read(ino, 0, len(files["bin/tool"]))
    # the chunks of other spans are still served
    first = layer.index.chunk(layer.index.first_chunk[ino])
    if first.start != c.start:
        assert await tampered.read(ino, 0, first.size) == files["bin/tool"][: first.size]


async def test_entries_that_lie_are_refused(layer_files) -> None:
    blob, tar, _ = layer_files
    zindex = index_for(blob)
    entries = entries_of(tar)
    beyond = [
        dataclasses.replace(e, uncompressed_offset=zindex.uncomp_size) if e.size else e for e in entries
    ]
    with pytest.raises(FormatError, match="beyond the stream"):
        await open_zran_layer(BytesSource(blob), beyond, zindex)
    escape = [*entries, dataclasses.replace(entries[-1], name="../escape")]
    with pytest.raises(FormatError, match=r"'\.\.'"):
        await open_zran_layer(BytesSource(blob), escape, zindex)


async def test_a_ztoc_serves_the_layer(layer_files) -> None:
    """The zTOC lazysnap index publishes (built in one pass, serialized, parsed back) serves every file:
    the compressed span digests it carries check the bytes fetched."""
    blob, _, files = layer_files
    built = ztoc.build_ztoc(io.BytesIO(blob).read, span_out=SPAN, what="test gzip layer")
    parsed = ztoc.parse_ztoc(ztoc.to_bytes(built), what="test zTOC")
    assert parsed.index.comp_digests is not None and parsed.index.out_digests is None
    layer = await open_zran_layer(BytesSource(blob, "test gzip layer"), parsed.entries, parsed.index)
    for path, data in files.items():
        assert await layer.read_file(path) == data, path
    bad = bytearray(blob)
    bad[len(blob) // 2] ^= 1
    tampered = await open_zran_layer(BytesSource(bytes(bad), "tampered"), parsed.entries, parsed.index)
    with pytest.raises(Unverified):
        await tampered.read_file("bin/tool")


async def test_a_read_caches_every_file_of_its_span(layer_files, tmp_path: Path) -> None:
    """Inflating a span for one file makes the other files of that span local too: the next reads of
    them fetch nothing."""
    blob, tar, files = layer_files
    zindex = index_for(blob)
    source = BytesSource(blob, "test gzip layer")
    reads: list[tuple[int, int]] = []
    original = source.read_many

    async def counted(spans: list[tuple[int, int]], early=None, tap=None) -> list[bytes]:
        reads.extend(spans)
        return await original(spans, early, tap)

    source.read_many = counted  # type: ignore[method-assign]
    layer = await open_zran_layer(source, entries_of(tar), zindex)
    ix = layer.index
    small = [p for p, d in files.items() if 0 < len(d) < 100]  # the long-named file and friends
    ino = ix.find(small[0])
    same_span = [
        cid
        for cid in range(len(ix.c_start))
        if ix.c_start[cid] == ix.c_start[ix.first_chunk[ino]] and cid != ix.first_chunk[ino]
    ]
    assert same_span, "the test layer should have other files in that span"
    cache = ChunkCache(tmp_path / "cache", 100 << 20, fsync=False)
    await cache.open()
    fetcher = Fetcher(cache, FetchOptions(background=False, merge_cap=0))
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        handle = LayerHandle(layer, "sha256-zran", "test gzip layer")
        assert await fetcher.read(handle, ino, 0, 100) == files[small[0]]
        with trio.fail_after(5):
            while not all(handle.cached[cid] for cid in same_span):
                await trio.sleep(0.01)
        fetched = len(reads)
        other = ix.find("etc/config.txt")
        if ix.c_start[ix.first_chunk[other]] == ix.c_start[ix.first_chunk[ino]]:
            assert (await fetcher.read(handle, other, 0, 50)) == files["etc/config.txt"][:50]
            assert len(reads) == fetched  # served from the cache
        nursery.cancel_scope.cancel()
