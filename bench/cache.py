"""Benchmark: the chunk cache's get() and put() against plain file I/O on the same files, same run.

For 4 MiB and 64 KiB chunks (content-addressed keys, so put re-checks each sha256):
- get, warm: every chunk read through `ChunkCache.get` (preadv RWF_NOWAIT in the loop) vs
  `open(path, "rb").read()` of the same files, pages in the page cache;
- get, cold: the same after dropping the files' pages (posix_fadvise DONTNEED): the cache falls back to a
  worker thread; one reader, and eight concurrent readers (8 trio tasks vs 8 plain threads);
- get after a restart: the first read of each chunk by a freshly opened cache hashes it once (warm pages);
- put, fsync on and off, one task and eight: vs writing the same bytes to plain files (open, write,
  fsync when on, close) from one thread.
Rounds alternate cache and baseline; medians are reported, with the ratio cache / plain.

    python -m bench.cache [--rounds N] [--dir DIR] [--json bench/results/cache.json]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from fuse.cache import CacheStats, ChunkCache

MiB, KiB = 1 << 20, 1 << 10
SETS = {"4MiB": (4 * MiB, 48), "64KiB": (64 * KiB, 1024)}  # chunk size, chunk count (192 MiB, 64 MiB)


def make_chunks(size: int, count: int, seed: int) -> list[tuple[str, bytes]]:
    base = os.urandom(size)
    out = []
    for i in range(count):
        data = base[:-16] + seed.to_bytes(8, "big") + i.to_bytes(8, "big")
        out.append((ChunkCache.key(hashlib.sha256(data).digest(), "bench", i), data))
    return out


def drop_pages(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def summary(timing: tuple[float, list[float]], nbytes: int) -> dict[str, float]:
    seconds, lat = timing[0], sorted(timing[1])
    return {
        "mb_per_s": nbytes / seconds / 1e6,
        "p50_us": lat[len(lat) // 2] * 1e6,
        "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6,
    }


async def timed_async(fns: list[Callable[[], Awaitable[object]]], tasks: int) -> tuple[float, list[float]]:
    lat: list[float] = []

    async def worker(part: list[Callable[[], Awaitable[object]]]) -> None:
        for fn in part:
            t = time.perf_counter()
            await fn()
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for w in range(tasks):
            nursery.start_soon(worker, fns[w::tasks])
    return time.perf_counter() - t0, lat


async def timed_threads(fns: list[Callable[[], object]], threads: int) -> tuple[float, list[float]]:
    """Plain blocking calls: in the calling thread for 1, else in `threads` worker threads."""
    lat: list[float] = []

    def run(part: list[Callable[[], object]]) -> None:
        for fn in part:
            t = time.perf_counter()
            fn()
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    if threads == 1:
        run(fns)
    else:
        limiter = trio.CapacityLimiter(threads)
        async with trio.open_nursery() as nursery:
            for w in range(threads):
                nursery.start_soon(
                    functools.partial(trio.to_thread.run_sync, run, fns[w::threads], limiter=limiter)
                )
    return time.perf_counter() - t0, lat


def median_summary(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


async def bench_gets(root: Path, size: int, chunks: list[tuple[str, bytes]], rounds: int) -> list[dict]:
    cache = ChunkCache(root, 1 << 40, fsync=True)
    await cache.open()
    for key, data in chunks:
        await cache.put(key, data)
    paths = [cache.path(k) for k, _ in chunks]
    nbytes = size * len(chunks)

    def cache_gets(c: ChunkCache) -> list[Callable[[], Awaitable[object]]]:
        return [functools.partial(c.get, k, size) for k, _ in chunks]

    plain_reads = [p.read_bytes for p in paths]
    for key, data in chunks[:3]:
        assert await cache.get(key, size) == data

    rows = []
    for case, cold, tasks in (("warm", False, 1), ("cold", True, 1), ("cold x8", True, 8)):
        mine, plain = [], []
        before = cache.stats()
        for _ in range(rounds):
            if cold:
                drop_pages(paths)
            mine.append(summary(await timed_async(cache_gets(cache), tasks), nbytes))
            if cold:
                drop_pages(paths)
            plain.append(summary(await timed_threads(plain_reads, tasks), nbytes))
        after = cache.stats()
        rows.append(row("get", case, size, len(chunks), mine, plain, fallbacks(before, after)))

    # a restart: each digest chunk is hashed once on its first read (pages warm)
    mine, plain = [], []
    for _ in range(rounds):
        fresh = ChunkCache(root, 1 << 40)
        await fresh.open()
        mine.append(summary(await timed_async(cache_gets(fresh), 1), nbytes))
        assert fresh.stats().verified_on_read == len(chunks)
        plain.append(summary(await timed_threads(plain_reads, 1), nbytes))
    rows.append(row("get", "first after restart", size, len(chunks), mine, plain, {}))
    return rows


def fallbacks(before: CacheStats, after: CacheStats) -> dict[str, int]:
    return {
        "nowait_reads": after.nowait_reads - before.nowait_reads,
        "thread_reads": after.nowait_misses - before.nowait_misses,
    }


def row(op: str, case: str, size: int, count: int, mine: list, plain: list, extra: dict) -> dict:
    m, p = median_summary(mine), median_summary(plain)
    return {
        "op": op,
        "case": case,
        "chunk_size": size,
        "chunks": count,
        "cache": m,
        "plain": p,
        "ratio": m["mb_per_s"] / p["mb_per_s"],
        **extra,
    }


def plain_write(path: Path, data: bytes, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


async def bench_puts(base: Path, size: int, count: int, rounds: int) -> list[dict]:
    rows = []
    for fsync in (False, True):
        for tasks in (1, 8):
            mine, plain = [], []
            for r in range(rounds):
                chunks = make_chunks(size, count, seed=1000 + r)
                root = base / f"put-{r}"
                cache = ChunkCache(root, 1 << 40, fsync=fsync)
                await cache.open()
                os.sync()
                puts = [functools.partial(cache.put, k, d) for k, d in chunks]
                mine.append(summary(await timed_async(puts, tasks), size * count))
                assert cache.stats().stored == count
                shutil.rmtree(root)

                plain_dir = base / f"plain-{r}"
                plain_dir.mkdir()
                os.sync()
                writes = [
                    functools.partial(plain_write, plain_dir / str(i), d, fsync)
                    for i, (_, d) in enumerate(chunks)
                ]
                plain.append(summary(await timed_threads(writes, 1), size * count))
                shutil.rmtree(plain_dir)
            case = f"fsync={'on' if fsync else 'off'}" + (f" x{tasks}" if tasks > 1 else "")
            rows.append(row("put", case, size, count, mine, plain, {}))
    return rows


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'op':4} {'chunk':>6} {'case':21} {'cache MB/s':>10} {'p50 us':>8} {'p99 us':>8}"
        f" {'plain MB/s':>10} {'p50 us':>8} {'ratio':>6}  notes"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        c, p = r["cache"], r["plain"]
        notes = f"{r['nowait_reads']} in loop, {r['thread_reads']} in a thread" if "thread_reads" in r else ""
        size = f"{r['chunk_size'] // MiB}MiB" if r["chunk_size"] >= MiB else f"{r['chunk_size'] // KiB}KiB"
        print(
            f"{r['op']:4} {size:>6} {r['case']:21} {c['mb_per_s']:10.0f} {c['p50_us']:8.0f}"
            f" {c['p99_us']:8.0f} {p['mb_per_s']:10.0f} {p['p50_us']:8.0f} {r['ratio']:6.2f}  {notes}"
        )


async def run(base: Path, rounds: int) -> list[dict]:
    rows: list[dict] = []
    for name, (size, count) in SETS.items():
        root = base / f"get-{name}"
        rows += await bench_gets(root, size, make_chunks(size, count, seed=len(rows)), rounds)
        shutil.rmtree(root)
    for _name, (size, count) in SETS.items():
        rows += await bench_puts(base, size, count, max(1, rounds // 2))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "cache.json")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="lzs-bench-cache-", dir=args.dir))
    try:
        rows = trio.run(run, base, args.rounds)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print_table(rows)
    machine = {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"machine": machine, "rounds": args.rounds, "rows": rows}, indent=2) + "\n"
    )
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
