"""The layer writers, checked byte by byte against formats.md and against what the blob holds: footers,
TOC fields and offsets (every chunk decompresses, from its own member, to data whose sha256 is its
chunkDigest), landmarks and prioritized order, the tar-split stream, and that the blob stays an ordinary
layer that `gzip -dc` / `zstd -dc` turn into the same tar (header bytes unchanged)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import subprocess
import tarfile
import zlib

import pytest
import trio
import zstandard

from fuse.formats.spec import ESTARGZ, ESTARGZ_ZSTD, FORMATS, ZSTD_CHUNKED
from snapshotter.convert.tar import TarFormatError, ustar_header
from snapshotter.convert.tarsplit import crc64_iso_reference
from snapshotter.convert.writer import (
    LayerResult,
    WriteOptions,
    WriterError,
    convert_bytes,
    estargz_footer,
)
from tests.harness import images as im

CHUNK = 64 << 10
BIG = im.pseudo_random(CHUNK * 3 + 1000, seed=11)  # three full chunks and a partial one
EXACT = im.pseudo_random(CHUNK, seed=12)  # exactly one chunk
ZEROS = im.zero_runs(CHUNK * 4, seed=13, gap=CHUNK * 2, island=1000)  # zeros runs of ~127 KiB


def rich_layer() -> im.Layer:
    """Every kind of entry a layer can hold, parents missing for some, names unicode and long."""
    return im.Layer(
        [
            im.Dir("bin"),
            im.File("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755),
            im.Symlink("bin/sh", "tool"),
            im.Hardlink("bin/tool-link", "bin/tool"),
            im.Dir("etc", mode=0o750, uid=5, gid=6),
            im.File("etc/secret", b"s3cret\n", mode=0o600, gid=42),
            im.File("etc/attrs", b"x", xattrs={"user.b": b"\x00\x01\xff", "user.a": b"value"}),
            im.Dir("tmp", mode=0o1777),
            im.File("usr/bin/setuid", b"#!/bin/sh\n", mode=0o4755),  # no usr/, usr/bin/ entries
            im.File("data/empty", b""),
            im.File("data/big", BIG),
            im.File("data/exact", EXACT),
            im.File("data/zeros", ZEROS),
            im.File("data/ünïcödé ✓ name", b"unicode\n", uid=1000, gid=1000, mtime=1_600_000_000),
            im.File("data/" + "long-name-" * 12, b"a name over 100 bytes\n"),
            im.Symlink("data/" + "long-target", "x" * 150),
            im.CharDev("dev/null", 1, 3),
            im.BlockDev("dev/loop", 7, 0),
            im.Fifo("dev/fifo"),
            im.Whiteout("old/gone"),
            im.Opaque("opaque"),
            im.File("opaque/visible", b"only this"),
        ]
    )


# --- reading what a writer produced (independent of the writer) ----------------------------------------


def members(blob: bytes, end: int) -> dict[int, tuple[int, bytes]]:
    """gzip members in blob[:end]: offset -> (end offset, decompressed bytes)."""
    out = {}
    pos = 0
    while pos < end:
        d = zlib.decompressobj(31)
        data = d.decompress(blob[pos:end])
        assert d.eof, f"gzip member at {pos} is not complete"
        nxt = end - len(d.unused_data)
        out[pos] = (nxt, data)
        pos = nxt
    return out


def frames(blob: bytes) -> dict[int, tuple[int, bytes | None]]:
    """zstd frames: offset -> (end offset, decompressed bytes, or None for a skippable frame)."""
    out: dict[int, tuple[int, bytes | None]] = {}
    pos = 0
    while pos < len(blob):
        if blob[pos : pos + 4] == b"\x50\x2a\x4d\x18":
            (length,) = struct.unpack("<I", blob[pos + 4 : pos + 8])
            out[pos] = (pos + 8 + length, None)
            pos += 8 + length
            continue
        assert blob[pos : pos + 4] == b"\x28\xb5\x2f\xfd", f"no zstd frame at {pos}"
        d = zstandard.ZstdDecompressor().decompressobj()
        data = d.decompress(blob[pos:])
        nxt = len(blob) - len(d.unused_data)
        out[pos] = (nxt, data)
        pos = nxt
    return out


def read_toc(blob: bytes, fmt: str) -> tuple[dict, bytes, int]:
    """(TOC, TOC JSON bytes, where the data ends) found from the footer alone."""
    if fmt == ESTARGZ:
        footer = blob[-51:]
        toc_offset = int(footer[16:32], 16)
        tar = zlib.decompressobj(31).decompress(blob[toc_offset:-51])
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            assert t.getnames() == ["stargz.index.json"]
            raw = t.extractfile("stargz.index.json").read()
        return json.loads(raw), raw, toc_offset
    if fmt == ESTARGZ_ZSTD:
        off, clen, ulen, kind = struct.unpack("<QQQQ", blob[-40:-8])
    else:
        off, clen, ulen, kind = struct.unpack("<QQQQ", blob[-64:-32])
    raw = zstandard.ZstdDecompressor().decompress(blob[off : off + clen])
    assert (len(raw), kind) == (ulen, 1)
    return json.loads(raw), raw, off - 8


def decompress(blob: bytes, fmt: str) -> bytes:
    """What an ordinary runtime gets from the blob: `gzip -dc` or `zstd -dc`."""
    tool = ["gzip", "-dc"] if fmt == ESTARGZ else ["zstd", "-dc"]
    p = subprocess.run(tool, input=blob, capture_output=True, check=True)
    return p.stdout


def convert(tar: bytes, fmt: str, **kw) -> tuple[bytes, LayerResult]:
    return convert_bytes(tar, WriteOptions(format=fmt, chunk_size=kw.pop("chunk_size", CHUNK), **kw))


def tar_headers(tar: bytes) -> list[tuple[str, bytes]]:
    """(name, raw header blocks incl. extension headers) of each member, by offsets tarfile reports."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        prev_end = 0
        for m in t.getmembers():
            out.append((m.name, tar[prev_end : m.offset_data]))
            prev_end = m.offset_data + (m.size + 511) // 512 * 512
    return out


# --- footers ---------------------------------------------------------------------------------------------


def test_estargz_footer_is_byte_exact() -> None:
    footer = estargz_footer(0x1234ABCD)
    expected = (
        bytes.fromhex("1f8b0804000000000" + "0ff")  # gzip header with FEXTRA, OS unknown
        + struct.pack("<H", 26)
        + b"SG"
        + struct.pack("<H", 22)
        + b"000000001234abcdSTARGZ"
        + bytes.fromhex("010000ffff")
        + bytes(8)
    )
    assert footer == expected and len(footer) == 51
    assert zlib.decompressobj(31).decompress(footer) == b""  # an empty member, valid gzip


@pytest.mark.parametrize("fmt", FORMATS)
def test_footer_points_at_the_toc(fmt: str) -> None:
    blob, result = convert(rich_layer().tar(), fmt)
    toc, raw, data_end = read_toc(blob, fmt)
    if fmt == ESTARGZ:
        assert blob[-51:] == estargz_footer(data_end)
        assert result.toc_digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    elif fmt == ESTARGZ_ZSTD:
        tail = blob[-48:]
        assert tail[:8] == b"\x50\x2a\x4d\x18" + struct.pack("<I", 40)
        assert tail[-8:] == bytes.fromhex("476e556c496e5578")  # "GnUlInUx"
        off, clen, ulen, kind = struct.unpack("<QQQQ", tail[8:40])
        assert blob[off - 8 : off] == b"\x50\x2a\x4d\x18" + struct.pack("<I", clen)
        assert off + clen == len(blob) - 48
        assert result.annotations["io.containers.zstd-chunked.manifest-position"] == f"{off}:{clen}:{ulen}:1"
        assert result.toc_digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    else:
        tail = blob[-72:]
        assert tail[:8] == b"\x50\x2a\x4d\x18" + struct.pack("<I", 64)
        assert tail[-8:] == bytes.fromhex("474e556c496e5578")  # "GNUlInUx"
        off, clen, ulen, kind, s_off, s_len, s_ulen = struct.unpack("<7Q", tail[8:64])
        assert kind == 1
        compressed_toc = blob[off : off + clen]
        assert result.toc_digest == "sha256:" + hashlib.sha256(compressed_toc).hexdigest()
        a = result.annotations
        assert a["io.github.containers.zstd-chunked.manifest-position"] == f"{off}:{clen}:{ulen}:1"
        assert a["io.github.containers.zstd-chunked.manifest-checksum"] == result.toc_digest
        assert a["io.github.containers.zstd-chunked.tarsplit-position"] == f"{s_off}:{s_len}:{s_ulen}"
        assert a["io.containers.zstd-chunked.manifest-checksum"] == result.toc_digest
        assert s_off == off + clen + 8 and s_off + s_len == len(blob) - 72
        assert "containerd.io/snapshot/stargz/toc.digest" not in a  # containers/storage refuses both
        split = blob[s_off : s_off + s_len]
        assert toc["tarSplitDigest"] == "sha256:" + hashlib.sha256(split).hexdigest()
    if fmt != ZSTD_CHUNKED:
        assert result.annotations["containerd.io/snapshot/stargz/toc.digest"] == result.toc_digest
    assert toc["version"] == 1
    assert result.annotations["io.containers.estargz.uncompressed-size"] == str(result.uncompressed_size)


# --- an ordinary layer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_blob_decompresses_to_the_same_tar(fmt: str) -> None:
    layer = rich_layer()
    tar = layer.tar()
    blob, result = convert(tar, fmt)
    raw = decompress(blob, fmt)
    assert result.digest == "sha256:" + hashlib.sha256(blob).hexdigest() and result.size == len(blob)
    assert result.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert result.uncompressed_size == len(raw)
    assert result.input_digest == layer.diff_id and result.input_size == len(tar)
    assert result.media_type.endswith("+gzip" if fmt == ESTARGZ else "+zstd")

    extra = [".no.prefetch.landmark"] + (["stargz.index.json"] if fmt == ESTARGZ else [])
    got = tar_headers(raw)
    want = tar_headers(tar)
    assert [n for n, _ in got] == extra[:1] + [n for n, _ in want] + extra[1:]
    assert got[1 : 1 + len(want)] == want  # every header block copied byte for byte
    with tarfile.open(fileobj=io.BytesIO(raw)) as out, tarfile.open(fileobj=io.BytesIO(tar)) as src:
        for m in src.getmembers():
            o = out.getmember(m.name)
            assert (o.type, o.mode, o.uid, o.gid, o.mtime, o.linkname) == (
                m.type,
                m.mode,
                m.uid,
                m.gid,
                m.mtime,
                m.linkname,
            )
            assert (o.devmajor, o.devminor, o.pax_headers) == (m.devmajor, m.devminor, m.pax_headers)
            if m.isreg():
                assert out.extractfile(o).read() == src.extractfile(m).read()
        landmark = out.getmember(".no.prefetch.landmark")
        assert out.extractfile(landmark).read() == b"\x0f"
    assert raw.endswith(bytes(1024))  # a proper end of archive


# --- the TOC agrees with the bytes -----------------------------------------------------------------------


def file_chunks(toc: dict, fmt: str) -> dict[str, list[tuple[int, int, int, str, dict]]]:
    """name -> [(blob offset, file offset, size, digest, entry)] for each chunk, in TOC order."""
    out: dict[str, list] = {}
    size = 0
    for e in toc["entries"]:
        if e["type"] == "reg":
            size = e.get("size", 0)
        if e["type"] not in ("reg", "chunk") or "offset" not in e:
            continue
        if fmt == ZSTD_CHUNKED and "chunkDigest" not in e:  # a single-chunk file
            out[e["name"]] = [(e["offset"], 0, size, e["digest"], e)]
            continue
        c_off = e.get("chunkOffset", 0)
        assert (e["type"] == "reg") == (c_off == 0)
        assert "innerOffset" not in e
        c_size = e.get("chunkSize") or (size - c_off)
        out.setdefault(e["name"], []).append((e["offset"], c_off, c_size, e["chunkDigest"], e))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_chunk_is_its_own_member_with_its_digest(fmt: str) -> None:
    layer = rich_layer()
    blob, _ = convert(layer.tar(), fmt)
    toc, _, data_end = read_toc(blob, fmt)
    units = members(blob, data_end) if fmt == ESTARGZ else {k: v for k, v in frames(blob).items() if v[1]}
    contents = {e.path: e.data for e in layer.entries if isinstance(e, im.File)}
    chunks = file_chunks(toc, fmt)
    assert set(chunks) == {p for p, d in contents.items() if d} | {".no.prefetch.landmark"}
    for name, parts in chunks.items():
        data = b"\x0f" if name == ".no.prefetch.landmark" else contents[name]
        assert sum(size for _, _, size, _, _ in parts) == len(data), name
        for offset, c_off, size, digest, entry in parts:
            assert offset in units, f"{name}: chunk at {c_off} does not start a member ({offset})"
            member = units[offset][1]
            piece = member[:size]
            assert piece == data[c_off : c_off + size], name
            assert digest == "sha256:" + hashlib.sha256(piece).hexdigest(), name
            if fmt == ZSTD_CHUNKED:
                assert member == piece  # the frame holds the chunk and nothing else
                assert (entry.get("chunkType") == "zeros") == (
                    piece == bytes(len(piece)) and size >= 64 << 10
                )
        if fmt == ZSTD_CHUNKED:  # endOffset: where the file's last frame ends
            head = next(e for e in toc["entries"] if e["name"] == name and e["type"] == "reg")
            assert head["endOffset"] == units[parts[-1][0]][0]
            assert head["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    big = chunks["data/big"]
    assert [c_off for _, c_off, _, _, _ in big] == [0, CHUNK, 2 * CHUNK, 3 * CHUNK]
    if fmt == ZSTD_CHUNKED:
        zeros = [e for *_, e in chunks["data/zeros"] if e.get("chunkType") == "zeros"]
        assert len(zeros) >= 2  # runs of zeros became chunks of their own


def test_estargz_toc_fields_as_stargz_writes_them() -> None:
    blob, _ = convert(rich_layer().tar(), ESTARGZ)
    toc, raw, _ = read_toc(blob, ESTARGZ)
    assert raw.startswith(b'{\n\t"version": 1,\n\t"entries": [\n\t\t{\n\t\t\t"name": ".no.prefetch.landmark"')
    by = {}
    for e in toc["entries"]:
        by.setdefault((e["name"], e["type"]), e)
    assert list(by[("bin/", "dir")].items()) == [
        ("name", "bin/"),
        ("type", "dir"),
        ("modtime", "2023-11-14T22:13:20Z"),
        ("mode", 0o755),
    ]
    assert by[("etc/", "dir")]["uid"] == 5 and by[("etc/", "dir")]["gid"] == 6
    assert by[("bin/sh", "symlink")]["linkName"] == "tool"
    assert by[("bin/tool-link", "hardlink")]["linkName"] == "bin/tool"
    assert "size" not in by[("bin/tool-link", "hardlink")]
    assert (by[("dev/null", "char")]["devMajor"], by[("dev/null", "char")]["devMinor"]) == (1, 3)
    assert by[("dev/loop", "block")]["devMajor"] == 7 and "devMinor" not in by[("dev/loop", "block")]
    assert by[("dev/fifo", "fifo")]["mode"] == 0o644
    attrs = by[("etc/attrs", "reg")]
    assert list(attrs["xattrs"].items()) == [("user.a", "dmFsdWU="), ("user.b", "AAH/")]
    assert list(attrs) == [
        "name",
        "type",
        "size",
        "modtime",
        "mode",
        "offset",
        "xattrs",
        "digest",
        "chunkDigest",
    ]
    empty = by[("data/empty", "reg")]
    assert empty["digest"] == "sha256:" + hashlib.sha256(b"").hexdigest()
    assert "offset" not in empty and "chunkDigest" not in empty and "size" not in empty
    assert by[("usr/bin/setuid", "reg")]["mode"] == 0o4755
    uni = by[("data/ünïcödé ✓ name", "reg")]
    assert (uni["uid"], uni["gid"], uni["modtime"]) == (1000, 1000, "2020-09-13T12:26:40Z")
    assert by[("old/.wh.gone", "reg")]["digest"] == "sha256:" + hashlib.sha256(b"").hexdigest()
    assert ("opaque/.wh..wh..opq", "reg") in by
    # chunkSize: on every chunk but a final partial one (0 = to the end of the file), as stargz
    big = [e for e in toc["entries"] if e["name"] == "data/big"]
    assert [e["type"] for e in big] == ["reg", "chunk", "chunk", "chunk"]
    assert [e.get("chunkSize") for e in big] == [CHUNK, CHUNK, CHUNK, None]
    assert list(big[1]) == ["name", "type", "offset", "chunkOffset", "chunkSize", "chunkDigest"]
    exact = by[("data/exact", "reg")]
    assert exact["chunkSize"] == CHUNK  # a file of exactly one chunk says so
    landmark = toc["entries"][0]
    assert landmark["size"] == 1 and "modtime" not in landmark
    assert landmark["digest"] == landmark["chunkDigest"] == "sha256:" + hashlib.sha256(b"\x0f").hexdigest()
    assert not any("NumLink" in e or "innerOffset" in e for e in toc["entries"])


def test_zstd_chunked_toc_fields_as_containers_storage_writes_them() -> None:
    blob, _ = convert(rich_layer().tar(), ZSTD_CHUNKED)
    toc, raw, _ = read_toc(blob, ZSTD_CHUNKED)
    assert raw.startswith(b'{"version":1,"entries":[{"type":"reg","name":".no.prefetch.landmark"')
    assert list(toc) == ["version", "entries", "tarSplitDigest"]
    by = {}
    for e in toc["entries"]:
        by.setdefault((e["name"], e["type"]), e)
    tool = by[("bin/tool", "reg")]
    assert list(tool) == ["type", "name", "mode", "size", "modtime", "digest", "offset", "endOffset"]
    assert tool["digest"] == "sha256:" + hashlib.sha256(b"#!/bin/sh\necho tool\n").hexdigest()
    assert tool["modtime"] == "2023-11-14T22:13:20Z"
    assert "digest" not in by[("data/empty", "reg")]  # containers/storage: no digest without data
    big = [e for e in toc["entries"] if e["name"] == "data/big"]
    assert [e.get("chunkSize") for e in big] == [CHUNK, CHUNK, CHUNK, 1000]  # every chunk has its size
    assert list(big[1]) == ["type", "name", "offset", "chunkSize", "chunkOffset", "chunkDigest"]
    assert by[("etc/attrs", "reg")]["xattrs"] == {"user.a": "dmFsdWU=", "user.b": "AAH/"}
    assert by[("dev/null", "char")]["devMajor"] == 1
    assert by[(".no.prefetch.landmark", "reg")]["modtime"] == "1970-01-01T00:00:00Z"


def test_zstd_chunked_tar_split_rebuilds_the_exact_tar() -> None:
    layer = rich_layer()
    blob, result = convert(layer.tar(), ZSTD_CHUNKED)
    raw = decompress(blob, ZSTD_CHUNKED)
    s_off, s_len, s_ulen = map(
        int, result.annotations["io.github.containers.zstd-chunked.tarsplit-position"].split(":")
    )
    lines = zstandard.ZstdDecompressor().decompressobj().decompress(blob[s_off : s_off + s_len])
    assert len(lines) == s_ulen
    contents = {e.path: e.data for e in layer.entries if isinstance(e, im.File)}
    contents[".no.prefetch.landmark"] = b"\x0f"
    rebuilt = bytearray()
    for position, line in enumerate(lines.splitlines()):
        e = json.loads(line)
        assert e["position"] == position
        if e["type"] == 2:
            rebuilt += base64.b64decode(e["payload"])
        else:
            assert e["type"] == 1
            if not e.get("size"):
                assert e["payload"] is None
                continue
            data = contents[e["name"]]
            assert base64.b64decode(e["payload"]) == crc64_iso_reference(data).to_bytes(8, "big")
            rebuilt += data
    assert bytes(rebuilt) == raw


# --- landmarks and prioritized files ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_prioritized_files_come_first_then_the_landmark(fmt: str) -> None:
    layer = rich_layer()
    wanted = ["/data/big", "usr/bin/setuid", "./bin/tool-link", "nowhere/missing", "etc/secret"]
    blob, result = convert(layer.tar(), fmt, prioritized=wanted)
    toc, _, _ = read_toc(blob, fmt)
    names = [e["name"] for e in toc["entries"] if e["type"] != "chunk"]
    landmark = names.index(".prefetch.landmark")
    # data/big (no data/ entry in the layer), usr/bin/setuid (no parents), the hard link after its
    # parent directory and its target, etc/secret after etc/
    assert names[:landmark] == [
        "data/big",
        "usr/bin/setuid",
        "bin/",
        "bin/tool",
        "bin/tool-link",
        "etc/",
        "etc/secret",
    ]
    original = [n for n, _ in tar_headers(layer.tar())]
    first = {n.rstrip("/") for n in names[:landmark]}
    assert [n.rstrip("/") for n in names[landmark + 1 :]] == [n for n in original if n not in first]
    assert ".no.prefetch.landmark" not in names
    assert result.prioritized_missing == ["nowhere/missing"]
    assert result.prioritized_found == ["/data/big", "usr/bin/setuid", "./bin/tool-link", "etc/secret"]
    # the prefetch region [0, landmark offset) holds every prioritized chunk
    landmark_offset = next(e for e in toc["entries"] if e["name"] == ".prefetch.landmark")["offset"]
    prio = [e for e in toc["entries"] if e["name"] in names[:landmark] and "offset" in e]
    assert prio and all(e["offset"] < landmark_offset for e in prio)
    # still the same files
    with tarfile.open(fileobj=io.BytesIO(decompress(blob, fmt))) as t:
        assert sorted(t.getnames()) == sorted(
            original + [".prefetch.landmark"] + (["stargz.index.json"] if fmt == ESTARGZ else [])
        )
        assert t.extractfile("data/big").read() == BIG


def test_no_prioritized_file_in_the_layer_means_no_prefetch() -> None:
    blob, result = convert(rich_layer().tar(), ESTARGZ, prioritized=["/not/here"])
    toc, _, _ = read_toc(blob, ESTARGZ)
    assert toc["entries"][0]["name"] == ".no.prefetch.landmark"
    assert result.prioritized_missing == ["/not/here"]


# --- odd inputs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_reconverting_drops_the_old_toc_and_landmarks(fmt: str) -> None:
    tar = rich_layer().tar()
    blob, first = convert(tar, fmt)
    again, second = convert(decompress(blob, fmt), fmt)
    assert again == blob  # the same members, the same output
    assert second.input_digest == first.diff_id


def test_layer_with_only_deep_paths_is_accepted() -> None:
    layer = im.Layer([im.File("a/b/c/d/file", b"deep"), im.Whiteout("x/y/z")])
    for fmt in FORMATS:
        blob, _ = convert(layer.tar(), fmt)
        toc, _, _ = read_toc(blob, fmt)
        assert [e["name"] for e in toc["entries"]] == [".no.prefetch.landmark", "a/b/c/d/file", "x/y/.wh.z"]


def test_empty_layer() -> None:
    for fmt in FORMATS:
        blob, result = convert(im.Layer([]).tar(), fmt)
        with tarfile.open(fileobj=io.BytesIO(decompress(blob, fmt))) as t:
            assert t.getnames()[0] == ".no.prefetch.landmark"
        assert result.entries == 1


def test_gnu_and_v7_headers() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        info = tarfile.TarInfo("gnu/" + "n" * 120)  # a GNU long name ('L' record)
        info.size = 3
        t.addfile(info, io.BytesIO(b"abc"))
        link = tarfile.TarInfo("gnu/link")
        link.type, link.linkname = tarfile.SYMTYPE, "t" * 130  # a GNU long link ('K' record)
        t.addfile(link)
    v7 = bytearray(tarfile.TarInfo("v7file").tobuf(format=tarfile.USTAR_FORMAT))
    v7[257:265] = bytes(8)  # no magic: a V7 header
    v7[148:156] = b"%06o\x00 " % (sum(v7[:148]) + 256 + sum(v7[156:]))
    tar = buf.getvalue()
    end = next(i for i in range(0, len(tar), 512) if tar[i : i + 1024] == bytes(1024))  # end of archive
    tar = tar[:end] + bytes(v7) + bytes(1024)
    blob, _ = convert(tar, ZSTD_CHUNKED)
    toc, _, _ = read_toc(blob, ZSTD_CHUNKED)
    names = [(e["name"], e.get("linkName")) for e in toc["entries"]]
    assert names == [
        (".no.prefetch.landmark", None),
        ("gnu/" + "n" * 120, None),
        ("gnu/link", "t" * 130),
        ("v7file", None),
    ]


def test_not_a_tar_is_refused_clearly() -> None:
    with pytest.raises(TarFormatError, match="not a tar archive"):
        convert(im.pseudo_random(4096, seed=1), ESTARGZ)
    truncated = rich_layer().tar()[:5000]
    with pytest.raises(TarFormatError, match="ends inside"):
        convert(truncated, ESTARGZ)


def test_sparse_files_are_refused_clearly() -> None:
    header = bytearray(ustar_header("sparse", 0))
    header[156:157] = b"S"
    header[148:156] = b"%06o\x00 " % (sum(header[:148]) + 256 + sum(header[156:]))
    with pytest.raises(TarFormatError, match="sparse"):
        convert(bytes(header) + bytes(1024), ESTARGZ)


def test_bad_options_are_refused_clearly() -> None:
    tar = rich_layer().tar()
    with pytest.raises(WriterError, match="unknown layer format 'gz'"):
        convert(tar, "gz")
    with pytest.raises(WriterError, match="compression level 12 is outside 1..9"):
        convert(tar, ESTARGZ, level=12)
    with pytest.raises(WriterError, match="chunk size 100"):
        convert(tar, ESTARGZ, chunk_size=100)


# --- our own reader agrees ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_lazysnap_reader_reads_every_file(fmt: str) -> None:
    """The format reader (fuse.formats, another module) opens the blob with the digest the manifest
    annotation carries and reads every file back, chunk by chunk, verified."""
    formats = pytest.importorskip("fuse.formats")
    layer = rich_layer()
    blob, result = convert(layer.tar(), fmt)

    async def read_all() -> dict[str, bytes]:
        opened = await formats.open_layer(formats.BytesSource(blob), result.toc_digest)
        assert opened.format == fmt
        return {e.path: await opened.read_file(e.path) for e in layer.entries if isinstance(e, im.File)}

    got = trio.run(read_all)
    assert got == {e.path: e.data for e in layer.entries if isinstance(e, im.File)}
