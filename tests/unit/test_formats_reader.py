"""Footers and opening layers: the right format found with at most two reads, TOCs verified, and every
kind of broken blob a clear FormatError (never another exception, a hang or unbounded memory)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import itertools
import json
import struct
import tarfile

import pytest
import trio
import zstandard
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fuse.formats import (
    ESTARGZ,
    ESTARGZ_ZSTD,
    ZSTD_CHUNKED,
    BytesSource,
    ChunkStream,
    FormatError,
    NotLazy,
    Unverified,
    decode_chunk,
    open_layer,
    parse_footer,
)
from fuse.formats.index import ZEROS
from fuse.formats.spec import SKIPPABLE_MAGIC


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gzip_footer(toc_offset: int) -> bytes:
    extra = b"SG" + struct.pack("<H", 22) + b"%016xSTARGZ" % toc_offset
    return (
        b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
        + struct.pack("<H", 26)
        + extra
        + b"\x01\x00\x00\xff\xff"
        + bytes(8)
    )


def zstd_footer(magic: bytes, fields: tuple[int, ...]) -> bytes:
    payload = struct.pack(f"<{len(fields)}Q", *fields) + magic
    return SKIPPABLE_MAGIC + struct.pack("<I", len(payload)) + payload


def tiny_estargz(files: dict[str, bytes], toc_mutator=None) -> tuple[bytes, str]:
    """A minimal eStargz blob by formats.md (one gzip member per file, TOC tar member, footer), built here
    so tests can make it lie; returns (blob, TOC digest)."""
    blob, entries = b"", []
    for name, data in files.items():
        entries.append(
            {
                "name": name,
                "type": "reg",
                "size": len(data),
                "offset": len(blob),
                "mode": 0o644,
                "chunkDigest": sha(data),
            }
        )
        blob += gzip.compress(data, mtime=0)
    doc = {"version": 1, "entries": entries}
    if toc_mutator:
        toc_mutator(doc)
    tail, digest = estargz_tail(doc, len(blob))
    return blob + tail, digest


def estargz_tail(doc: dict, toc_offset: int) -> tuple[bytes, str]:
    """What follows an eStargz blob's data at `toc_offset`: the TOC (a tar in one gzip member) and the
    footer; returns (those bytes, TOC digest)."""
    toc = json.dumps(doc).encode()
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w") as tar:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc)
        tar.addfile(info, io.BytesIO(toc))
    return gzip.compress(tar_buf.getvalue(), mtime=0) + gzip_footer(toc_offset), sha(toc)


FILES = {"a": b"alpha" * 1000, "dir/b": b"beta", "dir/c": bytes(range(256)) * 64}


async def test_open_and_read_with_two_reads_at_most() -> None:
    blob, digest = tiny_estargz(FILES)
    src = BytesSource(blob, "tiny")
    layer = await open_layer(src, digest)
    assert layer.format == ESTARGZ and len(src.reads) == 1  # footer and TOC in one suffix read
    for name, data in FILES.items():
        assert await layer.read_file(name) == data
    assert await layer.read(layer.index.find("a"), 10, 7) == FILES["a"][10:17]
    assert await layer.read(layer.index.find("a"), 4990, 100) == FILES["a"][4990:]

    big = {"big": bytes(300 << 10)}  # a TOC beyond the first 256 KiB: one more read
    big_blob, big_digest = tiny_estargz({**big, "x": b"x"})
    src = BytesSource(big_blob, "big")
    await open_layer(src, big_digest)
    assert len(src.reads) <= 2


async def test_toc_must_match_the_expected_digest() -> None:
    blob, digest = tiny_estargz(FILES)
    with pytest.raises(Unverified, match="does not match the expected"):
        await open_layer(BytesSource(blob, "tiny"), sha(b"another toc"))
    with pytest.raises(Unverified, match="no expected TOC digest"):
        await open_layer(BytesSource(blob, "tiny"), None)
    layer = await open_layer(BytesSource(blob, "tiny"), None, allow_unverified=True)  # explicit opt-in only
    assert layer.toc.json_digest == digest


async def test_a_lying_chunk_is_never_served() -> None:
    def corrupt(doc: dict) -> None:
        doc["entries"][1]["chunkDigest"] = sha(b"something else")

    blob, digest = tiny_estargz(FILES, corrupt)
    layer = await open_layer(BytesSource(blob, "tiny"), digest)
    assert await layer.read_file("a") == FILES["a"]
    with pytest.raises(Unverified, match="does not match its digest"):
        await layer.read_file("dir/b")


async def test_broken_blobs() -> None:
    blob, digest = tiny_estargz(FILES)
    cases = {
        "truncated": blob[:-10],
        "no footer": gzip.compress(b"plain layer"),
        "zeros": bytes(1000),
        "empty": b"",
    }
    for name, data in cases.items():
        with pytest.raises(NotLazy):
            await open_layer(BytesSource(data, name), digest)
    toc_at = blob.rindex(b"\x1f\x8b", 0, len(blob) - 51)
    bad_offset = blob[:-51] + gzip_footer(len(blob) + 100)
    with pytest.raises(FormatError, match="outside the blob"):
        await open_layer(BytesSource(bad_offset, "x"), digest)
    garbage_toc = blob[:toc_at] + b"\x1f\x8b\x08\x00garbage!" + gzip_footer(toc_at)
    with pytest.raises(FormatError, match="TOC at .* cannot be read"):
        await open_layer(BytesSource(garbage_toc, "x"), digest)
    bad_hex = blob[:-51] + gzip_footer(0).replace(b"0000000000000000", b"zzzzzzzzzzzzzzzz")
    with pytest.raises(FormatError, match="STARGZ"):
        await open_layer(BytesSource(bad_hex, "x"), digest)


async def test_invalid_json_and_wrong_tar_member() -> None:
    for payload, name, message in [
        (b"{not json", "stargz.index.json", "not valid JSON"),
        (b"{}", "other.json", "cannot be read"),
    ]:
        tar_buf = io.BytesIO()
        with tarfile.open(fileobj=tar_buf, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        blob = gzip.compress(b"data") + gzip.compress(tar_buf.getvalue())
        blob += gzip_footer(len(gzip.compress(b"data")))
        with pytest.raises(FormatError, match=message):
            await open_layer(BytesSource(blob, "x"), None, allow_unverified=True)


async def test_zstd_footers() -> None:
    data = zstandard.ZstdCompressor().compress(b"payload")
    toc = json.dumps(
        {
            "version": 1,
            "entries": [{"name": "f", "type": "reg", "size": 7, "offset": 0, "chunkDigest": sha(b"payload")}],
        }
    ).encode()
    ctoc = zstandard.ZstdCompressor().compress(toc)
    skippable_toc = SKIPPABLE_MAGIC + struct.pack("<I", len(ctoc)) + ctoc
    toc_offset = len(data) + 8
    for magic, fields, fmt in [
        (b"GnUlInUx", (toc_offset, len(ctoc), len(toc), 1), ESTARGZ_ZSTD),
        (b"GNUlInUx", (toc_offset, len(ctoc), len(toc), 1, 0, 0, 0), ZSTD_CHUNKED),
    ]:
        blob = data + skippable_toc + zstd_footer(magic, fields)
        layer = await open_layer(BytesSource(blob, "z"), sha(ctoc))  # the compressed TOC's digest works too
        assert layer.format == fmt
        assert await layer.read_file("f") == b"payload"
    wrong_type = (
        data + skippable_toc + zstd_footer(b"GNUlInUx", (toc_offset, len(ctoc), len(toc), 7, 0, 0, 0))
    )
    with pytest.raises(FormatError, match="manifest type 7"):
        parse_footer(wrong_type[-72:], len(wrong_type), "z")
    lying_len = data + skippable_toc + zstd_footer(b"GnUlInUx", (toc_offset, len(ctoc), len(toc) + 5, 1))
    with pytest.raises(FormatError, match="the footer says"):
        await open_layer(BytesSource(lying_len, "z"), None, allow_unverified=True)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 1 << 20))
def test_fuzzed_footers(tail: bytes, extra: int) -> None:
    size = len(tail) + extra
    try:
        footer = parse_footer(tail, size, "fuzz")
    except FormatError:
        return
    assert 0 <= footer.toc_offset and footer.toc_offset + footer.toc_length <= size - footer.size


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.sampled_from(["gzip-footer", "zstd-footer"]))
def test_fuzzed_blobs_with_valid_footers(junk: bytes, kind: str) -> None:
    import trio

    if kind == "gzip-footer":
        blob = junk + gzip_footer(0)
    else:
        blob = junk + zstd_footer(b"GNUlInUx", (0, len(junk), 100, 1, 0, 0, 0))

    async def attempt() -> None:
        try:
            await open_layer(BytesSource(blob, "fuzz"), None, allow_unverified=True)
        except FormatError:
            pass

    trio.run(attempt)


def packed_estargz(files: dict[str, bytes], root: str | None = None) -> tuple[bytes, str]:
    """An eStargz blob as stargz writes it with a minimal chunk size: the tar headers before the first
    payload in one gzip member, every later header and payload in a second member, each file found by
    its innerOffset in that member (directories between them add headers there too)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        if root is not None:
            info = tarfile.TarInfo(root)
            info.type, info.mode = tarfile.DIRTYPE, 0o750
            tar.addfile(info)
        for name, data in files.items():
            d = tarfile.TarInfo(f"dir-before-{name}")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(stream)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    first = members[next(iter(files))].offset_data
    head = gzip.compress(stream[:first], mtime=0)
    rest = gzip.compress(stream[first:], mtime=0)
    entries: list[dict] = [] if root is None else [{"name": root, "type": "dir", "mode": 0o750}]
    for name, data in files.items():
        entries.append({"name": f"dir-before-{name}/", "type": "dir"})
        entries.append(
            {
                "name": name,
                "type": "reg",
                "size": len(data),
                "offset": len(head),
                "innerOffset": members[name].offset_data - first,
                "chunkDigest": sha(data),
            }
        )
    toc = json.dumps({"version": 1, "entries": entries}, indent="\t").encode()
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w") as tar:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc)
        tar.addfile(info, io.BytesIO(toc))
    toc_offset = len(head) + len(rest)
    blob = head + rest + gzip.compress(tar_buf.getvalue(), mtime=0) + gzip_footer(toc_offset)
    return blob, sha(toc)


async def test_small_files_packed_in_one_member_are_read_by_their_inner_offset() -> None:
    files = {"a": b"A" * 700, "b": b"b" * 100, "c": bytes(range(256)) * 300, "d": b"d"}
    blob, digest = packed_estargz(files, root="./")
    layer = await open_layer(BytesSource(blob, "packed"), digest)
    assert len({layer.index.chunk(c).start for c in range(len(files))}) == 1
    for name, data in files.items():
        assert await layer.read_file(name) == data
    assert layer.index.stat(1).mode == 0o750  # the root entry './'


async def test_a_dot_root_entry_as_umoci_writes_it() -> None:
    """Issue 13: a TOC entry named '.' (umoci's root) made the whole layer fall back to a full pull."""

    def with_root(doc: dict) -> None:
        doc["entries"].insert(0, {"name": ".", "type": "dir", "mode": 0o711, "uid": 5})

    blob, digest = tiny_estargz(FILES, with_root)
    layer = await open_layer(BytesSource(blob, "dot"), digest)
    st_ = layer.index.stat(1)
    assert (st_.mode, st_.uid) == (0o711, 5)
    assert await layer.read_file("dir/b") == FILES["dir/b"]


async def test_toc_documents_that_are_not_a_toc() -> None:
    for doc, message in [
        ([], "TOC is not a JSON object"),
        ({"version": 1}, "not an object with an 'entries' list"),
        ({"entries": {"a": 1}}, "'entries' is not a list"),
        ({"entries": [1]}, "TOC entry 0 is not an object"),
        ({"entries": [], "other": {"nested": [1, 2.5, None]}}, ""),  # other members are skipped
    ]:
        text = json.dumps(doc).encode()
        zblob = zstd_blob(text)
        try:
            await open_layer(BytesSource(zblob, "doc"), None, allow_unverified=True)
        except FormatError as e:
            assert message and message in str(e), (doc, e)
        else:
            assert not message, doc
    with pytest.raises(FormatError, match="data after its JSON object"):
        await open_layer(BytesSource(zstd_blob(b'{"entries":[]} {}'), "x"), None, allow_unverified=True)
    with pytest.raises(FormatError, match="two 'entries' lists"):
        await open_layer(
            BytesSource(zstd_blob(b'{"entries":[],"entries":[]}'), "x"), None, allow_unverified=True
        )


async def test_a_broken_toc_that_is_not_the_expected_one_is_unverified() -> None:
    blob = zstd_blob(b'{"entries":[{"name":"/abs","type":"dir"}]}')
    with pytest.raises(Unverified, match=r"does not match the expected .* \(and the TOC is invalid"):
        await open_layer(BytesSource(blob, "x"), sha(b"another"))


def zstd_blob(toc: bytes) -> bytes:
    """A stargz zstd blob with no data and the given TOC JSON."""
    ctoc = zstandard.ZstdCompressor().compress(toc)
    return (
        SKIPPABLE_MAGIC
        + struct.pack("<I", len(ctoc))
        + ctoc
        + zstd_footer(b"GnUlInUx", (8, len(ctoc), len(toc), 1))
    )


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 1 << 64) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda kids: (
        st.lists(kids, max_size=3)
        | st.dictionaries(st.sampled_from(["name", "type", "size", "entries", "x", "é"]), kids, max_size=4)
    ),
    max_leaves=16,
)
_toc_entry = st.fixed_dictionaries(
    {
        "name": st.text(st.sampled_from("ab/.é"), max_size=6),
        "type": st.sampled_from(["reg", "dir", "symlink", "chunk"]),
    },
    optional={"size": st.integers(0, 9), "offset": st.integers(0, 99), "linkName": st.text(max_size=3)},
)
_toc_docs = st.one_of(
    _json_values,
    st.builds(
        lambda entries, extra: {"version": 1, **extra, "entries": entries},
        st.lists(st.one_of(_toc_entry, _json_values), max_size=6),
        st.dictionaries(st.sampled_from(["version", "x"]), _json_values, max_size=2),
    ),
)


@settings(max_examples=400, deadline=None)
@given(
    _toc_docs,
    st.integers(1, 50),
    st.sampled_from([None, "\t", 1]),
    st.integers(0, 1 << 16),
    st.sampled_from([0, 1 << 20]),
)
@example({"version": 1, "entries": [{"type": [], "name": ""}]}, 1, None, 0, 0)  # a type that is no string
@example({"version": 1, "entries": [{"type": [], "name": ""}]}, 1, None, 0, 1 << 20)
def test_fuzzed_streamed_tocs_read_as_json_loads_reads_them(
    doc, piece: int, indent, cut: int, whole: int
) -> None:
    """The TOC reader, decoding the TOC at once (`whole` bytes at most) or streaming it whatever the
    piece boundaries, accepts and indexes exactly what json.loads + build_index does, and a truncated
    TOC is a FormatError, never another exception."""
    from unittest import mock

    from fuse.formats import Footer, build_index, read_toc
    from fuse.formats import reader as reader_module
    from fuse.formats.index import ZSTD

    text = json.dumps(doc, indent=indent, ensure_ascii=False).encode()

    def streamed(text: bytes):
        raw = zstandard.ZstdCompressor().compress(text)
        footer = Footer(ESTARGZ_ZSTD, 48, 1000, len(raw), len(text))
        with (
            mock.patch.object(reader_module, "TEXT_PIECE", piece),
            mock.patch.object(reader_module, "WHOLE_TOC", whole),
        ):
            try:
                ix = read_toc(footer, raw, None, "fuzz")[0]
            except FormatError:
                return "FormatError"
        return sorted(ix.path(i) for i in range(1, ix.inode_count + 1))

    try:
        ix = build_index(json.loads(text), data_end=1000, storage=ZSTD, what="fuzz")
        reference = sorted(ix.path(i) for i in range(1, ix.inode_count + 1))
    except FormatError:
        reference = "FormatError"
    assert streamed(text) == reference
    if cut < len(text) and text[cut:].strip():
        assert streamed(text[:cut]) == "FormatError"


CRAFTED_TOCS = [
    # a second "entries" list spelled with an escape: msgspec would keep the last one
    b'{"entries":[{"name":"a","type":"dir"}],"entr\\u0069es":[{"name":"b","type":"dir"}]}',
    # bytes that are not UTF-8 in members msgspec skips without looking
    b'{"entries":[{"name":"a","type":"dir","foo":"\xff\xfe"}]}',
    b'{"x":"\xc0\x80","entries":[{"name":"a","type":"dir"}]}',
    b'{"entries":[{"name":"a","type":"dir","f\xffoo":1}]}',
    # valid: escapes, non-ASCII, xattrs, null fields, an unknown member
    b'{"entries":[{"name":"caf\xc3\xa9 \\u0026 co","type":"dir","xattrs":{"user.a":"eA=="}}],"v":[1]}',
    b'{"entries":[{"name":"a","type":"reg","size":0,"mode":null,"digest":null}]}',
]


@pytest.mark.parametrize("text", CRAFTED_TOCS)
def test_a_toc_decoded_whole_reads_as_the_streamed_parser_reads_it(text: bytes) -> None:
    """What the whole decode could read otherwise than the streamed parser goes the streamed way."""
    from unittest import mock

    from fuse.formats import Footer, read_toc
    from fuse.formats import reader as reader_module

    raw = zstandard.ZstdCompressor().compress(text)
    footer = Footer(ESTARGZ_ZSTD, 48, 1000, len(raw), len(text))

    def outcome(whole: int) -> object:
        with mock.patch.object(reader_module, "WHOLE_TOC", whole):
            try:
                ix = read_toc(footer, raw, None, "crafted")[0]
            except FormatError as e:
                return f"FormatError: {e}"
        return [(ix.path(i), ix.stat(i).mode, ix.xattr_names(i)) for i in range(1, ix.inode_count + 1)]

    assert outcome(1 << 20) == outcome(0)


async def test_toc_parses_run_one_at_a_time_in_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each parse may take up to Limits.max_index_bytes: several layers opened at once (an image's
    first Prepare) queue for it instead of adding up."""
    import threading
    import time

    import trio

    from fuse.formats import layer_from_toc
    from fuse.formats import reader as reader_module

    running, most = [0], [0]
    lock = threading.Lock()
    real = reader_module._finish_open

    def counting(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        try:
            return real(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(reader_module, "_finish_open", counting)
    blob, digest = tiny_estargz(FILES)
    src = BytesSource(blob, "tiny")
    footer, raw = await reader_module.fetch_toc(src)
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(layer_from_toc, src, footer, raw, digest)
    assert most[0] == 1


# --- a range decoded as it arrives --------------------------------------------------------------------


@functools.cache
def ranged_layers() -> list:
    """Layers whose chunks are cut every way a range may hold them: our writer's (files of several
    64 KiB chunks, one member each) and stargz's packed small files (one member, by innerOffset)."""
    from snapshotter.convert.writer import WriteOptions, convert_bytes
    from tests.harness import images as im

    files = [im.File(f"f{i}", im.pseudo_random(30_000 * i + 7, seed=i)) for i in range(6)]
    files.append(im.File("text", b"the same line again\n" * 20_000))
    blob, result = convert_bytes(im.Layer(files).tar(), WriteOptions(chunk_size=64 << 10))
    packed, digest = packed_estargz({"a": b"A" * 700, "b": bytes(range(256)) * 300, "c": b"c"})
    return [
        trio.run(open_layer, BytesSource(blob, "ours"), result.toc_digest),
        trio.run(open_layer, BytesSource(packed, "packed"), digest),
    ]


def stream_range(layer, blob: bytes, cuts: list[int]) -> tuple[dict, dict, int]:
    """Feed the range of all the layer's chunks cut at `cuts`: (results, the fed end at which each
    came, the range's start)."""
    ix = layer.index
    chunks = [ix.chunk(c) for c in range(len(ix.c_start)) if ix.c_storage[c] != ZEROS]
    start, end = min(c.start for c in chunks), max(c.end for c in chunks)
    stream = ChunkStream(start, chunks, "test")
    results, came = {}, {}
    bounds = sorted({0, end - start, *(k % (end - start) for k in cuts)})
    for a, b in itertools.pairwise(bounds):
        for c, result in stream.feed(a, blob[start + a : start + b]):
            assert c.id not in results  # each chunk once
            results[c.id], came[c.id] = result, start + b
    return results, came, start


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=1 << 30), max_size=40))
def test_a_range_decoded_as_it_arrives_gives_each_chunk_once_its_bytes_are_in(cuts) -> None:
    for layer in ranged_layers():
        blob, ix = layer.source.data, layer.index
        results, came, _ = stream_range(layer, blob, cuts)
        for cid in range(len(ix.c_start)):
            c = ix.chunk(cid)
            if c.storage == ZEROS:
                continue
            assert results[cid] == decode_chunk(c, blob[c.start : c.end], "test")
            assert came[cid] == min(e for e in came.values() if e >= c.end)  # at once, not later


def test_a_corrupt_chunk_in_a_streamed_range_fails_alone() -> None:
    layer = ranged_layers()[0]
    ix, blob = layer.index, bytearray(layer.source.data)
    bad = ix.chunk(3)
    blob[(bad.start + bad.end) // 2] ^= 0xFF
    results, _, _ = stream_range(layer, bytes(blob), [1000, 70_000, 200_001])
    assert isinstance(results[3], (FormatError, Unverified)), results[3]
    good = [cid for cid, r in results.items() if cid != 3]
    assert good and all(isinstance(results[cid], bytes) for cid in good)


def test_a_retried_range_starts_over_and_a_gap_stops_the_stream() -> None:
    layer = ranged_layers()[0]
    ix, blob = layer.index, layer.source.data
    chunks = [ix.chunk(c) for c in range(len(ix.c_start))]
    start, end = min(c.start for c in chunks), max(c.end for c in chunks)
    half = (end - start) // 2
    stream = ChunkStream(start, chunks, "test")
    first = {c.id for c, _ in stream.feed(0, blob[start : start + half])}
    assert first and len(first) < len(chunks)
    again = {c.id: r for c, r in stream.feed(0, blob[start:end])}  # a retried request: from 0
    assert set(again) == {c.id for c in chunks} - first  # the rest, each once
    assert all(again[c.id] == decode_chunk(c, blob[c.start : c.end], "test") for c in chunks if c.id in again)

    gapped = ChunkStream(start, chunks, "test")
    gapped.feed(0, blob[start : start + 100])
    assert gapped.feed(200, blob[start + 200 : end]) == []  # bytes 100-200 never came: nothing served
