"""Running built images in the test containerd and looking at what a container sees.

Shared by the end-to-end tests of containerd's own snapshotter and of lazysnap:

- :func:`container_tree` runs a container from an image (through a given snapshotter) and parses the
  listing of its root filesystem that busybox prints inside it;
- :func:`chain_ids` gives the chain IDs of an image's layers, the names containerd commits them under;
- :func:`feature_image` is a multi-layer image exercising what layers can do to each other (whiteouts of
  files and directories, opaque directories, hard links (containerd applies a layer straight
into the overlay upper dir, so a link must stay within its layer), devices, fifos, xattrs,
  special modes and owners, long and unicode names, a file turned into a directory);
- :data:`RUNTIME_PATHS` are the paths the runtime adds to every container, to ignore in comparisons.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.harness import images as im
from tests.harness import trees
from tests.harness.containerd import Containerd

BUSYBOX = Path("/bin/busybox").read_bytes()
RUNTIME_PATHS = ["proc", "sys", "dev", "etc/hosts", "etc/hostname", "etc/resolv.conf", "run"]


def container_tree(containerd: Containerd, ref: str, snapshotter: str | None = None) -> trees.Tree:
    """The root filesystem a container of `ref` sees, listed from inside it. A listing whose `@end`
    line is missing although the script exited 0 (`set -e`: every command before it succeeded) lost
    its tail in ctr's output copy, which a loaded CI machine saw once; it is listed again, once."""
    for attempt in (1, 2):
        out = containerd.run(
            ref, "/bin/busybox", "sh", "-c", trees.LISTING_SCRIPT, "sh", "/", snapshotter=snapshotter
        ).stdout
        if out.endswith("@end\n") or attempt == 2:
            break
    return trees.parse_listing(out)


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The chain ID of each layer (OCI image spec): the snapshot names containerd commits."""
    chain = [diff_ids[0]]
    for d in diff_ids[1:]:
        chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {d}".encode()).hexdigest())
    return chain


def image_chain_ids(image: im.Image) -> list[str]:
    return chain_ids([layer.diff_id for layer in image.layers])


def feature_image(*, big_files: int = 0) -> im.Image:
    """Three or four layers that use every kind of entry and every way of changing a lower layer.
    With `big_files`, a layer of that many 8 KiB files goes second (slow to apply: crash tests)."""
    base = im.Layer(
        [
            im.Dir("bin"),
            im.File("bin/busybox", BUSYBOX, mode=0o755),
            im.Symlink("bin/sh", "busybox"),
            im.Hardlink("bin/find", "bin/busybox"),
            im.Dir("etc", mode=0o755),
            im.File("etc/motd", b"hello from lazysnap\n"),
            im.File("etc/shadow", b"root:*:19000::::::\n", mode=0o600, uid=0, gid=42),
            im.File("etc/attrs", b"x", xattrs={"user.lazysnap": b"value", "user.bin": b"\x00\x01\xff"}),
            im.Symlink("etc/abs-link", "/etc/motd"),
            im.Dir("tmp", mode=0o1777),
            im.File("usr/local/bin/setuid-tool", b"#!/bin/sh\n", mode=0o4755),
            im.File("usr/local/bin/setgid-tool", b"#!/bin/sh\n", mode=0o2750, gid=50),
            im.File("data/big", im.pseudo_random(1 << 20, seed=7)),
            im.File("data/empty", b""),
            im.File("data/ünïcödé ✓", b"unicode\n", uid=1000, gid=1000),
            im.File("data/" + "long-name-" * 12, b"a name over 100 bytes\n"),
            im.File("data/linked", b"two names\n", mode=0o640),
            im.Hardlink("data/linked-too", "data/linked"),
            im.CharDev("dev-nodes/null", 1, 3),
            im.BlockDev("dev-nodes/loop", 7, 0),
            im.Fifo("dev-nodes/fifo"),
            im.Dir("gone-dir"),
            im.File("gone-dir/a", b"a"),
            im.File("gone-dir/sub/b", b"b"),
            im.File("gone-file", b"deleted by the next layer"),
            im.Dir("opaque", mode=0o750, uid=7, gid=7),
            im.File("opaque/hidden", b"hidden by an opaque marker"),
            im.Dir("opaque/hidden-dir"),
            im.File("becomes-dir", b"a file first"),
            im.Dir("owned", mode=0o700, uid=1000, gid=1000),
        ]
    )
    changes = im.Layer(
        [
            im.Whiteout("gone-file"),
            im.Whiteout("gone-dir"),
            im.Whiteout("becomes-dir"),
            im.Dir("becomes-dir", mode=0o711),
            im.File("becomes-dir/inside", b"now a directory"),
            im.Opaque("opaque"),
            im.File("opaque/visible", b"only this"),
            im.File("etc/motd", b"replaced\n", mode=0o640, mtime=1_600_000_000),
            im.File("new/deep/file", b"parents implied\n"),
            im.File("data/fresh", b"linked within its layer"),
            im.Hardlink("data/fresh-link", "data/fresh"),
            im.File("owned/file", b"in a 0700 dir", uid=1000, gid=1000),
        ]
    )
    top = im.Layer(
        [
            im.File("etc/version", b"3"),
            im.File("etc/attrs", b"y", xattrs={"user.lazysnap": b"changed"}),
            im.Whiteout("data/linked"),
            im.Dir("gone-dir"),  # recreated empty after the whiteout below it
        ]
    )
    layers = [base, changes, top]
    if big_files:
        bulk = im.Layer(
            [
                im.File(f"bulk/{i // 500:02d}/f{i:05d}", im.pseudo_random(8192, seed=i))
                for i in range(big_files)
            ]
        )
        layers.insert(1, bulk)
    return im.Image(layers, cmd=["/bin/sh"])
