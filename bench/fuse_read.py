"""Benchmark: the lazy data path (`lazysnap mount`) against native ext4, side by side in one run.

An image with a 256 MiB file and 50,000 small files in 500 directories is pushed to a local registry
and converted by lazysnap (eStargz, 4 MiB chunks). The same tree is extracted to an ext4 directory.
Measured, each with its native counterpart:
- cold read from the registry (empty chunk cache, no background fetch): MB/s;
- warm sequential read (kernel page cache through FUSE, keep_cache) vs native warm: ratio (target 0.9);
- first read of data already in the chunk cache (a fresh mount, nothing in the kernel's FUSE page cache)
  vs native warm: MB/s and ratio;
- random 4 KiB reads (fresh mount, chunk cache warm, offsets never repeated): p50/p99;
- `find` over the 50,000 entries, first and second run;
- the mount process's RSS with 10 layers of 20,000 files each mounted.

    python -m bench.fuse_read [--json bench/results/fuse_read.json]   (root; about 2 minutes)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import trio

from snapshotter.convert.converter import convert_image
from tests.harness import images as im
from tests.harness.mount import LazysnapMount
from tests.harness.registry import Registry, anonymous_client

BIG = 256 << 20
READ = 1 << 20


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def seq_read(path: Path) -> float:
    """MB/s of one sequential read with 1 MiB reads."""
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(READ):
            pass
    return path.stat().st_size / (time.perf_counter() - start) / 1e6


def random_reads(path: Path, count: int = 2000) -> tuple[float, float]:
    """p50/p99 latency in microseconds of 4 KiB reads at distinct random offsets."""
    rng = random.Random(1)
    offsets = rng.sample(range(path.stat().st_size // 4096), count)
    lat = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            t = time.perf_counter()
            os.pread(fd, 4096, off * 4096)
            lat.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    lat.sort()
    return statistics.median(lat) * 1e6, lat[int(len(lat) * 0.99)] * 1e6


def find_time(root: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["find", str(root)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main_image() -> im.Image:
    entries: list = [im.File("big", im.pseudo_random(BIG, seed=1))]
    for d in range(500):
        entries.append(im.Dir(f"tree/d{d:03d}"))
        entries += [im.File(f"tree/d{d:03d}/f{i:03d}", b"x" * (i % 64)) for i in range(99)]
    return im.Image([im.Layer(entries)])


def many_layers_image() -> im.Image:
    return im.Image(
        [im.Layer([im.File(f"l{n}/d{i // 100}/f{i}", b"") for i in range(20_000)]) for n in range(10)]
    )


async def push_and_convert(reg: Registry, repo: str, image: im.Image) -> str:
    await im.push_image_async(reg.url, repo, "v1", image)
    client = anonymous_client()
    async with client:
        result = await convert_image(client, f"{reg.host}/{repo}:v1")
    return result.destination


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("bench/results/fuse_read.json"))
    args = parser.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="lzs-bench-") as tmpdir:
        tmp = Path(tmpdir)
        reg = Registry(tmp / "registry", record=False).start()
        try:
            image = main_image()
            native = tmp / "native"
            native.mkdir()
            with tarfile.open(fileobj=io.BytesIO(image.layers[0].tar())) as tar:
                tar.extractall(native, filter="tar")
            ref = trio.run(push_and_convert, reg, "bench/main", image)
            many = trio.run(push_and_convert, reg, "bench/many", many_layers_image())

            drop_caches()
            out["native_cold_mb_s"] = seq_read(native / "big")
            out["native_warm_mb_s"] = seq_read(native / "big")
            out["native_random_4k_us"] = random_reads(native / "big")
            drop_caches()
            out["native_find_s"] = [find_time(native / "tree"), find_time(native / "tree")]

            m = LazysnapMount(tmp, ref, name="m1", args=("--no-background",)).start()
            try:
                out["lazy_cold_registry_mb_s"] = seq_read(m.mountpoint / "big")
                out["lazy_warm_mb_s"] = seq_read(m.mountpoint / "big")
                out["lazy_find_s"] = [find_time(m.mountpoint / "tree"), find_time(m.mountpoint / "tree")]
            finally:
                m.stop()
            m = LazysnapMount(tmp, ref, name="m2", args=("--no-background",), cache=tmp / "m1-cache").start()
            try:
                out["lazy_first_read_from_chunk_cache_mb_s"] = seq_read(m.mountpoint / "big")
            finally:
                m.stop()
            m = LazysnapMount(tmp, ref, name="m3", args=("--no-background",), cache=tmp / "m1-cache").start()
            try:
                out["lazy_random_4k_us"] = random_reads(m.mountpoint / "big")
            finally:
                m.stop()
            m = LazysnapMount(tmp, many, name="m4", args=("--no-background",)).start()
            try:
                out["rss_10_layers_20000_files_mib"] = rss_kib(m.service.pid) / 1024
            finally:
                m.stop()
        finally:
            reg.stop()
    out["ratio_warm"] = out["lazy_warm_mb_s"] / out["native_warm_mb_s"]
    out["ratio_chunk_cache_first_read"] = (
        out["lazy_first_read_from_chunk_cache_mb_s"] / out["native_warm_mb_s"]
    )
    print(f"{'measure':<44} {'lazysnap':>12} {'native ext4':>12} {'ratio':>7}")
    rows = [
        ("sequential read, warm (MB/s)", out["lazy_warm_mb_s"], out["native_warm_mb_s"]),
        (
            "first read from chunk cache (MB/s)",
            out["lazy_first_read_from_chunk_cache_mb_s"],
            out["native_warm_mb_s"],
        ),
        ("cold read (registry vs disk) (MB/s)", out["lazy_cold_registry_mb_s"], out["native_cold_mb_s"]),
        ("random 4 KiB read p50 (us)", out["lazy_random_4k_us"][0], out["native_random_4k_us"][0]),
        ("random 4 KiB read p99 (us)", out["lazy_random_4k_us"][1], out["native_random_4k_us"][1]),
        ("find 50,000 entries, first (s)", out["lazy_find_s"][0], out["native_find_s"][0]),
        ("find 50,000 entries, second (s)", out["lazy_find_s"][1], out["native_find_s"][1]),
    ]
    for name, ours, theirs in rows:
        print(f"{name:<44} {ours:>12.2f} {theirs:>12.2f} {ours / theirs:>7.2f}")
    print(f"{'mount RSS, 10 layers x 20,000 files (MiB)':<44} {out['rss_10_layers_20000_files_mib']:>12.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
