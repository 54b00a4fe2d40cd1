"""eStargz TOCs indexed while they download (`fuse.formats.tocstream`): the index is the one `read_toc`
builds from the whole TOC, whatever the pieces it arrives in; whatever the stream would read otherwise
it leaves to the usual way (which reads or reports it as before); the TOC's end that the suffix read
holds is not downloaded again."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import logging
import random
import tarfile
import time
import zlib

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from fuse.formats import BytesSource, FormatError, Unverified, open_layer, read_toc
from fuse.formats.footer import Footer
from fuse.formats.reader import TAIL_READ
from fuse.formats.spec import ESTARGZ
from fuse.formats.tocstream import TOC_STREAMS, TocStream
from tests.harness.procs import limited_main, run_limited
from tests.unit.test_formats_reader import _toc_docs, estargz_tail, sha

MEMORY_LIMIT = 1 << 30  # address space of a child (`run_limited`)
RSS_LIMIT_MIB = 100  # what a child feeding a stream may take, the interpreter included


def stored_toc(text: bytes, level: int = 9) -> bytes:
    """The TOC JSON `text` as eStargz stores it: a tar of stargz.index.json in one gzip member."""
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    return gzip.compress(tar_buf.getvalue(), compresslevel=level, mtime=0)


def summary(ix) -> list:
    """What the filesystem serves from an index: every inode's path and attributes and its chunks."""
    out = []
    for ino in range(1, ix.inode_count + 1):
        first, count = ix.first_chunk[ino], ix.chunk_count[ino]
        chunks = [ix.chunk(c) for c in range(first, first + count)] if ix.kind[ino] == 1 else []
        out.append((ix.path(ino), ix.stat(ino), ix.xattr_names(ino), ix.links.get(ino), chunks))
    return out


def streamed(text: bytes, piece: int, held: int, level: int = 9) -> tuple[object, str | None]:
    """The stream's outcome for `text` fed in pieces of `piece` bytes, the last `held` bytes given at the
    end as the suffix read holds them: (summary or None, why it gave up)."""
    return streamed_raw(stored_toc(text, level), piece, held)


def streamed_raw(raw: bytes, piece: int, held: int) -> tuple[object, str | None]:
    """`streamed` of a stored TOC."""
    held = min(held, len(raw))
    footer = Footer(ESTARGZ, 51, 1 << 30, len(raw), None)
    stream = TocStream(footer, "fuzz")
    head = raw[: len(raw) - held]
    for i in range(0, len(head), piece):
        stream.feed(head[i : i + piece])
    got = stream.finish(raw, raw[len(raw) - held :], None)
    return (summary(got[0]) if got else None), stream.gave_up


def usual(text: bytes) -> object:
    return usual_raw(stored_toc(text))


def usual_raw(raw: bytes) -> object:
    """What `read_toc` makes of a stored TOC: the index's summary, or "FormatError"."""
    footer = Footer(ESTARGZ, 51, 1 << 30, len(raw), None)
    try:
        return summary(read_toc(footer, raw, None, "fuzz")[0])
    except FormatError:
        return "FormatError"


@settings(max_examples=300, deadline=None)
@given(_toc_docs, st.sampled_from([None, "\t", 1]), st.integers(1, 300), st.integers(0, 400))
def test_a_streamed_toc_indexes_as_read_toc_does_or_gives_up(doc, indent, piece: int, held: int) -> None:
    text = json.dumps(doc, indent=indent, ensure_ascii=False).encode()
    got, why = streamed(text, piece, held)
    if got is not None:
        assert got == usual(text)
    else:
        assert why


_SPLICES = [
    *(b"}", b",", b"},", b"}, ", b"] ,", b"]", b"[", b"{", b"{}", b"},{", b'"', b"\\", b" ", b"\n"),
    *(b"\xff", b"\xc3\xa9", b"\xc3", b"null", b"1e5", b"-0", b"NaN", b'"\\u0041"', b'"entries"'),
    *(b'"entries":[', b'"name":"x"', b'"name":"x","name":"y"', b'"type":"dir"', b'"size":1.0'),
]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.builds(lambda n: many_entries(n), st.integers(0, 40)), _toc_docs),
    st.sampled_from([None, 1]),
    st.just([])
    | st.lists(st.tuples(st.floats(0, 1), st.integers(0, 3), st.sampled_from(_SPLICES)), max_size=3),
    st.sampled_from([0, 9]),
    st.just([]) | st.lists(st.tuples(st.integers(1, 1100), st.integers(1, 255)), max_size=1),
    st.just(b"") | st.sampled_from([b"\0" * 8, b"junk", gzip.compress(b"more", mtime=0)]),
    st.integers(1, 64),
    st.integers(0, 1200),
)
def test_a_stored_toc_with_bytes_changed_indexes_as_read_toc_does_or_gives_up(
    doc, indent, edits, level: int, flips, trailing: bytes, piece: int, held: int
) -> None:
    """Byte-level changes to the TOC JSON (cut marks, a second "entries", bytes that are not UTF-8,
    duplicate keys, numbers msgspec and the json module read differently) and to the stored TOC's end
    (the tar's end blocks, the gzip member's CRC and size, data after it): the stream gives read_toc's
    index, or gives up."""
    text = bytearray(json.dumps(doc, indent=indent, ensure_ascii=False).encode())
    for at, drop, splice in edits:
        i = int(at * len(text))
        text[i : i + drop] = splice
    raw = bytearray(stored_toc(bytes(text), level))
    for back, xor in flips:  # the last 1,100 bytes: tar end blocks, CRC, ISIZE (stored: level 0)
        raw[-min(back, len(raw) - 10)] ^= xor
    raw = bytes(raw) + trailing
    got, why = streamed_raw(raw, piece, held)
    if got is not None:
        assert got == usual_raw(raw)
    else:
        assert why


def test_a_toc_read_toc_parses_with_the_json_module_goes_the_usual_way() -> None:
    """`read_toc` parses a TOC of more than WHOLE_TOC_OBJECTS "{" (here in a string) with the json module,
    which refuses an entry longer than Limits.max_entry_bytes (600 KB here); msgspec would take it."""
    doc = many_entries(10)
    doc["entries"].insert(5, {"name": "big", "type": "reg", "size": 0, "pad": "{" * 600_000})
    text = json.dumps(doc, ensure_ascii=False).encode()
    assert usual(text) == "FormatError"
    got, why = streamed(text, 64 << 10, 100 << 10)
    assert got is None and "json module" in why


@pytest.mark.parametrize("where", [-8, -4, -1])  # the CRC, the size (ISIZE)
@pytest.mark.parametrize("held", [8, 40])
def test_a_toc_whose_gzip_member_ends_broken_goes_the_usual_way(where: int, held: int) -> None:
    """The JSON is whole before the member's end arrives (in the suffix read): a broken CRC or size after
    it is still the usual way's FormatError, not a TOC the stream accepts."""
    intact = stored_toc(json.dumps(many_entries(300), ensure_ascii=False).encode())
    assert streamed_raw(intact, 4096, held)[0] == usual_raw(intact) != "FormatError"
    raw = bytearray(intact)
    raw[where] ^= 0x55
    assert usual_raw(bytes(raw)) == "FormatError"
    got, why = streamed_raw(bytes(raw), 4096, held)
    assert got is None and why


def test_an_entry_arriving_in_small_pieces_costs_linear_time() -> None:
    """A 3 MB entry (incompressible: each piece inflates to little) fed 256 stored bytes at a time: the
    stream looks for `},` in each new piece only, and does not copy the text held for each piece."""
    pad = base64.b64encode(random.Random(1).randbytes(2_300_000)).decode()
    doc = {
        "version": 1,
        "entries": [{"name": "a", "type": "reg", "size": 0, "p": pad}, {"name": "b", "type": "dir"}],
    }
    text = json.dumps(doc).encode()
    began = time.process_time()
    got, _ = streamed(text, 256, 0, level=1)
    took = time.process_time() - began
    assert got == usual(text)
    assert took < 1.5  # 0.1 s; 6 s when each piece rescanned and copied the text held


def _tiny_entries(count: str) -> str:
    """A child's scenario: a stored TOC of `count` entries of 13 bytes each, fed at once (each piece of up
    to OUTPUT_PIECE bytes of JSON is one run of entries); the stream's outcome."""
    entry, head, tail = b'{"name":"a"},', b'{"entries":[', b'{"name":"a"}]}'
    n = int(count)
    size = len(head) + n * len(entry) + len(tail)
    info = tarfile.TarInfo("stargz.index.json")
    info.size = size
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [z.compress(info.tobuf(tarfile.USTAR_FORMAT) + head)]
    parts += [z.compress(entry * 10_000) for _ in range(n // 10_000)]
    parts += [z.compress(entry * (n % 10_000) + tail + bytes(-size % 512 + 1024)), z.flush()]
    raw = b"".join(parts)
    stream = TocStream(Footer(ESTARGZ, 51, 1 << 30, len(raw), None), "hostile")
    stream.feed(raw)
    return f"gave up: {stream.gave_up}" if stream.finish(raw, b"", None) is None else "accepted"


SCENARIOS = {"tiny_entries": _tiny_entries}


def test_many_tiny_entries_are_not_decoded_at_once() -> None:
    """1,000,000 entries of 13 bytes in a stored TOC of 25 KB: msgspec would make each 4 MB piece of
    text 320,000 entries (170 bytes each) before indexing the first: the stream gives up beyond the
    WHOLE_TOC_OBJECTS that read_toc decodes at once, before decoding them."""
    outcome, rss = run_limited("tests.unit.test_tocstream", "tiny_entries", "1000000")
    assert rss < RSS_LIMIT_MIB, f"peak RSS {rss} MiB ({outcome})"  # 55 MiB; 143 decoding 4 MB at once
    assert outcome.startswith("gave up: ") and "json module" in outcome, outcome


def many_entries(n: int) -> dict:
    """A TOC like a real one: a `./` root, directories, files with chunks, symlinks, hardlinks, names
    beyond ASCII."""
    entries: list[dict] = [{"name": "./", "type": "dir", "mode": 0o755, "modtime": "2024-01-02T03:04:05Z"}]
    offset = 0
    for i in range(n):
        d = f"usr/lib/pkg{i // 50}"
        if i % 50 == 0:
            entries.append({"name": d + "/", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0})
        data = b"file %d" % i
        name = f"{d}/módulo_{i}.py"
        entries.append(
            {
                "name": name,
                "type": "reg",
                "size": len(data),
                "offset": offset,
                "mode": 0o644,
                "modtime": "2024-01-02T03:04:05Z",
                "digest": sha(data),
                "chunkDigest": sha(data),
            }
        )
        offset += 100
        if i % 97 == 0:
            entries.append({"name": f"{d}/link{i}", "type": "symlink", "linkName": f"módulo_{i}.py"})
            entries.append({"name": f"{d}/hard{i}", "type": "hardlink", "linkName": name})
    return {"version": 1, "entries": entries}


@pytest.mark.parametrize("indent", [None, "\t"])
def test_a_real_sized_toc_is_indexed_while_it_arrives(indent) -> None:
    text = json.dumps(many_entries(6000), indent=indent, ensure_ascii=False).encode()
    got, why = streamed(text, 64 << 10, 100 << 10)
    assert why is None and got == usual(text)


@pytest.mark.parametrize(
    ("entry", "ascii", "why"),
    [
        ({"name": "x", "type": "reg", "size": 0, "xattrs": {"user.a": "eA=="}}, False, "not plain JSON"),
        ({"name": "caf\u00e9", "type": "dir"}, True, "not plain JSON"),  # written as caf\u00e9
    ],
)
def test_what_the_stream_might_read_otherwise_goes_the_usual_way(entry: dict, ascii: bool, why: str) -> None:
    doc = many_entries(300)
    doc["entries"].insert(150, entry)
    text = json.dumps(doc, indent="\t", ensure_ascii=ascii).encode()
    got, gave_up = streamed(text, 4096, 0)
    assert got is None and why in gave_up
    assert usual(text) != "FormatError"


def test_a_name_holding_the_cut_is_read_whole_or_goes_the_usual_way() -> None:
    """A piece that ends just after a name's `},` is cut there: that run does not decode, and the
    stream gives up; cut anywhere else, the name is read whole. (Stored uncompressed, so that the pieces'
    ends fall everywhere in the text.)"""
    doc = many_entries(40)
    doc["entries"].insert(20, {"name": "dir/a},b", "type": "reg", "size": 0})
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    expected = usual(text)
    outcomes = [streamed(text, piece, 0, level=0) for piece in range(40, 400)]
    assert all(got == expected for got, _ in outcomes if got is not None)
    assert any(got is None and "Error" in why for got, why in outcomes)


def blob_with_big_toc(n: int = 6000) -> tuple[bytes, str, dict]:
    """An eStargz blob whose TOC is larger than the suffix read; (blob, TOC digest, files)."""
    files = {f"d{i // 100}/f{i}": b"content %d" % i for i in range(n)}
    blob, entries = b"", []
    for name, data in files.items():
        entries.append(
            {"name": name, "type": "reg", "size": len(data), "offset": len(blob), "chunkDigest": sha(data)}
        )
        blob += gzip.compress(data, mtime=0)
    tail, digest = estargz_tail({"version": 1, "entries": entries}, len(blob))
    return blob + tail, digest, files


async def test_open_layer_streams_and_reads_the_toc_head_once(caplog: pytest.LogCaptureFixture) -> None:
    blob, digest, files = blob_with_big_toc()
    src = BytesSource(blob, "big")
    with caplog.at_level(logging.DEBUG, logger="lazysnap.formats"):
        layer = await open_layer(src, digest)
    assert "TOC indexed while it downloaded" in caplog.text
    (tail_at, tail_len), (head_at, head_len) = src.reads
    assert tail_len == TAIL_READ and head_at + head_len == tail_at  # the tail's part is not read again
    for name in ("d0/f0", "d33/f3333", "d59/f5999"):
        assert await layer.read_file(name) == files[name]


class RetryingSource(BytesSource):
    """Streams a read's first half, then starts again from 0 as a retried request does."""

    async def read(self, offset, length, tap=None):
        data = await super().read(offset, length)
        if tap is not None:  # the TOC head's read
            tap(0, data[: length // 2])
            await trio.sleep(0)
            for i in range(0, length, 4096):
                tap(i, data[i : i + 4096])
        return data


async def test_a_retried_download_is_read_the_usual_way(caplog: pytest.LogCaptureFixture) -> None:
    blob, digest, files = blob_with_big_toc()
    with caplog.at_level(logging.DEBUG, logger="lazysnap.formats"):
        layer = await open_layer(RetryingSource(blob, "retried"), digest)
    assert "download was retried" in caplog.text
    assert await layer.read_file("d42/f4242") == files["d42/f4242"]


class ShortSource(BytesSource):
    """Gives the TOC head's read half its bytes (tapped as they arrive), as a connection that drops does."""

    async def read(self, offset, length, tap=None):
        if tap is None:
            return await super().read(offset, length)
        data = self.data[offset : offset + length // 2]
        tap(0, data)
        await trio.sleep(0)
        return data


async def test_a_failed_toc_download_raises_its_error_as_the_usual_way_does() -> None:
    """The download's own error (here: a short read), not an ExceptionGroup that callers do not catch;
    and the stream's slot is free again."""
    blob, digest, _ = blob_with_big_toc()
    with pytest.raises(FormatError, match="short read of the TOC"):
        await open_layer(ShortSource(blob, "short"), digest)
    assert TOC_STREAMS.borrowed_tokens == 0


async def test_a_streamed_toc_that_is_not_the_expected_one_is_unverified() -> None:
    blob, digest, _ = blob_with_big_toc()
    with pytest.raises(Unverified, match="does not match the expected"):
        await open_layer(BytesSource(blob, "other"), "sha256:" + hashlib.sha256(b"x").hexdigest())
    broken = bytearray(blob)
    broken[len(blob) - 200_000] ^= 0xFF  # inside the TOC's gzip member, beyond the suffix read
    with pytest.raises((FormatError, Unverified)):
        await open_layer(BytesSource(bytes(broken), "broken"), digest)


if __name__ == "__main__":
    limited_main(SCENARIOS, MEMORY_LIMIT)
