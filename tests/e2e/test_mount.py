"""`lazysnap mount`: the data path alone. An accelerated image's merged tree, read lazily through FUSE
and overlayfs, equals the expected tree entry by entry; reads are lazy; concurrent readers, a registry
that goes away and comes back, a tiny cache and a corrupted cache file are all handled; a refused layer
is one line of error, and a FUSE server that dies fails its readers and leaves nothing mounted."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from fuse.formats.spec import TOC_DIGEST
from fuse.registry import Reference
from snapshotter import failpoints
from tests.e2e.test_lazy_pull import accelerate
from tests.harness import images as im
from tests.harness import trees
from tests.harness.accelerate import ctr_remote_convert, sample_image, skopeo_zstd_chunked
from tests.harness.containerd import Containerd
from tests.harness.mount import LAZYSNAP, LazysnapMount
from tests.harness.procs import mounts_under
from tests.harness.registry import Registry, anonymous_client


@pytest.fixture
def mount_factory(workdir: Path) -> Iterator[Callable[..., LazysnapMount]]:
    started: list[LazysnapMount] = []

    def make(image: str, **kw) -> LazysnapMount:
        m = LazysnapMount(workdir, image, name=f"mnt{len(started)}", **kw)
        started.append(m)
        return m.start()

    yield make
    for m in started:
        if m.service.alive():
            m.stop()


@pytest.fixture
def pulled_sample(registry: Registry, containerd: Containerd) -> tuple[im.Image, str]:
    image = sample_image()
    im.push_image(registry.url, "mount/src", "v1", image)
    ref = f"{registry.host}/mount/src:v1"
    containerd.ctr("image", "pull", "--plain-http", ref)
    return image, ref


@pytest.mark.parametrize(
    "args", [["--estargz"], ["--estargz", "--estargz-chunk-size", "65536"], ["--zstdchunked"]]
)
def test_mounted_tree_equals_expected_ctr_remote(
    registry, containerd, pulled_sample, mount_factory, args: list[str]
) -> None:
    image, ref = pulled_sample
    dst = ctr_remote_convert(containerd, ref, f"{registry.host}/mount/conv:{len(args)}{args[-1][2:6]}", *args)
    m = mount_factory(dst)
    trees.assert_same(image.expected_tree(), trees.scan(m.mountpoint))
    assert m.stop() == 0


def test_mounted_tree_equals_expected_skopeo(registry: Registry, workdir: Path, mount_factory) -> None:
    image = sample_image()
    im.push_image(registry.url, "mount/src", "v1", image)
    dst = skopeo_zstd_chunked(registry, workdir, "mount/src:v1", "mount/chunked:v1")
    m = mount_factory(dst)
    trees.assert_same(image.expected_tree(), trees.scan(m.mountpoint))


def big_image() -> im.Image:
    """About 200 MB of incompressible data in 50 files, and one small file in the middle of them."""
    files = [im.File(f"data/blob{i:02d}", im.pseudo_random(4 << 20, seed=i)) for i in range(50)]
    return im.Image(
        [im.Layer([im.Dir("data"), *files[:25], im.File("etc/small", b"just this\n"), *files[25:]])]
    )


def test_lazy_reads_concurrency_registry_outage_and_recovery(registry_factory, containerd, mount_factory):
    """One 200 MB image (converting it is the slow part) for laziness, concurrency and an outage."""
    reg = registry_factory(record=False)
    image = big_image()
    im.push_image(reg.url, "mount/big", "v1", image)
    containerd.ctr("image", "pull", "--plain-http", f"{reg.host}/mount/big:v1")
    dst = ctr_remote_convert(
        containerd, f"{reg.host}/mount/big:v1", f"{reg.host}/mount/big:esgz", "--estargz"
    )
    before = reg.blob_bytes_sent()
    m = mount_factory(dst, args=("--no-background", "--read-timeout", "3"))
    assert (m.mountpoint / "etc/small").read_bytes() == b"just this\n"
    fetched = reg.blob_bytes_sent() - before
    assert fetched < 2 << 20, f"{fetched} bytes fetched to read one 10-byte file of a 200 MB image"

    want = {
        f"data/blob{i:02d}": hashlib.sha256(im.pseudo_random(4 << 20, seed=i)).hexdigest() for i in range(50)
    }

    # 16 readers of overlapping files at once
    errors: list[str] = []

    def reader(k: int) -> None:
        for i in range(k, k + 8):
            path = f"data/blob{i % 20:02d}"
            got = hashlib.sha256((m.mountpoint / path).read_bytes()).hexdigest()
            if got != want[path]:
                errors.append(path)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []

    reg.stop()  # cached data keeps being served; uncached reads fail with EIO in bounded time
    assert hashlib.sha256((m.mountpoint / "data/blob03").read_bytes()).hexdigest() == want["data/blob03"]
    with pytest.raises(OSError) as e:
        (m.mountpoint / "data/blob40").read_bytes()
    assert e.value.errno == 5  # EIO
    reg.start()  # the same port: everything recovers
    assert hashlib.sha256((m.mountpoint / "data/blob40").read_bytes()).hexdigest() == want["data/blob40"]


def test_tiny_cache_and_corrupted_cache_file(registry, containerd, workdir, pulled_sample, mount_factory):
    image, ref = pulled_sample
    dst = ctr_remote_convert(
        containerd, ref, f"{registry.host}/mount/conv:cache", "--estargz", "--estargz-chunk-size", "65536"
    )
    expected = image.expected_tree()
    m = mount_factory(dst, args=("--cache-limit", str(256 << 10), "--no-background"))
    trees.assert_same(expected, trees.scan(m.mountpoint))  # every read evicts earlier chunks
    m.stop()

    m2 = mount_factory(dst, args=("--no-background",))
    trees.assert_same(expected, trees.scan(m2.mountpoint))
    m2.stop()
    chunk_files = sorted(p for p in m2.cache.rglob("*") if p.is_file() and p.stat().st_size > 1000)
    assert chunk_files, "nothing was cached"
    for p in chunk_files:  # truncate every cached chunk: all must be refetched, none served
        os.truncate(p, p.stat().st_size // 2)
    m3 = mount_factory(dst, args=("--no-background",), cache=m2.cache)
    trees.assert_same(expected, trees.scan(m3.mountpoint))


def run_mount(workdir: Path, image: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    mountpoint = workdir / "refused"
    mountpoint.mkdir(exist_ok=True)
    argv = [LAZYSNAP, "mount", "--plain-http", "--cache", str(workdir / "cache"), image, str(mountpoint)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def tampered(registry: Registry, ref: str, tag: str) -> str:
    """`ref` pushed again as `tag` with its layer's TOC digest annotation replaced by a wrong one."""

    async def push() -> str:
        client = anonymous_client()
        async with client:
            resolved = await client.resolve(ref)
            manifest = json.loads(json.dumps(resolved.manifest))
            for desc in manifest["layers"]:
                desc["annotations"][TOC_DIGEST] = "sha256:" + "0" * 64
            dst = Reference.parse(f"{registry.host}/mount/refused:{tag}")
            await client.push_manifest(dst, json.dumps(manifest).encode(), resolved.media_type)
            return str(dst)

    return trio.run(push)


def test_refused_layer_is_one_line_without_traceback(registry: Registry, workdir: Path) -> None:
    ref = accelerate(registry, "mount/refused", im.Image([im.Layer([im.File("etc/motd", b"hi\n")])]))
    cases = {
        tampered(registry, ref, "bad-toc"): "refused, its content does not match its digest",
        f"{registry.host}/mount/refused:no-such-tag": "cannot resolve",
    }
    for image, why in cases.items():
        p = run_mount(workdir, image)
        assert p.returncode == 1, p
        assert "Traceback" not in p.stderr, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lazysnap mount: ") and why in lines[0], p.stderr
    assert mounts_under(workdir) == []


def test_dead_fuse_server_fails_readers_and_exits(registry: Registry, workdir: Path) -> None:
    """The FUSE server stops (a failpoint makes a read handler fail as a bug would): the reader gets an
    error instead of hanging, the command exits 1 within seconds with one line, nothing stays mounted."""
    data = im.pseudo_random(1 << 20, seed=3)
    ref = accelerate(registry, "mount/dies", im.Image([im.Layer([im.File("data/file", data)])]))
    m = LazysnapMount(workdir, ref, args=("--no-background",))
    m.service.env = {failpoints.ENV: "fuse.read=error"}
    m.start()
    outcome: list[BaseException | bytes] = []
    reader = threading.Thread(target=lambda: outcome.append(_read(m.mountpoint / "data/file")), daemon=True)
    reader.start()
    reader.join(15)
    assert not reader.is_alive(), "a read of the mount hangs after its FUSE server stopped"
    assert isinstance(outcome[0], OSError), outcome
    deadline = time.monotonic() + 15
    while m.service.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not m.service.alive(), "lazysnap mount did not exit after its FUSE server stopped"
    assert m.service.proc.returncode == 1
    assert mounts_under(workdir) == [], "lazysnap mount left mounts behind"
    last = m.service.log_tail().strip().splitlines()[-1]
    assert last.startswith("lazysnap mount: the FUSE server stopped unexpectedly"), last


def _read(path: Path) -> BaseException | bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        return e
