"""The writers as streams: memory stays bounded for a 200 MB layer read from a pipe-like source (in a child
process, so its peak RSS is its own), the output does not depend on the number of threads, and the
tar-split CRC-64 is Go's crc64 ISO."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from fuse.formats.spec import FORMATS
from snapshotter.convert.tar import TarFormatError
from snapshotter.convert.tarsplit import Crc64Iso, crc64_iso_reference
from snapshotter.convert.writer import WriteOptions, convert_bytes, write_layer
from tests.harness import images as im

REPO = Path(__file__).resolve().parents[2]

# A child process: a generated tar of ~200 MB (a few small files, one file of 200 MiB), produced piece by
# piece by a read()-only object, converted into a sink that keeps only a hash. It prints its peak RSS
# before and after the conversion.
CHILD = r"""
import hashlib, io, json, resource, sys, tarfile
from snapshotter.convert.writer import WriteOptions, write_layer
from tests.harness.procs import peak_rss_mib

fmt, prioritized = sys.argv[1], sys.argv[2:]
BLOCK = bytes(random_block := __import__("random").Random(1).randbytes(1 << 20))
BIG = 200 << 20

def header(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
    return info.tobuf(format=tarfile.PAX_FORMAT)

def pieces():
    for i in range(200):
        data = b"small file %d\n" % i
        yield header(f"small/{i}", len(data)) + data + bytes(-len(data) % 512)
    yield header("big/file", BIG)
    for i in range(BIG >> 20):
        yield BLOCK[i % 7 :] + BLOCK[: i % 7]  # 1 MiB, different each time: no long-range matches
    yield bytes(1024)

class Stream:
    def __init__(self):
        self.it, self.buf = pieces(), b""
    def read(self, n=-1):
        while len(self.buf) < n:
            nxt = next(self.it, None)
            if nxt is None:
                break
            self.buf += nxt
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

class Sink:
    def __init__(self):
        self.h, self.n = hashlib.sha256(), 0
    def write(self, b):
        self.h.update(b); self.n += len(b)

before = peak_rss_mib() << 10
sink = Sink()
result = write_layer(Stream(), sink, WriteOptions(format=fmt, level=1, prioritized=prioritized))
after = peak_rss_mib() << 10
print(json.dumps({"before_kb": before, "after_kb": after, "input": result.input_size, "written": sink.n,
                  "size": result.size, "digest": "sha256:" + sink.h.hexdigest() == result.digest,
                  "first": result.prioritized_found}))
"""


@pytest.mark.parametrize(
    ("fmt", "prioritized"),
    [("estargz", []), ("zstd-chunked", ["big/file", "small/3"])],
    ids=["estargz-streamed", "zstd-chunked-prioritized-spooled"],
)
def test_memory_stays_bounded_for_a_200mb_layer(fmt: str, prioritized: list[str]) -> None:
    p = subprocess.run(
        [sys.executable, "-c", CHILD, fmt, *prioritized],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["input"] > 200e6 and out["digest"] and out["written"] == out["size"]
    assert out["first"] == prioritized
    growth_mb = (out["after_kb"] - out["before_kb"]) / 1024
    assert growth_mb < 100, f"peak RSS grew by {growth_mb:.0f} MB converting a 200 MB layer"


def test_output_does_not_depend_on_threads() -> None:
    layer = im.Layer(
        [
            im.File(f"f/{i}", im.pseudo_random(random.Random(i).randrange(0, 300_000), seed=i))
            for i in range(40)
        ]
        + [im.File("big", im.pseudo_random(3 << 20, seed=99))]
    )
    for fmt in FORMATS:
        blobs = {
            convert_bytes(layer.tar(), WriteOptions(format=fmt, chunk_size=256 << 10, threads=t))[0]
            for t in (1, 2, 5)
        }
        assert len(blobs) == 1, f"{fmt}: different blobs for different thread counts"


def test_crc64_is_gos_crc64_iso() -> None:
    assert crc64_iso_reference(b"123456789") == 0xB90956C775A41001  # CRC-64/GO-ISO check value
    rng = random.Random(5)
    for n in [0, 1, 7, 8, 9, 63, 64, 65, 511, 4096, 5000, 70_000, 300_001]:
        data = rng.randbytes(n)
        whole = Crc64Iso()
        whole.update(data)
        assert whole.value() == crc64_iso_reference(data), n
        split = Crc64Iso()
        cuts = sorted(rng.randrange(0, n + 1) for _ in range(4))
        for a, b in zip([0, *cuts], [*cuts, n], strict=True):
            split.update(data[a:b])
        assert split.digest() == whole.digest() == whole.value().to_bytes(8, "big"), n


@pytest.mark.parametrize("fmt", FORMATS)
def test_converter_reads_accelerated_sources(fmt: str) -> None:
    """The converter's decompression of source layers: multi-member gzip, multi-frame zstd with
    skippable frames (an accelerated layer as the source) give back the tar, and a cut blob fails."""
    from snapshotter.convert.converter import open_decompressed

    tar = im.Layer([im.File("a", im.pseudo_random(300_000, seed=1)), im.File("b/c", b"c")]).tar()
    blob, first = convert_bytes(tar, WriteOptions(format=fmt, chunk_size=64 << 10))
    compression = "gzip" if fmt == "estargz" else "zstd"
    out = io.BytesIO()
    again = write_layer(
        open_decompressed(io.BytesIO(blob), compression), out, WriteOptions(format=fmt, chunk_size=64 << 10)
    )
    assert again.input_digest == first.diff_id and out.getvalue() == blob
    with pytest.raises((TarFormatError, zstandard.ZstdError)):
        write_layer(open_decompressed(io.BytesIO(blob[: len(blob) // 2]), compression), io.BytesIO())
