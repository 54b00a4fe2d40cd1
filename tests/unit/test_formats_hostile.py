"""Hostile layers: TOCs and chunks built to exhaust memory or time end in a FormatError, within bounded
memory. Each memory case runs in a child process under RLIMIT_AS, so a regression fails the test (with
MemoryError or a kill) instead of taking the machine down; the child also reports its peak RSS.

    python -m tests.unit.test_formats_hostile SCENARIO   # what the child runs
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import zstandard

from fuse.formats import BytesSource, FormatError, open_layer
from fuse.formats.index import GZIP, ZSTD, Chunk
from fuse.formats.spec import SKIPPABLE_MAGIC
from tests.harness.procs import limited_main, run_limited

ROOT = Path(__file__).resolve().parents[2]
MEMORY_LIMIT = 512 << 20  # address space of the child: far below what the old code needed
RSS_LIMIT_MIB = 256  # what one hostile TOC parse may take, the interpreter included


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gzip_footer(toc_offset: int) -> bytes:
    extra = b"SG" + struct.pack("<H", 22) + b"%016xSTARGZ" % toc_offset
    return (
        b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", 26) + extra + b"\x01\x00\x00\xff\xff"
    ) + bytes(8)


def estargz_with_toc_text(pieces: Callable[[], Iterator[bytes]]) -> bytes:
    """An eStargz blob whose TOC JSON is whatever `pieces` yields, compressed as it streams (so a
    TOC of hundreds of MiB never exists whole, in the parent or the child)."""
    size = sum(len(p) for p in pieces())
    data = gzip.compress(b"x", mtime=0)
    info = tarfile.TarInfo("stargz.index.json")
    info.size = size
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [z.compress(info.tobuf(format=tarfile.USTAR_FORMAT))]
    out += [z.compress(p) for p in pieces()]
    out.append(z.compress(bytes(-size % 512 + 1024)) + z.flush())
    return data + b"".join(out) + gzip_footer(len(data))


def repeated(head: bytes, entry: Callable[[int], bytes], count: int, tail: bytes) -> Callable[[], Iterator]:
    def pieces() -> Iterator[bytes]:
        yield head
        batch = 4096
        for first in range(0, count, batch):
            yield b",".join(entry(i) for i in range(first, min(count, first + batch))) + (
                b"," if first + batch < count else b""
            )
        yield tail

    return pieces


# --- the scenarios a child process runs ---------------------------------------------------------------


def _open(blob: bytes) -> str:
    """Open the blob as a layer; what happened, as one line."""

    async def attempt() -> str:
        layer = await open_layer(BytesSource(blob, "hostile"), None, allow_unverified=True)
        return f"opened with {layer.index.inode_count} inodes"

    try:
        return trio.run(attempt)
    except FormatError as e:
        return f"FormatError: {e}"


def toc_of_repeated_directories() -> bytes:
    """255 MiB of TOC JSON listing one directory again and again (issue 12: a 650 KB layer that took
    3.2 GiB and 7.6 s before it was refused)."""
    one = b'{"name":"d/","type":"dir"}'
    count = (255 << 20) // (len(one) + 1)
    return estargz_with_toc_text(repeated(b'{"version":1,"entries":[', lambda i: one, count, b"]}"))


def toc_of_long_unique_names() -> bytes:
    """A million distinct files with 200-character names: the index alone would need ~500 MiB."""

    def entry(i: int) -> bytes:
        return b'{"name":"dir/%s%08d","type":"reg","size":0}' % (b"n" * 190, i)

    return estargz_with_toc_text(repeated(b'{"version":1,"entries":[', entry, 1_000_000, b"]}"))


def toc_of_tiny_entries() -> bytes:
    """1.3 million distinct files in 40 MiB of TOC JSON: small enough to be held whole, but decoded at
    once their entries would take ~400 MiB."""

    def entry(i: int) -> bytes:
        return b'{"name":"f%07d","type":"reg"}' % i

    return estargz_with_toc_text(repeated(b'{"version":1,"entries":[', entry, 1_300_000, b"]}"))


def toc_of_one_entry_with_many_xattrs() -> bytes:
    """37 MiB of TOC JSON, one entry: small enough to be held whole, with 3 million xattrs that decoded
    at once would take ~400 MiB."""
    head = b'{"version":1,"entries":[{"name":"a","type":"dir","xattrs":{'
    return estargz_with_toc_text(repeated(head, lambda i: b'"%d":""' % i, 3_000_000, b"}}]}"))


def toc_with_one_huge_name() -> bytes:
    def pieces() -> Iterator[bytes]:
        yield b'{"version":1,"entries":[{"type":"reg","name":"'
        for _ in range(200):
            yield b"a" * (1 << 20)
        yield b'"}]}'

    return estargz_with_toc_text(pieces)


def toc_with_a_huge_member_before_entries() -> bytes:
    def pieces() -> Iterator[bytes]:
        yield b'{"version":1,"padding":"'
        for _ in range(200):
            yield b"p" * (1 << 20)
        yield b'","entries":[]}'

    return estargz_with_toc_text(pieces)


def decode_gzip_bomb() -> str:
    """A 0.5 MB gzip member of 512 MiB of zeros, a chunk claiming innerOffset far beyond it (issue 12:
    a 2 MB blob took the process to 6.2 GiB)."""
    from fuse.formats import decode_chunk

    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = b"".join(z.compress(bytes(1 << 20)) for _ in range(512)) + z.flush()
    chunk = Chunk(0, GZIP, 0, len(member), 1 << 40, 0, 1, hashlib.sha256(b"\0").digest())
    try:
        decode_chunk(chunk, member, "hostile")
        return "decoded"
    except FormatError as e:
        return f"FormatError: {e}"


def stream_gzip_bomb() -> str:
    """The same bomb arriving piece by piece, decoded as it comes (`ChunkStream`, a miss's range)."""
    from fuse.formats import ChunkStream

    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = b"".join(z.compress(bytes(1 << 20)) for _ in range(512)) + z.flush()
    chunk = Chunk(0, GZIP, 0, len(member), 1 << 40, 0, 1, hashlib.sha256(b"\0").digest())
    stream = ChunkStream(0, [chunk], "hostile")
    for at in range(0, len(member), 64 << 10):
        for _, result in stream.feed(at, member[at : at + (64 << 10)]):
            return f"{type(result).__name__}: {result}"
    return "never given"


def decode_zstd_bomb() -> str:
    """A 32 KB zstd frame of 1 GiB of zeros, a chunk wanting everything after its first GiB (issue
    12: read(innerOffset + size) allocated it all at once)."""
    from fuse.formats import decode_chunk

    c = zstandard.ZstdCompressor(level=1).compressobj()
    frame = b"".join(c.compress(bytes(1 << 20)) for _ in range(1024)) + c.flush()
    chunk = Chunk(0, ZSTD, 0, len(frame), 1 << 30, 0, 1 << 20, hashlib.sha256(bytes(1 << 20)).digest())
    try:
        decode_chunk(chunk, frame, "hostile")
        return "decoded"
    except FormatError as e:
        return f"FormatError: {e}"


SCENARIOS: dict[str, Callable[[], str]] = {
    "repeated-directories": lambda: _open(toc_of_repeated_directories()),
    "long-unique-names": lambda: _open(toc_of_long_unique_names()),
    "tiny-entries": lambda: _open(toc_of_tiny_entries()),
    "many-xattrs": lambda: _open(toc_of_one_entry_with_many_xattrs()),
    "one-huge-name": lambda: _open(toc_with_one_huge_name()),
    "huge-member-before-entries": lambda: _open(toc_with_a_huge_member_before_entries()),
    "gzip-chunk-bomb": decode_gzip_bomb,
    "gzip-chunk-bomb-streamed": stream_gzip_bomb,
    "zstd-chunk-bomb": decode_zstd_bomb,
}


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        ("repeated-directories", "TOC has more than 1000000 entries"),
        ("long-unique-names", "the index of this TOC would take more than 128 MiB"),
        ("tiny-entries", "the index of this TOC would take more than 128 MiB"),
        ("many-xattrs", "TOC entry 0 is longer than 262144 characters"),
        ("one-huge-name", "TOC entry 0 is longer than 262144 characters"),
        ("huge-member-before-entries", "TOC member 'padding' is longer than 262144 characters"),
        ("gzip-chunk-bomb", "fewer than innerOffset 1099511627776 + size 1"),
        ("gzip-chunk-bomb-streamed", "fewer than innerOffset 1099511627776 + size 1"),
        ("zstd-chunk-bomb", "fewer than innerOffset 1073741824 + size 1048576"),
    ],
)
def test_hostile_input_is_a_format_error_in_bounded_memory(scenario: str, message: str) -> None:
    outcome, rss = run_limited("tests.unit.test_formats_hostile", scenario)
    assert outcome.startswith("FormatError: hostile: ") and message in outcome, outcome
    assert rss < RSS_LIMIT_MIB, f"{scenario}: peak RSS {rss} MiB"


def test_json_nested_deeper_than_the_parser_goes() -> None:
    def pieces() -> Iterator[bytes]:
        yield b'{"entries":[{"name":"a","type":"dir","x":' + b"[" * 200_000 + b"]" * 200_000 + b"}]}"

    assert _open(estargz_with_toc_text(pieces)) == "FormatError: hostile: TOC entry 0 is nested too deeply"


def test_toc_json_split_anywhere_parses_the_same() -> None:
    """Every entry crosses a piece boundary somewhere: the streamed parser still reads them all."""
    from unittest import mock

    from fuse.formats import reader

    entries = [
        {"name": f"d{i}/f\u00e9{'x' * i}", "type": "reg", "size": 0, "modtime": "2024-01-01T00:00:00Z"}
        for i in range(200)
    ]
    text = json.dumps({"version": 1, "entries": entries, "trailer": {"n": [1, 2.5, None]}}, indent="\t")
    raw = zstandard.ZstdCompressor().compress(text.encode())
    skippable = SKIPPABLE_MAGIC + struct.pack("<I", len(raw)) + raw
    footer = struct.pack("<4Q", 8, len(raw), len(text.encode()), 1) + b"GnUlInUx"
    blob = skippable + SKIPPABLE_MAGIC + struct.pack("<I", len(footer)) + footer
    for piece in (1, 2, 3, 7, 64, 1000):
        with mock.patch.object(reader, "TEXT_PIECE", piece):
            outcome = _open(blob)
        assert outcome == "opened with 401 inodes", (piece, outcome)


if __name__ == "__main__":
    limited_main(SCENARIOS, MEMORY_LIMIT)
