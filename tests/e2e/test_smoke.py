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
from tests.harness.containers import RUNTIME_PATHS, container_tree, feature_image, image_chain_ids
from tests.harness.registry import Registry


def wrong_image() -> im.Image:
    """feature_image with one more layer: two things differ from what feature_image promises."""
    tampered = im.Layer([im.File("etc/motd", b"tampered\n"), im.File("extra", b"!")])
    return im.Image([*feature_image().layers, tampered], cmd=["/bin/sh"])


@pytest.mark.parametrize(
    ("compression", "manifest_format"), [("gzip", "oci"), ("zstd", "oci"), ("none", "docker")]
)
def test_container_sees_the_built_tree(
    registry: Registry, containerd: Containerd, workdir: Path, compression: str, manifest_format: str
) -> None:
    image = feature_image()
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
    im.push_image(registry.url, "smoke/bad", "v1", wrong_image())
    ref = f"{registry.host}/smoke/bad:v1"
    containerd.ctr("image", "pull", "--plain-http", ref)
    differences = trees.compare(
        feature_image().expected_tree(), container_tree(containerd, ref), ignore=RUNTIME_PATHS
    )
    assert any(d.startswith("etc/motd: content sha256") for d in differences), differences
    assert "unexpected: extra" in differences, differences
    assert any(d.startswith("etc/motd: mode 0640 != 0644") for d in differences), differences
    assert len(differences) == 4, differences  # content, mode, mtime of etc/motd, and the extra file
