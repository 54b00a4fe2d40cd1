"""Benchmark: blob range reads through lazysnap's registry client against curl, same ranges, same run.

A real registry (docker-registry on loopback) holds a 64 MiB random blob. For each read size
(4 KiB, 64 KiB, 1 MiB, 4 MiB) and each number of concurrent readers (1, 8), both clients read the same
list of random aligned ranges: lazysnap with one RegistryClient shared by N trio tasks, curl as N
processes each reusing one connection for its share (`curl -K`, per-transfer times from `-w`).
Printed: throughput (MB/s) and per-request latency p50/p95 of each, and the ratio lazysnap/curl.

    python -m bench.registry_ranges [--requests N] [--json bench/results/registry_ranges.json]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import trio

from fuse.registry import Reference
from tests.harness.images import pseudo_random
from tests.harness.registry import Registry, anonymous_client

BLOB_SIZE = 64 << 20
SIZES = [4 << 10, 64 << 10, 1 << 20, 4 << 20]
READERS = [1, 8]


def plan(size: int, count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, BLOB_SIZE // size) * size for _ in range(count)]


async def lazysnap_reads(ref: Reference, digest: str, offsets: list[int], size: int, readers: int):
    latencies: list[float] = []
    async with anonymous_client() as c:
        await c.read_range(ref, digest, 0, 1)  # connection set up, as curl's first transfer does too

        async def reader(share: list[int]) -> None:
            for off in share:
                t = time.perf_counter()
                data = await c.read_range(ref, digest, off, size)
                latencies.append(time.perf_counter() - t)
                assert len(data) == size

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(readers):
                nursery.start_soon(reader, offsets[i::readers])
        return time.perf_counter() - start, latencies


def curl_reads(url: str, offsets: list[int], size: int, readers: int, tmp: Path):
    procs = []
    for i in range(readers):
        cfg = tmp / f"curl-{i}.cfg"
        lines = []
        for off in offsets[i::readers]:
            lines += [f'url = "{url}"', f'range = "{off}-{off + size - 1}"', 'output = "/dev/null"']
        cfg.write_text("\n".join(lines) + "\n")
        procs.append(cfg)
    start = time.perf_counter()
    running = [
        subprocess.Popen(
            ["curl", "-s", "-f", "-K", str(cfg), "-w", "%{time_total} %{size_download}\n"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for cfg in procs
    ]
    outputs = [p.communicate()[0] for p in running]
    elapsed = time.perf_counter() - start
    latencies = []
    for p, out in zip(running, outputs, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"curl failed with exit code {p.returncode}")
        for line in out.split("\n"):
            if line.strip():
                t, n = line.split()
                assert int(n) == size, f"curl read {n} bytes, wanted {size}"
                latencies.append(float(t))
    return elapsed, latencies


def summary(elapsed: float, latencies: list[float], size: int) -> dict:
    lat = sorted(latencies)
    return {
        "mb_per_s": len(lat) * size / elapsed / 1e6,
        "p50_ms": statistics.median(lat) * 1e3,
        "p95_ms": lat[int(len(lat) * 0.95) - 1] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="reads per size and reader count")
    parser.add_argument("--json", type=Path, default=Path("bench/results/registry_ranges.json"))
    args = parser.parse_args()
    if not shutil.which("curl"):
        raise SystemExit("curl is needed for the baseline")
    with tempfile.TemporaryDirectory(prefix="lzs-bench-") as tmpdir:
        tmp = Path(tmpdir)
        reg = Registry(tmp / "registry", record=False).start()
        try:
            ref = Reference.parse(f"{reg.host}/bench/blob:x")

            async def push() -> str:
                async with anonymous_client() as c:
                    return await c.push_blob(ref, pseudo_random(BLOB_SIZE, seed=1))

            digest = trio.run(push)
            url = f"{reg.url}/v2/bench/blob/blobs/{digest}"
            rows = []
            print(
                f"{'size':>8} {'readers':>7} | {'lazysnap MB/s':>13} {'p50 ms':>7} {'p95 ms':>7} | "
                f"{'curl MB/s':>9} {'p50 ms':>7} {'p95 ms':>7} | {'ratio':>5}"
            )
            for size in SIZES:
                count = max(16, min(args.requests, (256 << 20) // size))  # bounded bytes per cell
                for readers in READERS:
                    offsets = plan(size, count, seed=size + readers)
                    ours = summary(*trio.run(lazysnap_reads, ref, digest, offsets, size, readers), size)
                    theirs = summary(*curl_reads(url, offsets, size, readers, tmp), size)
                    ratio = ours["mb_per_s"] / theirs["mb_per_s"]
                    rows.append(
                        {
                            "size": size,
                            "readers": readers,
                            "requests": count,
                            "lazysnap": ours,
                            "curl": theirs,
                            "throughput_ratio": ratio,
                        }
                    )
                    print(
                        f"{size >> 10:>6}Ki {readers:>7} | {ours['mb_per_s']:>13.1f} {ours['p50_ms']:>7.2f} "
                        f"{ours['p95_ms']:>7.2f} | {theirs['mb_per_s']:>9.1f} {theirs['p50_ms']:>7.2f} "
                        f"{theirs['p95_ms']:>7.2f} | {ratio:>5.2f}"
                    )
        finally:
            reg.stop()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"blob_size": BLOB_SIZE, "rows": rows}, indent=2) + "\n")
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
