"""The harness is real: an image built by the builder, pushed to the real registry, pulled by the real
containerd (its own overlayfs snapshotter) and run by runc shows exactly the tree the builder promised,
and the comparison catches an image that differs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.harness import images as im
from tests.harness import trees
from tests.harness.containerd import Containerd
from tests.harness.containers import RUNTIME_PATHS, container_tree, image_chain_ids
from tests.harness.registry import Registry

BUSYBOX = Path("/bin/busybox").read_bytes()


def smoke_image(variant: str = "good") -> im.Image:
    base = im.Layer(
        [
            im.Dir("bin"),
            im.File("bin/busybox", BUSYBOX, mode=0o755),
            im.Symlink("bin/sh", "busybox"),
            im.Hardlink("bin/find", "bin/busybox"),
            im.Dir("etc", mode=0o755),
            im.File("etc/motd", b"hello from lazysnap\n"),
            im.File("etc/secret", b"s3cret\n", mode=0o600, uid=0, gid=42),
            im.File("etc/attrs", b"x", xattrs={"user.lazysnap": b"value", "user.bin": b"\x00\x01\xff"}),
            im.Symlink("etc/abs-link", "/etc/motd"),
            im.Symlink("etc/dangling", "../nowhere"),
            im.Dir("tmp", mode=0o1777),
            im.File("usr/bin/setuid-tool", b"#!/bin/sh\n", mode=0o4755),  # no usr/ nor usr/bin/ entries
            im.File("data/empty", b""),
            im.File("data/big", im.pseudo_random(3 << 20, seed=1)),
            im.File("data/zeros", im.zero_runs(5 << 20, seed=2)),
            im.File("data/ünïcödé ✓ name", b"unicode\n", uid=1000, gid=1000),
            im.File("data/" + "long-name-" * 12, b"a name over 100 bytes\n"),
            im.CharDev("dev-nodes/null", 1, 3),
            im.BlockDev("dev-nodes/loop", 7, 0),
            im.Fifo("dev-nodes/fifo"),
            im.Dir("old/keep"),
            im.File("old/keep/a", b"a"),
            im.File("old/gone", b"deleted by the next layer"),
            im.Dir("opaque"),
            im.File("opaque/hidden", b"hidden by an opaque marker"),
        ]
    )
    changes = im.Layer(
        [
            im.Whiteout("old/gone"),
            im.Whiteout("old/keep"),
            im.Opaque("opaque"),
            im.File("opaque/visible", b"only this"),
            im.File("etc/motd", b"replaced\n", mode=0o640, mtime=1_600_000_000),
            im.File("new/deep/file", b"parents implied\n"),
        ]
    )
    top = im.Layer([im.File("etc/version", variant.encode())])
    if variant == "bad":  # same description, but two things differ from what "good" promises
        top = im.Layer(
            [im.File("etc/version", b"good"), im.File("etc/motd", b"tampered\n"), im.File("extra", b"!")]
        )
    return im.Image([base, changes, top], cmd=["/bin/sh"])


@pytest.mark.parametrize(
    ("compression", "manifest_format"), [("gzip", "oci"), ("zstd", "oci"), ("none", "docker")]
)
def test_container_sees_the_built_tree(
    registry: Registry, containerd: Containerd, workdir: Path, compression: str, manifest_format: str
) -> None:
    image = smoke_image()
    im.push_image(
        registry.url, "smoke/img", "v1", image, compression=compression, manifest_format=manifest_format
    )
    ref = f"{registry.host}/smoke/img:v1"
    containerd.ctr("image", "pull", "--plain-http", ref)

    expected = image.expected_tree()
    trees.assert_same(expected, container_tree(containerd, ref), ignore=RUNTIME_PATHS)

    # The same rootfs seen from the host through a read-only view: xattrs included this time.
    top = image_chain_ids(image)[-1]
    view = workdir / "view"
    view.mkdir()
    mounts = json.loads(containerd.ctr("snapshots", "view", "--mounts", "smoke-view", top).stdout)
    assert [m["Type"] for m in mounts] == ["overlay"], mounts  # three layers: a read-only overlay
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", ",".join(mounts[0]["Options"]), str(view)], check=True
    )
    try:
        trees.assert_same(expected, trees.scan(view))
    finally:
        subprocess.run(["umount", str(view)], check=True)

    # ctr image rm + GC leaves no snapshot behind
    containerd.ctr("image", "rm", "--sync", ref)
    assert containerd.ctr("snapshots", "ls").stdout.strip().splitlines()[1:] == []


def test_comparison_catches_a_wrong_image(registry: Registry, containerd: Containerd) -> None:
    im.push_image(registry.url, "smoke/bad", "v1", smoke_image("bad"))
    ref = f"{registry.host}/smoke/bad:v1"
    containerd.ctr("image", "pull", "--plain-http", ref)
    differences = trees.compare(
        smoke_image("good").expected_tree(), container_tree(containerd, ref), ignore=RUNTIME_PATHS
    )
    assert any(d.startswith("etc/motd: content sha256") for d in differences), differences
    assert "unexpected: extra" in differences, differences
    assert any(d.startswith("etc/motd: mode 0640 != 0644") for d in differences), differences
    assert len(differences) == 4, differences  # content, mode, mtime of etc/motd, and the extra file
