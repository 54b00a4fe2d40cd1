"""A plain gzip layer served lazily from its checkpoint index (issue 17): the layer's entries (from a SOCI
zTOC, or any tar listing that knows where each file's data starts in the uncompressed stream) become a
`LayerIndex` whose chunks are the pieces of each regular file inside each span of a `zran.Index`; a
`ZranLayer` reads a chunk by fetching its span's compressed range (one request, neighbours merged as for
any layer) and inflating the whole span from its checkpoint, verified against the span's digests before
any byte is sliced out of it (`zran.extract`). Entries are checked as for any TOC (`IndexBuilder`:
names, links, limits); a file whose data lies beyond the stream is refused."""

from __future__ import annotations

import base64
import bisect
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

import trio

from . import zran
from .errors import FormatError
from .index import DEFAULT_LIMITS, ZRAN, Chunk, IndexBuilder, LayerIndex, Limits
from .reader import DECODE_LIMIT, Layer
from .source import BlobSource
from .ztoc import format_mtime

FORMAT = "gzip+zran"  # what `ZranLayer.format` says (status, logs)


class TarEntry(Protocol):
    """One entry of the layer's tar, as a zTOC describes it (`fuse.formats.ztoc.ZtocEntry`)."""

    name: str
    type: str  # reg, dir, symlink, hardlink, char, block, fifo
    size: int
    uncompressed_offset: int  # where a regular file's data starts in the uncompressed stream
    mode: int
    uid: int
    gid: int
    mtime: int | str  # seconds since the epoch, or RFC 3339 as a zTOC stores it
    linkname: str
    devmajor: int
    devminor: int
    xattrs: Mapping[str, str | bytes]


def toc_entries(entries: Iterable[TarEntry], zindex: zran.Index) -> Iterator[dict]:
    """The entries in the TOC form `IndexBuilder` takes: each regular file, then one chunk per span its
    data crosses (compressed range of the span, offset of the piece in the span's output)."""
    what = zindex.what
    if zindex.uncomp_size is None or zindex.comp_size is None:
        raise FormatError(f"{what}: the checkpoint index lacks the stream sizes")
    outs = [p.out for p in zindex.points]
    for e in entries:
        d: dict = {"name": e.name, "type": e.type, "mode": e.mode, "uid": e.uid, "gid": e.gid}
        if e.mtime:
            d["modtime"] = e.mtime if isinstance(e.mtime, str) else format_mtime(e.mtime * 1_000_000_000)
        if e.type in ("symlink", "hardlink"):
            d["linkName"] = e.linkname
        elif e.type in ("char", "block"):
            d["devMajor"], d["devMinor"] = e.devmajor, e.devminor
        if e.xattrs:
            d["xattrs"] = {
                k: base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode()
                for k, v in e.xattrs.items()
            }
        if e.type != "reg":
            yield d
            continue
        d["size"] = e.size
        start, end = e.uncompressed_offset, e.uncompressed_offset + e.size
        if start < 0 or end > zindex.uncomp_size:
            raise FormatError(
                f"{what}: {e.name!r}: data [{start}, {end}) lies beyond the stream ({zindex.uncomp_size} B)"
            )
        pieces = _pieces(start, end, outs, zindex)
        if e.size:
            d.update(next(pieces))
        yield d
        for piece in pieces:
            yield {"type": "chunk", "name": e.name, **piece}


def _pieces(start: int, end: int, outs: list[int], zindex: zran.Index) -> Iterator[dict]:
    k = max(bisect.bisect_right(outs, start) - 1, 0)
    pos = start
    while pos < end:
        span_end = outs[k + 1] if k + 1 < len(outs) else zindex.uncomp_size
        n = min(end, span_end) - pos
        c_start, c_end = zindex.span_range(k)
        yield {
            "offset": c_start,
            "endOffset": c_end,
            "innerOffset": pos - outs[k],
            "chunkOffset": pos - start,
            "chunkSize": n,
        }
        pos += n
        k += 1


def index_of(entries: Iterable[TarEntry], zindex: zran.Index, limits: Limits | None = None) -> LayerIndex:
    builder = IndexBuilder(zindex.what, zindex.comp_size or 0, ZRAN, limits or DEFAULT_LIMITS)
    builder.add_all(toc_entries(entries, zindex))
    return builder.finish()


class ZranLayer(Layer):
    """A plain gzip layer read through its checkpoint index; chunks are slices of verified spans."""

    def __init__(self, source: BlobSource, index: LayerIndex, zindex: zran.Index, entries: tuple = ()):
        super().__init__(source, None, index, None)  # no footer, no TOC: the index is the zTOC's
        self.zindex = zindex
        self.entries = entries  # as listed (the daemon compares them with the blob's, once local)
        self._span_of = {zindex.span_range(k)[0]: k for k in range(len(zindex.points))}
        self._in_span: dict[int, list[int]] = {}  # compressed start of a span -> the chunks in it
        for cid, start in enumerate(index.c_start):
            self._in_span.setdefault(start, []).append(cid)

    @property
    def format(self) -> str:
        return FORMAT

    def prefetch_span(self) -> tuple[int, int] | None:
        return None  # plain layers have no prioritized region

    def chunk_stream(self, start: int, members: list[Chunk]) -> None:
        return None  # a span inflates from its checkpoint's window: decoded once it is all in

    def decode_members(self, start: int, data: bytes, members: list[Chunk]) -> dict[int, bytes | Exception]:
        """Inflate each span the chunks lie in once, verified, and slice the chunks out of it, and every
        other chunk of that span too (files read together lie together: the reads to come find them
        in the cache); an error rejects the chunks of its span only."""
        by_span: dict[tuple[int, int], list[Chunk]] = {}
        for c in members:
            by_span.setdefault((c.start, c.end), []).append(c)
        asked = {c.id for c in members}
        for (s, _e), chunks in by_span.items():
            chunks += [self.index.chunk(cid) for cid in self._in_span.get(s, ()) if cid not in asked]
        out: dict[int, bytes | Exception] = {}
        for (s, e), chunks in by_span.items():
            try:
                plain = self._span(s, e, data[s - start : e - start])
            except Exception as err:  # FormatError, Unverified, MemoryError: this span's chunks only
                out.update((c.id, err) for c in chunks)
                continue
            for c in chunks:
                piece = plain[c.inner : c.inner + c.size]
                if len(piece) != c.size:
                    where = f"chunk at file offset {c.file_offset}"
                    out[c.id] = FormatError(f"{self.source.description}: {where} lies beyond its span")
                else:
                    out[c.id] = piece
        return out

    def _span(self, s: int, e: int, comp: bytes) -> bytes:
        what, points = self.source.description, self.zindex.points
        k = self._span_of.get(s)
        if k is None or self.zindex.span_range(k)[1] != e:
            raise FormatError(f"{what}: chunk span [{s}, {e}) is not a span of the checkpoint index")
        if len(comp) != e - s:
            raise FormatError(f"{what}: short read of span [{s}, {e}): {len(comp)} bytes")
        span_end = points[k + 1].out if k + 1 < len(points) else self.zindex.uncomp_size
        return zran.extract(self.zindex, k, comp, points[k].out, span_end - points[k].out)


async def open_zran_layer(
    source: BlobSource, entries: Iterable[TarEntry], zindex: zran.Index, limits: Limits | None = None
) -> ZranLayer:
    """The layer, its index built off the trio loop (a zTOC may list a million entries)."""
    listed = tuple(entries)
    index = await trio.to_thread.run_sync(index_of, listed, zindex, limits, limiter=DECODE_LIMIT)
    return ZranLayer(source, index, zindex, listed)
