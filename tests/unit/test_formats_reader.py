"""Footers and opening layers: the right format found with at most two reads, TOCs verified, and every
kind of broken blob a clear FormatError (never another exception, a hang or unbounded memory)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from fuse.formats import (
    ESTARGZ,
    ESTARGZ_ZSTD,
    ZSTD_CHUNKED,
    BytesSource,
    FormatError,
    NotLazy,
    Unverified,
    open_layer,
    parse_footer,
)
from fuse.formats.footer import SKIPPABLE_MAGIC


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
    toc = json.dumps(doc).encode()
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w") as tar:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc)
        tar.addfile(info, io.BytesIO(toc))
    toc_offset = len(blob)
    blob += gzip.compress(tar_buf.getvalue(), mtime=0) + gzip_footer(toc_offset)
    return blob, sha(toc)


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
