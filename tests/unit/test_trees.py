"""Tests of tests.harness.trees: scanning a real directory, the busybox listing, and the comparer."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.harness.trees import LISTING_SCRIPT, Node, Tree, assert_same, compare, parse_listing, scan

BUSYBOX = "/bin/busybox"
MTIME = 1_600_000_000
LONG_NAME = "long-" + "x" * 150  # one component > 100 bytes
DEEP_DIR = "deep/" + "/".join(["segment-" + "y" * 20] * 5)  # a path > 100 bytes
UNICODE_NAME = "ünï cødé|pipe ✓\u2028sep"  # space, "|" and a Unicode line separator
ODD_LINK = "odd' -> 'link"  # looks like the separator of busybox `stat -c %N`


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _make_sample(root: Path, monkeypatch: pytest.MonkeyPatch) -> Tree:
    """Create one of each node kind below ``root``; return the Tree that scan() should report."""
    (root / "d").mkdir()
    (root / "d/file").write_bytes(b"hello\n")
    os.chown(root / "d/file", 12, 34)
    os.setxattr(root / "d/file", "user.comment", b"\xff\x00bin")
    os.setxattr(root / "d/file", "trusted.overlay.x", b"y")
    os.setxattr(root / "d/file", "security.skipped", b"1")
    os.link(root / "d/file", root / "d/hard")
    (root / "setgid").write_bytes(b"")
    (root / LONG_NAME).write_bytes(b"long")
    (root / DEEP_DIR).mkdir(parents=True)
    (root / DEEP_DIR / UNICODE_NAME).write_bytes(b"unicode")
    os.symlink("d/file", root / "rel")
    os.symlink("/etc/passwd", root / "abs")
    os.symlink("nowhere/x", root / "dangling")
    os.symlink("t' -> 'x", root / ODD_LINK)
    os.setxattr(root / "rel", "trusted.link", b"l", follow_symlinks=False)
    os.mknod(root / "null", 0o20600, os.makedev(1, 3))
    os.mknod(root / "bigdev", 0o20600, os.makedev(300, 70000))
    os.mknod(root / "sda1", 0o60600, os.makedev(8, 1))
    os.mkfifo(root / "fifo")
    monkeypatch.chdir(root)  # a relative socket path stays under the 108-byte limit
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock")

    file_xattrs = {"user.comment": b"\xff\x00bin", "trusted.overlay.x": b"y"}
    file_node = Node("reg", 0o4755, 12, 34, size=6, sha256=_sha(b"hello\n"), mtime=MTIME, xattrs=file_xattrs)
    nodes = {
        "d": Node("dir", 0o1777, mtime=MTIME, xattrs={}),
        "d/file": file_node,
        "d/hard": file_node,
        "setgid": Node("reg", 0o2750, size=0, sha256=_sha(b""), mtime=MTIME, xattrs={}),
        LONG_NAME: Node("reg", 0o600, size=4, sha256=_sha(b"long"), mtime=MTIME, xattrs={}),
        f"{DEEP_DIR}/{UNICODE_NAME}": Node(
            "reg", 0o644, size=7, sha256=_sha(b"unicode"), mtime=MTIME, xattrs={}
        ),
        "rel": Node("symlink", 0o777, target="d/file", mtime=MTIME, xattrs={"trusted.link": b"l"}),
        "abs": Node("symlink", 0o777, target="/etc/passwd", mtime=MTIME, xattrs={}),
        "dangling": Node("symlink", 0o777, target="nowhere/x", mtime=MTIME, xattrs={}),
        ODD_LINK: Node("symlink", 0o777, target="t' -> 'x", mtime=MTIME, xattrs={}),
        "null": Node("char", 0o666, rdev=(1, 3), mtime=MTIME, xattrs={}),
        "bigdev": Node("char", 0o600, rdev=(300, 70000), mtime=MTIME, xattrs={}),
        "sda1": Node("block", 0o660, rdev=(8, 1), mtime=MTIME, xattrs={}),
        "fifo": Node("fifo", 0o640, mtime=MTIME, xattrs={}),
        "sock": Node("socket", 0o755, mtime=MTIME, xattrs={}),
    }
    parts = DEEP_DIR.split("/")
    for i in range(1, len(parts) + 1):
        nodes["/".join(parts[:i])] = Node("dir", 0o711, mtime=MTIME, xattrs={})
    for path, node in nodes.items():  # after all creation, so directory mtimes stay put
        if node.kind != "symlink":
            os.chmod(root / path, node.mode)
        os.utime(root / path, (MTIME, MTIME), follow_symlinks=False)
    # 1959-12-31T23:59:59.5Z: stat's whole seconds round down, as busybox prints tv_sec.
    os.utime(root / "setgid", ns=(0, -315_619_199_500_000_000))
    nodes["setgid"] = dataclasses.replace(nodes["setgid"], mtime=-315_619_200)
    return Tree(nodes, {frozenset({"d/file", "d/hard"})})


@pytest.fixture
def sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Tree]:
    root = tmp_path / "root"
    root.mkdir()
    return root, _make_sample(root, monkeypatch)


def _busybox_listing(root: Path) -> Tree:
    result = subprocess.run(
        [BUSYBOX, "sh", "-c", LISTING_SCRIPT, "sh", str(root)], capture_output=True, check=True
    )
    return parse_listing(os.fsdecode(result.stdout))


def _without_xattrs(tree: Tree) -> Tree:
    return Tree({p: dataclasses.replace(n, xattrs=None) for p, n in tree.nodes.items()}, tree.hardlinks)


def test_scan_reports_every_node_kind(sample: tuple[Path, Tree]) -> None:
    root, expected = sample
    actual = scan(root)
    assert actual.nodes == expected.nodes
    assert actual.hardlinks == expected.hardlinks


def test_scan_without_xattrs_leaves_them_unknown(sample: tuple[Path, Tree]) -> None:
    root, expected = sample
    assert scan(root, xattrs=False) == _without_xattrs(expected)


def test_busybox_listing_agrees_with_scan(sample: tuple[Path, Tree]) -> None:
    root, expected = sample
    listed = _busybox_listing(root)
    assert listed == _without_xattrs(scan(root))
    assert listed == _without_xattrs(expected)


def test_listing_uses_root_from_environment(sample: tuple[Path, Tree]) -> None:
    root, expected = sample
    env = {"LISTING_ROOT": str(root), "PATH": "/nonexistent"}  # applets only, no PATH lookup
    result = subprocess.run([BUSYBOX, "sh", "-c", LISTING_SCRIPT], env=env, capture_output=True, check=True)
    assert parse_listing(os.fsdecode(result.stdout)) == _without_xattrs(expected)


def test_other_mounts_are_listed_but_not_entered(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "here").write_bytes(b"")
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "mode=0700", "lazysnap-test", tmp_path / "mnt"]
    ).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        (tmp_path / "mnt" / "inside").write_bytes(b"")
        assert sorted(scan(tmp_path).nodes) == ["here", "mnt"]
        assert scan(tmp_path).nodes["mnt"].mode == 0o700  # the mounted root, as find -xdev reports it
        assert sorted(scan(tmp_path, one_filesystem=False).nodes) == ["here", "mnt", "mnt/inside"]
        assert _busybox_listing(tmp_path) == _without_xattrs(scan(tmp_path))
    finally:
        subprocess.run(["umount", tmp_path / "mnt"], check=True)


def test_parse_listing_rejects_truncated_output() -> None:
    with pytest.raises(ValueError, match="truncated"):
        parse_listing("@stat\n81a4|0|0|0|0|1|2|0|0|./f\n@sha256\n")


# --- compare --------------------------------------------------------------------------------------

REG = Node("reg", 0o644, size=3, sha256="aa" * 32, mtime=100, xattrs={"user.a": b"1"})
DIR = Node("dir", 0o755)


def _tree(nodes: dict[str, Node], hardlinks: Iterable[Iterable[str]] = ()) -> Tree:
    return Tree(nodes, {frozenset(group) for group in hardlinks})


def _diff(expected: Node, actual: Node, ignore_mtime_of: Iterable[str] = ("dir",)) -> list[str]:
    return compare(_tree({"f": expected}), _tree({"f": actual}), ignore_mtime_of=ignore_mtime_of)


def test_identical_trees_have_no_differences() -> None:
    tree = _tree({"etc": DIR, "etc/f": REG, "etc/l": Node("symlink", 0o777, target="f")}, [["etc/f", "x"]])
    assert compare(tree, _tree(dict(tree.nodes), [["x", "etc/f"]])) == []
    assert_same(tree, tree)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mode": 0o4755}, "f: mode 0644 != 4755"),
        ({"uid": 1, "gid": 2}, "f: owner 0:0 != 1:2"),
        ({"sha256": "bb" * 32}, f"f: content sha256 {'aa' * 32} != {'bb' * 32}"),
        ({"size": 4}, "f: size 3 != 4"),
        ({"mtime": 101}, "f: mtime 100 != 101"),
        ({"xattrs": {"user.a": b"2"}}, "f: xattr user.a b'1' != b'2'"),
        ({"xattrs": {}}, "f: xattr user.a missing (expected b'1')"),
        ({"xattrs": {"user.a": b"1", "trusted.b": b""}}, "f: xattr trusted.b unexpected (b'')"),
        ({"kind": "dir"}, "f: type reg != dir"),
    ],
)
def test_each_field_difference_is_reported(changes: dict[str, object], message: str) -> None:
    assert _diff(REG, dataclasses.replace(REG, **changes)) == [message]


def test_link_target_and_device_differences() -> None:
    link = Node("symlink", 0o777, target="busybox")
    assert _diff(link, dataclasses.replace(link, target="/bin/busybox")) == [
        "f: link target 'busybox' != '/bin/busybox'"
    ]
    dev = Node("char", 0o666, rdev=(1, 3))
    assert _diff(dev, dataclasses.replace(dev, rdev=(1, 5))) == ["f: rdev (1, 3) != (1, 5)"]


def test_unknown_fields_are_not_compared() -> None:
    unknown = dataclasses.replace(REG, size=None, sha256=None, mtime=None, xattrs=None)
    assert _diff(REG, unknown) == []
    assert _diff(unknown, REG) == []


def test_mtime_ignored_by_kind() -> None:
    old, new = Node("dir", 0o755, mtime=1), Node("dir", 0o755, mtime=2)
    assert _diff(old, new) == []
    assert _diff(old, new, ignore_mtime_of=()) == ["f: mtime 1 != 2"]
    assert _diff(REG, dataclasses.replace(REG, mtime=5), ignore_mtime_of=("reg",)) == []


def test_missing_unexpected_and_sorting() -> None:
    expected = _tree({"b": REG, "a": REG, "c/x": REG})
    actual = _tree({"c/x": dataclasses.replace(REG, mode=0o600), "d": REG, "a": REG})
    assert compare(expected, actual) == ["missing: b", "c/x: mode 0644 != 0600", "unexpected: d"]


def test_ignore_patterns_cover_subtrees() -> None:
    expected = _tree({"proc": Node("dir", 0o555), "etc": DIR, "procfs": REG})
    actual = _tree({"proc": DIR, "proc/1/status": REG, "etc": DIR, "etc/x/y.pyc": REG})
    assert compare(expected, actual, ignore=["proc", "*.pyc"]) == ["missing: procfs"]
    assert compare(expected, actual, ignore=["proc/*"]) == [
        "unexpected: etc/x/y.pyc",
        "proc: mode 0555 != 0755",
        "missing: procfs",
    ]


def test_hardlink_differences() -> None:
    nodes = {"a": REG, "b": REG, "c": REG, "d": REG}
    together, apart = _tree(nodes, [["a", "b"]]), _tree(nodes)
    assert compare(together, together) == []
    assert compare(together, apart) == ["hardlinks: expected {a, b} to be one inode, got {a} {b}"]
    assert compare(apart, together) == ["hardlinks: unexpected {a, b} as one inode"]
    assert compare(together, _tree(nodes, [["b", "c", "d"]])) == [
        "hardlinks: expected {a, b} to be one inode, got {a} {b, c, d}",
        "hardlinks: unexpected {b, c, d} as one inode",
    ]


def test_hardlinks_compared_among_present_unignored_paths() -> None:
    nodes = {"a": REG, "b": REG, "c": REG}
    three = _tree(nodes, [["a", "b", "c"]])
    assert compare(three, _tree(nodes, [["a", "b"]]), ignore=["c"]) == []
    assert compare(three, _tree({"a": REG, "b": REG}, [["a", "b"]])) == ["missing: c"]
    assert compare(three, _tree({"a": REG, "b": REG})) == [
        "missing: c",
        "hardlinks: expected {a, b} to be one inode, got {a} {b}",
    ]


def test_assert_same_lists_and_caps_differences() -> None:
    expected = _tree({f"f{i:03}": REG for i in range(60)})
    with pytest.raises(AssertionError) as info:
        assert_same(expected, _tree({}), max_lines=50)
    lines = str(info.value).splitlines()
    assert lines[0] == "60 tree difference(s):"
    assert lines[1:3] == ["missing: f000", "missing: f001"]
    assert lines[-1] == "... and 10 more"
    assert len(lines) == 52
    assert_same(expected, _tree({}), ignore=["f*"])
