"""Read a seekable layer's TOC and its files over any random-access source, every byte verified.

Opening a layer (`fuse.formats.tocstream.open_layer`) needs two reads at most: a suffix read
(`TAIL_READ` bytes) that holds the footer and often the whole TOC, and one read for the rest of the TOC
when it is larger. The TOC is trusted only when its
digest matches the expected one (eStargz: sha256 of the TOC JSON; zstd:chunked: sha256 of the
compressed TOC; either is accepted for either format, both being digests of the same TOC); a caller
may accept an unverifiable TOC only explicitly.

Whatever a TOC claims, reading it takes bounded memory: the stored TOC is at most `MAX_STORED_TOC`
bytes; its JSON, when it has at most `WHOLE_TOC` bytes and `WHOLE_TOC_OBJECTS` objects (real TOCs:
10 MB and 28,000 entries), is decoded at once by msgspec with each entry's field types checked
(`fuse.formats.index.TocEntry`: 20 ms against 94 ms for our streamed parser on such a TOC), and each
entry is released once indexed; a larger one is decompressed piece by piece and parsed one entry at a
time (`_TocParser`) into the index builder, never held whole; the index stays within
`Limits.max_index_bytes`; and at most `TOC_PARSES` TOCs are parsed at once in this process (in a
worker thread).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import json.scanner
import re
import tarfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import trio
import zstandard
from isal import isal_zlib

from ..registry.ranges import Tap
from .errors import FormatError, Unverified
from .footer import TAIL_NEEDED, Footer, parse_footer
from .index import (
    DEFAULT_LIMITS,
    GZIP,
    REG,
    ZEROS,
    ZSTD,
    Chunk,
    IndexBuilder,
    LayerIndex,
    Limits,
    TocDocument,
)
from .source import BlobSource
from .spec import ESTARGZ, TOC_NAME

TAIL_READ = 256 << 10  # one suffix read: the footer, and the TOC when it fits
MAX_STORED_TOC = 64 << 20  # the TOC as stored in the blob (compressed): read and held in memory
MAX_TOC_SIZE = 256 << 20  # the TOC JSON (streamed, never held whole: this bounds the work)
MERGE_CAP = 8 << 20  # neighbouring chunk spans merge into one range up to this size
TAR_HEAD_LIMIT = 1 << 20  # tar bytes of the stored eStargz TOC before the TOC JSON begins
ZSTD_MAX_WINDOW = 32 << 20  # largest zstd window accepted (zstd -19 uses 8 MiB; only --ultra/--long more)
INPUT_PIECE = 64 << 10  # compressed bytes handed to a decompressor at once
TEXT_PIECE = 256 << 10  # TOC JSON bytes handed to the parser at once
WHOLE_TOC = 40 << 20  # TOC JSON held whole and decoded at once when no larger (else streamed)...
WHOLE_TOC_OBJECTS = 150_000  # ... and with no more objects than this (a decoded entry takes 300-700 B)
WHOLE_TOC_NON_ASCII = 8 << 20  # ... or no larger than this when it has bytes beyond ASCII
OUTPUT_PIECE = 4 << 20  # decompressed bytes asked for at once
DECODE_LIMIT = trio.CapacityLimiter(2)  # decompression threads (the machine's cores)
TOC_PARSES = trio.CapacityLimiter(1)  # TOC parses at once: each may take Limits.max_index_bytes
INFLATE_ERRORS = (isal_zlib.error, zstandard.ZstdError)  # what a corrupt gzip or zstd stream raises
TOC_DECODER = msgspec.json.Decoder(TocDocument)


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
        """Fetch, decompress and verify chunks; neighbouring spans go in one range. A zero-run chunk is
        b"" (a TOC may declare a 1 GiB hole: `read` makes only the zeros it returns)."""
        chunks = [self.index.chunk(i) for i in ids]
        out = {c.id: b"" for c in chunks if c.storage == ZEROS}
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
                self.decode_members, start, data, members, limiter=DECODE_LIMIT
            )
            for cid, result in decoded.items():
                if isinstance(result, Exception):
                    raise result
                out[cid] = result
        return out

    def chunk_stream(self, start: int, members: list[Chunk]) -> ChunkStream | None:
        """A decoder of the range's chunks as its bytes arrive, where the format has one."""
        return ChunkStream(start, members, self.source.description, self.allow_unverified_chunks)

    def decode_members(self, start: int, data: bytes, members: list[Chunk]) -> dict[int, bytes | Exception]:
        """Each chunk of a range fetched from `start` decoded and verified on its own (blocking: call
        from a thread): its bytes, or the error that rejects it alone."""
        what = self.source.description
        out: dict[int, bytes | Exception] = {}
        for c in members:
            if c.end - start > len(data):
                out[c.id] = FormatError(
                    f"{what}: short read: chunk at {c.start} ends at {c.end}, the range from {start} "
                    f"came back with {len(data)} bytes"
                )
                continue
            try:
                out[c.id] = decode_chunk(
                    c, data[c.start - start : c.end - start], what, self.allow_unverified_chunks
                )
            except Exception as e:  # FormatError, Unverified, MemoryError: this chunk only
                out[c.id] = e
        return out

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
            lo, hi = max(0, offset - c_off), min(end - c_off, ix.c_size[cid])
            parts.append(bytes(hi - lo) if ix.c_storage[cid] == ZEROS else data[lo:hi])
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


# --- decompression in bounded pieces ------------------------------------------------------------------


class _GzipReader:
    """One gzip member inflated on demand: `read(n)` returns at most n bytes (fewer only at the end of
    the member) and holds at most one input piece beside its output. `limit` caps the total output
    (exceeding it is a FormatError saying `limit_reason`)."""

    def __init__(self, data: bytes, limit: int | None = None, limit_reason: str = ""):
        self._z = isal_zlib.decompressobj(wbits=31)
        self._in = memoryview(data)
        self._pos = 0
        self._tail = b""
        self.total = 0
        self.limit, self.limit_reason = limit, limit_reason

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            raise ValueError("read() of a whole member is not bounded: give a size")
        parts, need, z = [], n, self._z
        while need > 0 and not z.eof:
            if self._tail:
                data = self._tail
            elif self._pos < len(self._in):
                data = self._in[self._pos : self._pos + INPUT_PIECE]
                self._pos += len(data)
            else:
                data = b""  # input used up: what the inflater still holds (the rest of a long match)
            out = z.decompress(data, need)
            self._tail = z.unconsumed_tail
            if not out and not data:
                break
            if out:
                parts.append(out)
                need -= len(out)
        got = parts[0] if len(parts) == 1 else b"".join(parts)
        self.total += len(got)
        if self.limit is not None and self.total > self.limit:
            raise FormatError(self.limit_reason)
        return got


def _inflater(storage: int, span: bytes) -> Any:
    """A reader of a chunk's member(s): read(n) gives at most n bytes, fewer only at the end."""
    if storage == GZIP:
        return _GzipReader(span)
    if storage == ZSTD:
        return zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_reader(
            span, read_size=INPUT_PIECE, read_across_frames=True
        )
    raise ValueError(f"unknown chunk storage {storage}")


def _read_up_to(reader: Any, n: int, keep: bool) -> tuple[int, list[bytes]]:
    """Read n bytes (fewer at the end of the data) in pieces of at most OUTPUT_PIECE; returns the
    count and, when `keep`, the pieces."""
    got, parts = 0, []
    while got < n:
        piece = reader.read(min(n - got, OUTPUT_PIECE))
        if not piece:
            break
        got += len(piece)
        if keep:
            parts.append(piece)
    return got, parts


def decode_chunk(c: Chunk, span: bytes, what: str, allow_unverified: bool = False) -> bytes:
    """Decompress one chunk's span and return its verified bytes (blocking: call from a thread).
    Inflates no further than innerOffset + size, skipping the first innerOffset bytes piece by
    piece: memory stays at the chunk's size plus one piece, whatever the TOC claims."""
    if c.storage not in (GZIP, ZSTD):
        raise FormatError(f"{what}: unknown chunk storage {c.storage}")
    try:
        reader = _inflater(c.storage, span)
        skipped, _ = _read_up_to(reader, c.inner, keep=False)
        got, parts = _read_up_to(reader, c.size, keep=True) if skipped == c.inner else (0, [])
    except INFLATE_ERRORS as e:
        raise _undecodable(c, str(e), what) from e
    if got < c.size:
        raise _short(c, skipped + got, what)
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    _verify(c, hashlib.sha256(data) if c.digest is not None else None, what, allow_unverified)
    return data


def _undecodable(c: Chunk, why: str, what: str) -> FormatError:
    return FormatError(f"{what}: chunk at {c.start} does not decompress: {why}")


def _short(c: Chunk, inflated: int, what: str) -> FormatError:
    return FormatError(
        f"{what}: chunk at {c.start} decompresses to {inflated} bytes, fewer than "
        f"innerOffset {c.inner} + size {c.size}: the TOC does not describe this blob"
    )


def _verify(c: Chunk, sha: Any, what: str, allow_unverified: bool) -> None:
    """Raise Unverified unless `sha` (the sha256 object of the chunk's bytes) matches its TOC digest."""
    if c.digest is None:
        if not allow_unverified:
            raise Unverified(f"{what}: chunk at {c.start} has no digest in the TOC; refusing to serve it")
    elif sha.digest() != c.digest:
        raise Unverified(
            f"{what}: chunk at {c.start} (file offset {c.file_offset}) does not match its digest"
        )


class ChunkStream:
    """The gzip chunks of one range decoded while the range arrives: `feed` takes each piece of the
    body as it comes and returns every chunk whose last compressed byte is now in, verified, or the
    error that rejects it. A reader waits for its chunk's bytes, not for the rest of the range nor for
    a decode after it: the inflate and the hash run while the next bytes are on the wire (about 8 ms a
    4 MiB chunk here, on the path of every miss otherwise). Chunks of other storages are left to
    `Layer.decode_members` once the range is in (`streams`). Memory: as `decode_chunk`, each chunk
    being decoded holds at most its size plus one input piece, whatever its member inflates to.

    The pieces must come in order from the range's start; a piece at offset 0 again (a retried request)
    starts over; any other gap leaves the unfinished chunks to `decode_members`."""

    def __init__(self, start: int, members: list[Chunk], what: str, allow_unverified: bool = False):
        self._what, self._allow = what, allow_unverified
        self._start = start
        self._members = sorted((c for c in members if c.storage == GZIP), key=lambda c: c.start)
        self.streams = {c.id for c in self._members}
        self._given: set[int] = set()  # chunks returned (a retried request does not decode them again)
        self._restart()

    def _restart(self) -> None:
        self._pos = self._start  # blob offset of the next byte expected
        self._next = 0  # the first member not begun
        self._open: list[_Inflating] = []
        self._broken = False

    def feed(self, offset: int, piece: bytes) -> list[tuple[Chunk, bytes | Exception]]:
        if offset == 0 and self._pos != self._start:
            self._restart()
        pos = self._start + offset
        if self._broken or pos != self._pos:
            self._broken = True
            return []
        end = pos + len(piece)
        self._pos = end
        while self._next < len(self._members) and self._members[self._next].start < end:
            if self._members[self._next].id not in self._given:
                self._open.append(_Inflating(self._members[self._next]))
            self._next += 1
        done = []
        for inflating in self._open:
            c = inflating.chunk
            inflating.feed(piece[max(0, c.start - pos) : c.end - pos])
            if c.end <= end:
                done.append((c, inflating.finish(self._what, self._allow)))
                self._given.add(c.id)
        if done:
            self._open = [i for i in self._open if i.chunk.end > end]
        return done


class _Inflating:
    """One gzip chunk being inflated piece by piece: its first `inner` bytes skipped, then at most
    `size` kept and hashed."""

    def __init__(self, chunk: Chunk):
        self.chunk = chunk
        self._z = isal_zlib.decompressobj(wbits=31)
        self._skip = chunk.inner
        self._parts: list[bytes] = []
        self._got = 0
        self._sha = hashlib.sha256() if chunk.digest is not None else None
        self._error: str | None = None  # why the member does not inflate

    def feed(self, data: bytes) -> None:
        z, c = self._z, self.chunk
        try:
            while not self._error and not z.eof and (want := self._skip + c.size - self._got) > 0:
                ask = min(want, OUTPUT_PIECE)
                out = z.decompress(data, ask)
                data, starved = z.unconsumed_tail, len(out) < ask  # starved: every input byte used
                if self._skip and out:
                    cut = min(self._skip, len(out))
                    self._skip -= cut
                    out = out[cut:]
                if out:
                    self._parts.append(out)
                    self._got += len(out)
                    if self._sha is not None:
                        self._sha.update(out)
                if starved and not data:
                    break
        except INFLATE_ERRORS as e:
            self._error = str(e)

    def finish(self, what: str, allow_unverified: bool) -> bytes | Exception:
        c = self.chunk
        if self._error is not None:
            return _undecodable(c, self._error, what)
        if self._got < c.size:
            return _short(c, c.inner - self._skip + self._got, what)
        try:
            _verify(c, self._sha, what, allow_unverified)
        except Unverified as e:
            return e
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts = []
        return data


# --- opening a layer --------------------------------------------------------------------------------


async def fetch_toc(source: BlobSource) -> tuple[bytes, bytes]:
    """(footer bytes, stored TOC bytes) of a layer, in one or two reads. A caller may keep both to
    open the layer again later without the network (`layer_from_toc`)."""
    footer_bytes, footer, held = await read_tail(source)
    return footer_bytes, await read_rest(source, footer, held)


async def read_tail(source: BlobSource, tail: bytes | None = None) -> tuple[bytes, Footer, bytes]:
    """The suffix read (`tail`, when the caller made it already: the blob's last `TAIL_READ` bytes):
    (footer bytes, footer, the end of the stored TOC that it holds: often all)."""
    what = source.description
    tail_len = min(source.size, TAIL_READ)
    if tail is None or len(tail) != tail_len:
        tail = await source.read(source.size - tail_len, tail_len)
    if len(tail) != tail_len:
        raise FormatError(f"{what}: short read of the blob's last {tail_len} bytes")
    footer_bytes = tail[-TAIL_NEEDED:] if tail_len >= TAIL_NEEDED else tail
    footer = parse_footer(footer_bytes, source.size, what)
    _check_stored_toc_size(footer, what)
    tail_start = source.size - tail_len
    first = max(footer.toc_offset, tail_start) - tail_start
    held = tail[first : max(first, footer.toc_offset + footer.toc_length - tail_start)]
    return footer_bytes, footer, held


async def read_rest(source: BlobSource, footer: Footer, held: bytes, tap: Tap | None = None) -> bytes:
    """The stored TOC whose end `read_tail` holds: its head read (given to `tap` as it arrives) and
    joined to that end."""
    missing = footer.toc_length - len(held)
    head = await source.read(footer.toc_offset, missing, tap) if missing > 0 else b""
    if len(head) != missing:
        raise FormatError(f"{source.description}: short read of the TOC")
    return head + held if head else held


def _check_stored_toc_size(footer: Footer, what: str) -> None:
    if footer.toc_length > MAX_STORED_TOC:
        raise FormatError(
            f"{what}: stored TOC of {footer.toc_length} bytes is larger than the limit of "
            f"{MAX_STORED_TOC}; such a layer can only be pulled in full"
        )


async def layer_from_toc(
    source: BlobSource,
    footer_bytes: bytes,
    raw: bytes,
    expected_toc_digest: str | None,
    *,
    allow_unverified: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> Layer:
    """The layer from its footer and stored TOC (verified and indexed in a worker thread, at most
    `TOC_PARSES` at once in this process)."""
    if expected_toc_digest is None and not allow_unverified:
        raise Unverified(f"{source.description}: no expected TOC digest given; refusing an unverifiable TOC")
    footer = parse_footer(footer_bytes, source.size, source.description)
    if len(raw) != footer.toc_length:
        raise FormatError(
            f"{source.description}: stored TOC is {len(raw)} bytes, the footer says {footer.toc_length}"
        )
    _check_stored_toc_size(footer, source.description)
    return await trio.to_thread.run_sync(
        _finish_open, source, footer, raw, expected_toc_digest, allow_unverified, limits, limiter=TOC_PARSES
    )


def _finish_open(
    source: BlobSource,
    footer: Footer,
    raw: bytes,
    expected: str | None,
    allow_unverified: bool,
    limits: Limits,
) -> Layer:
    index, info = read_toc(footer, raw, expected, source.description, limits)
    return Layer(source, footer, index, info, allow_unverified_chunks=allow_unverified)


def read_toc(
    footer: Footer, raw: bytes, expected: str | None, what: str, limits: Limits = DEFAULT_LIMITS
) -> tuple[LayerIndex, TocInfo]:
    """Verify and index a stored TOC (blocking: call from a thread). A TOC JSON of at most `WHOLE_TOC`
    bytes that matches `expected` is decoded at once (`decode_toc`); a larger one, or one that does
    not decode so, is streamed from `raw` into the index builder one entry at a time (`_TocParser`,
    which says what is wrong with it). A TOC that does not match `expected` is Unverified (also when it
    is broken as well), one that breaks the format or `limits` a FormatError."""
    compressed_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    text = _TocText(_toc_pieces(footer, raw, what), footer, what)
    builder = IndexBuilder(what, footer.toc_offset, GZIP if footer.format == ESTARGZ else ZSTD, limits)
    whole = text.hold()
    doc = None
    if whole is not None and expected in (None, text.digest, compressed_digest):
        doc = decode_toc(whole)
    if doc is not None:
        del whole
        entries = doc.entries
        del doc
        for i, e in enumerate(entries):
            entries[i] = None  # released once indexed: the entries shrink as the index grows
            builder.add(e)
    else:
        if whole is not None:  # the streamed parser reads it (and says what is wrong with it, if anything)
            text.again(whole)
            del whole
        try:
            _TocParser(text, limits.max_entry_bytes, what).parse(builder.add)
            text.drain()  # nothing but whitespace is left; the digest needs every byte
        except FormatError as e:
            if expected is not None and expected != compressed_digest and not text.failed:
                text.drain()  # a TOC that is not the expected one is reported as such
                if text.digest != expected:
                    raise Unverified(
                        f"{what}: TOC digest {text.digest} does not match the expected {expected} "
                        f"(and the TOC is invalid: {e})"
                    ) from e
            raise
    info = TocInfo(text.digest, compressed_digest, text.size)
    if expected is not None and expected not in (info.json_digest, info.compressed_digest):
        raise Unverified(f"{what}: TOC digest {info.json_digest} does not match the expected {expected}")
    if footer.toc_uncompressed and text.size != footer.toc_uncompressed:
        raise FormatError(f"{what}: TOC is {text.size} bytes, the footer says {footer.toc_uncompressed}")
    return builder.finish(), info


def _toc_pieces(footer: Footer, raw: bytes, what: str) -> Iterator[bytes]:
    """The TOC JSON from its stored form, in pieces: a gzip member holding a tar (eStargz) or a zstd
    frame (the zstd variants)."""
    if footer.format == ESTARGZ:
        gz = _GzipReader(
            raw, TAR_HEAD_LIMIT, f"{what}: TOC tar has more than {TAR_HEAD_LIMIT} bytes before {TOC_NAME}"
        )
        with tarfile.open(fileobj=gz, mode="r|", bufsize=INPUT_PIECE) as tar:
            for member in tar:
                if member.name != TOC_NAME:
                    continue
                f = tar.extractfile(member)
                if f is None:
                    raise FormatError(f"{what}: {TOC_NAME} in the TOC tar is not a regular file")
                if member.size > MAX_TOC_SIZE:
                    raise FormatError(
                        f"{what}: TOC of {member.size} bytes, larger than the limit of {MAX_TOC_SIZE}"
                    )
                gz.limit = (
                    gz.total + member.size + TEXT_PIECE + INPUT_PIECE
                )  # the member, the tar's read-ahead
                while piece := f.read(TEXT_PIECE):
                    yield piece
                return
        raise FormatError(f"{what}: TOC at {footer.toc_offset} cannot be read: no {TOC_NAME} in the TOC tar")
    reader = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_reader(
        raw, read_size=INPUT_PIECE
    )
    with reader:
        while piece := reader.read(TEXT_PIECE):
            yield piece


def decode_toc(text: bytes) -> TocDocument | None:
    """The TOC JSON decoded at once with its entries' types checked (`TocEntry`); None where msgspec
    refuses it, and where the two parsers might read it differently or msgspec's memory would not be
    bounded by the text's size: a document naming "entries" twice (which the streamed parser refuses),
    a `\\u` escape (a key msgspec unescapes, such as a second "entr\\u0069es"), xattrs (a map of any
    number of members), bytes beyond ASCII in a text over `WHOLE_TOC_NON_ASCII` (one astral character
    makes a long string take 4 bytes a character) or that are not UTF-8 (msgspec skips unknown members
    unchecked). The streamed parser then reads it, and says what is wrong with it."""
    if (
        text.count(b'"entries"') != 1
        or not plain_json(text)
        or not decoded_whole(len(text), 0, text.isascii())  # (its objects were counted by `hold`)
    ):
        return None
    try:
        return TOC_DECODER.decode(text)
    except (msgspec.MsgspecError, RecursionError):
        return None


def decoded_whole(size: int, objects: int, ascii: bool) -> bool:
    """Whether a TOC JSON of `size` bytes with `objects` objects ("{"), ASCII or not, is held whole and
    decoded at once by msgspec (else `_TocParser` parses it, with limits of its own)."""
    return size <= WHOLE_TOC and objects <= WHOLE_TOC_OBJECTS and (ascii or size <= WHOLE_TOC_NON_ASCII)


def plain_json(text: bytes) -> bool:
    """Whether msgspec reads the TOC JSON `text` as the streamed parser does, in memory its size bounds
    (see `decode_toc`): no `\\u` escape, no xattrs, valid UTF-8."""
    return b"\\u" not in text and b'"xattrs"' not in text and (text.isascii() or _is_utf8(text))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _TocText:
    """The TOC JSON pieces, counted, hashed and bounded by MAX_TOC_SIZE; read errors become
    FormatErrors (and `failed`). `hold` reads ahead; what it read is given again by `next`."""

    def __init__(self, pieces: Iterator[bytes], footer: Footer, what: str):
        self._pieces, self._footer, self._what = pieces, footer, what
        self._hash = hashlib.sha256()
        self._again: deque[bytes] = deque()  # pieces read by `hold`, given again
        self.size = 0
        self.failed = False

    def hold(self) -> bytes | None:
        """The whole text when its size and objects ("{") let it be decoded at once (`decoded_whole`),
        else None; then `next` gives what was read again (each piece once: the parser frees them as it
        goes)."""
        held: deque[bytes] = deque()
        objects = 0
        while (piece := self.next()) is not None:
            held.append(piece)
            objects += piece.count(b"{")
            if not decoded_whole(self.size, objects, True):
                self._again = held
                return None
        return b"".join(held)

    def again(self, whole: bytes) -> None:
        """Give `whole` (what `hold` returned) through `next` again, in pieces the parser frees as it goes
        (no second inflate or hash)."""
        self._again = deque(whole[i : i + TEXT_PIECE] for i in range(0, len(whole), TEXT_PIECE))

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def next(self) -> bytes | None:
        """The next piece, None at the end."""
        if self._again:
            return self._again.popleft()
        try:
            piece = next(self._pieces, None)
        except FormatError:
            self.failed = True
            raise
        except (*INFLATE_ERRORS, tarfile.TarError, EOFError) as e:
            self.failed = True
            raise FormatError(
                f"{self._what}: TOC at {self._footer.toc_offset} cannot be read: {type(e).__name__}: {e}"
            ) from e
        if piece is None:
            return None
        self.size += len(piece)
        if self.size > MAX_TOC_SIZE:
            self.failed = True
            raise FormatError(f"{self._what}: TOC larger than the limit of {MAX_TOC_SIZE} bytes")
        self._hash.update(piece)
        return piece

    def drain(self) -> None:
        while self.next() is not None:
            pass


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_NUMBER_TAIL = re.compile(r"[0-9eE.+-]*\Z")  # what may follow a number to the end of the buffer
_JSON = json.JSONDecoder()
_SCAN = json.scanner.make_scanner(_JSON)  # the C scanner: (value, end) of the value at an index


class _TocParser:
    """Parses the TOC document `{"entries": [...], ...}` from a `_TocText`, handing each entry to a
    callback as soon as it is complete. It holds one piece of text and one value at a time: a value
    (an entry, or another member of the document) longer than `max_value` characters is refused,
    and nesting is bounded by the json module's recursion limit."""

    def __init__(self, text: _TocText, max_value: int, what: str):
        self.text, self.max_value, self.what = text, max_value, what
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.entries = 0

    def parse(self, on_entry: Callable[[Any], None]) -> None:
        self.expect("{", "TOC is not a JSON object")
        seen_entries = False
        if self.peek() == "}":
            self.pos += 1
        else:
            while True:
                key = self.value("a member name of the TOC object")
                if type(key) is not str:
                    raise self.error("TOC object has a member name that is not a string")
                self.expect(":", "TOC object without ':' after a member name")
                if key == "entries":
                    if seen_entries:
                        raise self.error("TOC has two 'entries' lists")
                    seen_entries = True
                    self.expect("[", "TOC 'entries' is not a list")
                    if self.peek() == "]":
                        self.pos += 1
                    else:
                        self.parse_entries(on_entry)
                else:
                    self.value(f"TOC member {key[:100]!r}")
                if self.expect(",}", "TOC object member not followed by ',' or '}'") == "}":
                    break
        if self.peek() != "":
            raise self.error("TOC has data after its JSON object")
        if not seen_entries:
            raise self.error("TOC is not an object with an 'entries' list")

    def parse_entries(self, on_entry: Callable[[Any], None]) -> None:
        """The entries of the list, up to and including its ']'. The inner loop takes the entries that
        lie whole in the buffer; the one that crosses its end (or anything unusual) goes through
        `value` and `expect`, which read on and report errors."""
        ws, scan = _WHITESPACE.match, _SCAN
        while True:
            buf, pos, count = self.buf, self.pos, self.entries
            while True:
                try:
                    value, end = scan(buf, pos)
                    after = ws(buf, end).end()
                    c = buf[after]  # IndexError at the end of the buffer: the careful path
                except (StopIteration, ValueError, IndexError, RecursionError):
                    break
                if c != "," and c != "]":
                    break
                on_entry(value)
                count += 1
                pos = ws(buf, after + 1).end()
                if c == "]":
                    self.pos, self.entries = pos, count
                    return
            self.pos, self.entries = pos, count
            on_entry(self.value(f"TOC entry {self.entries}"))
            self.entries += 1
            if self.expect(",]", f"TOC entry {self.entries - 1} not followed by ',' or ']'") == "]":
                return
            self.peek()

    def error(self, message: str) -> FormatError:
        return FormatError(f"{self.what}: {message}")

    def more(self) -> bool:
        """Append the next piece of text to the buffer, dropping what was parsed; False at the end."""
        if self.eof:
            return False
        piece = self.text.next()
        try:
            if piece is None:
                self.eof = True
                text = self.utf8.decode(b"", final=True)
            else:
                text = self.utf8.decode(piece)
        except UnicodeDecodeError as e:
            raise self.error(f"TOC is not valid UTF-8 JSON: {e}") from e
        self.buf = self.buf[self.pos :] + text
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end), left unread."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def expect(self, chars: str, message: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise self.error(message)
        self.pos += 1
        return c

    def value(self, what_for: str) -> Any:
        """The next JSON value, parsed whole."""
        self.peek()
        while True:
            try:
                value, end = _JSON.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                problem = f"{e.msg} (character {e.pos - self.pos} of it)"
            except RecursionError:
                raise self.error(f"{what_for} is nested too deeply") from None
            except ValueError as e:  # e.g. an integer of more than 4300 digits
                raise self.error(f"{what_for} is not valid JSON: {e}") from None
            else:
                if self.eof or type(value) not in (int, float) or not _NUMBER_TAIL.match(self.buf, end):
                    self.pos = end
                    return value
                problem = ""  # a number that may go on in the next piece ("1" of "12", "0" of "0.5")
            if len(self.buf) - self.pos > self.max_value:
                raise self.error(
                    f"{what_for} is longer than {self.max_value} characters (the limit of one value)"
                    + (f" or invalid: {problem}" if problem else "")
                )
            if not self.more():
                raise self.error(f"{what_for} is not valid JSON: {problem or 'the TOC ends inside it'}")
