"""Open a seekable layer over any random-access source and read its files, every byte verified.

`open_layer` needs two reads at most: a suffix read (`TAIL_READ` bytes) that holds the footer and
often the whole TOC, and one read for the TOC when it is larger. The TOC is trusted only when its
digest matches the expected one (eStargz: sha256 of the TOC JSON; zstd:chunked: sha256 of the
compressed TOC; either is accepted for either format, both being digests of the same TOC); a caller
may accept an unverifiable TOC only explicitly. Parsing and indexing run in a worker thread.

Chunks are fetched as compressed spans (neighbours merged into one range, up to `MERGE_CAP`),
decompressed in a worker thread and checked against their sha256 before a byte is returned.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from dataclasses import dataclass

import trio
import zstandard

from .errors import FormatError, Unverified
from .footer import ESTARGZ, TAIL_NEEDED, Footer, parse_footer
from .index import DEFAULT_LIMITS, GZIP, REG, ZEROS, ZSTD, Chunk, LayerIndex, Limits, build_index
from .source import BlobSource

TAIL_READ = 256 << 10  # one suffix read: the footer, and the TOC when it fits
MAX_TOC_SIZE = 256 << 20  # uncompressed TOC JSON; compressed TOC is capped at the same
MERGE_CAP = 8 << 20  # neighbouring chunk spans merge into one range up to this size
TOC_NAME = "stargz.index.json"
DECODE_LIMIT = trio.CapacityLimiter(2)  # decompression threads (the machine's cores)


@dataclass(frozen=True)
class TocInfo:
    json_digest: str  # sha256 of the TOC JSON
    compressed_digest: str  # sha256 of the TOC as stored in the blob
    size: int  # bytes of TOC JSON


class Layer:
    def __init__(
        self,
        source: BlobSource,
        footer: Footer,
        index: LayerIndex,
        toc: TocInfo,
        allow_unverified_chunks: bool = False,
    ):
        self.source, self.footer, self.index, self.toc = source, footer, index, toc
        self.allow_unverified_chunks = allow_unverified_chunks

    @property
    def format(self) -> str:
        return self.footer.format

    def prefetch_span(self) -> tuple[int, int] | None:
        """The prioritized region [0, landmark) to fetch in one request at mount time, if any."""
        end = self.index.prefetch_end
        return (0, end) if end else None

    async def read_chunks(self, ids: list[int]) -> dict[int, bytes]:
        """Fetch, decompress and verify chunks; neighbouring spans go in one range."""
        chunks = [self.index.chunk(i) for i in ids]
        out = {c.id: bytes(c.size) for c in chunks if c.storage == ZEROS}
        stored = sorted((c for c in chunks if c.storage != ZEROS), key=lambda c: (c.start, c.inner))
        groups = merge_spans(stored)
        datas = await self.source.read_many([(start, end - start) for start, end, _ in groups])
        for (start, end, members), data in zip(groups, datas, strict=True):
            if len(data) != end - start:
                raise FormatError(
                    f"{self.source.description}: short read at {start} ({len(data)} of "
                    f"{end - start} bytes): the blob is truncated"
                )
            decoded = await trio.to_thread.run_sync(
                self._decode_group, start, data, members, limiter=DECODE_LIMIT
            )
            out.update(decoded)
        return out

    def _decode_group(self, start: int, data: bytes, members: list[Chunk]) -> dict[int, bytes]:
        return {
            c.id: decode_chunk(
                c,
                data[c.start - start : c.end - start],
                self.source.description,
                self.allow_unverified_chunks,
            )
            for c in members
        }

    async def read(self, ino: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of a regular file (short at end of file)."""
        ix = self.index
        if ix.kind[ino] != REG:
            raise IsADirectoryError(ix.path(ino))
        ids = list(ix.chunks_of(ino, offset, length))
        got = await self.read_chunks(ids)
        parts = []
        end = min(offset + length, ix.size[ino])
        for cid in ids:
            c_off, data = ix.c_file_offset[cid], got[cid]
            parts.append(data[max(0, offset - c_off) : max(0, end - c_off)])
        return b"".join(parts)

    async def read_file(self, path: str) -> bytes:
        ino = self.index.find(path)
        if ino is None:
            raise FileNotFoundError(path)
        return await self.read(ino, 0, self.index.size[ino])


def merge_spans(chunks: list[Chunk], cap: int = MERGE_CAP) -> list[tuple[int, int, list[Chunk]]]:
    """Group chunks (sorted by start) into ranges: touching or overlapping spans merge up to `cap`."""
    groups: list[tuple[int, int, list[Chunk]]] = []
    for c in chunks:
        if groups and c.start <= groups[-1][1] and max(c.end, groups[-1][1]) - groups[-1][0] <= cap:
            start, end, members = groups[-1]
            groups[-1] = (start, max(end, c.end), [*members, c])
        else:
            groups.append((c.start, c.end, [c]))
    return groups


def decode_chunk(c: Chunk, span: bytes, what: str, allow_unverified: bool = False) -> bytes:
    """Decompress one chunk's span and return its verified bytes (blocking: call from a thread)."""
    want = c.inner + c.size
    try:
        if c.storage == GZIP:
            data = zlib.decompressobj(wbits=31).decompress(span, want)
        elif c.storage == ZSTD:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(span), read_across_frames=True) as r:
                data = r.read(want)
        else:
            raise FormatError(f"{what}: unknown chunk storage {c.storage}")
    except (zlib.error, zstandard.ZstdError) as e:
        raise FormatError(f"{what}: chunk at {c.start} does not decompress: {e}") from e
    if len(data) < want:
        raise FormatError(
            f"{what}: chunk at {c.start} decompresses to {len(data)} bytes, fewer than "
            f"innerOffset {c.inner} + size {c.size}"
        )
    data = data[c.inner : want]
    if c.digest is None:
        if not allow_unverified:
            raise Unverified(f"{what}: chunk at {c.start} has no digest in the TOC; refusing to serve it")
    elif hashlib.sha256(data).digest() != c.digest:
        raise Unverified(
            f"{what}: chunk at {c.start} (file offset {c.file_offset}) does not match its digest"
        )
    return data


async def open_layer(
    source: BlobSource,
    expected_toc_digest: str | None,
    *,
    allow_unverified: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> Layer:
    """Open a layer: footer, TOC (verified), index. Raises NotLazy for ordinary layers."""
    tail, raw = await fetch_toc(source)
    return await layer_from_toc(
        source, tail, raw, expected_toc_digest, allow_unverified=allow_unverified, limits=limits
    )


async def fetch_toc(source: BlobSource) -> tuple[bytes, bytes]:
    """(footer bytes, stored TOC bytes) of a layer, in one or two reads. A caller may keep both to
    open the layer again later without the network (`layer_from_toc`)."""
    what = source.description
    tail_len = min(source.size, TAIL_READ)
    tail = await source.read(source.size - tail_len, tail_len)
    if len(tail) != tail_len:
        raise FormatError(f"{what}: short read of the blob's last {tail_len} bytes")
    footer_bytes = tail[-TAIL_NEEDED:] if tail_len >= TAIL_NEEDED else tail
    footer = parse_footer(footer_bytes, source.size, what)
    if footer.toc_length > MAX_TOC_SIZE:
        raise FormatError(
            f"{what}: TOC of {footer.toc_length} bytes is larger than the limit of {MAX_TOC_SIZE}"
        )
    tail_start = source.size - tail_len
    if footer.toc_offset >= tail_start:
        raw = tail[footer.toc_offset - tail_start : footer.toc_offset - tail_start + footer.toc_length]
    else:
        raw = await source.read(footer.toc_offset, footer.toc_length)
    if len(raw) != footer.toc_length:
        raise FormatError(f"{what}: short read of the TOC")
    return footer_bytes, raw


async def layer_from_toc(
    source: BlobSource,
    footer_bytes: bytes,
    raw: bytes,
    expected_toc_digest: str | None,
    *,
    allow_unverified: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> Layer:
    """The layer from its footer and stored TOC (verified and indexed in a worker thread)."""
    if expected_toc_digest is None and not allow_unverified:
        raise Unverified(f"{source.description}: no expected TOC digest given; refusing an unverifiable TOC")
    footer = parse_footer(footer_bytes, source.size, source.description)
    if len(raw) != footer.toc_length:
        raise FormatError(
            f"{source.description}: stored TOC is {len(raw)} bytes, the footer says {footer.toc_length}"
        )
    return await trio.to_thread.run_sync(
        _finish_open, source, footer, raw, expected_toc_digest, allow_unverified, limits
    )


def _finish_open(
    source: BlobSource,
    footer: Footer,
    raw: bytes,
    expected: str | None,
    allow_unverified: bool,
    limits: Limits,
) -> Layer:
    what = source.description
    text = _toc_json(footer, raw, what)
    info = TocInfo(
        "sha256:" + hashlib.sha256(text).hexdigest(), "sha256:" + hashlib.sha256(raw).hexdigest(), len(text)
    )
    if expected is not None and expected not in (info.json_digest, info.compressed_digest):
        raise Unverified(f"{what}: TOC digest {info.json_digest} does not match the expected {expected}")
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{what}: TOC is not valid JSON: {e}") from e
    storage = GZIP if footer.format == ESTARGZ else ZSTD
    index = build_index(doc, data_end=footer.toc_offset, storage=storage, what=what, limits=limits)
    return Layer(source, footer, index, info, allow_unverified_chunks=allow_unverified)


def _toc_json(footer: Footer, raw: bytes, what: str) -> bytes:
    """The TOC JSON from its stored form: a gzip member holding a tar (eStargz) or a zstd frame."""
    try:
        if footer.format == ESTARGZ:
            d = zlib.decompressobj(wbits=31)
            tar_bytes = d.decompress(raw, MAX_TOC_SIZE + 4096)
            if d.unconsumed_tail:
                raise FormatError(f"{what}: TOC larger than the limit of {MAX_TOC_SIZE} bytes")
            with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
                member = tar.getmember(TOC_NAME)
                f = tar.extractfile(member)
                if f is None:
                    raise FormatError(f"{what}: {TOC_NAME} in the TOC tar is not a regular file")
                return f.read()
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as r:
            text = r.read(MAX_TOC_SIZE + 1)
        if len(text) > MAX_TOC_SIZE:
            raise FormatError(f"{what}: TOC larger than the limit of {MAX_TOC_SIZE} bytes")
        if footer.toc_uncompressed and len(text) != footer.toc_uncompressed:
            raise FormatError(f"{what}: TOC is {len(text)} bytes, the footer says {footer.toc_uncompressed}")
        return text
    except (zlib.error, zstandard.ZstdError, tarfile.TarError, KeyError, EOFError) as e:
        raise FormatError(
            f"{what}: TOC at {footer.toc_offset} cannot be read: {type(e).__name__}: {e}"
        ) from e
