"""Tests of tests.harness.images: layer tars and blobs, image configs, and the expected-tree model."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections.abc import Callable

import pytest
import zstandard

from tests.harness.images import (
    DEFAULT_MTIME,
    BlockDev,
    CharDev,
    Dir,
    Entry,
    Fifo,
    File,
    Hardlink,
    Image,
    Layer,
    Opaque,
    Symlink,
    Whiteout,
    pseudo_random,
    push_image,
    zero_runs,
)
from tests.harness.trees import Node, Tree

LONG_PATH = "usr/share/" + "ü" * 40 + "/" + "n" * 120  # > 100 bytes and not ASCII
BINARY_XATTR = b"\x01\x00\x00\x02\xff\xfe"  # a security.capability-like value, not UTF-8

SAMPLE = Layer(
    [
        Dir("etc", mode=0o1777, uid=3, gid=4, mtime=5, xattrs={"user.dir": b"d"}),
        File(
            "etc/passwd",
            b"root:x:0:0\n",
            mode=0o4755,
            uid=1,
            gid=2,
            mtime=1234,
            xattrs={"user.b": BINARY_XATTR},
        ),
        File(LONG_PATH, b"long", xattrs={"trusted.t": b"text"}),
        Hardlink("etc/passwd-", "etc/passwd"),
        Symlink("bin/sh", "/usr/bin/busybox", uid=7),
        CharDev("dev/null", 1, 3),
        BlockDev("dev/sda", 8, 300),
        Fifo("run/pipe", mode=0o600),
        Whiteout("var/gone"),
        Opaque("opt"),
    ]
)


def _members(layer: Layer) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(layer.tar())) as tar:
        return tar.getmembers()


def _data(layer: Layer, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(layer.tar())) as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read()


def _tree(*layers: list[Entry]) -> Tree:
    return Image([Layer(entries) for entries in layers]).expected_tree()


# --- tar ------------------------------------------------------------------------------------------


def test_tar_has_exactly_the_described_members_in_order() -> None:
    names = [m.name for m in _members(SAMPLE)]
    assert names == [
        "etc",
        "etc/passwd",
        LONG_PATH,
        "etc/passwd-",
        "bin/sh",
        "dev/null",
        "dev/sda",
        "run/pipe",
        "var/.wh.gone",
        "opt/.wh..wh..opq",
    ]  # and no implied "bin", "dev", "usr", ... directories


def test_tar_member_metadata_round_trips() -> None:
    def meta(m: tarfile.TarInfo) -> tuple[bytes, int, int, int, int, str, int, int]:
        return m.type, m.mode, m.uid, m.gid, m.mtime, m.linkname, m.devmajor, m.devminor

    t = DEFAULT_MTIME
    assert {m.name: meta(m) for m in _members(SAMPLE)} == {
        "etc": (tarfile.DIRTYPE, 0o1777, 3, 4, 5, "", 0, 0),
        "etc/passwd": (tarfile.REGTYPE, 0o4755, 1, 2, 1234, "", 0, 0),
        LONG_PATH: (tarfile.REGTYPE, 0o644, 0, 0, t, "", 0, 0),
        # a hardlink carries its target's metadata: extractors apply it to the shared inode
        "etc/passwd-": (tarfile.LNKTYPE, 0o4755, 1, 2, 1234, "etc/passwd", 0, 0),
        "bin/sh": (tarfile.SYMTYPE, 0o777, 7, 0, t, "/usr/bin/busybox", 0, 0),
        "dev/null": (tarfile.CHRTYPE, 0o666, 0, 0, t, "", 1, 3),
        "dev/sda": (tarfile.BLKTYPE, 0o660, 0, 0, t, "", 8, 300),
        "run/pipe": (tarfile.FIFOTYPE, 0o600, 0, 0, t, "", 0, 0),
        "var/.wh.gone": (tarfile.REGTYPE, 0o644, 0, 0, 0, "", 0, 0),
        "opt/.wh..wh..opq": (tarfile.REGTYPE, 0o644, 0, 0, 0, "", 0, 0),
    }
    assert {(m.uname, m.gname) for m in _members(SAMPLE)} == {("", "")}
    assert {m.name: m.size for m in _members(SAMPLE) if m.size} == {"etc/passwd": 11, LONG_PATH: 4}
    assert _data(SAMPLE, "etc/passwd") == b"root:x:0:0\n"
    assert _data(SAMPLE, LONG_PATH) == b"long"


def test_tar_xattrs_are_pax_schily_records() -> None:
    prefix = "SCHILY.xattr."
    xattrs = {
        m.name: {k.removeprefix(prefix): v for k, v in m.pax_headers.items() if k.startswith(prefix)}
        for m in _members(SAMPLE)
    }
    assert xattrs["etc"] == {"user.dir": "d"}
    assert xattrs["etc/passwd"]["user.b"].encode("utf-8", "surrogateescape") == BINARY_XATTR
    assert xattrs[LONG_PATH] == {"trusted.t": "text"}
    assert xattrs["bin/sh"] == {}
    assert (
        b"SCHILY.xattr.user.b=" + BINARY_XATTR + b"\n" in SAMPLE.tar()
    )  # raw bytes, as Go's archive/tar reads them


def test_tar_is_posix_pax() -> None:
    assert SAMPLE.tar()[257:265] == b"ustar\x0000"  # POSIX ustar magic, as PAX uses
    assert {m.name: m.pax_headers.get("path") for m in _members(SAMPLE)}[LONG_PATH] == LONG_PATH
    assert Layer([File("a")]).tar()[156:157] == b"0"  # a short ASCII name needs no extended header


def test_layer_rejects_absolute_or_trailing_slash_paths() -> None:
    for path in ("/etc", "etc/", ""):
        with pytest.raises(ValueError):
            Layer([File(path)])


@pytest.mark.parametrize(
    ("compression", "decompress"),
    [
        ("gzip", gzip.decompress),
        ("zstd", lambda blob: zstandard.ZstdDecompressor().decompress(blob)),
        ("none", lambda blob: blob),
    ],
)
def test_blob_decompresses_to_the_tar(compression: str, decompress: Callable[[bytes], bytes]) -> None:
    blob = SAMPLE.blob(compression)
    assert decompress(blob) == SAMPLE.tar()
    assert Layer(SAMPLE.entries).blob(compression) == blob  # reproducible


def test_gzip_header_has_no_timestamp_and_diff_id_hashes_the_tar() -> None:
    assert SAMPLE.blob("gzip")[4:8] == b"\0\0\0\0"
    assert SAMPLE.diff_id == "sha256:" + hashlib.sha256(SAMPLE.tar()).hexdigest()
    with pytest.raises(ValueError):
        SAMPLE.blob("bzip2")


# --- data helpers, config, push options -----------------------------------------------------------


def test_data_helpers_are_deterministic() -> None:
    assert pseudo_random(1 << 20, 1) == pseudo_random(1 << 20, 1) != pseudo_random(1 << 20, 2)
    assert len(pseudo_random(12345, 0)) == 12345
    data = zero_runs(3 << 20, 7, gap=1 << 20, island=4096)
    assert len(data) == 3 << 20 and data == zero_runs(3 << 20, 7, gap=1 << 20, island=4096)
    for offset in (0, 1 << 20, 2 << 20):
        assert data[offset : offset + 4096].count(0) < 100
        assert data[offset + 4096 : offset + (1 << 20)] == bytes((1 << 20) - 4096)


def test_config() -> None:
    layers = [SAMPLE, Layer([File("x")])]
    config = Image(layers, cmd=["/bin/sh"], architecture="arm64", variant="v8").config()
    assert config["rootfs"] == {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
    assert len(config["history"]) == 2
    assert (config["architecture"], config["os"], config["variant"]) == ("arm64", "linux", "v8")
    assert config["config"] == {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["/bin/sh"],
    }
    assert Image(layers, env=["A=1"]).config(["sha256:" + "0" * 64])["config"] == {"Env": ["A=1"]}
    assert Image(layers).config(["sha256:" + "0" * 64])["rootfs"]["diff_ids"] == ["sha256:" + "0" * 64]


def test_push_rejects_bad_options_before_connecting() -> None:
    image = Image([SAMPLE])
    with pytest.raises(ValueError, match="zstd"):
        push_image("http://127.0.0.1:9", "r", "t", image, manifest_format="docker", compression="zstd")
    with pytest.raises(ValueError):
        push_image("http://127.0.0.1:9", "r", "t", image, manifest_format="v1")


# --- expected tree --------------------------------------------------------------------------------

IMPLICIT = Node("dir", 0o755, xattrs={})


def _reg(
    data: bytes,
    mode: int = 0o644,
    mtime: int = DEFAULT_MTIME,
    uid: int = 0,
    gid: int = 0,
    xattrs: dict[str, bytes] | None = None,
) -> Node:
    digest = hashlib.sha256(data).hexdigest()
    return Node("reg", mode, uid, gid, size=len(data), sha256=digest, mtime=mtime, xattrs=xattrs or {})


def test_expected_tree_of_one_layer() -> None:
    tree = Image([SAMPLE]).expected_tree()
    passwd = _reg(b"root:x:0:0\n", 0o4755, 1234, uid=1, gid=2, xattrs={"user.b": BINARY_XATTR})
    assert tree.nodes == {
        "etc": Node("dir", 0o1777, 3, 4, xattrs={"user.dir": b"d"}),  # dir mtimes are unknown
        "etc/passwd": passwd,
        "etc/passwd-": passwd,
        "usr": IMPLICIT,
        "usr/share": IMPLICIT,
        LONG_PATH.rsplit("/", 1)[0]: IMPLICIT,
        LONG_PATH: _reg(b"long", xattrs={"trusted.t": b"text"}),
        "bin": IMPLICIT,
        "bin/sh": Node("symlink", 0o777, uid=7, target="/usr/bin/busybox", mtime=DEFAULT_MTIME, xattrs={}),
        "dev": IMPLICIT,
        "dev/null": Node("char", 0o666, rdev=(1, 3), mtime=DEFAULT_MTIME, xattrs={}),
        "dev/sda": Node("block", 0o660, rdev=(8, 300), mtime=DEFAULT_MTIME, xattrs={}),
        "run": IMPLICIT,
        "run/pipe": Node("fifo", 0o600, mtime=DEFAULT_MTIME, xattrs={}),
        "var": IMPLICIT,  # parent of a whiteout
        "opt": IMPLICIT,  # an opaque directory exists
    }
    assert tree.hardlinks == {frozenset({"etc/passwd", "etc/passwd-"})}


def test_later_layers_override() -> None:
    tree = _tree(
        [
            Dir("d", mode=0o700),
            File("d/keep", b"1"),
            File("f", b"old"),
            Dir("was_dir"),
            File("was_dir/x"),
            File("was_file"),
        ],
        [
            Dir("d", mode=0o750),
            File("f", b"new", mode=0o600),
            File("was_dir", b"now a file"),
            Dir("was_file"),
        ],
    )
    assert tree.nodes == {
        "d": Node("dir", 0o750, xattrs={}),  # new attributes, children kept
        "d/keep": _reg(b"1"),
        "f": _reg(b"new", 0o600),
        "was_dir": _reg(b"now a file"),  # the directory's children are gone
        "was_file": Node("dir", 0o755, xattrs={}),
    }


def test_implicit_parent_replaces_a_lower_file() -> None:
    tree = _tree([File("a", b"file")], [File("a/b", b"x")])
    assert tree.nodes == {"a": IMPLICIT, "a/b": _reg(b"x")}


def test_whiteout_removes_lower_subtree_only() -> None:
    tree = _tree(
        [Dir("a"), File("a/x"), Dir("a/sub"), File("a/sub/y"), File("ab"), File("keep")],
        [Whiteout("a"), Whiteout("keep/missing/entry"), File("new"), Whiteout("new")],
    )
    # "ab" shares a prefix with "a" but is not below it; "new" is in the whiteout's own layer. The
    # directory holding a whiteout file exists, created implicitly, replacing a lower non-directory.
    assert sorted(tree.nodes) == ["ab", "keep", "keep/missing", "new"]
    assert tree.nodes["keep"] == tree.nodes["keep/missing"] == IMPLICIT
    assert sorted(_tree([Dir("a"), File("a/x")], [Whiteout("a")], [File("a/y")]).nodes) == ["a", "a/y"]


def test_opaque_hides_lower_children_but_keeps_this_layers() -> None:
    tree = _tree(
        [Dir("d", mode=0o700), File("d/old"), Dir("d/sub"), File("d/sub/deep"), File("sibling")],
        [File("d/new", b"n"), Opaque("d"), Dir("d/sub2")],
    )
    assert sorted(tree.nodes) == ["d", "d/new", "d/sub2", "sibling"]
    assert tree.nodes["d"] == Node("dir", 0o700, xattrs={})  # the directory itself stays as it was
    assert _tree([Dir("d", mode=0o700)], [Opaque("d"), Dir("d", mode=0o711)]).nodes == {
        "d": Node("dir", 0o711, xattrs={})
    }
    assert _tree([File("d")], [Opaque("d")]).nodes == {"d": IMPLICIT}


def test_hardlink_groups_follow_replacements() -> None:
    base = [File("a", b"data", mode=0o755), Hardlink("b", "a"), Hardlink("c", "a")]
    assert _tree(base).hardlinks == {frozenset({"a", "b", "c"})}
    assert _tree(base).nodes["c"] == _reg(b"data", 0o755)
    assert _tree(base, [File("a", b"new")]).hardlinks == {frozenset({"b", "c"})}
    assert _tree(base, [File("a"), Whiteout("b")]).hardlinks == set()
    assert _tree(base, [Hardlink("d", "b")]).hardlinks == {frozenset({"a", "b", "c", "d"})}
    moved = _tree([File("x", b"1"), File("y", b"2"), Hardlink("l", "x")], [Hardlink("l", "y")])
    assert moved.hardlinks == {frozenset({"y", "l"})}
    assert moved.nodes["l"].sha256 == hashlib.sha256(b"2").hexdigest()


def test_hardlink_to_missing_or_directory_target_is_an_error() -> None:
    with pytest.raises(ValueError):
        _tree([Hardlink("b", "a")])
    with pytest.raises(ValueError):
        _tree([Dir("a"), Hardlink("b", "a")])
