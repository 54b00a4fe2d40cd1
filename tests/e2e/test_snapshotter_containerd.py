"""lazysnap under a real containerd 1.6: images pulled, unpacked and run through the proxy plugin, the
container's tree checked against the image, garbage collection leaving nothing, parallel pulls sharing
layers, and the daemon crashing in the middle of an unpack (a real SIGKILL while containerd writes a
large layer, and a SIGKILL between a snapshot's directory and its record) then restarted: the pull
completes on retry, committed snapshots survive, orphans are removed."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from snapshotter import failpoints
from tests.harness import images as im
from tests.harness import trees
from tests.harness.containerd import CommandError, Containerd
from tests.harness.containers import RUNTIME_PATHS, container_tree, feature_image, image_chain_ids
from tests.harness.registry import Registry
from tests.harness.snapshotter import PLUGIN, Lazysnap, Mounts, mounts_from_ctr

pytestmark = pytest.mark.slow


def pull(containerd: Containerd, ref: str, *, retry_for: float = 0) -> None:
    """`ctr image pull` through lazysnap; with `retry_for`, retried (containerd's proxy reconnects to a
    restarted snapshotter with a backoff of up to 3 s)."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            containerd.ctr("image", "pull", "--plain-http", "--snapshotter", PLUGIN, ref)
            return
        except CommandError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def remove_image_and_check_nothing_left(containerd: Containerd, snapshotter: Lazysnap, ref: str) -> None:
    containerd.ctr("image", "rm", "--sync", ref)
    assert snapshotter.client().list() == []
    assert snapshotter.snapshot_dirs() == set()
    assert snapshotter.record_ids() == set()


def test_pull_run_view_and_remove(
    registry: Registry, snapshotter: Lazysnap, lazysnap_containerd: Containerd, mounter: Mounts, workdir: Path
) -> None:
    containerd = lazysnap_containerd
    image = feature_image()
    im.push_image(registry.url, "lazysnap/features", "v1", image)
    ref = f"{registry.host}/lazysnap/features:v1"
    pull(containerd, ref)

    # containerd committed every layer under "<namespace>/<n>/<chainID>", each on the one below
    client = snapshotter.client()
    chains = image_chain_ids(image)
    committed = {info.name.split("/", 2)[2]: info for info in client.list("kind==committed")}
    assert sorted(committed) == sorted(chains)
    assert all(info.name.startswith(containerd.namespace + "/") for info in committed.values())
    assert committed[chains[0]].parent == ""
    for lower, upper in zip(chains, chains[1:], strict=False):
        assert committed[upper].parent == committed[lower].name
    assert client.list("kind==active") == [] and client.list("kind==view") == []
    assert client.usage(committed[chains[0]].name).size >= 1 << 20  # data/big, stored at Commit
    # unpack keys hold a space ("<ns>/<n>/extract-<x> <chainID>"): they reached us intact
    assert "extract-" in snapshotter.log() and f' {chains[0]}"' in snapshotter.log()
    listing = containerd.ctr("snapshots", "--snapshotter", PLUGIN, "ls").stdout
    assert all(chain in listing for chain in chains)

    expected = image.expected_tree()
    trees.assert_same(expected, container_tree(containerd, ref, PLUGIN), ignore=RUNTIME_PATHS)
    # the container's snapshot goes with `run --rm`, from the backend at containerd's next GC
    _wait_until(lambda: client.list("kind==active") == [], "GC to remove the container's snapshot", 10)

    # the same rootfs from the host through a read-only view, xattrs included
    view = json.loads(
        containerd.ctr(
            "snapshots", "--snapshotter", PLUGIN, "view", "--mounts", "host-view", chains[-1]
        ).stdout
    )
    assert [m["Type"] for m in view] == ["overlay"] and not any(
        o.startswith("upperdir") for o in view[0]["Options"]
    )
    target = mounter.mount(mounts_from_ctr(view), workdir / "view")
    trees.assert_same(expected, trees.scan(target))
    with pytest.raises(OSError):
        (target / "etc" / "motd").write_text("read-only view")
    mounter.unmount(target)
    containerd.ctr("snapshots", "--snapshotter", PLUGIN, "rm", "host-view")

    remove_image_and_check_nothing_left(containerd, snapshotter, ref)
    snapshotter.assert_consistent()


def test_parallel_pulls_sharing_layers(
    registry: Registry, snapshotter: Lazysnap, lazysnap_containerd: Containerd
) -> None:
    """Three images on one base layer, pulled at once: containerd unpacks the base in parallel, one
    Commit wins, the others get AlreadyExists and reuse it."""
    containerd = lazysnap_containerd
    base = feature_image().layers[0]
    refs = []
    for n in range(3):
        layers = [base, *(im.Layer([im.File(f"layer{i}/file", f"{n}-{i}".encode())]) for i in range(3))]
        im.push_image(registry.url, f"lazysnap/par{n}", "v1", im.Image(layers, cmd=["/bin/sh"]))
        refs.append((f"{registry.host}/lazysnap/par{n}:v1", im.Image(layers)))
    errors: list[BaseException] = []

    def pull_one(ref: str) -> None:
        try:
            pull(containerd, ref)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=pull_one, args=(ref,)) for ref, _ in refs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    client = snapshotter.client()
    assert len(client.list("kind==committed")) == 1 + 3 * 3
    # the losers' extract snapshots leave the backend at containerd's next garbage collection
    _wait_until(lambda: client.list("kind==active") == [], "GC to remove the unpacks that lost", 10)
    for ref, image in refs:
        trees.assert_same(
            image.expected_tree(), container_tree(containerd, ref, PLUGIN), ignore=RUNTIME_PATHS
        )
    for ref, _ in refs:
        containerd.ctr("image", "rm", "--sync", ref)
    assert client.list() == [] and snapshotter.snapshot_dirs() == set()


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 60, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"ctr exited ({proc.returncode}) before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_sigkill_while_containerd_applies_a_large_layer(
    registry: Registry, snapshotter: Lazysnap, lazysnap_containerd: Containerd
) -> None:
    containerd = lazysnap_containerd
    image = feature_image(big_files=4000)  # layer 2: 4,000 files, 32 MiB
    im.push_image(registry.url, "lazysnap/big", "v1", image, compression="none")
    ref = f"{registry.host}/lazysnap/big:v1"
    chains = image_chain_ids(image)
    client = snapshotter.client()

    argv = ["ctr", "-a", str(containerd.address), "-n", containerd.namespace, "image", "pull", "--plain-http"]
    proc = subprocess.Popen(
        [*argv, "--snapshotter", PLUGIN, ref], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    upper: list[Path] = []

    def applying_bulk_layer() -> bool:
        if not upper:
            for info in client.list("kind==active"):
                if info.name.endswith(" " + chains[1]):  # the extract snapshot of the bulk layer
                    (m,) = client.mounts(info.name)
                    upper.append(
                        Path(next(o for o in m.options if o.startswith("upperdir=")).split("=", 1)[1])
                    )
        return bool(upper) and sum(len(files) for _, _, files in os.walk(upper[0])) >= 300

    try:
        _wait_until(applying_bulk_layer, "containerd to be writing the bulk layer", proc=proc)
        committed_before = client.names("kind==committed")
        snapshotter.kill()
        written = sum(len(files) for _, _, files in os.walk(upper[0]))
        assert written < 4000, "the layer was fully applied before the kill: make it bigger"
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, out
    assert committed_before == [n for n in committed_before if n.endswith(chains[0])]

    snapshotter.start()
    client = snapshotter.client()
    assert set(committed_before) <= set(client.names("kind==committed"))  # nothing committed was lost
    snapshotter.assert_consistent()

    pull(containerd, ref, retry_for=30)
    # every layer is committed (a layer containerd dropped when the first pull failed stays in the
    # backend until containerd's garbage collector removes it: at the latest with the image below)
    assert set(chains) <= {i.name.split("/", 2)[2] for i in client.list("kind==committed")}
    trees.assert_same(image.expected_tree(), container_tree(containerd, ref, PLUGIN), ignore=RUNTIME_PATHS)
    remove_image_and_check_nothing_left(containerd, snapshotter, ref)  # the interrupted unpack's too


def test_sigkill_between_directory_and_record(
    registry: Registry,
    snapshotter_factory: Callable[..., Lazysnap],
    containerd_factory: Callable[..., Containerd],
) -> None:
    """The daemon dies inside the second Prepare, after creating the snapshot's directory and before
    committing its record: the restart removes that orphan, the pull then completes."""
    snapshotter = snapshotter_factory(env={failpoints.ENV: "create.before-commit=kill@2"})
    containerd = containerd_factory(snapshotter_socket=snapshotter.address)
    image = feature_image()
    im.push_image(registry.url, "lazysnap/crash", "v1", image)
    ref = f"{registry.host}/lazysnap/crash:v1"
    chains = image_chain_ids(image)

    with pytest.raises(CommandError):
        pull(containerd, ref)
    assert snapshotter.wait_exit() == -9
    orphans = snapshotter.snapshot_dirs() - snapshotter.record_ids()
    assert len(orphans) == 1, (snapshotter.snapshot_dirs(), snapshotter.record_ids())

    snapshotter.start(env={})
    assert "removed 1 orphaned snapshot directories" in snapshotter.log()
    snapshotter.assert_consistent()
    client = snapshotter.client()
    assert [n.split("/", 2)[2] for n in client.names("kind==committed")] == [chains[0]]

    pull(containerd, ref, retry_for=30)
    trees.assert_same(image.expected_tree(), container_tree(containerd, ref, PLUGIN), ignore=RUNTIME_PATHS)
    remove_image_and_check_nothing_left(containerd, snapshotter, ref)
