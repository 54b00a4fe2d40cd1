"""The whole path of automatic acceleration: an image pushed to an enabled repository of the real
registry is converted by `lazysnap convertd` on the registry's notification, pushed beside the original
as `<tag>_accelerated`, and the real containerd pulls it lazily through lazysnap (`ctr-remote image
rpull`) and runs it, seeing exactly the tree of the original image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fuse.formats.spec import TOC_DIGEST
from tests.e2e.test_convert_full_pull import FORMAT_FILES
from tests.harness import images as im
from tests.harness import trees
from tests.harness.containerd import Containerd
from tests.harness.containers import RUNTIME_PATHS, container_tree, feature_image
from tests.harness.convertd import Convertd, get_manifest, wait_tag
from tests.harness.registry import Registry


@pytest.fixture
def convertd(workdir: Path) -> Iterator[Convertd]:
    c = Convertd(workdir, repositories=[{"name": "apps/*", "format": "estargz", "chunk_size": "1MiB"}])
    yield c
    c.stop()


def test_pushed_image_is_accelerated_and_runs_the_same_tree(
    convertd: Convertd, registry_factory, lazysnap_containerd: Containerd
) -> None:
    registry: Registry = registry_factory(config=convertd.registry_config())
    convertd.start()
    image = feature_image()  # busybox inside, every kind of entry
    digest = im.push_image(registry.url, "apps/smoke", "1.0", image)
    wait_tag(registry.url, "apps/smoke", "1.0_accelerated", 60, convertd)

    original, _, original_digest = get_manifest(registry.url, "apps/smoke", "1.0")
    assert original_digest == digest  # untouched
    accelerated = get_manifest(registry.url, "apps/smoke", "1.0_accelerated")[0]
    assert len(accelerated["layers"]) == len(original["layers"]) == 3
    assert all(TOC_DIGEST in layer.get("annotations", {}) for layer in accelerated["layers"])
    assert convertd.wait_job("apps/smoke", digest)["attempts"] == 1

    ref = f"{registry.host}/apps/smoke:1.0_accelerated"
    lazysnap_containerd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "lazysnap", ref)
    tree = container_tree(lazysnap_containerd, ref, snapshotter="lazysnap")
    trees.assert_same(image.expected_tree(), tree, ignore=RUNTIME_PATHS + FORMAT_FILES)
