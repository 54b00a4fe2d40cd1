"""Lazy pulls through containerd: `ctr-remote image rpull` and CRI's PullImage return without the layers,
the container runs from the FUSE mount and sees exactly the image's tree; ordinary layers fall back to a
full pull; a restarted daemon serves what it has cached without the network."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import trio

from fuse.registry import Reference
from snapshotter import failpoints
from snapshotter.convert.writer import WriteOptions, convert_bytes
from tests.harness import images as im
from tests.harness import trees
from tests.harness.accelerate import accelerate
from tests.harness.containerd import Containerd
from tests.harness.containers import RUNTIME_PATHS, container_tree, feature_image
from tests.harness.procs import free_port, mounts_under
from tests.harness.registry import Registry, anonymous_client
from tests.harness.snapshotter import Lazysnap, lazysnap_command

PLUGIN = "lazysnap"


def layer_bytes(registry: Registry, ref: str) -> tuple[int, int]:
    """(bytes of layer blobs the registry sent, total size of the image's layer blobs)."""

    async def layers() -> list[dict]:
        client = anonymous_client()
        async with client:
            return (await client.resolve(ref)).layers

    descs = trio.run(layers)
    return sum(registry.blob_bytes_sent(d["digest"]) for d in descs), sum(d["size"] for d in descs)


def rpull(containerd: Containerd, ref: str) -> None:
    containerd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", PLUGIN, ref)


def lazysnap_with(snapshotter_factory, workdir: Path, **settings) -> Lazysnap:
    """`lazysnap serve` with a config file holding `settings` (TOML values)."""
    config = workdir / "lazysnap.toml"
    lines = [f'root = "{workdir}/state"', f'address = "{workdir}/lazysnap.sock"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    config.write_text("\n".join(lines) + "\n")
    return snapshotter_factory(config=config)


def test_rpull_runs_lazily_and_sees_the_image(
    registry: Registry, snapshotter_factory, containerd_factory, workdir: Path
) -> None:
    snapshotter = lazysnap_with(snapshotter_factory, workdir, background=False)
    lazysnap_containerd = containerd_factory(snapshotter_socket=snapshotter.address)
    image = feature_image(big_files=0)
    big = im.Layer([im.File("data/blob", im.pseudo_random(20 << 20, seed=5))])
    image = im.Image([*image.layers, big], cmd=["/bin/sh"])
    ref = accelerate(registry, "lazy/app", image)

    started = time.monotonic()
    rpull(lazysnap_containerd, ref)
    pull_seconds = time.monotonic() - started
    fetched, total = layer_bytes(registry, ref)
    assert fetched < total / 4, f"rpull fetched {fetched} of {total} layer bytes: not lazy"
    # every layer is a remote snapshot served from the FUSE mount
    names = snapshotter.client().names()
    assert len(names) == len(image.layers)
    assert len(list((snapshotter.root / "mnt").iterdir())) == len(image.layers)
    assert "lazy layer claimed" in snapshotter.log()

    tree = container_tree(lazysnap_containerd, ref, snapshotter=PLUGIN)
    trees.assert_same(image.expected_tree(), tree, ignore=RUNTIME_PATHS)
    assert pull_seconds < 30

    lazysnap_containerd.ctr("image", "rm", "--sync", ref)
    deadline = time.monotonic() + 20
    while snapshotter.client().names() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert snapshotter.client().names() == []
    assert list((snapshotter.root / "mnt").iterdir()) == []  # the layers are unmounted
    assert list((snapshotter.root / "layers").iterdir()) == []  # and their stored TOCs deleted


def test_mixed_layers_fall_back(
    registry: Registry, snapshotter: Lazysnap, lazysnap_containerd: Containerd
) -> None:
    """A layer that is not lazily loadable is pulled in full by containerd; the image still works."""
    image = feature_image()
    lazy_layer, result = convert_bytes(image.layers[0].tar(), WriteOptions())
    plain = [layer.blob("gzip") for layer in image.layers[1:]]

    async def push_mixed() -> str:
        client = anonymous_client()
        ref = Reference.parse(f"{registry.host}/lazy/mixed:v1")
        async with client:
            layers = [
                {
                    "mediaType": result.media_type,
                    "digest": await client.push_blob(ref, lazy_layer),
                    "size": len(lazy_layer),
                    "annotations": result.annotations,
                }
            ]
            for blob in plain:
                layers.append(
                    {
                        "mediaType": im.OCI_LAYER["gzip"],
                        "digest": await client.push_blob(ref, blob),
                        "size": len(blob),
                    }
                )
            config = image.config([result.diff_id, *(layer.diff_id for layer in image.layers[1:])])
            body = json.dumps(config).encode()
            manifest = {
                "schemaVersion": 2,
                "mediaType": im.OCI_MANIFEST,
                "config": {
                    "mediaType": im.OCI_CONFIG,
                    "digest": await client.push_blob(ref, body),
                    "size": len(body),
                },
                "layers": layers,
            }
            await client.push_manifest(ref, json.dumps(manifest).encode(), im.OCI_MANIFEST)
        return str(ref)

    ref = trio.run(push_mixed)
    rpull(lazysnap_containerd, ref)
    assert (
        "full pull for" in snapshotter.log()
        and "no TOC digest (not an accelerated layer)" in snapshotter.log()
    )
    assert len(list((snapshotter.root / "mnt").iterdir())) == 1  # only the accelerated layer is remote
    expected = image.expected_tree()
    # the lazily loaded base layer is the converted tar: it also holds the converter's own entries
    tree = container_tree(lazysnap_containerd, ref, snapshotter=PLUGIN)
    trees.assert_same(expected, tree, ignore=[*RUNTIME_PATHS, ".no.prefetch.landmark", "stargz.index.json"])


def test_cri_pull_is_lazy(registry: Registry, snapshotter_factory, containerd_factory, workdir: Path) -> None:
    snapshotter = lazysnap_with(snapshotter_factory, workdir, background=False)
    containerd = containerd_factory(snapshotter_socket=snapshotter.address, cri=True, cri_snapshotter=PLUGIN)
    containerd.plain_http(registry.host)
    image = im.Image(
        [*feature_image().layers, im.Layer([im.File("data/blob", im.pseudo_random(20 << 20, 6))])]
    )
    ref = accelerate(registry, "lazy/cri", image, format="zstd-chunked")
    cri = containerd.cri_client()
    try:
        assert cri.pull_image(ref).startswith("sha256:")
    finally:
        cri.close()
    fetched, total = layer_bytes(registry, ref)
    assert fetched < total / 4, f"CRI pull fetched {fetched} of {total} layer bytes: not lazy"
    assert len(list((snapshotter.root / "mnt").iterdir())) == len(image.layers)
    # zstd:chunked layers carry no toc.digest label: the TOC digest came from the manifest
    assert "cri.layer-digest" in snapshotter.log()


def test_restart_serves_cached_layers_without_the_network(
    registry_factory, snapshotter_factory, containerd_factory, workdir: Path
) -> None:
    registry = registry_factory(record=False)
    metrics_port = free_port()
    snap = lazysnap_with(
        snapshotter_factory, workdir, metrics_address=f"127.0.0.1:{metrics_port}", read_timeout=5.0
    )
    containerd = containerd_factory(snapshotter_socket=snap.address)
    image = feature_image()
    ref = accelerate(registry, "lazy/restart", image)
    rpull(containerd, ref)

    def metrics() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    deadline = time.monotonic() + 60  # the background fetch makes every layer local
    while time.monotonic() < deadline:
        ratios = [
            float(line.split()[-1])
            for line in metrics().splitlines()
            if line.startswith("lazysnap_layer_fetched_ratio{")
        ]
        if ratios and min(ratios) == 1.0:
            break
        time.sleep(0.5)
    assert ratios and min(ratios) == 1.0, ratios
    text = metrics()
    assert f"lazysnap_remote_layers {float(len(image.layers))}" in text
    assert 'lazysnap_rpcs_total{code="ALREADY_EXISTS",rpc="Prepare"}' in text
    for healthy in ("bad_chunks", "chunk_cache_write_errors", "chunk_cache_read_errors", "fetch_errors"):
        assert f"lazysnap_{healthy}_total 0.0" in text, healthy  # exported, and nothing went wrong
    (limit,) = [
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("lazysnap_chunk_cache_limit")
    ]
    assert limit == 20 << 30  # the default 20GiB, not lowered

    snap.stop()
    registry.stop()  # no network from here on
    snap.start()
    assert len(snap.client().names()) == len(image.layers)  # restored from the stored TOCs
    containerd.wait_snapshotter(PLUGIN)
    tree = container_tree(containerd, ref, snapshotter=PLUGIN)
    trees.assert_same(image.expected_tree(), tree, ignore=RUNTIME_PATHS)


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    unit = (Path(__file__).resolve().parents[2] / "systemd" / "lazysnap.service").read_text()
    assert "Type=notify" in unit and "Before=containerd.service" in unit
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and line[:1] != "#")
    # the daemon's FUSE descriptor survives its restarts; its successor may notify; reload upgrades
    assert int(settings["FileDescriptorStoreMax"]) > 0 and settings["NotifyAccess"] == "all"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID" and settings["Restart"] == "always"
    local = tmp_path / "lazysnap.service"
    local.write_text(unit.replace("/usr/local/bin/lazysnap", str(Path(sys.executable).parent / "lazysnap")))
    p = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True)
    assert p.returncode == 0 and "lazysnap.service" not in p.stderr, p.stderr


def test_implicit_dirs_never_take_attributes_through_a_lower_symlink(
    registry: Registry, snapshotter_factory, containerd_factory, workdir: Path
) -> None:
    """Layer 1 has `x -> <host dir>`, layer 2 `x/inner/k` without directory entries: the served
    `x/inner` must not get the host directory's mode, owner and mtime (the symlink is never followed
    on the host), while an ordinary lower directory (`y`) still gives its attributes."""
    host = workdir / "host"
    (host / "inner").mkdir(parents=True)
    os.chmod(host / "inner", 0o701)
    os.chown(host / "inner", 4242, 4343)
    snapshotter = lazysnap_with(snapshotter_factory, workdir, background=False)
    containerd = containerd_factory(snapshotter_socket=snapshotter.address)
    image = im.Image(
        [
            im.Layer([im.Symlink("x", str(host)), im.Dir("y", mode=0o750, uid=7, gid=8)]),
            im.Layer([im.File("x/inner/k", b"k\n"), im.File("y/k", b"k\n")]),
        ]
    )
    ref = accelerate(registry, "lazy/symlink-below", image)
    rpull(containerd, ref)

    async def top_digest() -> str:
        client = anonymous_client()
        async with client:
            return (await client.resolve(ref)).layers[-1]["digest"]

    top = trio.run(top_digest).replace(":", "-")
    inner = os.stat(snapshotter.root / "mnt" / top / "x" / "inner")
    assert (inner.st_mode & 0o7777, inner.st_uid, inner.st_gid) == (0o755, 0, 0)
    y = os.stat(snapshotter.root / "mnt" / top / "y")
    assert (y.st_mode & 0o7777, y.st_uid, y.st_gid) == (0o750, 7, 8)
    meta = json.loads((snapshotter.root / "layers" / top / "meta.json").read_text())
    assert set(meta["inherited"]) == {"y"}, meta["inherited"]


def test_dead_fuse_server_fails_readers_instead_of_hanging(
    registry: Registry, snapshotter_factory, containerd_factory, workdir: Path
) -> None:
    """The daemon's FUSE server stops (a failpoint makes a read handler fail as a bug would): a reader
    of a lazy layer gets an error at once instead of hanging, the daemon exits non-zero within
    seconds (systemd restarts it) and leaves no FUSE mount behind."""
    snapshotter = lazysnap_with(snapshotter_factory, workdir, background=False)
    snapshotter.stop()
    snapshotter.start(env={failpoints.ENV: "fuse.read=error"})
    containerd = containerd_factory(snapshotter_socket=snapshotter.address)
    image = im.Image([im.Layer([im.File("data/file", im.pseudo_random(1 << 20, seed=9))])])
    ref = accelerate(registry, "lazy/dies", image)
    rpull(containerd, ref)
    (layer,) = (snapshotter.root / "mnt").iterdir()
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append((layer / "data/file").read_bytes())
        except OSError as e:
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(15)
    assert not reader.is_alive(), "a read of a lazy layer hangs after the FUSE server stopped"
    assert isinstance(outcome[0], OSError), outcome
    assert snapshotter.wait_exit(15) != 0
    assert mounts_under(snapshotter.root) == [], "the daemon left its FUSE mount behind"
    log = snapshotter.log()
    assert "the FUSE server stopped unexpectedly" in log
    assert "lazysnap serve: the data path stopped" in log
    assert "Traceback" not in log, "the daemon should exit with one line, not a traceback"


def test_first_prepare_reads_every_layers_toc_ahead(
    registry: Registry, snapshotter_factory, workdir: Path
) -> None:
    """containerd prepares an image's layers one after another; the labels of the first Prepare name
    them all, so the daemon reads and indexes every TOC at once. Each later Prepare then finds its layer
    ready: it causes no registry request of its own, and no TOC is read twice."""
    snapshotter = lazysnap_with(snapshotter_factory, workdir, background=False, prefetch=False)
    image = im.Image(
        [im.Layer([im.File(f"layer{i}/file", im.pseudo_random(300 << 10, seed=20 + i))]) for i in range(4)]
    )
    ref = accelerate(registry, "lazy/ahead", image)

    async def descriptors() -> list[dict]:
        client = anonymous_client()
        async with client:
            return (await client.resolve(Reference.parse(ref))).layers

    digests = [d["digest"] for d in trio.run(descriptors)]
    client = snapshotter.client()

    def prepare(i: int) -> None:
        labels = {
            "containerd.io/snapshot.ref": f"sha256:{i:064x}",
            "containerd.io/snapshot/stargz/toc.digest": "",
            "containerd.io/snapshot/remote/stargz.reference": ref,
            "containerd.io/snapshot/remote/stargz.digest": digests[i],
            "containerd.io/snapshot/remote/stargz.layers": ",".join(digests[i:]),
        }
        labels = {k: v for k, v in labels.items() if v}
        parent = f"sha256:{i - 1:064x}" if i else ""
        with pytest.raises(grpc.RpcError) as claimed:
            client.prepare(f"extract-{i}", parent, labels)
        assert claimed.value.code() == grpc.StatusCode.ALREADY_EXISTS, claimed.value

    def blob_requests() -> dict[str, int]:
        counts = dict.fromkeys(digests, 0)
        for r in registry.requests():
            for d in digests:
                if r.method == "GET" and d in r.path:
                    counts[d] += 1
        return counts

    prepare(0)
    deadline = time.monotonic() + 20
    while 0 in blob_requests().values() and time.monotonic() < deadline:
        time.sleep(0.05)
    after_first = blob_requests()
    assert 0 not in after_first.values(), f"the first Prepare did not read every TOC: {after_first}"
    time.sleep(0.5)  # reads ahead settle
    settled = blob_requests()
    for i in range(1, len(digests)):
        prepare(i)
    assert blob_requests() == settled, (
        "a later Prepare read its TOC again instead of using the one read ahead"
    )
    assert all(n <= 2 for n in settled.values()), settled  # a tail read, and the TOC when it is larger
    assert len(list((snapshotter.root / "mnt").iterdir())) == len(digests)


def test_status_shows_the_daemons_layers_mid_background_fetch(
    registry: Registry, snapshotter_factory, containerd_factory, workdir: Path
) -> None:
    """`lazysnap status` asks the running daemon (its status socket): the image's layers, how much of
    each is local while the background fetch is still going, the cache and its limit."""
    snapshotter = lazysnap_with(snapshotter_factory, workdir, background_rate="200kB", cache_limit="1GiB")
    containerd = containerd_factory(snapshotter_socket=snapshotter.address)
    image = im.Image([im.Layer([im.File("data/blob", im.pseudo_random(16 << 20, seed=31))])])
    ref = accelerate(registry, "lazy/status", image, chunk_size=256 << 10)
    rpull(containerd, ref)
    time.sleep(4.5)  # the background fetch starts 3 s after the mount: one 4 MiB piece, then 200 kB/s
    command = [*lazysnap_command(), "status", "--root", str(snapshotter.root)]
    shown = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    (layer,) = doc["layers"]
    assert layer["image"] == ref and layer["refs"] == 1
    assert 0 < layer["fetched"] < 1, layer  # mid-way
    assert 0 < layer["bytes_local"] < layer["bytes"] and layer["bytes"] >= 16 << 20  # file content
    assert doc["cache"]["limit"] == 1 << 30
    table = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert table.returncode == 0 and ref in table.stdout and "\x1b" not in table.stdout, table.stdout
    snapshotter.stop()
    gone = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert gone.returncode == 1 and gone.stdout == "" and len(gone.stderr.splitlines()) == 1, gone
