"""fuse.formats.zran: checkpoint indexes of ordinary gzip streams made by real producers (GNU gzip,
Python's gzip, pigz, a Go-style stream, pgzip-style sync flushes, multi-member), random reads equal
to the decompressed reference, verification against corruption and tampered checkpoints, bounded
memory on a 200 MB stream (in a child under RLIMIT_AS), and interop with SOCI's own C checkpoint code
(tests/fixtures/soci, compiled with cc and zlib).

    python -m tests.unit.test_zran SCENARIO   # what the memory child runs
"""

from __future__ import annotations

import ctypes
import dataclasses
import gzip
import hashlib
import io
import random
import shutil
import struct
import subprocess
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from fuse.formats import FormatError, Unverified, zran
from tests.harness.procs import limited_main, run_limited

ROOT = Path(__file__).resolve().parents[2]
SOCI_SRC = ROOT / "tests" / "fixtures" / "soci"
MEMORY_LIMIT = 1 << 30  # address space of the memory child
RSS_LIMIT_MIB = 100
MIB = 1 << 20
SPAN = 1 * MIB  # small spans in tests: more checkpoints, more boundaries exercised


def mixed_tar(size: int, seed: int) -> bytes:
    """A tar of files mixing incompressible blocks (stored deflate blocks), text and zeros."""
    rnd = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        n = 0
        while buf.tell() < size:
            kind, length = n % 3, rnd.randint(1, 3 * MIB // 2)
            if kind == 0:
                data = rnd.randbytes(length)
            elif kind == 1:
                words = [b"lorem", b"ipsum", b"dolor", b"sit", b"amet", b"%d" % n, b"\n"]
                data = b" ".join(rnd.choice(words) for _ in range(length // 5))[:length]
            else:
                data = bytes(length)
            info = tarfile.TarInfo(f"dir{n % 7}/file{n}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            n += 1
    return buf.getvalue()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("zran")
    (d / "big.tar").write_bytes(mixed_tar(40 * MIB, 1))
    (d / "small.tar").write_bytes(mixed_tar(6 * MIB, 2))
    return d


def run(argv: list[str], **kw) -> bytes:
    return subprocess.run(argv, check=True, capture_output=True, **kw).stdout


def gnu_gzip(level: int) -> Callable[[Path], bytes]:
    return lambda tar: run(["gzip", f"-{level}", "-c", str(tar)])


def python_gzip(tar: Path) -> bytes:
    return gzip.compress(tar.read_bytes(), compresslevel=6, mtime=0)


def pigz(tar: Path) -> bytes:
    return run(["pigz", "-6", "-c", str(tar)])  # installed by `make test` (Makefile APT_PACKAGES)


def gzip_member(raw: bytes, data: bytes, header_fields: bool = False) -> bytes:
    """A gzip member around raw deflate data; with header_fields: FEXTRA, FNAME, FCOMMENT and FHCRC."""
    if not header_fields:
        head = b"\x1f\x8b\x08\x00" + bytes(4) + b"\x00\xff"
    else:
        extra = b"LZ\x04\x00abcd"
        head = b"\x1f\x8b\x08\x1e" + bytes(4) + b"\x00\x03" + struct.pack("<H", len(extra)) + extra
        head += b"layer.tar\x00" + b"a comment\x00"
        head += struct.pack("<H", zlib.crc32(head) & 0xFFFF)
    return head + raw + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def go_like(tar: Path) -> bytes:
    """What Go's writer ends with: an empty final stored block after the data (byte-aligned here), so
    the last block boundary sits at the very end of the uncompressed stream; all header fields set."""
    data = tar.read_bytes()
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    raw = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH) + b"\x01\x00\x00\xff\xff"
    return gzip_member(raw, data, header_fields=True)


def pgzip_like(tar: Path) -> bytes:
    """klauspost/pgzip (umoci's compressor) style: a sync flush (empty stored block) every 64 KiB."""
    data = tar.read_bytes()
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    raw = b"".join(
        c.compress(data[k : k + 65536]) + c.flush(zlib.Z_SYNC_FLUSH) for k in range(0, len(data), 65536)
    )
    return gzip_member(raw + c.flush(), data)


def multi_member(tar: Path) -> bytes:
    """`cat a.gz b.gz c.gz`: GNU gzip, an empty member, then Python's gzip."""
    data = tar.read_bytes()
    third = len(data) // 3
    a, b = tar.parent / "part-a", tar.parent / "part-b"
    a.write_bytes(data[:third])
    b.write_bytes(b"")
    return run(["gzip", "-6", "-c", str(a)]) + run(["gzip", "-c", str(b)]) + gzip.compress(data[third:], 9)


PRODUCERS = {
    "gzip-1": gnu_gzip(1),
    "gzip-6": gnu_gzip(6),
    "gzip-9": gnu_gzip(9),
    "python-gzip": python_gzip,
    "pigz": pigz,
    "go-like": go_like,
    "pgzip-like": pgzip_like,
    "multi-member": multi_member,
}


def build(comp: bytes, **kw) -> zran.Index:
    return zran.build_index(io.BytesIO(comp).read, **kw)


def read(ix: zran.Index, comp: bytes, offset: int, length: int, **kw) -> bytes:
    i, start, end = ix.plan(offset, length)
    return zran.extract(ix, i, comp[start:end], offset, length, **kw)


def ranges(ix: zran.Index, size: int, rnd: random.Random, n: int) -> list[tuple[int, int]]:
    """Random ranges plus ranges at 0, the end and around every checkpoint, and ones spanning several."""
    out = [(0, 1), (0, min(size, 5000)), (size - 1, 1), (max(0, size - 70000), min(size, 70000))]
    for p in ix.points[1:]:
        for off in (p.out - 1, p.out, p.out + 1):
            if 0 <= off < size:
                out.append((off, min(size - off, rnd.choice([1, 4096, 100000]))))
    for _ in range(n):
        off = rnd.randrange(size)
        out.append((off, rnd.randint(1, min(size - off, rnd.choice([4096, MIB, 3 * MIB])))))
    return out


@pytest.mark.parametrize("producer", list(PRODUCERS))
def test_reads_equal_the_decompressed_stream(work: Path, producer: str) -> None:
    tar = work / ("big.tar" if producer == "gzip-6" else "small.tar")
    ref, comp = tar.read_bytes(), PRODUCERS[producer](tar)
    assert gzip.decompress(comp) == ref
    ix = build(comp, span=SPAN, span_out=SPAN)
    assert (ix.comp_size, ix.uncomp_size) == (len(comp), len(ref))
    assert ix.blob_digest == hashlib.sha256(comp).digest()
    assert len(ix.points) >= len(ref) // SPAN // 2
    rnd = random.Random(producer)
    for off, n in ranges(ix, len(ref), rnd, 60):
        assert read(ix, comp, off, n) == ref[off : off + n], (producer, off, n)
    # The serialized index (SOCI blob + our digests) reads the same.
    again = zran.Index.from_bytes(ix.to_bytes(), ix.digests_to_bytes())
    assert again == ix
    off = len(ref) // 2
    assert read(again, comp, off, 4096) == ref[off : off + 4096]


def test_multi_member_checkpoints_and_cross_member_reads(work: Path) -> None:
    tar = work / "small.tar"
    ref, comp = tar.read_bytes(), multi_member(tar)
    ix = build(comp, span=256 << 10, span_out=256 << 10)
    third = len(ref) // 3
    # A read that starts in member 1 and ends in member 3 (crossing the empty member 2).
    for off in (third - 10, third - 300000, third - 1):
        assert read(ix, comp, off, 400000) == ref[off : off + 400000]


def test_go_style_final_empty_block_reads_to_the_end(work: Path) -> None:
    tar = work / "small.tar"
    ref, comp = tar.read_bytes(), go_like(tar)
    # span_out=1: a checkpoint at every block boundary, including the one at the very end.
    ix = build(comp, span=None, span_out=1)
    assert ix.points[-1].out == len(ref)
    for n in (1, 4096, 300000):
        assert read(ix, comp, len(ref) - n, n) == ref[-n:]


def test_empty_stream(work: Path) -> None:
    comp = gzip.compress(b"")
    ix = build(comp)
    assert ix.uncomp_size == 0 and read(ix, comp, 0, 0) == b""


# ---- verification --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gz6(work: Path) -> tuple[bytes, bytes, zran.Index]:
    tar = work / "small.tar"
    ref, comp = tar.read_bytes(), gnu_gzip(6)(tar)
    return ref, comp, build(comp, span=SPAN, span_out=SPAN)


def corrupt_reads(ix: zran.Index, comp: bytes, ref: bytes, rnd: random.Random) -> None:
    """Flip one byte inside the range a read fetches: the read raises, it never returns wrong bytes."""
    size = len(ref)
    for _ in range(40):
        off = rnd.randrange(size)
        n = min(4096, size - off)
        i, start, end = ix.plan(off, n)
        bad = bytearray(comp[start:end])
        bad[rnd.randrange(len(bad))] ^= 1 << rnd.randrange(8)
        with pytest.raises(FormatError):  # Unverified is a FormatError
            zran.extract(ix, i, bytes(bad), off, n)


def test_flipped_compressed_byte_is_an_error(gz6) -> None:
    ref, comp, ix = gz6
    corrupt_reads(ix, comp, ref, random.Random(1))  # caught by the compressed span digests
    # Without them, the uncompressed span digests (or zlib) still catch every flip.
    corrupt_reads(dataclasses.replace(ix, comp_digests=None), comp, ref, random.Random(2))


def compressible_span(ix: zran.Index) -> int:
    """A checkpoint (not the first) in text, so the output right after it refers back into the window."""
    for k in range(1, len(ix.points) - 1):
        p, q = ix.points[k], ix.points[k + 1]
        if (
            2 * (q.cin - p.cin) < q.out - p.out < 20 * (q.cin - p.cin)
            and p.window.count(0) < zran.WINDOW // 4
        ):
            return k
    raise AssertionError("no text span in the test data")


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda p: dataclasses.replace(p, window=p.window[::-1]), id="window"),
        pytest.param(lambda p: dataclasses.replace(p, window=bytes(zran.WINDOW)), id="zero-window"),
        pytest.param(lambda p: dataclasses.replace(p, bits=(p.bits + 3) % 8), id="bits"),
        pytest.param(lambda p: dataclasses.replace(p, cin=p.cin + 1), id="cin"),
        pytest.param(lambda p: dataclasses.replace(p, out=p.out - 7), id="out"),
    ],
)
def test_tampered_checkpoint_is_an_error(gz6, tamper) -> None:
    ref, comp, ix = gz6
    k = compressible_span(ix)
    points = list(ix.points)
    points[k] = tamper(points[k])
    bad = dataclasses.replace(ix, points=points)
    off = points[k].out + 10
    with pytest.raises(FormatError):
        read(bad, comp, off, 4096)
    with pytest.raises(FormatError):  # the same, trusting only the uncompressed span digests
        read(dataclasses.replace(bad, comp_digests=None), comp, off, 4096)


def test_index_without_digests_needs_consent(gz6) -> None:
    ref, comp, ix = gz6
    bare = zran.Index.from_bytes(ix.to_bytes(), comp_size=len(comp))
    off = len(ref) // 3
    with pytest.raises(Unverified, match="no span digests"):
        read(bare, comp, off, 100)
    assert read(bare, comp, off, 100, unverified_ok=True) == ref[off : off + 100]
    # SOCI's compressed span digests (from a zTOC) make it verifiable, for the compressed bytes.
    soci = zran.Index.from_bytes(ix.to_bytes(), comp_size=len(comp), comp_digests=ix.comp_digests)
    assert read(soci, comp, off, 100) == ref[off : off + 100]


def test_short_range_is_an_error(gz6) -> None:
    ref, comp, ix = gz6
    i, start, end = ix.plan(1000, 100)
    with pytest.raises(FormatError, match="fetch the planned range"):
        zran.extract(ix, i, comp[start : end - 1], 1000, 100)
    loose = dataclasses.replace(ix, comp_digests=None, out_digests=None, uncomp_size=None, comp_size=None)
    with pytest.raises(FormatError, match="truncated or corrupt|ended"):
        zran.extract(
            loose, len(ix.points) - 1, comp[ix.points[-1].cin : -1000], len(ref) - 10, 10, unverified_ok=True
        )


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda c: c[: len(c) // 2], "truncated"),
        (lambda c: c[:-3], "truncated"),
        (lambda c: c + b"garbage!", "corrupt deflate data"),
        (lambda c: c[:5000] + bytes([c[5000] ^ 0xFF]) + c[5001:], "corrupt deflate data"),
        (lambda c: b"PK\x03\x04" + c[4:], "corrupt deflate data"),
        (lambda c: b"", "truncated"),
    ],
    ids=["half", "no-trailer", "trailing-garbage", "flipped", "not-gzip", "empty"],
)
def test_bad_streams_are_refused_when_building(gz6, mangle, message) -> None:
    ref, comp, ix = gz6
    with pytest.raises(FormatError, match=message):
        build(mangle(comp))


def test_header_crc_is_checked(work: Path) -> None:
    comp = bytearray(go_like(work / "small.tar"))
    comp[10 + 2 + 8 + 10 + 10] ^= 1  # the FHCRC field after FEXTRA, FNAME and FCOMMENT
    with pytest.raises(FormatError, match="header crc"):
        build(bytes(comp))


def test_inflate_bomb_is_capped() -> None:
    comp = gzip.compress(bytes(64 * MIB), 9)  # ~64 KiB that inflate to 64 MiB
    with pytest.raises(FormatError, match="more than 16777216 bytes"):
        build(comp, max_out=16 * MIB)


def test_inconsistent_blobs_are_refused(gz6) -> None:
    ref, comp, ix = gz6
    blob = ix.to_bytes()
    with pytest.raises(FormatError, match="claims"):
        zran.Index.from_bytes(blob[:-1])
    # A checkpoint claiming more output than its compressed bytes could ever inflate to (1032:1).
    k = 1
    pos = zran._ZINFO_HEADER.size + k * zran._ZINFO_POINT_SIZE
    cin, out, bits = zran._ZINFO_POINT.unpack_from(blob, pos)
    lying = bytearray(blob)
    zran._ZINFO_POINT.pack_into(lying, pos, cin, out + 1100 * (cin - ix.points[0].cin + 1), bits)
    with pytest.raises(FormatError, match="possible deflate stream"):
        zran.Index.from_bytes(bytes(lying))
    # Our digests belong to one zinfo blob only: a changed window byte breaks the binding.
    changed = bytearray(blob)
    changed[-1] ^= 1
    with pytest.raises(FormatError, match="another zinfo blob"):
        zran.Index.from_bytes(bytes(changed), ix.digests_to_bytes())


# ---- memory: a 200 MB stream generated on the fly, in a child under RLIMIT_AS -------------------


def generated_gzip(total: int) -> Callable[[int], bytes]:
    """read(n) over the gzip of `total` bytes of mixed data, compressed on the fly (never stored)."""
    rnd = random.Random(3)
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    text = b"".join(b"line %d of some compressible text\n" % k for k in range(40000))[:MIB]
    state = {"made": 0, "buf": b""}

    def read(n: int) -> bytes:
        while len(state["buf"]) < n and state["made"] is not None:
            if state["made"] >= total:
                state["buf"] += c.flush()
                state["made"] = None
                break
            k = state["made"] // MIB
            block = (rnd.randbytes(MIB), text, bytes(MIB))[k % 3]
            state["buf"] += c.compress(block)
            state["made"] += MIB
        out, state["buf"] = state["buf"][:n], state["buf"][n:]
        return out

    return read


def build_200mb() -> str:
    ix = zran.build_index(generated_gzip(200 * MIB))
    return f"ok {ix.uncomp_size} {len(ix.points)}"


SCENARIOS = {"build-200mb": build_200mb}


def test_build_of_a_200mb_stream_stays_in_bounded_memory() -> None:
    outcome, rss = run_limited("tests.unit.test_zran", "build-200mb")
    assert outcome.startswith(f"ok {200 * MIB} "), outcome
    assert rss < RSS_LIMIT_MIB, f"peak RSS {rss} MiB"


# ---- SOCI interop: SOCI's gzip_zinfo.c compiled here, called through ctypes ----------------------


class Soci:
    """SOCI's checkpoint code (tests/fixtures/soci/gzip_zinfo.c) as a shared library."""

    def __init__(self, so: Path):
        self.lib = lib = ctypes.CDLL(str(so))
        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.generate_zinfo_from_file.argtypes = [ctypes.c_char_p, i64, ctypes.POINTER(vp)]
        lib.get_blob_size.argtypes = [vp]
        lib.get_blob_size.restype = ctypes.c_uint
        lib.zinfo_to_blob.argtypes = [vp, vp]
        lib.blob_to_zinfo.argtypes = [vp, i64]
        lib.blob_to_zinfo.restype = vp
        lib.extract_data_from_buffer.argtypes = [vp, i64, vp, i64, vp, i64, ctypes.c_int]
        lib.pt_index_from_ucmp_offset.argtypes = [vp, i64]
        lib.free_zinfo.argtypes = [vp]

    def build(self, path: Path, span: int) -> bytes:
        zinfo = ctypes.c_void_p()
        n = self.lib.generate_zinfo_from_file(str(path).encode(), span, ctypes.byref(zinfo))
        assert n > 0, f"SOCI could not index {path}: {n}"
        try:
            buf = ctypes.create_string_buffer(self.lib.get_blob_size(zinfo))
            size = self.lib.zinfo_to_blob(zinfo, buf)
            return buf.raw[:size]
        finally:
            self.lib.free_zinfo(zinfo)

    def extract(self, blob: bytes, comp: bytes, offset: int, length: int) -> bytes:
        """Read like SOCI's daemon: span of the offset, its compressed range, extract_data_from_buffer."""
        zinfo = self.lib.blob_to_zinfo(blob, len(blob))
        assert zinfo, "SOCI refused the blob"
        try:
            ix = zran.Index.from_bytes(blob, comp_size=len(comp))
            i = self.lib.pt_index_from_ucmp_offset(zinfo, offset)
            start, _ = ix.span_range(i)
            _, end = ix.span_range(ix._end_point(i, offset + length) - 1)
            out = ctypes.create_string_buffer(length)
            got = self.lib.extract_data_from_buffer(
                comp[start:end], end - start, zinfo, offset, out, length, i
            )
            assert got == length, f"SOCI extracted {got} of {length} bytes at {offset}"
            return out.raw
        finally:
            self.lib.free_zinfo(zinfo)


@pytest.fixture(scope="module")
def soci(tmp_path_factory) -> Soci:
    if shutil.which("cc") is None or not Path("/usr/include/zlib.h").exists():
        pytest.fail("the SOCI interop test needs a C compiler and zlib headers (Debian: gcc, zlib1g-dev)")
    so = tmp_path_factory.mktemp("soci") / "libgzip_zinfo.so"
    run(["cc", "-shared", "-fPIC", "-O2", "-o", str(so), str(SOCI_SRC / "gzip_zinfo.c"), "-lz"])
    return Soci(so)


@pytest.mark.parametrize("producer", ["gzip-6", "go-like", "pgzip-like", "multi-member", "python-gzip"])
def test_soci_interop(work: Path, soci: Soci, producer: str) -> None:
    tar = work / ("big.tar" if producer == "gzip-6" else "small.tar")
    ref, comp = tar.read_bytes(), PRODUCERS[producer](tar)
    path = work / f"{producer}.gz"
    path.write_bytes(comp)
    rnd = random.Random(producer)
    reads = ranges(build(comp, span=None, span_out=SPAN), len(ref), rnd, 30)

    # Spacing on uncompressed bytes only: byte for byte SOCI's blob.
    theirs = soci.build(path, SPAN)
    ours = build(comp, span=None, span_out=SPAN)
    assert ours.to_bytes() == theirs

    # SOCI's blob, read by us (no digests of ours: compressed span digests as in a zTOC).
    ix = zran.Index.from_bytes(theirs, comp_size=len(comp), comp_digests=ours.comp_digests)
    for off, n in reads:
        assert read(ix, comp, off, n) == ref[off : off + n]
    # SOCI's zTOC span digest definition: sha256 of compressed [cin_k - (bits?1:0), cin_k+1).
    for k in (0, len(ix.points) // 2, len(ix.points) - 1):
        a, b = ix.span_range(k)
        assert hashlib.sha256(comp[a:b]).digest() == ours.comp_digests[k]

    # Our blob with checkpoints on compressed or uncompressed spacing, read by SOCI.
    mixed = build(comp, span=SPAN // 2, span_out=SPAN).to_bytes()
    for off, n in reads:
        assert soci.extract(mixed, comp, off, n) == ref[off : off + n]


def test_soci_v1_blob_is_read(work: Path) -> None:
    tar = work / "small.tar"
    ref, comp = tar.read_bytes(), python_gzip(tar)
    v2 = build(comp, span=None, span_out=SPAN).to_bytes()
    v1 = v2[: zran._ZINFO_HEADER.size] + v2[zran._ZINFO_HEADER.size + zran._ZINFO_POINT_SIZE :]
    old = zran.Index.from_bytes(v1, comp_size=len(comp))
    assert old.points[0] == zran.Checkpoint(10, 0, 0, bytes(zran.WINDOW))  # a bare 10-byte header
    assert read(old, comp, 12345, 1000, unverified_ok=True) == ref[12345:13345]


if __name__ == "__main__":
    limited_main(SCENARIOS, MEMORY_LIMIT)
