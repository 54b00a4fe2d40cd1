"""The CRI harness is real: kubelet's PullImage, sent to containerd's CRI plugin with the CRI messages
compiled into containerd, pulls an image from the test registry."""

from __future__ import annotations

import hashlib

from tests.harness import images as im
from tests.harness.registry import Registry


def test_cri_pull_image(registry: Registry, containerd_factory) -> None:
    containerd = containerd_factory(cri=True, cri_snapshotter="overlayfs")
    containerd.plain_http(registry.host)
    image = im.Image([im.Layer([im.File("etc/hello", b"hi\\n")])])
    digest = im.push_image(registry.url, "cri/img", "v1", image)
    cri = containerd.cri_client()
    try:
        image_ref = cri.pull_image(f"{registry.host}/cri/img:v1")
        assert image_ref.startswith("sha256:")
        assert f"{registry.host}/cri/img:v1" in cri.list_images()
        # containerd keeps CRI images in its k8s.io namespace, fetched from our registry
        assert digest in containerd.ctr("image", "ls", namespace="k8s.io").stdout
        layer_blob = "sha256:" + hashlib.sha256(image.layers[0].blob("gzip")).hexdigest()
        assert [g.status for g in registry.blob_gets(layer_blob)] == [200]  # a full pull of the layer
        cri.remove_image(f"{registry.host}/cri/img:v1")
        assert f"{registry.host}/cri/img:v1" not in cri.list_images()
    finally:
        cri.close()
