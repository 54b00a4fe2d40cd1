"""The tree a lazily read layer presents, read through lazysnap's own reader (every file's content
fetched and verified), for comparison with `images.Layer.overlay_tree()` or a scanned directory."""

from __future__ import annotations

import hashlib

from fuse.formats import Layer
from fuse.formats.index import BLOCK, CHAR, DIR, FIFO, REG, ROOT, SYMLINK
from tests.harness import trees

KINDS = {DIR: "dir", REG: "reg", SYMLINK: "symlink", CHAR: "char", BLOCK: "block", FIFO: "fifo"}


async def tree_of(layer: Layer) -> trees.Tree:
    ix = layer.index
    nodes: dict[str, trees.Node] = {}
    paths_of: dict[int, set[str]] = {}

    async def walk(ino: int, prefix: str) -> None:
        for name, child in ix.children(ino):
            path = f"{prefix}{name}"
            st = ix.stat(child)
            kind = KINDS[st.kind]
            sha = size = target = rdev = None
            if kind == "reg":
                data = await layer.read(child, 0, st.size)
                size, sha = len(data), hashlib.sha256(data).hexdigest()
            elif kind == "symlink":
                target = ix.readlink(child)
            elif kind in ("char", "block"):
                rdev = st.rdev
            xattrs = {n: ix.xattr(child, n) or b"" for n in ix.xattr_names(child)}
            nodes[path] = trees.Node(
                kind,
                st.mode,
                st.uid,
                st.gid,
                size,
                sha,
                target,
                rdev,
                mtime=st.mtime_ns // 10**9,
                xattrs=xattrs,
            )
            if kind == "dir":
                await walk(child, path + "/")
            else:
                paths_of.setdefault(child, set()).add(path)

    await walk(ROOT, "")
    return trees.Tree(nodes, {frozenset(p) for p in paths_of.values() if len(p) > 1})
