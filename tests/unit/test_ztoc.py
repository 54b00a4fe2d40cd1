"""fuse.formats.ztoc: zTOCs of layers made by GNU tar (GNU long names, PAX xattrs, ustar prefixes,
base-256 numbers, hardlinks, an entry appended again later, the "./" root) equal the tar as Python's
tarfile lists it; files read back through the index equal their content; the FlatBuffers document round
trips and interoperates with `flatc` and SOCI's schema (tests/fixtures/soci/ztoc.fbs) both ways; hostile
zTOCs and layers are refused with FormatError, and a zTOC whose entries share one huge string stays
within its memory budget (in a child under RLIMIT_AS).

    python -m tests.unit.test_ztoc SCENARIO   # what the memory child runs
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import flatbuffers
import pytest

from fuse.formats import FormatError, zran, ztoc
from fuse.formats.index import Limits
from tests.harness.procs import limited_main, run_limited

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "tests" / "fixtures" / "soci" / "ztoc.fbs"
MEMORY_LIMIT = 768 << 20  # address space of the memory child
KIND = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
LONG = "l" * 120  # longer than ustar's 100-byte name field


def run(*argv: str | Path, **kw) -> bytes:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, **kw).stdout


def gnu_tar(src: Path, *options: str) -> bytes:
    return run("tar", "-C", src, *options, "-cf", "-", ".")


def gzip6(data: bytes) -> bytes:
    return run("gzip", "-6", "-n", "-c", input=data)


def norm(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts) or "."


def expected(tar: bytes) -> dict[str, tuple]:
    """What an unpack creates, from Python's tarfile: name -> (type, size, offset, mode, uid, link, xattrs);
    a name listed again replaces the earlier entry."""
    out: dict[str, tuple] = {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for m in t.getmembers():
            kind = KIND[m.type]
            link = norm(m.linkname) if kind == "hardlink" else (m.linkname if kind == "symlink" else "")
            xattrs = {
                k.removeprefix("SCHILY.xattr."): v.encode("utf-8", "surrogateescape")
                for k, v in m.pax_headers.items()
                if k.startswith("SCHILY.xattr.")
            }
            size = m.size if kind == "reg" else 0
            out.pop(norm(m.name), None)
            out[norm(m.name)] = (kind, size, m.offset_data, m.mode & 0o7777, m.uid, link, xattrs)
    return out


def listing(z: ztoc.Ztoc) -> dict[str, tuple]:
    return {
        e.name: (e.type, e.size, e.uncompressed_offset, e.mode, e.uid, e.linkname, e.xattrs)
        for e in z.entries
    }


def build(blob: bytes, **kw) -> ztoc.Ztoc:
    return ztoc.build_ztoc(io.BytesIO(blob).read, what="test layer", **kw)


def read_file(z: ztoc.Ztoc, blob: bytes, e: ztoc.ZtocEntry) -> bytes:
    """A file's bytes, read as the daemon will: one planned compressed range, inflated from a checkpoint
    and checked against SOCI's compressed span digests."""
    i, start, end = z.index.plan(e.uncompressed_offset, e.size)
    return zran.extract(z.index, i, blob[start:end], e.uncompressed_offset, e.size)


def data_of_big(z: ztoc.Ztoc) -> ztoc.ZtocEntry:
    """Whichever of the hardlinked pair big/hard GNU tar stored with the data (directory order decides)."""
    return next(e for e in z.entries if e.name in ("big", "hard") and e.type == "reg")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A directory with GNU tar's hard cases: long names and link targets, a deep ustar-prefixable path,
    hardlinks, symlinks, xattrs, a setuid file, a fifo, and enough random data for several spans."""
    src = tmp_path / "src"
    deep = src / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"deep\n")
    (src / LONG).write_bytes(b"long name\n")
    (src / "big").write_bytes(random.Random(1).randbytes(3 << 20))
    (src / "zeros").write_bytes(bytes(5 << 20))
    (src / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "suid", 0o4755)
    os.link(src / "big", src / "hard")
    os.symlink(LONG, src / "sym")  # a link target longer than 100 bytes
    os.mkfifo(src / "fifo")
    os.setxattr(src / "big", "user.color", b"blue")
    os.setxattr(src / "big", "user.bin", b"\x00\xff")
    return src


@pytest.mark.parametrize("fmt", ["gnu", "posix", "ustar"])
def test_gnu_tar_layers_list_like_tarfile_and_read_back(tree: Path, fmt: str) -> None:
    options = ["--format=" + fmt] + (["--xattrs"] if fmt == "posix" else [])
    if fmt == "ustar":  # ustar cannot hold the long name or link target: only the prefixed path
        (tree / LONG).unlink()
        (tree / "sym").unlink()
    tar = gnu_tar(tree, *options)
    blob = gzip6(tar)
    z = build(blob, span_out=1 << 20)
    assert listing(z) == expected(tar)
    names = {e.name for e in z.entries}
    assert "." in names and "d" * 60 + "/" + "e" * 60 + "/f" in names
    if fmt == "posix":
        assert data_of_big(z).xattrs == {
            "user.color": b"blue",
            "user.bin": b"\x00\xff",
        }
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for e in z.entries:
            if e.type == "reg":
                assert read_file(z, blob, e) == t.extractfile("./" + e.name).read()
    assert z.index.blob_digest == hashlib.sha256(blob).digest()
    assert z.compressed_archive_size == len(blob) and z.uncompressed_archive_size == len(tar)
    assert len(z.index.points) >= 3  # several spans, so reads start from different checkpoints


def test_entry_appended_later_replaces_the_earlier_one(tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "layer.tar"
    run("tar", "-C", tree, "--format=gnu", "-cf", archive, ".")
    (tree / "suid").write_bytes(b"replaced, and longer than before\n")
    os.chmod(tree / "suid", 0o600)
    run("tar", "-C", tree, "--format=gnu", "-rf", archive, "./suid")  # GNU tar --append
    tar = archive.read_bytes()
    blob = gzip6(tar)
    z = build(blob)
    assert listing(z) == expected(tar)
    suid = [e for e in z.entries if e.name == "suid"]
    assert len(suid) == 1 and suid[0].mode == 0o600 and z.entries[-1] is suid[0]
    assert read_file(z, blob, suid[0]) == b"replaced, and longer than before\n"


def test_base256_uid_and_mtime(tree: Path) -> None:
    tar = gnu_tar(tree, "--format=gnu", "--owner=big:3000000", "--mtime=@99999999999")
    assert b"\x80" in tar[108:116]  # GNU tar wrote the uid in base-256 (over 7 octal digits)
    z = build(gzip6(tar))
    assert {e.uid for e in z.entries} == {3000000}
    assert listing(z) == expected(tar)
    assert z.entries[0].mtime == "5138-11-16T09:46:39Z"  # Go's RFC 3339, as SOCI writes it
    assert z.entries[0].mtime_ns == 99999999999 * 10**9


def pax_tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, **kw) -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type, i.size = kind, size
    for k, v in kw.items():
        setattr(i, k, v)
    return i


def test_pax_fractional_mtime_and_root_entry() -> None:
    tar = pax_tar([(info("./", tarfile.DIRTYPE, mode=0o700), None), (info("./a", size=1, mtime=1.25), b"x")])
    z = build(gzip6(tar))
    assert [(e.name, e.type) for e in z.entries] == [(".", "dir"), ("a", "reg")]
    assert z.entries[0].mode == 0o700
    assert z.entries[1].mtime == "1970-01-01T00:00:01.25Z" and z.entries[1].mtime_ns == 1_250_000_000


@pytest.mark.parametrize(
    "members, message",
    [
        ([(info("../etc/passwd", size=1), b"x")], "'..'"),
        ([(info("/etc/passwd", size=1), b"x")], "absolute"),
        ([(info("a/" + "n" * 256, size=1), b"x")], "longer than Linux allows"),
        ([(info("h", tarfile.LNKTYPE, linkname="missing"), None)], "not in the layer before it"),
        (
            [
                (info("f", size=1), b"x"),
                (info("h", tarfile.LNKTYPE, linkname="f"), None),
                (info("f", size=1), b"y"),
            ],
            "replaced after a hardlink",
        ),
        ([(info("d", tarfile.DIRTYPE), None), (info("d/f"), b""), (info("d"), b"")], "replaces a directory"),
        ([(info("f"), b""), (info("f/g"), b"")], "lies below 'f', which is a reg"),
        ([(info("s", tarfile.GNUTYPE_SPARSE), None)], "sparse"),
    ],
)
def test_layers_a_file_list_cannot_show_are_refused(members, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        build(gzip6(pax_tar(members)))


def test_corrupt_and_truncated_tar_streams_are_refused(tree: Path) -> None:
    tar = bytearray(gnu_tar(tree))
    tar[148] ^= 1  # the first header's checksum
    with pytest.raises(FormatError, match="checksum"):
        build(gzip6(bytes(tar)))
    tar = gnu_tar(tree)
    with pytest.raises(FormatError, match="ends inside an entry"):
        build(gzip6(tar[: 512 * 8 + 100]))


def test_entry_budget_limits() -> None:
    tar = pax_tar([(info(f"f{k}"), b"") for k in range(50)])
    with pytest.raises(FormatError, match="more than 10 entries"):
        build(gzip6(tar), limits=Limits(max_entries=10))
    with pytest.raises(FormatError, match="MiB of memory"):
        build(gzip6(tar), limits=Limits(max_index_bytes=4000))


# ---- serialization ---------------------------------------------------------------------------------


@pytest.fixture
def layer(tree: Path) -> tuple[bytes, ztoc.Ztoc]:
    tar = gnu_tar(tree, "--format=posix", "--xattrs")
    blob = gzip6(tar)
    return blob, build(blob, span_out=1 << 20)


def test_round_trip(layer) -> None:
    blob, z = layer
    back = ztoc.parse_ztoc(ztoc.to_bytes(z), what="round trip")
    assert back.entries == z.entries
    assert (back.version, back.build_tool) == (ztoc.VERSION, ztoc.BUILD_TOOL)
    assert back.index.to_bytes() == z.index.to_bytes() and back.index.comp_digests == z.index.comp_digests
    assert (back.compressed_archive_size, back.uncompressed_archive_size) == (
        len(blob),
        z.uncompressed_archive_size,
    )
    assert read_file(back, blob, data_of_big(back)) == random.Random(1).randbytes(3 << 20)


def utf8(xattrs: dict[str, bytes]) -> dict[str, bytes]:
    """The xattrs flatc's JSON can carry (its strings are UTF-8 text)."""
    out = {}
    for k, v in xattrs.items():
        try:
            v.decode()
        except UnicodeDecodeError:
            continue
        out[k] = v
    return out


def expected_json(z: ztoc.Ztoc) -> dict:
    """The zTOC as flatc prints it with --strict-json (defaults, such as zeros, are left out)."""

    def entry(e: ztoc.ZtocEntry) -> dict:
        d = {
            "name": e.name,
            "type": e.type,
            "uncompressed_offset": e.uncompressed_offset,
            "uncompressed_size": e.size,
            "linkname": e.linkname,
            "mode": e.mode,
            "uid": e.uid,
            "gid": e.gid,
            "uname": e.uname,
            "gname": e.gname,
            "mod_time": e.mtime,
            "devmajor": e.devmajor,
            "devminor": e.devminor,
            "xattrs": [
                {"key": "SCHILY.xattr." + k, "value": v.decode()} for k, v in sorted(utf8(e.xattrs).items())
            ],
        }
        return {k: v for k, v in d.items() if v != 0}

    info_ = {
        "max_span_id": len(z.index.points) - 1,
        "span_digests": ["sha256:" + d.hex() for d in z.index.comp_digests],
        "checkpoints": list(z.index.to_bytes()),
    }
    return {
        "version": z.version,
        "build_tool_identifier": z.build_tool,
        "compressed_archive_size": z.compressed_archive_size,
        "uncompressed_archive_size": z.uncompressed_archive_size,
        "toc": {"metadata": [entry(e) for e in z.entries]},
        "compression_info": {k: v for k, v in info_.items() if v != 0},
    }


def flatc() -> str:
    path = shutil.which("flatc")
    assert path, "flatc is missing: install Debian's flatbuffers-compiler (the Makefile's APT_PACKAGES)"
    return path


def test_flatc_decodes_our_ztoc_with_socis_schema(tmp_path: Path, tree: Path) -> None:
    os.removexattr(tree / "big", "user.bin")  # UTF-8 values only: flatc's JSON has no bytes type
    blob = gzip6(gnu_tar(tree, "--format=posix", "--xattrs"))
    z = build(blob, span_out=1 << 20)
    (tmp_path / "our.ztoc").write_bytes(ztoc.to_bytes(z))
    run(
        flatc(),
        "--json",
        "--strict-json",
        "--raw-binary",
        "-o",
        tmp_path,
        SCHEMA,
        "--",
        tmp_path / "our.ztoc",
    )
    assert json.loads((tmp_path / "our.json").read_text()) == expected_json(z)


def test_flatc_built_ztoc_parses_identically(tmp_path: Path, layer) -> None:
    blob, z = layer
    doc = expected_json(z)
    for m in doc["toc"]["metadata"]:  # as SOCI writes them: raw tar names and other PAX records kept
        m["name"] = "./" + m["name"] + ("/" if m["type"] == "dir" else "") if m["name"] != "." else "./"
        m["xattrs"] = [{"key": "mtime", "value": "1700000000.5"}, *m["xattrs"]]  # not an xattr: ignored
    (tmp_path / "doc.json").write_text(json.dumps(doc))
    run(flatc(), "--binary", "-o", tmp_path, SCHEMA, tmp_path / "doc.json")
    back = ztoc.parse_ztoc((tmp_path / "doc.bin").read_bytes(), what="flatc")
    assert back.entries == [dataclasses.replace(e, xattrs=utf8(e.xattrs)) for e in z.entries]
    assert back.index.to_bytes() == z.index.to_bytes() and back.index.comp_digests == z.index.comp_digests
    assert read_file(back, blob, data_of_big(back)) == random.Random(1).randbytes(3 << 20)


# ---- hostile zTOCs -----------------------------------------------------------------------------------


def tampered(z: ztoc.Ztoc, k: int, **changes) -> bytes:
    entries = list(z.entries)
    entries[k] = dataclasses.replace(entries[k], **changes)
    return ztoc.to_bytes(dataclasses.replace(z, entries=entries))


def test_hostile_ztocs_are_refused(layer) -> None:
    _, z = layer
    last = len(z.entries) - 1
    cases = {
        "'..'": tampered(z, last, name="../../etc/shadow"),
        "absolute": tampered(z, last, name="/etc/shadow"),
        "outside the": tampered(z, last, uncompressed_offset=z.uncompressed_archive_size + 512),
        "overlaps": tampered(z, last, uncompressed_offset=z.entries[last - 1].uncompressed_offset),
        "tar block boundary": tampered(z, last, uncompressed_offset=z.entries[last].uncompressed_offset + 1),
        "unknown type": tampered(z, last, type="socket"),
        "not an RFC 3339": tampered(z, last, mtime="yesterday"),
        "impossible archive sizes": ztoc.to_bytes(dataclasses.replace(z, compressed_archive_size=-1)),
        "not supported": ztoc.to_bytes(dataclasses.replace(z, version="9.9")),
    }
    fewer = _unchecked(z.index, points=z.index.points[:-1])  # one checkpoint fewer than span digests
    cases["span digests for max_span_id"] = ztoc.to_bytes(dataclasses.replace(z, index=fewer))
    swapped = _unchecked(z.index, points=[z.index.points[0], *z.index.points[:0:-1]])
    cases["does not follow checkpoint"] = ztoc.to_bytes(dataclasses.replace(z, index=swapped))
    cases["beyond the blob"] = ztoc.to_bytes(
        dataclasses.replace(z, compressed_archive_size=z.index.points[-1].cin - 1)
    )
    good = ztoc.to_bytes(z)
    cases["malformed zTOC"] = good[: len(good) // 2]  # truncated: offsets run past the end
    for message, blob in cases.items():
        with pytest.raises(FormatError, match=message):
            ztoc.parse_ztoc(blob, what="hostile")
    with pytest.raises(FormatError, match="over the limit"):
        ztoc.parse_ztoc(good, max_bytes=len(good) - 1)
    ztoc.parse_ztoc(good)  # the untampered document is fine


def _unchecked(index: zran.Index, **changes) -> zran.Index:
    """An Index with fields changed behind its validation (what a hostile writer can serialize)."""
    copy = object.__new__(zran.Index)
    copy.__dict__.update(index.__dict__ | changes)
    return copy


def shared_string_ztoc(entries: int, name_bytes: int) -> bytes:
    """A valid-looking zTOC whose entries all point at ONE long uname string: tiny on the wire, huge
    once each entry decodes its own copy."""
    b = flatbuffers.Builder(1 << 20)
    uname = b.CreateString("u" * name_bytes)
    kind = b.CreateString("reg")
    tables = []
    for k in range(entries):
        name = b.CreateString(f"f{k}")
        b.StartObject(14)
        b.PrependUOffsetTRelativeSlot(8, uname, 0)
        b.PrependInt64Slot(2, 512 * (2 * k + 1), 0)
        b.PrependUOffsetTRelativeSlot(1, kind, 0)
        b.PrependUOffsetTRelativeSlot(0, name, 0)
        tables.append(b.EndObject())
    vec = ztoc._offsets_vector(b, tables)
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, vec, 0)
    toc = b.EndObject()
    index = zran.Index([zran.Checkpoint(10, 0, 0, bytes(zran.WINDOW))], 1 << 22)
    points = b.CreateByteVector(index.to_bytes())
    digests = ztoc._offsets_vector(b, [b.CreateString("sha256:" + "0" * 64)])
    b.StartObject(4)
    b.PrependUOffsetTRelativeSlot(3, points, 0)
    b.PrependUOffsetTRelativeSlot(2, digests, 0)
    info_ = b.EndObject()
    version = b.CreateString(ztoc.VERSION)
    b.StartObject(6)
    b.PrependUOffsetTRelativeSlot(5, info_, 0)
    b.PrependUOffsetTRelativeSlot(4, toc, 0)
    b.PrependInt64Slot(3, 1024 * entries + 1024, 0)
    b.PrependInt64Slot(2, 1 << 20, 0)
    b.PrependUOffsetTRelativeSlot(0, version, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


def test_shared_strings_stay_within_the_memory_budget() -> None:
    """300,000 entries x a 4,000-byte shared uname would decode to 1.2 GB: refused by the entry budget,
    in a child whose address space is capped at MEMORY_LIMIT."""
    outcome, _ = run_limited("tests.unit.test_ztoc", "shared-strings")
    assert outcome.startswith("refused: ") and "MiB of memory" in outcome, outcome


def _child_shared_strings() -> str:
    blob = shared_string_ztoc(300_000, 4000)
    try:
        ztoc.parse_ztoc(blob, what="shared strings")
    except FormatError as e:
        return f"refused: {e}"
    return "parsed"


if __name__ == "__main__":
    limited_main({"shared-strings": _child_shared_strings}, MEMORY_LIMIT)
