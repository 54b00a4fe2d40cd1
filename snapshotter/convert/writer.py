"""Layer writers: turn an uncompressed tar stream into a seekable layer blob (eStargz, stargz's zstd
variant, or containers/storage zstd:chunked), with its TOC, footer, DiffID and manifest annotations.

Byte layouts are those of shared/reference/formats.md, and every format fact (names, magics, footer
sizes, annotation keys, landmarks) comes from `fuse.formats.spec`; TOC JSON fields, their order and omission
rules are those of stargz-snapshotter's estargz package (eStargz and its zstd variant) and of
containers/storage's pkg/chunked (zstd:chunked), so their readers, and ours, read what this writes.

How a blob is built. The new tar stream is the input's members with their header bytes copied unchanged,
reordered only when files are prioritized (they come first, their parent directories before them,
followed by `.prefetch.landmark`; otherwise `.no.prefetch.landmark` comes first). The stream is cut into
*units*, each compressed on its own into one gzip member or zstd frame:

- every chunk of regular-file data (a file's data, or `chunk_size` pieces of a larger file; for
  zstd:chunked also runs of zeros of at least `ZERO_RUN` bytes, TOC `chunkType: "zeros"`) starts a unit,
  so a reader fetches `[offset, next offset)` and decompresses one member;
- for eStargz the padding and the headers that follow a chunk stay in its unit (as stargz writes them);
  for zstd:chunked they start a unit of their own, so a file's frames end at its `endOffset`
  (as containers/storage writes them).

Streaming and memory: the input is read once (prioritized files make a second, local pass: the input is
spooled to a temporary file); units are compressed by a thread pool (zlib and zstandard release the
GIL) with a bounded number of batches in flight, and written in order, so memory stays at a few chunks
per thread whatever the layer size. A file larger than `chunk_size` is never held whole. Hashes (DiffID,
file and chunk digests, tar-split CRCs) are computed in the calling thread in stream order. What grows
with the layer is the TOC (about 300 bytes per entry), as in every implementation of these formats.

The output is deterministic: the same input and options give the same blob.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import struct
import tempfile
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import zstandard

from fuse.formats.spec import (
    CHUNKED_CHECKSUM,
    CHUNKED_MAGIC,
    CHUNKED_POSITION,
    CHUNKED_TARSPLIT,
    ESTARGZ,
    ESTARGZ_ZSTD,
    FORMATS,
    LANDMARK_CONTENTS,
    LEGACY_CHUNKED_CHECKSUM,
    LEGACY_CHUNKED_POSITION,
    MANIFEST_TYPE_CRFS,
    MEDIA_TYPES,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    RESERVED_NAMES,
    SKIPPABLE_MAGIC,
    STARGZ_ZSTD_MAGIC,
    TOC_DIGEST,
    TOC_NAME,
    UNCOMPRESSED_SIZE,
    ZSTD_CHUNKED,
)
from snapshotter.convert.tar import (
    BLOCK,
    Readable,
    Source,
    TarEntry,
    TarFormatError,
    TarReader,
    clean_name,
    ustar_header,
)
from snapshotter.convert.tarsplit import Crc64Iso, TarSplitWriter

# 1 MiB, as Nydus: a miss fetches no more of a file than this where bytes are dear (a 100 Mbit/s link:
# python-scipy started 0.94x the peer's time with 4 MiB chunks, 0.87x with 1 MiB); where round trips
# are dear the fetcher fetches a file's aligned 4 MiB around a miss (`fuse.fetch.FETCH_UNIT`)
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 256 << 20
DEFAULT_LEVELS = {ESTARGZ: 6, ESTARGZ_ZSTD: 3, ZSTD_CHUNKED: 3}
LEVEL_RANGES = {ESTARGZ: (1, 9), ESTARGZ_ZSTD: (1, 22), ZSTD_CHUNKED: (1, 22)}
ZERO_RUN = 64 << 10  # zstd:chunked: a run of zeros at least this long is its own "zeros" chunk

UNIT_CAP = 1 << 20  # a run of headers longer than this continues in a new unit
BATCH_BYTES = 1 << 20  # small units are compressed in batches of about this size...
BATCH_UNITS = 256  # ...or of this many units


class Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


class WriterError(ValueError):
    """Bad options, or an input the writer cannot convert; the message says which and what to do."""


@dataclass(frozen=True)
class WriteOptions:
    format: str = ESTARGZ
    chunk_size: int = DEFAULT_CHUNK_SIZE
    level: int | None = None  # gzip 1-9 (default 6) or zstd 1-22 (default 3)
    prioritized: Sequence[str] = ()  # paths, in order, to put first (before .prefetch.landmark)
    threads: int = 0  # compression threads; 0: one per core
    spool_dir: str | None = None  # where the input is spooled when files are prioritized

    def validated(self) -> WriteOptions:
        if self.format not in FORMATS:
            raise WriterError(f"unknown layer format {self.format!r}: use one of {', '.join(FORMATS)}")
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise WriterError(
                f"chunk size {self.chunk_size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes"
            )
        low, high = LEVEL_RANGES[self.format]
        if self.level is not None and not low <= self.level <= high:
            raise WriterError(f"compression level {self.level} is outside {low}..{high} for {self.format}")
        if self.threads < 0:
            raise WriterError("threads must be 0 (one per core) or more")
        return self

    @property
    def effective_level(self) -> int:
        return DEFAULT_LEVELS[self.format] if self.level is None else self.level

    @property
    def effective_threads(self) -> int:
        if self.threads:
            return self.threads
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class LayerResult:
    """What a writer produced, and what an image manifest and config need to know about it."""

    format: str
    media_type: str
    digest: str  # sha256 of the blob
    size: int  # bytes of the blob
    diff_id: str  # sha256 of the new uncompressed tar
    uncompressed_size: int
    toc_digest: str  # eStargz: sha256 of the TOC JSON; zstd:chunked: sha256 of the compressed TOC
    toc_offset: int  # where the TOC (gzip member, or the compressed JSON in its skippable frame) starts
    annotations: dict[str, str]
    entries: int  # TOC entries
    input_digest: str  # sha256 of the input tar (the source layer's DiffID, to check)
    input_size: int
    prioritized_found: list[str] = field(default_factory=list)
    prioritized_missing: list[str] = field(default_factory=list)


# --- compression units ----------------------------------------------------------------------------------


def _compressor(fmt: str, level: int) -> Callable[[list[bytes]], bytes]:
    """A function compressing one unit (a list of byte pieces) to one gzip member / zstd frame."""
    if fmt == ESTARGZ:

        def gzip_unit(pieces: list[bytes]) -> bytes:
            c = zlib.compressobj(level, zlib.DEFLATED, 31)
            return b"".join([*(c.compress(p) for p in pieces), c.flush()])

        return gzip_unit
    local = threading.local()

    def zstd_unit(pieces: list[bytes]) -> bytes:
        cctx = getattr(local, "cctx", None)
        if cctx is None:
            cctx = local.cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        return cctx.compress(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    return zstd_unit


class _Units:
    """Collects the uncompressed stream into units, compresses them on a thread pool and writes the
    results in order to `dst`, remembering where each unit starts in the blob."""

    def __init__(self, dst: Writable, compress: Callable[[list[bytes]], bytes], threads: int):
        self._dst = dst
        self._compress = compress
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lazysnap-compress")
        self._inflight: deque[Future[list[bytes]]] = deque()
        self._max_inflight = threads + 2
        self._batch: list[list[bytes]] = []
        self._batch_bytes = 0
        self._pieces: list[bytes] = []
        self._length = 0
        self.index = 0  # the unit being filled
        self.offsets: list[int] = []  # compressed offset of each finished unit
        self.written = 0
        self.blob_hash = hashlib.sha256()
        self.diff_hash = hashlib.sha256()
        self.uncompressed = 0

    def append(self, piece: bytes, *, may_split: bool = True) -> None:
        if not piece:
            return
        if may_split and self._length >= UNIT_CAP:
            self.cut()
        self.diff_hash.update(piece)
        self.uncompressed += len(piece)
        self._pieces.append(piece)
        self._length += len(piece)

    def cut(self) -> int:
        """End the current unit (if it holds anything); returns the index of the unit now being filled."""
        if self._pieces:
            self._batch.append(self._pieces)
            self._batch_bytes += self._length
            self._pieces, self._length = [], 0
            self.index += 1
            if self._batch_bytes >= BATCH_BYTES or len(self._batch) >= BATCH_UNITS:
                self._submit()
        return self.index

    def _submit(self) -> None:
        if not self._batch:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        compress = self._compress
        self._inflight.append(self._pool.submit(lambda: [compress(unit) for unit in batch]))
        while len(self._inflight) >= self._max_inflight:
            self._write_one()

    def _write_one(self) -> None:
        for member in self._inflight.popleft().result():
            self.offsets.append(self.written)
            self._write(member)

    def _write(self, data: bytes) -> None:
        self.blob_hash.update(data)
        self._dst.write(data)
        self.written += len(data)

    def finish_data(self) -> None:
        """Compress and write every unit; after this, `offsets` is complete."""
        self.cut()
        self._submit()
        while self._inflight:
            self._write_one()

    def write_raw(self, data: bytes, *, uncompressed: bytes = b"") -> None:
        """Write bytes after the data units (TOC, footers); `uncompressed` is their tar content, if any."""
        if uncompressed:
            self.diff_hash.update(uncompressed)
            self.uncompressed += len(uncompressed)
        self._write(data)

    def close(self) -> None:
        for f in self._inflight:
            f.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


# --- TOC entries ----------------------------------------------------------------------------------------


def _rfc3339(ns: int, *, nanos: bool) -> str:
    seconds, frac = divmod(ns, 1_000_000_000)
    try:
        text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return ""
    if nanos and frac:
        text += ("." + f"{frac:09d}").rstrip("0")
    return text + "Z"


def _estargz_modtime(ns: int) -> str:
    """stargz's formatModtime: empty for the epoch, else UTC RFC 3339 rounded to the second."""
    if ns // 1_000_000_000 == 0:
        return ""
    return _rfc3339((ns + 500_000_000) // 1_000_000_000 * 1_000_000_000, nanos=False)


def _xattrs(entry: TarEntry) -> dict[str, str]:
    return {k: base64.b64encode(v).decode() for k, v in sorted(entry.xattrs.items())}


def _json_name(name: str) -> str:
    """Names with bytes that are not UTF-8 are written as Go's encoding/json writes them (U+FFFD)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass
class _Chunk:
    unit: int
    offset: int  # within the file
    size: int
    digest: str
    zeros: bool = False


def _estargz_entry(e: TarEntry) -> dict:
    d: dict = {"name": _json_name(e.name), "type": e.kind}
    if e.is_regular and e.size:
        d["size"] = e.size
    if modtime := _estargz_modtime(e.mtime_ns):
        d["modtime"] = modtime
    if e.linkname and e.kind in ("hardlink", "symlink"):
        d["linkName"] = _json_name(e.linkname)
    for key, value in (("mode", e.mode), ("uid", e.uid), ("gid", e.gid)):
        if value:
            d[key] = value
    if e.uname:
        d["userName"] = _json_name(e.uname)
    if e.gname:
        d["groupName"] = _json_name(e.gname)
    return d


def _estargz_reg(e: TarEntry, chunks: list[_Chunk], file_digest: str, chunk_size: int) -> list[dict]:
    """The reg entry and its chunk entries; offsets hold unit indices until the blob is written."""
    head = _estargz_entry(e)
    if not chunks:
        if e.xattrs:
            head["xattrs"] = _xattrs(e)
        head["digest"] = file_digest
        return [head]
    out = []
    for i, c in enumerate(chunks):
        d = head if i == 0 else {"name": _json_name(e.name), "type": "chunk"}
        d["offset"] = c.unit
        if i == 0:
            if e.xattrs:
                d["xattrs"] = _xattrs(e)
            d["digest"] = file_digest
        if c.offset:
            d["chunkOffset"] = c.offset
        if c.size == chunk_size:  # stargz leaves chunkSize out for a final partial chunk (0 = to the end)
            d["chunkSize"] = c.size
        d["chunkDigest"] = c.digest
        out.append(d)
    return out


def _estargz_other(e: TarEntry) -> dict:
    return _devices_and_xattrs(_estargz_entry(e), e, devices=e.kind in ("char", "block"))


def _devices_and_xattrs(d: dict, e: TarEntry, *, devices: bool = True) -> dict:
    """d with the entry's device numbers (when `devices` and not zero) and extended attributes."""
    if devices and e.devmajor:
        d["devMajor"] = e.devmajor
    if devices and e.devminor:
        d["devMinor"] = e.devminor
    if e.xattrs:
        d["xattrs"] = _xattrs(e)
    return d


def _zstd_chunked_entry(e: TarEntry, chunks: list[_Chunk], file_digest: str, end_unit: int) -> list[dict]:
    """containers/storage FileMetadata; offsets hold unit indices until the blob is written."""
    d: dict = {"type": e.kind, "name": _json_name(e.name)}
    if e.linkname:
        d["linkName"] = _json_name(e.linkname)
    for key, value in (("mode", e.mode), ("size", e.size), ("uid", e.uid), ("gid", e.gid)):
        if value:
            d[key] = value
    if modtime := _rfc3339(e.mtime_ns, nanos=True):
        d["modtime"] = modtime
    for key, ns in (("accesstime", e.atime_ns), ("changetime", e.ctime_ns)):
        if ns is not None and (text := _rfc3339(ns, nanos=True)):
            d[key] = text
    _devices_and_xattrs(d, e)
    if not chunks:
        return [d]
    d["digest"] = file_digest
    d["offset"] = chunks[0].unit
    d["endOffset"] = end_unit
    if len(chunks) == 1:
        return [d]
    out = []
    for i, c in enumerate(chunks):
        entry = d if i == 0 else {"type": "chunk", "name": d["name"], "offset": c.unit}
        entry["chunkSize"] = c.size
        if c.offset:
            entry["chunkOffset"] = c.offset
        entry["chunkDigest"] = c.digest
        if c.zeros:
            entry["chunkType"] = "zeros"
        out.append(entry)
    return out


# --- the writer -----------------------------------------------------------------------------------------


_NONZERO = re.compile(rb"[^\x00]")


def _zero_runs(data: bytes, minimum: int) -> list[tuple[int, int, bool]]:
    """Split data into (start, end, is_zeros) pieces, zeros being runs of at least `minimum` bytes."""
    out: list[tuple[int, int, bool]] = []
    probe = bytes(minimum)
    pos = 0
    while pos < len(data):
        start = data.find(probe, pos)
        if start < 0:
            break
        nonzero = _NONZERO.search(data, start + minimum)
        end = nonzero.start() if nonzero else len(data)
        if start > pos:
            out.append((pos, start, False))
        out.append((start, end, True))
        pos = end
    if pos < len(data):
        out.append((pos, len(data), False))
    return out


class _LayerWriter:
    def __init__(self, dst: Writable, options: WriteOptions):
        self.options = options
        self.fmt = options.format
        self.chunk_size = options.chunk_size
        self.units = _Units(dst, _compressor(self.fmt, options.effective_level), options.effective_threads)
        self.toc: list[dict] = []
        self.patches: list[tuple[dict, str]] = []  # (entry, key) whose value is a unit index
        self.pending_padding = 0
        self.separate_metadata = self.fmt == ZSTD_CHUNKED  # headers after a file's data: new frame
        self._after_data = False
        self.tar_split = TarSplitWriter(options.effective_level) if self.fmt == ZSTD_CHUNKED else None

    # Each member: padding of the previous one and its header blocks, then its data.
    def emit(self, entry: TarEntry, read: Callable[[int], bytes]) -> None:
        units = self.units
        if self.separate_metadata and self._after_data:
            units.cut()
        self._after_data = False
        segment = bytes(self.pending_padding) + entry.raw
        units.append(segment)
        if self.tar_split:
            self.tar_split.segment(segment)
        chunks: list[_Chunk] = []
        file_hash = hashlib.sha256()
        crc = Crc64Iso() if self.tar_split and entry.size else None
        if entry.is_regular and entry.size:
            done = 0
            while done < entry.size:
                block = read(min(self.chunk_size, entry.size - done))
                if not block:
                    raise TarFormatError(f"tar stream ends inside the data of {entry.name!r}")
                file_hash.update(block)
                if crc:
                    crc.update(block)
                pieces = _zero_runs(block, ZERO_RUN) if self.fmt == ZSTD_CHUNKED else [(0, len(block), False)]
                for start, end, zeros in pieces:
                    piece = block if (start, end) == (0, len(block)) else block[start:end]
                    unit = units.cut()
                    units.append(piece, may_split=False)
                    digest = "sha256:" + hashlib.sha256(piece).hexdigest()
                    chunks.append(_Chunk(unit, done + start, len(piece), digest, zeros))
                done += len(block)
            self._after_data = True
        elif entry.size:  # data of a non-regular member (rare): kept in the stream, not in the TOC
            remaining = entry.size
            while remaining:
                block = read(min(remaining, 1 << 20))
                if not block:
                    raise TarFormatError(f"tar stream ends inside the data of {entry.name!r}")
                units.append(block)
                if crc:
                    crc.update(block)
                remaining -= len(block)
        self.pending_padding = entry.padding
        if self.tar_split:
            self.tar_split.file(entry.name, entry.size, crc.digest() if crc else None)
        file_digest = "sha256:" + file_hash.hexdigest()
        if self.fmt == ZSTD_CHUNKED:
            entries = _zstd_chunked_entry(entry, chunks, file_digest, units.index + 1 if chunks else 0)
            for d in entries:
                for key in ("offset", "endOffset"):
                    if key in d:
                        self.patches.append((d, key))
        elif entry.is_regular:
            entries = _estargz_reg(entry, chunks, file_digest, self.chunk_size)
            self.patches += [(d, "offset") for d in entries if "offset" in d]
        else:
            entries = [_estargz_other(entry)]
        self.toc += entries

    def finish(self) -> tuple[str, int, dict[str, str]]:
        """Write the end of the tar, the TOC and the footer; returns (TOC digest, TOC offset, annotations)."""
        units = self.units
        padding = bytes(self.pending_padding)
        end = bytes(2 * BLOCK)
        if self.fmt == ESTARGZ:
            # as stargz writes it: the last member's padding closes its unit; the end-of-archive blocks
            # follow the TOC entry, in the TOC member
            units.append(padding, may_split=False)
        else:
            if self.separate_metadata:
                units.cut()
            units.append(padding + end, may_split=False)
            if self.tar_split:
                self.tar_split.segment(padding + end)
                self.tar_split.segment(b"")  # what followed the end blocks in the input: nothing
        units.finish_data()
        offsets = units.offsets
        offsets.append(units.written)  # a file's data may end where the data units end
        for d, key in self.patches:
            d[key] = offsets[d[key]]
        if self.fmt == ESTARGZ:
            return self._finish_estargz(end)
        if self.fmt == ESTARGZ_ZSTD:
            return self._finish_estargz_zstd()
        return self._finish_zstd_chunked()

    def _toc_json_indented(self) -> bytes:
        doc = {"version": 1, "entries": self.toc}
        return json.dumps(doc, indent="\t", ensure_ascii=False).encode()

    def _finish_estargz(self, end: bytes) -> tuple[str, int, dict[str, str]]:
        units = self.units
        toc_json = self._toc_json_indented()
        toc_offset = units.written
        tar = ustar_header(TOC_NAME, len(toc_json)) + toc_json + bytes(-len(toc_json) % BLOCK) + end
        member = zlib.compressobj(self.options.effective_level, zlib.DEFLATED, 31)
        units.write_raw(member.compress(tar) + member.flush(), uncompressed=tar)
        units.write_raw(estargz_footer(toc_offset))
        toc_digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
        return toc_digest, toc_offset, {TOC_DIGEST: toc_digest, UNCOMPRESSED_SIZE: str(units.uncompressed)}

    def _zstd(self, data: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=self.options.effective_level).compress(data)

    def _finish_estargz_zstd(self) -> tuple[str, int, dict[str, str]]:
        units = self.units
        toc_json = self._toc_json_indented()
        compressed = self._zstd(toc_json)
        toc_offset = units.written + 8
        units.write_raw(skippable_frame(compressed))
        units.write_raw(skippable_frame(estargz_zstd_footer(toc_offset, len(compressed), len(toc_json))))
        position = f"{toc_offset}:{len(compressed)}:{len(toc_json)}:{MANIFEST_TYPE_CRFS}"
        toc_digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
        return (
            toc_digest,
            toc_offset,
            {
                TOC_DIGEST: toc_digest,
                UNCOMPRESSED_SIZE: str(units.uncompressed),
                LEGACY_CHUNKED_CHECKSUM: "sha256:" + hashlib.sha256(compressed).hexdigest(),
                LEGACY_CHUNKED_POSITION: position,
            },
        )

    def _finish_zstd_chunked(self) -> tuple[str, int, dict[str, str]]:
        units = self.units
        assert self.tar_split is not None
        spool, split_len, split_digest = self.tar_split.finish()
        doc = {"version": 1, "entries": self.toc, "tarSplitDigest": split_digest}
        toc_json = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        compressed = self._zstd(toc_json)
        toc_offset = units.written + 8
        if len(compressed) >= 1 << 32 or split_len >= 1 << 32:
            raise WriterError("the TOC or tar-split of this layer exceeds 4 GiB, the limit of a zstd frame")
        units.write_raw(skippable_frame(compressed))
        split_offset = units.written + 8
        units.write_raw(SKIPPABLE_MAGIC + struct.pack("<I", split_len))
        while block := spool.read(1 << 20):
            units.write_raw(block)
        split_ulen = self.tar_split.uncompressed_size
        footer = zstd_chunked_footer(
            toc_offset, len(compressed), len(toc_json), split_offset, split_len, split_ulen
        )
        units.write_raw(skippable_frame(footer))
        toc_digest = "sha256:" + hashlib.sha256(compressed).hexdigest()
        position = f"{toc_offset}:{len(compressed)}:{len(toc_json)}:{MANIFEST_TYPE_CRFS}"
        annotations = {
            CHUNKED_CHECKSUM: toc_digest,
            CHUNKED_POSITION: position,
            CHUNKED_TARSPLIT: f"{split_offset}:{split_len}:{split_ulen}",
            LEGACY_CHUNKED_CHECKSUM: toc_digest,
            LEGACY_CHUNKED_POSITION: position,
            UNCOMPRESSED_SIZE: str(units.uncompressed),
        }
        return toc_digest, toc_offset, annotations

    def close(self) -> None:
        self.units.close()
        if self.tar_split:
            self.tar_split.close()


# --- footers --------------------------------------------------------------------------------------------


def estargz_footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer: an empty gzip member whose extra field holds the TOC offset."""
    subfield = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(subfield)) + subfield
    header = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", len(extra)) + extra
    return header + b"\x01\x00\x00\xff\xff" + bytes(8)


def estargz_zstd_footer(toc_offset: int, compressed: int, uncompressed: int) -> bytes:
    """stargz's 40-byte zstd footer (the payload of the last skippable frame)."""
    return struct.pack("<QQQQ", toc_offset, compressed, uncompressed, MANIFEST_TYPE_CRFS) + STARGZ_ZSTD_MAGIC


def zstd_chunked_footer(
    toc_offset: int, toc_len: int, toc_ulen: int, split_offset: int, split_len: int, split_ulen: int
) -> bytes:
    """containers/storage's 64-byte zstd:chunked footer (the payload of the last skippable frame)."""
    return (
        struct.pack(
            "<QQQQQQQ", toc_offset, toc_len, toc_ulen, MANIFEST_TYPE_CRFS, split_offset, split_len, split_ulen
        )
        + CHUNKED_MAGIC
    )


def skippable_frame(data: bytes) -> bytes:
    return SKIPPABLE_MAGIC + struct.pack("<I", len(data)) + data


# --- ordering -------------------------------------------------------------------------------------------


@dataclass
class _Spooled:
    entry: TarEntry  # with its raw header bytes moved to the spool file
    raw_offset: int
    raw_length: int


def _landmark(name: str) -> TarEntry:
    """A landmark member, with the header stargz gives it (mode 0, mtime 0: its TOC entry is the same)."""
    return TarEntry(raw=ustar_header(name, len(LANDMARK_CONTENTS), mode=0), name=name, typeflag=b"0", size=1)


def _priority_order(
    entries: list[_Spooled], prioritized: Iterable[str]
) -> tuple[list[int], list[str], list[str]]:
    """Indices of entries to put first, as stargz's sortEntries picks them: for each path, its parent
    directories (those the layer has), the target of a hard link, then the path itself."""
    by_name: dict[str, list[int]] = {}
    for i, s in enumerate(entries):
        by_name.setdefault(s.entry.clean_name, []).append(i)
    order: list[int] = []
    picked: set[str] = set()
    found: list[str] = []
    missing: list[str] = []

    def move(name: str, depth: int = 0) -> None:
        if name in picked or depth > 64:
            return
        parent = name.rpartition("/")[0]
        if name:
            move(parent, depth + 1)
        indices = by_name.get(name)
        if indices is None:
            return
        picked.add(name)
        last = entries[indices[-1]].entry
        if last.kind == "hardlink":
            move(clean_name(last.linkname), depth + 1)
        order.extend(indices)

    for path in prioritized:
        name = clean_name(path)
        if name in by_name:
            move(name)
            found.append(path)
        else:
            missing.append(path)
    return order, found, missing


# --- entry points ---------------------------------------------------------------------------------------


def write_layer(src: Readable, dst: Writable, options: WriteOptions | None = None) -> LayerResult:
    """Convert the uncompressed tar read from `src` into a layer blob written to `dst`.

    `src` needs only `read(n)`, `dst` only `write(b)`; neither is closed. Raises `TarFormatError` for an
    input that is not a usable tar, `WriterError` for bad options.
    """
    options = (options or WriteOptions()).validated()
    writer = _LayerWriter(dst, options)
    source = Source(src)
    reader = TarReader(source)
    found: list[str] = []
    missing: list[str] = []
    try:
        if options.prioritized:
            found, missing = _write_prioritized(writer, reader, source, options)
        else:
            writer.emit(_landmark(NO_PREFETCH_LANDMARK), lambda n: LANDMARK_CONTENTS[:n])
            while (entry := reader.next()) is not None:
                if entry.clean_name in RESERVED_NAMES:
                    reader.skip_data(entry)  # a TOC or landmark of an earlier conversion
                    continue
                writer.emit(entry, source.read_up_to)
                source.read_exact(entry.padding, f"the padding after {entry.name!r}")
            source.drain()
        toc_digest, toc_offset, annotations = writer.finish()
    finally:
        writer.close()
    units = writer.units
    return LayerResult(
        format=options.format,
        media_type=MEDIA_TYPES[options.format],
        digest="sha256:" + units.blob_hash.hexdigest(),
        size=units.written,
        diff_id="sha256:" + units.diff_hash.hexdigest(),
        uncompressed_size=units.uncompressed,
        toc_digest=toc_digest,
        toc_offset=toc_offset,
        annotations=annotations,
        entries=len(writer.toc),
        input_digest=source.digest(),
        input_size=source.offset,
        prioritized_found=found,
        prioritized_missing=missing,
    )


def _write_prioritized(
    writer: _LayerWriter, reader: TarReader, source: Source, options: WriteOptions
) -> tuple[list[str], list[str]]:
    """Spool the input's member data to a temporary file, then write prioritized members first."""
    with tempfile.TemporaryFile(dir=options.spool_dir) as spool:
        entries: list[_Spooled] = []
        while (entry := reader.next()) is not None:
            if entry.clean_name in RESERVED_NAMES:
                reader.skip_data(entry)
                continue
            entries.append(_Spooled(entry, spool.tell(), len(entry.raw)))
            spool.write(entry.raw)
            entry.raw = b""
            remaining = entry.size
            while remaining:
                block = source.read_up_to(min(remaining, 1 << 20))
                if not block:
                    raise TarFormatError(f"tar stream ends inside the data of {entry.name!r}")
                spool.write(block)
                remaining -= len(block)
            source.read_exact(entry.padding, f"the padding after {entry.name!r}")
        source.drain()
        spool.flush()  # members are read back with pread on the descriptor
        order, found, missing = _priority_order(entries, options.prioritized)
        fd = spool.fileno()

        def emit(s: _Spooled) -> None:
            s.entry.raw = os.pread(fd, s.raw_length, s.raw_offset)
            position = s.raw_offset + s.raw_length

            def read(n: int) -> bytes:
                nonlocal position
                data = os.pread(fd, n, position)
                position += len(data)
                return data

            writer.emit(s.entry, read)
            s.entry.raw = b""

        landmark = PREFETCH_LANDMARK if order else NO_PREFETCH_LANDMARK
        if not order:
            writer.emit(_landmark(landmark), lambda n: LANDMARK_CONTENTS[:n])
        first = set(order)
        for i in order:
            emit(entries[i])
        if order:
            writer.emit(_landmark(landmark), lambda n: LANDMARK_CONTENTS[:n])
        for i, s in enumerate(entries):
            if i not in first:
                emit(s)
    return found, missing


def convert_bytes(tar: bytes, options: WriteOptions | None = None) -> tuple[bytes, LayerResult]:
    """write_layer for an in-memory tar (tests, small layers)."""
    out = io.BytesIO()
    result = write_layer(io.BytesIO(tar), out, options)
    return out.getvalue(), result
