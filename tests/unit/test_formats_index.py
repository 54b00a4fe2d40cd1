"""The TOC index: tree, attributes, overlay semantics, chunk plans, and every kind of lying TOC."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fuse.formats import FormatError, Unverified, build_index, decode_chunk
from fuse.formats.index import CHAR, DIR, GZIP, MAX_RATIO, REG, ROOT, SYMLINK, ZEROS, ZSTD, Chunk, Limits

END = 10_000_000  # data region end (TOC offset) used by these TOCs


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def index(*entries: dict, data_end: int = END):
    return build_index(
        {"version": 1, "entries": list(entries)}, data_end=data_end, storage=GZIP, what="test layer"
    )


def reg(name: str, size: int, offset: int = 100, **kw) -> dict:
    return {"name": name, "type": "reg", "size": size, "offset": offset, "mode": 0o644, **kw}


def test_tree_attributes_and_overlay_semantics() -> None:
    ix = index(
        {"name": "etc/", "type": "dir", "mode": 0o755, "modtime": "2023-11-14T22:13:20Z"},
        reg(
            "etc/passwd",
            10,
            mode=0o4755,
            uid=1,
            gid=2,
            modtime="2020-01-01T00:00:01.5Z",
            xattrs={"user.a": base64.b64encode(b"v").decode()},
        ),
        {"name": "etc/passwd-", "type": "hardlink", "linkName": "etc/passwd"},
        {"name": "bin/sh", "type": "symlink", "linkName": "/usr/bin/busybox"},  # no bin/ entry
        {"name": "dev/null", "type": "char", "devMajor": 1, "devMinor": 3, "mode": 0o666},
        {"name": "var/.wh.cache", "type": "reg", "size": 0, "mode": 0o644},
        {"name": "opt/.wh..wh..opq", "type": "reg", "size": 0},
        {"name": ".prefetch.landmark", "type": "reg", "size": 1, "offset": 5000, "chunkDigest": sha(b"\x0f")},
    )
    assert [n for n, _ in ix.children(ROOT)] == ["bin", "dev", "etc", "opt", "var"]
    passwd = ix.find("etc/passwd")
    st_ = ix.stat(passwd)
    assert (st_.kind, st_.mode, st_.uid, st_.gid, st_.size, st_.nlink) == (REG, 0o4755, 1, 2, 10, 2)
    assert st_.mtime_ns == 1_577_836_801_500_000_000
    assert ix.find("etc/passwd-") == passwd  # one inode, two names
    assert ix.stat(ix.find("etc")).mtime_ns == 1_700_000_000 * 10**9
    assert ix.xattr(passwd, "user.a") == b"v"
    sh = ix.find("bin/sh")
    assert ix.kind[sh] == SYMLINK and ix.readlink(sh) == "/usr/bin/busybox"
    assert ix.stat(ix.find("bin")).mode == 0o755  # implicit parent
    assert ix.stat(ix.find("dev/null")).rdev == (1, 3)
    wh = ix.stat(ix.find("var/cache"))
    assert (wh.kind, wh.rdev, wh.mode) == (CHAR, (0, 0), 0)
    assert ix.find("var/.wh.cache") is None
    opt = ix.find("opt")
    assert ix.xattr(opt, "trusted.overlay.opaque") == b"y" and ix.children(opt) == []
    assert ix.find(".prefetch.landmark") is None and ix.prefetch_end == 5000
    assert ix.stat(ROOT).nlink == 2 + 5  # . and .. plus five subdirectories
    assert ix.path(passwd) == "etc/passwd"


def test_inode_numbers_are_a_function_of_the_toc() -> None:
    entries = [reg("a/b", 1), {"name": "c", "type": "dir"}, reg("c/d", 2, offset=200)]
    one, two = index(*entries), index(*entries)
    assert [one.find(p) for p in ("a", "a/b", "c", "c/d")] == [two.find(p) for p in ("a", "a/b", "c", "c/d")]
    # TOC order, an implicit parent just before the first entry below it
    assert [one.find(p) for p in ("a", "a/b", "c", "c/d")] == [2, 3, 4, 5]


def test_chunks_plan_and_spans() -> None:
    ix = index(
        reg("big", 300, offset=100, chunkSize=100, chunkDigest=sha(b"1")),
        {"name": "big", "type": "chunk", "offset": 200, "chunkOffset": 100, "chunkSize": 100},
        {"name": "big", "type": "chunk", "offset": 300, "chunkOffset": 200, "chunkSize": 0},
        reg("small", 5, offset=400),
        {"name": "z", "type": "reg", "size": 50, "chunkType": "zeros"},
    )
    big = ix.find("big")
    assert list(ix.chunks_of(big)) == [0, 1, 2]
    assert list(ix.chunks_of(big, 150, 10)) == [1]
    assert list(ix.chunks_of(big, 99, 2)) == [0, 1]
    assert list(ix.chunks_of(big, 250, 1000)) == [2]
    assert list(ix.chunks_of(big, 300, 10)) == []
    spans = [(ix.chunk(c).start, ix.chunk(c).end) for c in range(4)]
    assert spans == [(100, 200), (200, 300), (300, 400), (400, END)]
    assert ix.chunk(2).size == 100 and ix.chunk(0).digest == hashlib.sha256(b"1").digest()
    assert ix.chunk(1).digest is None
    assert ix.chunk(4).storage == ZEROS


def test_end_offset_is_used_when_given() -> None:
    ix = index(reg("a", 10, offset=100, endOffset=150), reg("b", 10, offset=500))
    assert (ix.chunk(0).start, ix.chunk(0).end) == (100, 150)


BAD = [
    ("absolute", [reg("/etc/x", 1)], "absolute name"),
    ("dotdot", [reg("a/../../x", 1)], "'..'"),
    ("dup", [reg("a", 1), reg("a", 1, offset=200)], "duplicate name"),
    ("hardlink-nothing", [{"name": "l", "type": "hardlink", "linkName": "missing"}], "hardlink to nothing"),
    (
        "hardlink-dir",
        [{"name": "d", "type": "dir"}, {"name": "l", "type": "hardlink", "linkName": "d"}],
        "hardlink to a directory",
    ),
    ("negative-offset", [reg("a", 1, offset=-5)], "offset must be an integer"),
    ("offset-past-toc", [reg("a", 1, offset=END + 1)], "outside the data region"),
    ("offset-at-toc", [reg("a", 1, offset=END)], "outside the data region"),
    ("end-before-start", [reg("a", 10, offset=100, endOffset=50)], "endOffset"),
    (
        "gap",
        [
            reg("a", 200, chunkSize=100),
            {"name": "a", "type": "chunk", "offset": 300, "chunkOffset": 150, "chunkSize": 50},
        ],
        "expected 100",
    ),
    ("short", [reg("a", 200, chunkSize=100)], "cover 100 of its 200"),
    ("overlong-chunk", [reg("a", 10, chunkSize=100)], "does not fit"),
    ("orphan-chunk", [{"name": "a", "type": "chunk", "offset": 5, "chunkOffset": 0}], "does not follow"),
    ("absurd-size", [reg("a", 1 << 50)], "beyond the limit"),
    ("unknown-type", [{"name": "a", "type": "socket"}], "unknown type"),
    ("bad-mode", [reg("a", 1, mode="0644")], "mode must be"),
    ("huge-uid", [reg("a", 1, uid=1 << 32)], "uid must be"),
    ("bad-digest", [reg("a", 1, chunkDigest="md5:abc")], "unsupported digest"),
    ("bad-time", [reg("a", 1, modtime="yesterday")], "RFC 3339"),
    ("symlink-no-target", [{"name": "s", "type": "symlink"}], "linkName"),
    ("parent-is-file", [reg("a", 1), reg("a/b", 1, offset=200)], "not a directory"),
    ("bad-xattr", [reg("a", 1, xattrs={"user.x": "!!!"})], "base64"),
    ("null-xattr", [reg("a", 1, xattrs={"user.x": None})], "xattrs: Expected `str`, got `null`"),
    ("root-not-dir", [{"name": "./", "type": "reg", "size": 0}], "root must be a directory"),
    ("dot-root-not-dir", [{"name": ".", "type": "symlink", "linkName": "x"}], "root must be a directory"),
    ("dot-dot-after-dot-slash", [reg("./../x", 1)], "'..'"),
    ("dot-component", [reg("a/./b", 1)], "'.'"),
    ("absolute-root", [{"name": "/", "type": "dir"}], "absolute name"),
    ("component-256", [reg("d/" + "n" * 256, 1)], "a name component of 256 bytes: at most 255"),
    ("component-4096", [reg("n" * 4096, 1)], "a path must be under 4096 bytes"),
    ("component-utf8", [reg("\u00e9" * 128, 1)], "a name component of 256 bytes"),  # 128 characters
    ("path-4096", [reg("/".join(["n" * 240] * 17), 1)], "name of 4096 characters: a path must be under"),
    ("path-4096-utf8", [reg("/".join(["\u00e9" * 120] * 17), 1)], "name of 4096 bytes: a path must be under"),
    ("symlink-target-4096", [{"name": "s", "type": "symlink", "linkName": "t" * 4096}], "symlink target"),
    ("not-utf8", [reg("\ud800", 1)], "not valid UTF-8"),
]


@pytest.mark.parametrize(("entries", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_lying_tocs_are_clear_format_errors(entries: list[dict], message: str) -> None:
    with pytest.raises(FormatError, match="test layer: TOC entry") as e:
        index(*entries)
    assert message in str(e.value)


def test_not_a_toc() -> None:
    for doc in (None, [], {"entries": {}}, {"version": 1}):
        with pytest.raises(FormatError, match="not an object with an 'entries' list"):
            build_index(doc, data_end=END, storage=GZIP, what="test layer")
    with pytest.raises(FormatError, match="not an object"):
        index("just a string")  # type: ignore[arg-type]


def test_directories_listed_twice_merge() -> None:
    ix = index(
        {"name": "d", "type": "dir", "mode": 0o700},
        reg("d/f", 1),
        {"name": "d/", "type": "dir", "mode": 0o750},
    )
    assert ix.stat(ix.find("d")).mode == 0o750 and ix.find("d/f") is not None


def test_decode_and_verify_chunks() -> None:
    payload = b"hello world" * 100
    member = gzip.compress(b"prefix" + payload + b"tar header bytes")
    good = Chunk(0, GZIP, 0, len(member), 6, 0, len(payload), hashlib.sha256(payload).digest())
    assert decode_chunk(good, member, "t") == payload
    with pytest.raises(Unverified, match="does not match its digest"):
        decode_chunk(Chunk(0, GZIP, 0, len(member), 7, 0, len(payload), good.digest), member, "t")
    with pytest.raises(Unverified, match="no digest"):
        decode_chunk(Chunk(0, GZIP, 0, len(member), 6, 0, len(payload), None), member, "t")
    assert (
        decode_chunk(Chunk(0, GZIP, 0, len(member), 6, 0, len(payload), None), member, "t", True) == payload
    )
    with pytest.raises(FormatError, match="does not decompress"):
        decode_chunk(good, b"\x1f\x8bgarbage" + member[10:], "t")
    with pytest.raises(FormatError, match="fewer than"):
        decode_chunk(Chunk(0, GZIP, 0, len(member), 6, 0, len(payload) * 2, good.digest), member, "t")


_names = st.one_of(
    st.text(st.sampled_from("ab./-_é\x00 "), min_size=0, max_size=12),
    st.builds(lambda n, c: c * n, st.integers(250, 260), st.sampled_from(["a", "é", "./a"])),
)
_values = st.one_of(st.none(), st.integers(-5, 1 << 64), st.text(max_size=5), st.booleans())
_entry = st.fixed_dictionaries(
    {"name": _names, "type": st.sampled_from(["reg", "dir", "symlink", "hardlink", "chunk", "char", "x"])},
    optional={
        k: _values
        for k in (
            "size",
            "offset",
            "chunkOffset",
            "chunkSize",
            "mode",
            "uid",
            "endOffset",
            "devMajor",
            "innerOffset",
        )
    }
    | {"linkName": _names, "chunkDigest": _values, "modtime": _values, "chunkType": _values},
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_entry, max_size=8))
@example([{"name": "_", "type": "reg", "uid": 4_294_967_296}])  # found by this test: uid overflowed a column
@example([{"name": "a", "type": "reg", "size": 5, "offset": 9, "innerOffset": 1 << 40}])
@example([{"name": "./" + "é" * 128, "type": "dir"}, {"name": ".", "type": "dir", "mode": 5}])
@example([{"name": "l", "type": "symlink", "linkName": "a", "mode": 0o644}])
@example([{"name": "/".join("a" * 1500), "type": "dir"}])
def test_fuzzed_tocs_give_an_index_or_a_format_error(entries: list[dict]) -> None:
    try:
        ix = index(*entries)
    except FormatError:
        return
    # what was accepted is consistent: every file's chunks cover it exactly, every chunk lies in what
    # its member can inflate to, every name can be created by a full unpack, symlinks are 0777
    for ino in range(2, ix.inode_count + 1):
        if ix.kind[ino] == REG:
            ids = ix.chunks_of(ino)
            assert sum(ix.chunk(c).size for c in ids) == ix.size[ino]
        if ix.kind[ino] == SYMLINK:
            assert ix.stat(ino).mode == 0o777
        assert ix.kind[ix.parent[ino]] == DIR
        assert 0 < len(ix.names[ino].encode()) <= 255 and ix.names[ino] not in (".", "..")
        assert len(ix.path(ino).encode()) < 4096
    for cid in range(len(ix.c_start)):
        c = ix.chunk(cid)
        if c.storage != ZEROS:
            assert c.inner + c.size <= (c.end - c.start) * MAX_RATIO[GZIP]


def test_toc_json_round_trip_matches_digest_rules() -> None:
    # the index accepts exactly what json.loads gives for a real TOC document
    doc = json.loads(json.dumps({"version": 1, "entries": [reg("a", 3, chunkDigest=sha(b"abc"))]}))
    assert build_index(doc, data_end=END, storage=GZIP, what="t").find("a") == 2


def test_index_memory_per_entry_stays_under_300_bytes() -> None:
    import gc
    import tracemalloc

    from bench.index_build import synthetic_toc
    from fuse.formats.reader import decode_toc

    toc, data_end = synthetic_toc(20_000)
    doc = decode_toc(toc)
    tracemalloc.start()
    try:
        ix = build_index(doc, data_end=data_end + 10, storage=GZIP, what="t")
        del doc
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert ix.inode_count >= 18_000
    assert retained / 20_000 < 300


def test_a_whiteout_and_a_new_entry_of_the_same_name_in_one_layer() -> None:
    """A lower file replaced by a directory: the layer whites it out and adds the directory."""
    ix = index(
        {"name": "x/.wh.becomes-dir", "type": "reg", "size": 0},
        {"name": "x/becomes-dir/", "type": "dir", "mode": 0o750},
        reg("x/becomes-dir/inner", 1),
        reg("y/file", 1, offset=200),
        {"name": "y/.wh.file", "type": "reg", "size": 0},  # its own layer's entry is not whited out
    )
    d = ix.find("x/becomes-dir")
    assert ix.kind[d] == DIR and ix.stat(d).mode == 0o750 and ix.find("x/becomes-dir/inner")
    assert ix.kind[ix.find("y/file")] == REG


def test_names_a_full_unpack_can_create_are_accepted_up_to_the_kernel_limits() -> None:
    longest_component = "n" * 255
    longest_path = "/".join(["p" * 254] * 16)[:4095]  # 4095 bytes: PATH_MAX less the NUL
    ix = index(
        reg(longest_component, 1),
        reg("\u00e9" * 127 + "e", 1, offset=200),  # 255 bytes in UTF-8
        reg(longest_path, 1, offset=300),
        {"name": "s", "type": "symlink", "linkName": "t" * 4095},
    )
    assert ix.find(longest_component) and ix.find("\u00e9" * 127 + "e") and ix.find(longest_path)
    assert ix.stat(ix.find("s")).size == 4095


def test_a_root_entry_gives_the_root_its_attributes() -> None:
    """umoci writes the root as '.', GNU tar as './' (shared/reference/formats.md); both are the layer
    root, and './'-prefixed names are ordinary names."""
    for root in (".", "./", ""):
        ix = index(
            {
                "name": root,
                "type": "dir",
                "mode": 0o750,
                "uid": 7,
                "gid": 8,
                "modtime": "2023-11-14T22:13:20Z",
            },
            {"name": "./etc/", "type": "dir", "mode": 0o700},
            reg("./etc/x", 3),
        )
        st_ = ix.stat(ROOT)
        assert (st_.mode, st_.uid, st_.gid, st_.mtime_ns) == (0o750, 7, 8, 1_700_000_000 * 10**9), root
        assert [n for n, _ in ix.children(ROOT)] == ["etc"] and ix.stat(ix.find("etc")).mode == 0o700
        assert ix.stat(ix.find("etc/x")).size == 3 and ix.path(ix.find("etc/x")) == "etc/x"
        assert ix.implicit == set()


def test_symlinks_show_mode_0777_as_a_full_unpack_does() -> None:
    ix = index(
        {"name": "a", "type": "symlink", "linkName": "b", "mode": 0o644, "uid": 3},
        {"name": "c", "type": "symlink", "linkName": "b"},  # mode omitted (0)
    )
    assert ix.stat(ix.find("a")).mode == 0o777 and ix.stat(ix.find("a")).uid == 3
    assert ix.stat(ix.find("c")).mode == 0o777


def test_thousands_of_implicit_parents_need_no_recursion() -> None:
    """Issue 12: about 1,000 implicit parents raised RecursionError (not a FormatError)."""
    deep = "/".join(["d"] * 2000) + "/f"  # 4001 bytes
    ix = index(reg(deep, 1))
    f = ix.find(deep)
    assert f is not None and ix.path(f) == deep and len(ix.implicit) == 2000
    assert ix.inherit_implicit(lambda path: None) == 0
    with pytest.raises(FormatError, match="not a directory"):
        index(reg("d", 1), reg("d/" + "/".join(["e"] * 2000) + "/f", 1, offset=200))


def member_chunks(*chunks: tuple[int, int, int], start: int = 100, end: int = 100_100) -> list:
    """Regular files whose chunks (inner, size, toc_gap) share the compressed member [start, end);
    `toc_gap` directories are listed before each file (their tar headers lie in the member)."""
    out: list[dict] = [reg("next", 1, offset=end)]
    for n, (inner, size, dirs) in enumerate(chunks):
        out += [{"name": f"d{n}-{k}", "type": "dir"} for k in range(dirs)]
        out.append(reg(f"f{n}", size, offset=start, innerOffset=inner, chunkDigest=sha(bytes(size))))
    return out


def test_chunks_packed_in_one_member_are_accepted_when_their_geometry_is_honest() -> None:
    """eStargz with a minimal chunk size packs small files into one gzip member; innerOffset says where
    each payload starts after the tar headers before it."""
    ix = index(*member_chunks((0, 700, 0), (700 + 324 + 512, 100, 0), (1536 + 100 + 412 + 512 * 4, 5, 3)))
    assert [(ix.chunk(c).start, ix.chunk(c).end, ix.chunk(c).inner) for c in (1, 2, 3)] == [
        (100, 100_100, 0),
        (100, 100_100, 1536),
        (100, 100_100, 4096),
    ]
    dup = [reg("a", 10, offset=100, chunkDigest=sha(b"a")), reg("b", 10, offset=100, chunkDigest=sha(b"a"))]
    assert index(*dup, reg("n", 1, offset=300)).find("b")  # the same bytes named twice


HONEST_GAP = Limits().header_allowance


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (member_chunks((1 << 40, 1, 0)), "innerOffset 1099511627776 leaves"),
        (member_chunks((0, 100, 0), (HONEST_GAP + 101, 1, 0)), "more than the tar headers of 1 entries"),
        (member_chunks((0, 100, 0), (50, 100, 0)), "overlaps the chunk before it"),
        (member_chunks((0, 200_000, 0), end=150), "more than a member of 50 compressed bytes can inflate to"),
        (
            [reg("big", 1 << 30, offset=100, chunkSize=1 << 30), reg("next", 1, offset=101)],
            "member of 1 compressed bytes",
        ),
    ],
    ids=["inner-beyond-anything", "gap-beyond-headers", "overlap", "ratio-shared", "ratio-alone"],
)
def test_chunk_geometry_no_compressor_produces_is_refused(entries: list[dict], message: str) -> None:
    """Issue 12: an unbounded innerOffset made decoding inflate gigabytes from a 2 MB blob."""
    with pytest.raises(FormatError, match="the TOC does not describe this blob") as e:
        index(*entries)
    assert message in str(e.value)
    # the boundary: one entry's worth of tar headers between two payloads is honest
    assert index(*member_chunks((0, 100, 0), (HONEST_GAP + 100, 1, 0))).find("f1")


def test_the_index_stays_within_its_memory_budget() -> None:
    small = Limits(max_index_bytes=1 << 20)
    names = [reg(f"dir/{'n' * 200}{i:06d}", 0) for i in range(5000)]
    with pytest.raises(FormatError, match="would take more than 1 MiB by entry"):
        build_index({"entries": names}, data_end=END, storage=GZIP, what="t", limits=small)
    with pytest.raises(FormatError, match="more than 10 entries"):
        build_index(
            {"entries": [{"name": "d/", "type": "dir"}] * 11},
            data_end=END,
            storage=GZIP,
            what="t",
            limits=Limits(max_entries=10),
        )


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=3000) | st.builds(bytes, st.integers(0, 300_000)),
    st.sampled_from([GZIP, ZSTD]),
    st.integers(0, 400_000),
    st.integers(1, 400_000),
)
def test_fuzzed_chunk_decoding_takes_exactly_what_the_toc_says(
    payload: bytes, storage: int, inner: int, size: int
) -> None:
    """decode_chunk skips innerOffset bytes and returns the next `size`, verified; past the end of the
    member it is a FormatError (never a short or padded chunk, never another exception)."""
    import zstandard

    member = (
        gzip.compress(payload, mtime=0) if storage == GZIP else zstandard.ZstdCompressor().compress(payload)
    )
    want = payload[inner : inner + size]
    c = Chunk(0, storage, 0, len(member), inner, 0, size, hashlib.sha256(want).digest())
    if inner + size <= len(payload):
        assert decode_chunk(c, member, "t") == want
    else:
        with pytest.raises(FormatError, match="fewer than innerOffset"):
            decode_chunk(c, member, "t")
