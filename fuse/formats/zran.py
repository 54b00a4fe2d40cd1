"""Random access into ordinary gzip layers (single- or multi-member): a checkpoint index built in one
streaming pass, the single compressed range a read needs, and a verified inflate of that range.

How it works (zlib's zran technique, as AWS SOCI uses it): while the layer is inflated once, a
checkpoint is taken at a deflate block boundary every `span` compressed bytes or `span_out`
uncompressed bytes (whichever comes first): the compressed offset `cin` of the first whole byte, the
`bits` (0-7) of the block's start left in byte `cin-1`, the uncompressed offset `out`, and the 32 KiB of
output before it. A read of uncompressed `[offset, offset+length)` starts a raw inflater at the last
checkpoint at or before `offset` (inflatePrime the bits, inflateSetDictionary the window) and runs it
over the compressed bytes up to the first checkpoint at or after the end. Python's zlib has neither
inflatePrime nor Z_BLOCK, so this module binds the system libz (`libz.so.1`) through ctypes (`_Z`).

Serialized form, two separate blobs (all integers little-endian):
- `Index.to_bytes()`: SOCI's zinfo-v2 checkpoint blob, unchanged, so SOCI and lazysnap read each
  other's: `int32 count, int64 span_size`, then per checkpoint `int64 cin, int64 out, uint8 bits,
  32768 B window` (uncompressed). `span_size` is `span_out`. SOCI's v1 blobs (checkpoint 0 omitted)
  are read too. With `span=None` the checkpoints are exactly SOCI's, and the blob is byte-identical to
  the one SOCI's C code builds with the same span size.
- `Index.digests_to_bytes()`: lazysnap's extras (DIGESTS_MAGIC, then `uint64 comp_size, uint64
  uncomp_size, uint64 span, uint32 count`, the sha256 of the whole gzip blob, the sha256 of the
  zinfo blob above (binding the two), then `count` sha256 of each span's uncompressed bytes, then
  `count` sha256 of each span's compressed bytes (SOCI's `span_digests`)). Span k is
  uncompressed `[out_k, out_k+1)` and compressed `[cin_k - (1 if bits_k else 0), cin_k+1)`; the last
  span ends at the end of the stream / the blob.

What is verified (see `extract`): with the digests, every byte returned lies in a span that was
inflated whole and whose uncompressed sha256 matched, and each span's compressed bytes matched their
sha256 before inflating. A bare SOCI blob (no digests) can only be read with `unverified_ok=True`,
or with SOCI's compressed span digests (`comp_digests`), which check the fetched bytes but not the
checkpoints themselves (a wrong window inflates to wrong bytes): only a full verification of the
blob against the layer digest settles that.

All functions are synchronous and release the GIL inside zlib and hashlib; call them from trio with
`trio.to_thread.run_sync`."""

from __future__ import annotations

import bisect
import ctypes
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import FormatError, Unverified
from .index import GZIP, MAX_RATIO

WINDOW = 32768  # deflate's history: a checkpoint keeps this much output before it
DEFAULT_SPAN = 4 << 20  # compressed bytes between checkpoints (at most, plus one block)
DEFAULT_SPAN_OUT = 4 << 20  # uncompressed bytes between checkpoints; SOCI's default span size
# No layer we serve is larger than this uncompressed: a stream inflating beyond it is refused.
MAX_OUT = 1 << 40
# The most uncompressed bytes one read may have to inflate (one span, or several for a long read).
# zlib, Go and pgzip end a deflate block after 16 Ki symbols (at most ~4 MiB of output), so honest
# spans stay under span_out + 4 MiB; a bigger one comes from a hostile stream or index.
MAX_SPAN_OUT = 64 << 20
DIGESTS_MAGIC = b"LZSZRAN\x01"

_CHUNK = 1 << 16  # compressed bytes read at a time while building
_RING = 1 << 18  # output ring while building (a multiple of WINDOW)
_SCRATCH = 1 << 18  # output buffer for bytes inflated but not returned by extract
_GZIP_TRAILER = 8  # CRC32 + ISIZE after each member's deflate data
_ZINFO_HEADER = struct.Struct("<iq")  # count, span size
_ZINFO_POINT = struct.Struct("<qqB")  # cin, out, bits (then the window)
_ZINFO_POINT_SIZE = _ZINFO_POINT.size + WINDOW
_DIGESTS_HEADER = struct.Struct("<8sQQQI32s32s")


# ---- the ctypes surface: z_stream and the seven libz calls this module needs --------------------


class _ZStream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


Z_OK, Z_STREAM_END, Z_NEED_DICT, Z_BUF_ERROR = 0, 1, 2, -5
Z_NO_FLUSH, Z_BLOCK = 0, 5
RAW, GZIP_ONLY = -15, 31  # inflateInit2 windowBits: raw deflate; gzip header and trailer


def _load_libz() -> ctypes.CDLL:
    lib = ctypes.CDLL("libz.so.1")  # CDLL: every call releases the GIL
    p = ctypes.POINTER(_ZStream)
    lib.zlibVersion.restype = ctypes.c_char_p
    for name, args in {
        "inflateInit2_": [p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int],
        "inflate": [p, ctypes.c_int],
        "inflatePrime": [p, ctypes.c_int, ctypes.c_int],
        "inflateSetDictionary": [p, ctypes.c_void_p, ctypes.c_uint],
        "inflateReset2": [p, ctypes.c_int],
        "inflateEnd": [p],
    }.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


_libz: ctypes.CDLL | None = None


class _Inflater:
    """One zlib inflate stream (`with`-managed: inflateEnd on exit)."""

    def __init__(self, window_bits: int, what: str):
        global _libz
        if _libz is None:
            _libz = _load_libz()
        self.z, self.what, self.s = _libz, what, _ZStream()
        self.ref = ctypes.byref(self.s)
        ret = self.z.inflateInit2_(self.ref, window_bits, self.z.zlibVersion(), ctypes.sizeof(_ZStream))
        if ret != Z_OK:
            raise MemoryError(f"{what}: inflateInit2 failed ({ret})")

    def __enter__(self) -> _Inflater:
        return self

    def __exit__(self, *exc) -> None:
        self.z.inflateEnd(self.ref)

    def inflate(self, flush: int) -> int:
        ret = self.z.inflate(self.ref, flush)
        if ret not in (Z_OK, Z_STREAM_END, Z_BUF_ERROR):
            msg = self.s.msg.decode(errors="replace") if self.s.msg else f"zlib error {ret}"
            raise FormatError(f"{self.what}: corrupt deflate data ({msg})")
        return ret

    def prime(self, bits: int, value: int) -> None:
        self._check(self.z.inflatePrime(self.ref, bits, value), "inflatePrime")

    def set_dictionary(self, window: bytes) -> None:
        self._check(self.z.inflateSetDictionary(self.ref, window, len(window)), "inflateSetDictionary")

    def reset(self, window_bits: int) -> None:
        self._check(self.z.inflateReset2(self.ref, window_bits), "inflateReset2")

    def _check(self, ret: int, call: str) -> None:
        if ret != Z_OK:
            raise FormatError(f"{self.what}: {call} failed ({ret})")


# ---- the index -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    cin: int  # compressed offset of the first whole byte after the block boundary
    out: int  # uncompressed offset of the boundary
    bits: int  # 0-7 bits of the next block held in byte cin-1
    window: bytes  # the WINDOW bytes of output before `out` (zero-padded at the stream start)


@dataclass
class Index:
    """Checkpoints of one gzip blob, plus (when built here or read with its digests blob) the sizes and
    the digests that make reads verifiable. `span_size` is the zinfo header field (= span_out)."""

    points: list[Checkpoint]
    span_size: int
    comp_size: int | None = None
    uncomp_size: int | None = None
    span: int = 0  # compressed spacing used to build (0 = none: SOCI's rule); informational
    blob_digest: bytes | None = None  # sha256 of the whole compressed blob
    out_digests: list[bytes] | None = None  # sha256 of each span's uncompressed bytes
    comp_digests: list[bytes] | None = None  # sha256 of each span's compressed bytes (SOCI's)
    what: str = "gzip layer"  # names the layer in errors
    _outs: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._outs = [p.out for p in self.points]
        self._validate()

    @property
    def verifiable(self) -> bool:
        return self.out_digests is not None or self.comp_digests is not None

    def span_range(self, k: int) -> tuple[int, int]:
        """Compressed `[start, end)` of span k (SOCI's definition); the last span needs comp_size."""
        p = self.points[k]
        start = p.cin - (1 if p.bits else 0)
        if k + 1 < len(self.points):
            return start, self.points[k + 1].cin
        if self.comp_size is None:
            raise FormatError(f"{self.what}: the blob size is needed to read the last span")
        return start, self.comp_size

    def plan(self, offset: int, length: int) -> tuple[int, int, int]:
        """The checkpoint to start from and the one compressed range `[comp_start, comp_end)` to fetch
        to produce uncompressed `[offset, offset+length)`: from checkpoint i (the last at or before
        offset) to the first checkpoint at or after the end (or the end of the blob)."""
        if offset < 0 or length < 0:
            raise ValueError(f"{self.what}: bad range offset={offset} length={length}")
        end = offset + length
        if self.uncomp_size is not None and end > self.uncomp_size:
            raise ValueError(f"{self.what}: range {offset}+{length} beyond the end ({self.uncomp_size})")
        i = max(bisect.bisect_right(self._outs, offset) - 1, 0)
        j = self._end_point(i, end)
        start = self.span_range(i)[0]
        return i, start, self.span_range(j - 1)[1]

    def _end_point(self, i: int, end: int) -> int:
        """The checkpoint after the last span a read from checkpoint i to `end` covers (len = the end)."""
        return max(bisect.bisect_left(self._outs, end, lo=i + 1), i + 1)

    # ---- serialization ----

    def to_bytes(self) -> bytes:
        """SOCI's zinfo-v2 checkpoint blob (module docstring)."""
        parts = [_ZINFO_HEADER.pack(len(self.points), self.span_size)]
        for p in self.points:
            parts += [_ZINFO_POINT.pack(p.cin, p.out, p.bits), p.window]
        return b"".join(parts)

    def digests_to_bytes(self) -> bytes:
        """lazysnap's extras for this index (module docstring); needs an index built by build_index."""
        if self.out_digests is None or self.comp_digests is None or self.blob_digest is None:
            raise ValueError(f"{self.what}: this index has no digests to serialize")
        header = _DIGESTS_HEADER.pack(
            DIGESTS_MAGIC,
            self.comp_size,
            self.uncomp_size,
            self.span,
            len(self.points),
            self.blob_digest,
            hashlib.sha256(self.to_bytes()).digest(),
        )
        return b"".join([header, *self.out_digests, *self.comp_digests])

    @classmethod
    def from_bytes(
        cls,
        blob: bytes,
        digests: bytes | None = None,
        *,
        comp_size: int | None = None,
        comp_digests: list[bytes] | None = None,
        what: str = "gzip layer",
    ) -> Index:
        """Read a zinfo blob (v2, or SOCI's v1), with lazysnap's digests blob if there is one, or the
        blob size and SOCI's compressed span digests from a zTOC. Raises FormatError if inconsistent."""
        if len(blob) < _ZINFO_HEADER.size:
            raise FormatError(f"{what}: zinfo blob of {len(blob)} bytes is shorter than its header")
        count, span_size = _ZINFO_HEADER.unpack_from(blob)
        body = len(blob) - _ZINFO_HEADER.size
        points: list[Checkpoint] = []
        if count >= 1 and body == (count - 1) * _ZINFO_POINT_SIZE:  # v1: checkpoint 0 left out
            points.append(Checkpoint(10, 0, 0, bytes(WINDOW)))  # SOCI's v1 rule: after a bare header
        elif count < 1 or body != count * _ZINFO_POINT_SIZE:
            raise FormatError(f"{what}: zinfo blob claims {count} checkpoints but holds {body} bytes")
        for pos in range(_ZINFO_HEADER.size, len(blob), _ZINFO_POINT_SIZE):
            cin, out, bits = _ZINFO_POINT.unpack_from(blob, pos)
            start = pos + _ZINFO_POINT.size
            points.append(Checkpoint(cin, out, bits, blob[start : start + WINDOW]))
        kw: dict = {"comp_size": comp_size, "comp_digests": comp_digests}
        if digests is not None:
            kw = _parse_digests(digests, blob, len(points), what)
            if comp_size is not None and comp_size != kw["comp_size"]:
                raise FormatError(f"{what}: digests blob is for {kw['comp_size']} bytes, not {comp_size}")
        return cls(points, span_size, what=what, **kw)

    def _validate(self) -> None:
        """Refuse an index that is inconsistent or would make a read inflate absurdly much."""
        what, ratio, n = self.what, MAX_RATIO[GZIP], len(self.points)
        if not n:
            raise FormatError(f"{what}: index has no checkpoints")
        for name in ("out_digests", "comp_digests"):
            d = getattr(self, name)
            if d is not None and (len(d) != n or any(len(x) != 32 for x in d)):
                raise FormatError(f"{what}: {name} has {len(d)} entries for {n} spans")
        if self.out_digests is not None and self.uncomp_size is None:
            raise FormatError(f"{what}: span digests without the uncompressed size")
        prev = None
        for k, p in enumerate(self.points):
            if not (
                0 <= p.bits <= 7 and p.cin >= (1 if p.bits else 0) and p.out >= 0 and len(p.window) == WINDOW
            ):
                raise FormatError(
                    f"{what}: checkpoint {k} is malformed (cin={p.cin} bits={p.bits} out={p.out})"
                )
            if prev is not None:
                dcin, dout = p.cin - prev.cin, p.out - prev.out
                if dcin < 0 or dout < 0 or dout > (dcin + 1) * ratio:
                    raise FormatError(
                        f"{what}: checkpoint {k} (cin={p.cin}, out={p.out}) does not follow checkpoint "
                        f"{k - 1} (cin={prev.cin}, out={prev.out}) in a possible deflate stream"
                    )
            prev = p
        last = self.points[-1]
        if self.comp_size is not None and last.cin > self.comp_size:
            raise FormatError(f"{what}: checkpoint at {last.cin} lies beyond the blob ({self.comp_size} B)")
        if self.uncomp_size is not None and last.out > self.uncomp_size:
            raise FormatError(
                f"{what}: checkpoint at out={last.out} beyond the stream ({self.uncomp_size} B)"
            )


def _parse_digests(digests: bytes, zinfo: bytes, n: int, what: str) -> dict:
    size = _DIGESTS_HEADER.size + 2 * 32 * n
    if len(digests) != size:
        raise FormatError(f"{what}: digests blob is {len(digests)} bytes, expected {size} for {n} spans")
    magic, comp_size, uncomp_size, span, count, blob_digest, zinfo_digest = _DIGESTS_HEADER.unpack_from(
        digests
    )
    if magic != DIGESTS_MAGIC or count != n:
        raise FormatError(f"{what}: not a lazysnap zran digests blob for {n} checkpoints")
    if zinfo_digest != hashlib.sha256(zinfo).digest():
        raise FormatError(f"{what}: digests blob belongs to another zinfo blob")
    body = digests[_DIGESTS_HEADER.size :]
    dig = [body[k : k + 32] for k in range(0, len(body), 32)]
    return {
        "comp_size": comp_size,
        "uncomp_size": uncomp_size,
        "span": span,
        "blob_digest": blob_digest,
        "out_digests": dig[:n],
        "comp_digests": dig[n:],
    }


# ---- building ------------------------------------------------------------------------------------


def build_index(
    read: Callable[[int], bytes],
    *,
    span: int | None = DEFAULT_SPAN,
    span_out: int = DEFAULT_SPAN_OUT,
    max_out: int = MAX_OUT,
    sink: Callable[[memoryview], None] | None = None,
    what: str = "gzip layer",
) -> Index:
    """Stream a gzip blob once through `read(n) -> bytes` (b"" at the end) and index it. Memory stays
    at a few hundred KiB plus 32 KiB per checkpoint, whatever the blob's size. `span=None` spaces
    checkpoints on uncompressed bytes only, exactly as SOCI does. `sink` (optional) receives every
    uncompressed byte in order, as a memoryview valid only during the call (e.g. to parse the tar in
    the same pass). Raises FormatError for anything but a complete, valid gzip stream of at most
    `max_out` uncompressed bytes with spans of at most MAX_SPAN_OUT uncompressed bytes."""
    if span_out <= 0 or (span is not None and span <= 0):
        raise ValueError("span and span_out must be positive")
    blob_hash = hashlib.sha256()
    points: list[Checkpoint] = []
    out_digests: list[bytes] = []
    comp_digests: list[bytes] = []
    ring = (ctypes.c_ubyte * _RING)()
    ring_addr, ring_view = ctypes.addressof(ring), memoryview(ring).cast("B")
    inbuf = (ctypes.c_ubyte * _CHUNK)()
    pos = totin = totout = last_in = last_out = 0
    data, chunk_start, prev_last = b"", 0, 0  # the input chunk being inflated, its offset, the byte before
    out_hash = comp_hash = None  # hashers of the current span (none before checkpoint 0)
    hashed = 0  # compressed offset up to which comp_hash has been fed
    ended = False  # the last inflate call ended a member

    with _Inflater(GZIP_ONLY, what) as z:
        s = z.s
        while True:
            if s.avail_in == 0:
                if comp_hash is not None:
                    comp_hash.update(data[hashed - chunk_start :])
                    hashed = chunk_start + len(data)
                chunk_start += len(data)
                if data:
                    prev_last = data[-1]
                data = read(_CHUNK)
                if not data:
                    break
                if len(data) > _CHUNK:
                    raise ValueError(f"read({_CHUNK}) returned {len(data)} bytes")
                blob_hash.update(data)
                ctypes.memmove(inbuf, data, len(data))
                s.next_in, s.avail_in = ctypes.addressof(inbuf), len(data)
            if ended:  # more input after a member: the next member starts here
                z.reset(GZIP_ONLY)
                ended = False
            if pos == _RING:
                pos = 0
            s.next_out, s.avail_out = ring_addr + pos, _RING - pos
            before_in, before_out = s.avail_in, s.avail_out
            ret = z.inflate(Z_BLOCK)
            produced = before_out - s.avail_out
            totin += before_in - s.avail_in
            if produced:
                chunk = ring_view[pos : pos + produced]
                out_hash.update(chunk)  # output only follows checkpoint 0 (taken after the header)
                if sink is not None:
                    sink(chunk)
                pos += produced
                totout += produced
                if totout > max_out:
                    raise FormatError(f"{what}: inflates to more than {max_out} bytes; refusing it")
            if ret == Z_STREAM_END:
                ended = True
                continue
            dt = s.data_type
            if not (dt & 128) or dt & 64:
                continue
            if not (
                totout == 0 or totout - last_out > span_out or (span is not None and totin - last_in > span)
            ):
                continue
            # A block boundary where a checkpoint is due.
            bits = dt & 7
            if points:
                comp_hash.update(data[hashed - chunk_start : totin - chunk_start])
                comp_digests.append(comp_hash.digest())
                out_digests.append(out_hash.digest())
                if totout - points[-1].out > MAX_SPAN_OUT:
                    raise _span_too_large(what, points[-1].out, totout)
            comp_hash, out_hash, hashed = hashlib.sha256(), hashlib.sha256(), totin
            if bits:
                comp_hash.update(bytes([data[totin - 1 - chunk_start] if totin > chunk_start else prev_last]))
            if pos >= WINDOW:
                window = bytes(ring_view[pos - WINDOW : pos])
            else:
                window = bytes(ring_view[_RING - (WINDOW - pos) :]) + bytes(ring_view[:pos])
            points.append(Checkpoint(totin, totout, bits, window))
            last_in, last_out = totin, totout

    if not ended:
        raise FormatError(f"{what}: gzip stream is truncated after {chunk_start} bytes (no end of member)")
    if not points:
        raise FormatError(f"{what}: gzip stream has no deflate data")
    comp_digests.append(comp_hash.digest())
    out_digests.append(out_hash.digest())
    if totout - points[-1].out > MAX_SPAN_OUT:
        raise _span_too_large(what, points[-1].out, totout)
    return Index(
        points,
        span_out,
        comp_size=chunk_start,
        uncomp_size=totout,
        span=span or 0,
        blob_digest=blob_hash.digest(),
        out_digests=out_digests,
        comp_digests=comp_digests,
        what=what,
    )


def _span_too_large(what: str, start: int, end: int) -> FormatError:
    return FormatError(
        f"{what}: one deflate block runs from {start} to {end} uncompressed ({end - start} B, over "
        f"{MAX_SPAN_OUT}); it cannot be read lazily: pull the layer in full"
    )


# ---- reading -------------------------------------------------------------------------------------


def extract(
    index: Index, i: int, comp: bytes, offset: int, length: int, *, unverified_ok: bool = False
) -> bytes:
    """Uncompressed `[offset, offset+length)`, inflated from checkpoint i over `comp`, the compressed
    range `index.plan(offset, length)` returned. With span digests, the spans the read touches are
    inflated whole and each one's sha256 must match (and each span's compressed bytes, first) before
    anything is returned: Unverified otherwise. Corrupt or short data raises FormatError. An index
    without digests (a bare SOCI blob) is read only with `unverified_ok=True`."""
    what, points = index.what, index.points
    if not index.verifiable and not unverified_ok:
        raise Unverified(f"{what}: index has no span digests; refusing to serve unverified bytes")
    if length == 0:
        return b""
    end = offset + length
    if not (0 <= i < len(points)) or points[i].out > offset:
        raise ValueError(f"{what}: checkpoint {i} is not at or before offset {offset}")
    j = index._end_point(i, end)
    comp_start = points[i].cin - (1 if points[i].bits else 0)
    if index.comp_size is not None or j < len(points):
        comp_end = index.span_range(j - 1)[1]
        if len(comp) != comp_end - comp_start:
            raise FormatError(
                f"{what}: got {len(comp)} compressed bytes for [{comp_start}, {comp_end}); "
                "fetch the planned range"
            )
    if index.comp_digests is not None:
        for k in range(i, j):
            a, b = index.span_range(k)
            if hashlib.sha256(comp[a - comp_start : b - comp_start]).digest() != index.comp_digests[k]:
                raise Unverified(f"{what}: compressed bytes [{a}, {b}) of span {k} do not match their digest")
    # Where to stop: the end of the last span touched when its digest is known, else the read's end.
    if index.out_digests is None:
        stop = end
    elif j < len(points):
        stop = points[j].out
    else:
        stop = index.uncomp_size
    if stop < end:
        raise ValueError(f"{what}: range {offset}+{length} beyond the end ({stop})")
    if stop - points[i].out > MAX_SPAN_OUT * max(1, j - i):
        raise _span_too_large(what, points[i].out, stop)
    # Output positions where something changes: span ends (digest checks), the read's start and end.
    marks = sorted({offset, end, stop, *(p.out for p in points[i + 1 : j])})
    result = bytearray(length)
    res = (ctypes.c_ubyte * length).from_buffer(result)
    res_view = memoryview(result)
    scratch = (ctypes.c_ubyte * _SCRATCH)()
    scratch_view = memoryview(scratch).cast("B")
    src = (ctypes.c_ubyte * max(len(comp), 1)).from_buffer_copy(comp) if comp else (ctypes.c_ubyte * 1)()
    k, pos, m = i, points[i].out, 0  # current span, output position, next mark
    span_hash = hashlib.sha256() if index.out_digests is not None else None
    raw = True  # still in checkpoint i's member (raw inflate: its trailer is skipped by hand)
    with _Inflater(RAW, what) as z:
        s = z.s
        p = points[i]
        s.next_in, s.avail_in = ctypes.addressof(src), len(comp)
        if p.bits:
            if not comp:
                raise FormatError(f"{what}: empty compressed range")
            z.prime(p.bits, comp[0] >> (8 - p.bits))
            s.next_in, s.avail_in = s.next_in + 1, s.avail_in - 1
        z.set_dictionary(p.window)
        while pos < stop:
            while marks[m] <= pos:
                m += 1
            limit = marks[m]
            if offset <= pos < end:
                s.next_out = ctypes.addressof(res) + (pos - offset)
                s.avail_out = limit - pos
                view = res_view
                base = pos - offset
            else:
                s.avail_out = min(limit - pos, _SCRATCH)
                s.next_out = ctypes.addressof(scratch)
                view, base = scratch_view, 0
            before_out, before_in = s.avail_out, s.avail_in
            ret = z.inflate(Z_NO_FLUSH)
            produced = before_out - s.avail_out
            if span_hash is not None and produced:
                span_hash.update(view[base : base + produced])
            pos += produced
            while span_hash is not None and k + 1 < j and points[k + 1].out <= pos:
                _check_span(index, k, span_hash)
                k, span_hash = k + 1, hashlib.sha256()
            if ret == Z_STREAM_END:
                if raw:  # raw inflate leaves the member's trailer: skip it once
                    if s.avail_in < _GZIP_TRAILER and pos < stop:
                        raise FormatError(f"{what}: compressed range ends inside a gzip trailer")
                    skip = min(_GZIP_TRAILER, s.avail_in)
                    s.next_in, s.avail_in = s.next_in + skip, s.avail_in - skip
                    raw = False
                if s.avail_in == 0:
                    break
                z.reset(GZIP_ONLY)  # the next member: gzip mode checks its header and trailer
            elif produced == 0 and s.avail_in == before_in:
                raise FormatError(
                    f"{what}: compressed range [{comp_start}, {comp_start + len(comp)}) ended at "
                    f"uncompressed {pos}, before {stop}: truncated or corrupt"
                )
    if pos < stop:
        raise FormatError(f"{what}: gzip stream ended at uncompressed {pos}, before {stop}")
    if span_hash is not None:
        _check_span(index, k, span_hash)
    return bytes(result)


def _check_span(index: Index, k: int, h) -> None:
    if h.digest() != index.out_digests[k]:
        a = index.points[k].out
        raise Unverified(
            f"{index.what}: span {k} (uncompressed from {a}) does not match its digest: corrupt blob "
            "range or a wrong checkpoint; the bytes were not served"
        )
