"""A model of a file tree, ways to capture one, and an exact comparer.

A :class:`Tree` maps relative POSIX paths to :class:`Node` metadata (type, permission bits, owner,
content digest, symlink target, device numbers, mtime, xattrs) plus the groups of paths that share
an inode. Trees come from three sources:

* :func:`scan` walks a directory on the host (for example a snapshotter mount);
* :func:`parse_listing` reads the output of :data:`LISTING_SCRIPT`, a busybox shell script run inside
  a container that lists the container's root filesystem;
* ``tests.harness.images.Image.expected_tree`` predicts what a container should see.

:func:`compare` lists every difference between two trees, one readable line each, and
:func:`assert_same` turns a non-empty list into an ``AssertionError``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

_KIND_OF_FMT = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "reg",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}
_SKIPPED_XATTR_NAMESPACES = ("security.", "system.")


@dataclass(frozen=True)
class Node:
    """Metadata of one path. ``None`` in an optional field means "unknown": it is not compared."""

    kind: str  # "dir", "reg", "symlink", "char", "block", "fifo" or "socket"
    mode: int  # st_mode & 0o7777, including setuid/setgid/sticky
    uid: int = 0
    gid: int = 0
    size: int | None = None  # reg only
    sha256: str | None = None  # reg only: hex digest of the content
    target: str | None = None  # symlink only
    rdev: tuple[int, int] | None = None  # char/block only: (major, minor)
    mtime: int | None = None  # whole seconds (floor)
    xattrs: dict[str, bytes] | None = field(default=None, hash=False)  # kept out of the hash: a dict


@dataclass
class Tree:
    """Paths ("etc", "etc/passwd"; the root itself is not a key) and groups of hard-linked paths."""

    nodes: dict[str, Node] = field(default_factory=dict)
    hardlinks: set[frozenset[str]] = field(default_factory=set)


def _kind(st_mode: int) -> str:
    return _KIND_OF_FMT[stat.S_IFMT(st_mode)]


def _group_hardlinks(inode_of: dict[str, object]) -> set[frozenset[str]]:
    """Groups of >= 2 paths with the same inode key."""
    by_inode: dict[object, set[str]] = defaultdict(set)
    for path, inode in inode_of.items():
        by_inode[inode].add(path)
    return {frozenset(paths) for paths in by_inode.values() if len(paths) > 1}


def _read_xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # file system without xattr support
        return {}
    return {
        name: os.getxattr(path, name, follow_symlinks=False)
        for name in names
        if not name.startswith(_SKIPPED_XATTR_NAMESPACES)
    }


def _sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def scan(root: Path, *, xattrs: bool = True, one_filesystem: bool = True) -> Tree:
    """Capture the tree below ``root`` without following symlinks.

    With ``one_filesystem`` a mount point below ``root`` is listed (with the mounted root's
    metadata, like ``find -xdev``) but not descended into. Regular files are hashed; xattrs
    outside ``security.*`` and ``system.*`` are read unless ``xattrs`` is false (then ``None``).
    """
    top = os.fsdecode(root)
    root_dev = os.lstat(top).st_dev
    tree = Tree()
    inode_of: dict[str, object] = {}
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        with os.scandir(os.path.join(top, rel_dir)) as entries:
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                st = entry.stat(follow_symlinks=False)
                kind = _kind(st.st_mode)
                tree.nodes[rel] = Node(
                    kind=kind,
                    mode=stat.S_IMODE(st.st_mode),
                    uid=st.st_uid,
                    gid=st.st_gid,
                    size=st.st_size if kind == "reg" else None,
                    sha256=_sha256_file(entry.path) if kind == "reg" else None,
                    target=os.readlink(entry.path) if kind == "symlink" else None,
                    rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else None,
                    mtime=st.st_mtime_ns // 1_000_000_000,
                    xattrs=_read_xattrs(entry.path) if xattrs else None,
                )
                if kind == "dir":
                    if not one_filesystem or st.st_dev == root_dev:
                        pending.append(rel)
                elif st.st_nlink > 1:
                    inode_of[rel] = (st.st_dev, st.st_ino)
    tree.hardlinks = _group_hardlinks(inode_of)
    return tree


# LISTING_SCRIPT lists the directory given as $1, else $LISTING_ROOT, else "/", without crossing
# mounts (a mount point itself is listed, with the mounted root's metadata). Run it as
# `busybox sh -c "$LISTING_SCRIPT" sh [ROOT]`; it needs only busybox applets. Output, one record per
# line, paths relative to the root and prefixed with "./" (names may contain anything but "\n"):
#   @stat     then per path:          RAWMODE_HEX|UID|GID|SIZE|MTIME|DEV|INODE|MAJOR_HEX|MINOR_HEX|./PATH
#   @sha256   then per regular file:  SHA256_HEX  ./PATH      (sha256sum style, two spaces)
#   @symlink  then per symlink:       './PATH' -> 'TARGET'    (busybox `stat -c %N`, nothing escaped)
#   @end      marks complete output
# The path is the last field of a record, so it may contain "|". RAWMODE_HEX is st_mode in hex
# (`%f`: type and permission bits); MTIME is whole seconds, rounded down like st_mtime's tv_sec.
LISTING_SCRIPT = r"""
set -eu
cd "${1:-${LISTING_ROOT:-/}}"
echo '@stat'
find . -xdev -mindepth 1 -exec stat -c '%f|%u|%g|%s|%Y|%d|%i|%t|%T|%n' {} +
echo '@sha256'
find . -xdev -type f -exec sha256sum {} +
echo '@symlink'
find . -xdev -type l -exec stat -c '%N' {} +
echo '@end'
"""


def _split_symlink_record(line: str, symlinks: set[str]) -> tuple[str, str]:
    """Split "'./PATH' -> 'TARGET'" at the separator that follows a known symlink path."""
    body = line.removeprefix("'./").removesuffix("'")
    start = 0
    while (at := body.find("' -> '", start)) >= 0:
        if body[:at] in symlinks:
            return body[:at], body[at + 6 :]
        start = at + 1
    raise ValueError(f"symlink record for an unknown path: {line!r}")


def parse_listing(text: str) -> Tree:
    """Parse :data:`LISTING_SCRIPT` output. xattrs are ``None``: busybox cannot read them."""
    sections: dict[str, list[str]] = defaultdict(list)
    current: str | None = None
    for line in text.removesuffix("\n").split("\n"):  # not splitlines(): names may hold U+2028 etc.
        if line in ("@stat", "@sha256", "@symlink", "@end"):
            current = line
        elif current is None or current == "@end":
            raise ValueError(f"unexpected line outside a section: {line!r}")
        else:
            sections[current].append(line)
    if current != "@end":
        raise ValueError("listing is truncated: no @end marker")

    stats = [line.split("|", 9) for line in sections["@stat"]]
    symlinks = {path[2:] for raw_mode, *_, path in stats if _kind(int(raw_mode, 16)) == "symlink"}
    targets = dict(_split_symlink_record(line, symlinks) for line in sections["@symlink"])
    digests = {}
    for line in sections["@sha256"]:
        digest, path = line.split("  ./", 1)
        digests[path] = digest

    tree = Tree()
    inode_of: dict[str, object] = {}
    for raw_mode, uid, gid, size, mtime, dev, inode, major, minor, dotted_path in stats:
        path = dotted_path.removeprefix("./")
        st_mode = int(raw_mode, 16)
        kind = _kind(st_mode)
        tree.nodes[path] = Node(
            kind=kind,
            mode=stat.S_IMODE(st_mode),
            uid=int(uid),
            gid=int(gid),
            size=int(size) if kind == "reg" else None,
            sha256=digests[path] if kind == "reg" else None,
            target=targets[path] if kind == "symlink" else None,
            rdev=(int(major, 16), int(minor, 16)) if kind in ("char", "block") else None,
            mtime=int(mtime),
        )
        if kind != "dir":
            inode_of[path] = (dev, inode)
    tree.hardlinks = _group_hardlinks(inode_of)
    return tree


def _fmt_group(paths: Iterable[str]) -> str:
    return "{" + ", ".join(sorted(paths)) + "}"


def _node_differences(e: Node, a: Node, compare_mtime: bool) -> list[str]:
    if e.kind != a.kind:
        return [f"type {e.kind} != {a.kind}"]
    diffs = []
    if e.mode != a.mode:
        diffs.append(f"mode {e.mode:04o} != {a.mode:04o}")
    if (e.uid, e.gid) != (a.uid, a.gid):
        diffs.append(f"owner {e.uid}:{e.gid} != {a.uid}:{a.gid}")

    def known_and_differ(get: Callable[[Node], object]) -> bool:
        return get(e) is not None and get(a) is not None and get(e) != get(a)

    if known_and_differ(lambda n: n.size):
        diffs.append(f"size {e.size} != {a.size}")
    if known_and_differ(lambda n: n.sha256):
        diffs.append(f"content sha256 {e.sha256} != {a.sha256}")
    if known_and_differ(lambda n: n.target):
        diffs.append(f"link target {e.target!r} != {a.target!r}")
    if known_and_differ(lambda n: n.rdev):
        diffs.append(f"rdev {e.rdev} != {a.rdev}")
    if compare_mtime and known_and_differ(lambda n: n.mtime):
        diffs.append(f"mtime {e.mtime} != {a.mtime}")
    if e.xattrs is not None and a.xattrs is not None:
        for name in sorted(e.xattrs.keys() | a.xattrs.keys()):
            if name not in a.xattrs:
                diffs.append(f"xattr {name} missing (expected {e.xattrs[name]!r})")
            elif name not in e.xattrs:
                diffs.append(f"xattr {name} unexpected ({a.xattrs[name]!r})")
            elif e.xattrs[name] != a.xattrs[name]:
                diffs.append(f"xattr {name} {e.xattrs[name]!r} != {a.xattrs[name]!r}")
    return diffs


def compare(
    expected: Tree,
    actual: Tree,
    *,
    ignore: Iterable[str] = (),
    ignore_mtime_of: Iterable[str] = ("dir",),
) -> list[str]:
    """Every difference between two trees, one line each.

    Per-path lines come first, sorted by path; hard-link group differences follow. A field that is
    ``None`` on either side is not compared, nor is the mtime of the kinds in ``ignore_mtime_of``.
    ``ignore`` holds fnmatch patterns of paths to skip; a matched path's descendants are skipped too.
    Hard links are compared among the non-ignored paths present in both trees.
    """
    patterns = tuple(ignore)
    no_mtime = frozenset(ignore_mtime_of)

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)

    diffs = []
    for path in sorted(expected.nodes.keys() | actual.nodes.keys()):
        if ignored(path):
            continue
        e, a = expected.nodes.get(path), actual.nodes.get(path)
        if a is None:
            diffs.append(f"missing: {path}")
        elif e is None:
            diffs.append(f"unexpected: {path}")
        else:
            diffs += [f"{path}: {d}" for d in _node_differences(e, a, e.kind not in no_mtime)]

    common = {p for p in expected.nodes.keys() & actual.nodes.keys() if not ignored(p)}

    def groups(tree: Tree) -> set[frozenset[str]]:
        restricted = (group & common for group in tree.hardlinks)
        return {group for group in restricted if len(group) > 1}

    expected_groups, actual_groups = groups(expected), groups(actual)
    actual_group_of = {path: group for group in actual_groups for path in group}
    for group in sorted(expected_groups - actual_groups, key=sorted):
        got = {actual_group_of.get(path, frozenset([path])) for path in group}
        got_text = " ".join(sorted(_fmt_group(g) for g in got))
        diffs.append(f"hardlinks: expected {_fmt_group(group)} to be one inode, got {got_text}")
    for group in sorted(actual_groups - expected_groups, key=sorted):
        diffs.append(f"hardlinks: unexpected {_fmt_group(group)} as one inode")
    return diffs


def assert_same(
    expected: Tree,
    actual: Tree,
    *,
    ignore: Iterable[str] = (),
    ignore_mtime_of: Iterable[str] = ("dir",),
    max_lines: int = 50,
) -> None:
    """Raise ``AssertionError`` listing the differences (see :func:`compare`) if there are any."""
    diffs = compare(expected, actual, ignore=ignore, ignore_mtime_of=ignore_mtime_of)
    if diffs:
        shown = diffs[:max_lines]
        if len(diffs) > max_lines:
            shown.append(f"... and {len(diffs) - max_lines} more")
        raise AssertionError(f"{len(diffs)} tree difference(s):\n" + "\n".join(shown))
