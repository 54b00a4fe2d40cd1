"""The on-disk chunk cache: what callers and the disk see - content addressing, atomic and verified
writes, size-checked reads, LRU eviction with pins, restarts, concurrency, and a loop that never stalls.

Documented behaviour the tests pin down:
- Reads are size-checked (fstat against the caller's size), not hashed: a file of the right size with
  flipped bytes is served for a `layer-` key (it has no digest), and for a `sha256-` key written by this
  process (verified when it was written). A `sha256-` file found at a restart is hashed once, on its first
  read, so flipped bytes written while the daemon was down are caught, dropped and refetched.
- A failing disk is the caller's miss, never its crash: a full filesystem makes the cache evict down to
  what fits and write again; a directory removed under it is made again; a read-only one still serves
  its chunks and refuses writes with CacheError; an unreadable file is a miss, dropped and counted.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import trio

from fuse.cache import TMP_PREFIX, CacheError, ChunkCache

KiB = 1 << 10
MiB = 1 << 20


def chunk(seed: int, size: int = 4 * KiB) -> bytes:
    """Deterministic, distinct content per seed."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    return (block * (size // len(block) + 1))[:size]


def key_of(data: bytes, layer: str = "sha256:" + "11" * 32, cid: int = 0) -> str:
    return ChunkCache.key(hashlib.sha256(data).digest(), layer, cid)


def files_on_disk(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in root.glob("??/*")}


def temp_files(root: Path) -> list[Path]:
    return list(root.glob(f"??/{TMP_PREFIX}*"))


def assert_consistent(cache: ChunkCache) -> None:
    """Index and directory agree: every file is cached and counted, nothing half-written is visible."""
    on_disk = files_on_disk(cache.root)
    st = cache.stats()
    assert not temp_files(cache.root)
    assert st.entries == len(on_disk)
    assert st.bytes_used == sum(on_disk.values())
    assert all(cache.contains(k) for k in on_disk)


async def opened(root: Path, limit: int = 1 << 30, **kw) -> ChunkCache:
    kw.setdefault("fsync", False)
    cache = ChunkCache(root, limit, **kw)
    await cache.open()
    return cache


def page_cache_can_be_dropped(path: Path) -> bool:
    """Whether fadvise(DONTNEED) evicts this file's pages here and RWF_NOWAIT then refuses to block
    (ext4, xfs, btrfs do; some filesystems ignore either)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            return os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT) < 4096
        except BlockingIOError:
            return True
        except OSError:
            return False
    finally:
        os.close(fd)


@contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A real small filesystem at `path` (tmpfs of `size` bytes: it fills up), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs: needs root")
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def drop_pages(path: Path) -> None:
    """Evict a file's pages from the page cache (they are clean: the caches here fsync their writes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --- keys and layout ------------------------------------------------------------------------------


def test_keys_are_content_addressed_or_per_layer() -> None:
    digest = bytes(range(32))
    assert ChunkCache.key(digest, "sha256:aa", 7) == "sha256-" + digest.hex()
    assert ChunkCache.key(digest, "sha256:bb", 9) == ChunkCache.key(digest, "sha256:aa", 7)
    plain = ChunkCache.key(None, "sha256:aa", 7)
    assert plain.startswith("layer-") and plain.endswith("-7") and "/" not in plain
    # the escape is injective: layer ids that differ only in punctuation get different keys
    ids = ["a:b", "a_b", "a_3ab", "a/b", "a.b", "a-b"]
    assert len({ChunkCache.key(None, i, 0) for i in ids}) == len(ids)
    assert len(ChunkCache.key(None, "x" * 1000, 0)) < 255
    with pytest.raises(ValueError):
        ChunkCache.key(b"short", "l", 0)


async def test_round_trip_and_layout(tmp_path: Path) -> None:
    cache = await opened(tmp_path / "cache")
    a, b = chunk(1, 100 * KiB), chunk(2, 5000)
    ka, kb = key_of(a), ChunkCache.key(None, "sha256:" + "22" * 32, 3)
    assert not cache.contains(ka)
    assert await cache.get(ka, len(a)) is None
    await cache.put(ka, a)
    await cache.put(kb, b)
    assert cache.contains(ka) and cache.contains(kb)
    assert await cache.get(ka, len(a)) == a
    assert await cache.get(kb, len(b)) == b
    assert await cache.get(ka, len(a), offset=1000, length=3000) == a[1000:4000]
    assert await cache.get(ka, len(a), offset=len(a) - 10) == a[-10:]
    with pytest.raises(ValueError):
        await cache.get(ka, len(a), offset=len(a) - 10, length=11)

    # two-level fan-out, private files, a private root
    path_a = cache.path(ka)
    assert path_a == tmp_path / "cache" / ka[7:9] / ka and path_a.is_file()
    assert stat.S_IMODE(path_a.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    assert cache.path(kb).parent.parent == tmp_path / "cache"
    assert len([d for d in (tmp_path / "cache").iterdir() if d.is_dir()]) == 256

    st = cache.stats()
    assert (st.hits, st.misses, st.entries, st.bytes_used, st.stored) == (4, 1, 2, len(a) + len(b), 2)
    assert_consistent(cache)


async def test_keys_that_are_not_cache_keys_are_refused(tmp_path: Path) -> None:
    cache = await opened(tmp_path)
    for bad in ["../../etc/passwd", "sha256-xyz", "layer-a/b-1", "", "sha256-" + "AB" * 32]:
        with pytest.raises(ValueError):
            await cache.put(bad, b"x")
    assert files_on_disk(tmp_path) == {}


async def test_identical_chunks_of_two_layers_are_stored_once(tmp_path: Path) -> None:
    cache = await opened(tmp_path)
    data = chunk(3, 64 * KiB)
    k1 = ChunkCache.key(hashlib.sha256(data).digest(), "sha256:" + "aa" * 32, 0)
    k2 = ChunkCache.key(hashlib.sha256(data).digest(), "sha256:" + "bb" * 32, 12)
    assert k1 == k2
    await cache.put(k1, data)
    assert cache.contains(k2)  # the second layer finds it without fetching
    await cache.put(k2, data)
    assert files_on_disk(tmp_path) == {k1: len(data)}
    st = cache.stats()
    assert (st.stored, st.duplicate_puts, st.entries, st.bytes_used) == (1, 1, 1, len(data))


# --- verified, atomic writes ----------------------------------------------------------------------


async def test_put_refuses_data_that_does_not_match_its_digest(tmp_path: Path) -> None:
    cache = await opened(tmp_path)
    key = key_of(chunk(4))
    with pytest.raises(CacheError, match="sha256"):
        await cache.put(key, chunk(5))
    assert not cache.contains(key)
    assert files_on_disk(tmp_path) == {}
    assert cache.stats().stored == 0


async def test_a_failed_write_leaves_nothing_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = await opened(tmp_path, fsync=True)
    data = chunk(6)

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(CacheError, match="No space left"):
        await cache.put(key_of(data), data)
    monkeypatch.undo()
    assert files_on_disk(tmp_path) == {}  # neither the chunk nor its temp file
    await cache.put(key_of(data), data)  # and the key is not stuck
    assert await cache.get(key_of(data), len(data)) == data


async def test_a_full_filesystem_evicts_down_to_what_fits_and_writes(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", MiB) as disk:
        cache = await opened(disk / "cache", limit=1 << 30)  # far more than the disk holds
        datas = [chunk(100 + i, 64 * KiB) for i in range(40)]  # 2.5 MiB in all
        for data in datas:
            await cache.put(key_of(data), data)  # before: CacheError (ENOSPC) from the 16th on
        st = cache.stats()
        assert st.write_errors == 0 and st.evictions > 0
        assert st.bytes_used <= MiB and st.effective_limit <= MiB < st.limit
        assert await cache.get(key_of(datas[-1]), len(datas[-1])) == datas[-1]  # the newest are kept
        assert_consistent(cache)


async def test_a_full_filesystem_with_nothing_to_evict_refuses_the_write(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", 256 * KiB) as disk:
        cache = await opened(disk / "cache")
        (disk / "other").write_bytes(bytes(256 * KiB - 4 * KiB))  # someone else filled it
        data = chunk(7, 64 * KiB)
        with pytest.raises(CacheError, match="No space left.*lower cache_limit"):
            await cache.put(key_of(data), data)
        assert cache.stats().write_errors == 1
        (disk / "other").unlink()
        await cache.put(key_of(data), data)  # room again: stored
        assert await cache.get(key_of(data), len(data)) == data
        assert_consistent(cache)


async def test_a_read_only_cache_serves_its_chunks_and_refuses_writes(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", MiB) as disk:
        cache = await opened(disk / "cache")
        old = chunk(8)
        await cache.put(key_of(old), old)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        restarted = await opened(disk / "cache")  # opens read-only: before, open() failed (EROFS)
        assert await restarted.get(key_of(old), len(old)) == old
        new = chunk(9)
        with pytest.raises(CacheError, match="Read-only"):
            await restarted.put(key_of(new), new)
        assert restarted.stats().write_errors == 1 and not restarted.contains(key_of(new))


async def test_a_cache_directory_removed_under_us_is_made_again(tmp_path: Path) -> None:
    cache = await opened(tmp_path / "cache")
    old, new = chunk(10), chunk(11)
    await cache.put(key_of(old), old)
    shutil.rmtree(tmp_path / "cache")
    await cache.put(key_of(new), new)  # before: CacheError (ENOENT)
    assert await cache.get(key_of(new), len(new)) == new
    assert await cache.get(key_of(old), len(old)) is None  # gone with the directory: a miss
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    assert_consistent(cache)


async def test_a_read_that_fails_with_an_io_error_is_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = await opened(tmp_path)
    data = chunk(12)
    await cache.put(key_of(data), data)

    def eio(*args: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cache._opener, "open_cached", eio)
    assert await cache.get(key_of(data), len(data)) is None  # before: OSError reached the reader
    monkeypatch.undo()
    st = cache.stats()
    assert st.read_errors == 1 and not cache.contains(key_of(data))
    await cache.put(key_of(data), data)  # fetched again, stored again
    assert await cache.get(key_of(data), len(data)) == data
    assert_consistent(cache)


async def test_temp_files_of_an_interrupted_write_are_removed_at_open(tmp_path: Path) -> None:
    cache = await opened(tmp_path)
    data = chunk(7)
    await cache.put(key_of(data), data)
    # a "crash" in the middle of a put: a partial temp file next to where the chunk would go
    partial = chunk(8)
    leftover = cache.path(key_of(partial)).parent / f"{TMP_PREFIX}deadbeef"
    leftover.write_bytes(partial[:1000])
    stranger = tmp_path / "00" / "not-a-chunk"
    stranger.write_bytes(b"x")

    again = await opened(tmp_path)
    assert not leftover.exists()
    assert stranger.exists()  # files that are not ours are left alone and not counted
    st = again.stats()
    assert (st.entries, st.bytes_used) == (1, len(data))
    assert not again.contains(key_of(partial))
    assert await again.get(key_of(data), len(data)) == data


# --- size-checked reads ---------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "grow", "empty"])
async def test_a_file_of_the_wrong_size_is_dropped_never_served(tmp_path: Path, damage: str) -> None:
    cache = await opened(tmp_path)
    data = chunk(9, 64 * KiB)
    key = key_of(data)
    await cache.put(key, data)
    path = cache.path(key)
    with open(path, "r+b") as f:
        if damage == "truncate":
            f.truncate(len(data) - 1)
        elif damage == "grow":
            f.seek(0, os.SEEK_END)
            f.write(b"\0")
        else:
            f.truncate(0)

    assert await cache.get(key, len(data)) is None
    assert not path.exists()
    st = cache.stats()
    assert (st.corrupt, st.misses, st.hits, st.entries, st.bytes_used) == (1, 1, 0, 0, 0)
    assert not cache.contains(key)
    await cache.put(key, data)  # the caller refetches and stores it again
    assert await cache.get(key, len(data)) == data


async def test_wrong_size_is_also_caught_after_a_restart(tmp_path: Path) -> None:
    cache = await opened(tmp_path)
    data = chunk(10, 64 * KiB)
    key = ChunkCache.key(None, "sha256:" + "33" * 32, 1)
    await cache.put(key, data)
    os.truncate(cache.path(key), 1000)  # e.g. a crash with fsync=False
    again = await opened(tmp_path)
    assert again.contains(key)  # the scan cannot know the size a chunk should have
    assert await again.get(key, len(data)) is None
    assert not again.path(key).exists()
    assert again.stats().corrupt == 1


async def test_flipped_bytes_of_the_right_size_are_served_for_layer_keys(tmp_path: Path) -> None:
    """Size-checked on read only: a `layer-` chunk has no digest to check against."""
    cache = await opened(tmp_path)
    data = chunk(11, 8 * KiB)
    key = ChunkCache.key(None, "sha256:" + "44" * 32, 0)
    await cache.put(key, data)
    flip(cache.path(key), 100)
    got = await cache.get(key, len(data))
    assert got is not None and got != data and len(got) == len(data)
    again = await opened(tmp_path)
    assert await again.get(key, len(data)) == got
    assert again.stats().corrupt == 0


async def test_flipped_bytes_of_a_digest_key_are_caught_once_per_process(tmp_path: Path) -> None:
    """Verified on write; within the process that wrote it, size-checked only. A file found at a
    restart is hashed on its first read: bytes changed while the daemon was down are never served."""
    cache = await opened(tmp_path)
    data = chunk(12, 64 * KiB)
    key = key_of(data)
    await cache.put(key, data)
    flip(cache.path(key), 5)
    assert await cache.get(key, len(data)) != data  # served: this process verified what it wrote

    again = await opened(tmp_path)
    assert await again.get(key, len(data)) is None
    assert not again.path(key).exists()
    assert again.stats().corrupt == 1

    await again.put(key, data)
    third = await opened(tmp_path)
    assert await third.get(key, len(data), offset=10, length=10) == data[10:20]
    assert await third.get(key, len(data)) == data
    st = third.stats()
    assert (st.verified_on_read, st.corrupt, st.hits) == (1, 0, 2)  # hashed once, on the first read


def flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


async def test_a_file_deleted_behind_the_cache_is_a_miss(tmp_path: Path) -> None:
    cache = await opened(tmp_path)
    data = chunk(13)
    await cache.put(key_of(data), data)
    cache.path(key_of(data)).unlink()
    assert await cache.get(key_of(data), len(data)) is None
    assert not cache.contains(key_of(data))
    assert_consistent(cache)


# --- LRU eviction, pins ---------------------------------------------------------------------------


async def test_least_recently_used_chunks_are_evicted_first(tmp_path: Path) -> None:
    size = 10 * KiB
    cache = await opened(tmp_path, limit=3 * size)
    a, b, c, d, e = (chunk(20 + i, size) for i in range(5))
    for x in (a, b, c):
        await cache.put(key_of(x), x)
    assert await cache.get(key_of(a), size) == a  # a is now the most recently used
    await cache.put(key_of(d), d)
    assert not cache.contains(key_of(b)) and not cache.path(key_of(b)).exists()
    assert all(cache.contains(key_of(x)) for x in (a, c, d))
    await cache.put(key_of(e), e)
    assert not cache.contains(key_of(c))
    assert sorted(files_on_disk(tmp_path)) == sorted(key_of(x) for x in (a, d, e))
    st = cache.stats()
    assert (st.evictions, st.entries, st.bytes_used) == (2, 3, 3 * size)
    assert st.bytes_used <= st.limit


async def test_pinned_chunks_are_never_evicted_even_over_the_limit(tmp_path: Path) -> None:
    size = 10 * KiB
    cache = await opened(tmp_path, limit=2 * size)
    a, b, c, d = (chunk(30 + i, size) for i in range(4))
    cache.pin(key_of(a))
    with cache.pinned(key_of(b)):
        await cache.put(key_of(a), a)
        await cache.put(key_of(b), b)
        await cache.put(key_of(c), c)  # nothing evictable: over the limit
        await cache.put(key_of(d), d)  # c is evictable, a and b are not
        assert cache.contains(key_of(a)) and cache.contains(key_of(b))
        assert not cache.contains(key_of(c)) and cache.contains(key_of(d))
        assert cache.stats().bytes_used == 3 * size > cache.limit
        assert cache.stats().pinned == 2
        assert await cache.get(key_of(a), size) == a
    cache.unpin(key_of(a))
    with pytest.raises(RuntimeError):
        cache.unpin(key_of(a))
    await cache.put(key_of(c), c)
    assert cache.stats().bytes_used <= cache.limit
    assert cache.contains(key_of(c))
    assert_consistent(cache)


async def test_a_chunk_larger_than_the_limit_is_still_stored(tmp_path: Path) -> None:
    cache = await opened(tmp_path, limit=1000)
    data = chunk(40, 4000)
    await cache.put(key_of(data), data)
    assert await cache.get(key_of(data), len(data)) == data  # the caller needs it now
    small = chunk(41, 100)
    await cache.put(key_of(small), small)
    assert not cache.contains(key_of(data))
    assert_consistent(cache)


# --- restarts -------------------------------------------------------------------------------------


async def test_a_restart_reuses_chunks_usage_and_approximate_lru_order(tmp_path: Path) -> None:
    size = 10 * KiB
    cache = await opened(tmp_path, limit=3 * size)
    a, b, c, d = (chunk(50 + i, size) for i in range(4))
    for x in (a, b, c):
        await cache.put(key_of(x), x)
    # recency as the disk records it: a used most recently, then c, then b
    for x, age in ((b, 300), (c, 200), (a, 100)):
        t = os.path.getmtime(cache.path(key_of(x))) - age
        os.utime(cache.path(key_of(x)), (t, t))

    again = await opened(tmp_path, limit=3 * size)
    st = again.stats()
    assert (st.entries, st.bytes_used, st.hits, st.misses) == (3, 3 * size, 0, 0)
    assert await again.get(key_of(c), size) == c
    await again.put(key_of(d), d)
    assert not again.contains(key_of(b))  # the oldest on disk went first
    assert all(again.contains(key_of(x)) for x in (a, c, d))


async def test_hits_are_persisted_as_recency_for_the_next_start(tmp_path: Path) -> None:
    size = 10 * KiB
    cache = await opened(tmp_path, limit=2 * size)
    a, b, c = (chunk(60 + i, size) for i in range(3))
    await cache.put(key_of(a), a)
    await cache.put(key_of(b), b)
    old = os.path.getmtime(cache.path(key_of(a))) - 3600
    os.utime(cache.path(key_of(a)), (old, old))  # a: written long ago...
    again = await opened(tmp_path, limit=2 * size)
    assert await again.get(key_of(a), size) == a  # ...but read now
    await again.flush()
    assert os.path.getmtime(again.path(key_of(a))) > old + 3000

    third = await opened(tmp_path, limit=2 * size)
    await third.put(key_of(c), c)
    assert third.contains(key_of(a)) and not third.contains(key_of(b))


async def test_a_lower_limit_at_restart_evicts_the_oldest(tmp_path: Path) -> None:
    size = 10 * KiB
    cache = await opened(tmp_path)
    xs = [chunk(70 + i, size) for i in range(5)]
    for i, x in enumerate(xs):
        await cache.put(key_of(x), x)
        t = 1_700_000_000 + i
        os.utime(cache.path(key_of(x)), (t, t))
    small = await opened(tmp_path, limit=2 * size)
    assert [small.contains(key_of(x)) for x in xs] == [False, False, False, True, True]
    assert sorted(files_on_disk(tmp_path)) == sorted(key_of(x) for x in xs[3:])
    assert_consistent(small)


async def test_async_context_manager_and_use_before_open(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 1 << 20, fsync=False)
    with pytest.raises(RuntimeError, match="open"):
        await cache.get(key_of(b"x"), 1)
    async with ChunkCache(tmp_path, 1 << 20, fsync=False) as cache:
        await cache.put(key_of(b"x"), b"x")
    assert files_on_disk(tmp_path) == {key_of(b"x"): 1}


# --- concurrency ----------------------------------------------------------------------------------


async def test_fifty_tasks_putting_and_getting_one_key(tmp_path: Path) -> None:
    cache = await opened(tmp_path, fsync=True)
    data = chunk(80, 1 * MiB)
    key = key_of(data)
    results: list[bytes | None] = []

    async def worker(i: int) -> None:
        if i % 2:
            results.append(await cache.get(key, len(data)))  # may run before any put finished
        await cache.put(key, data)
        results.append(await cache.get(key, len(data)))

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(worker, i)
    assert all(r in (None, data) for r in results)
    assert results.count(data) >= 50  # every get after its own put found the chunk
    st = cache.stats()
    assert (st.stored, st.duplicate_puts, st.entries) == (1, 49, 1)
    assert files_on_disk(tmp_path) == {key: len(data)}
    assert_consistent(cache)


async def test_concurrent_churn_under_a_small_limit_keeps_index_and_disk_in_step(tmp_path: Path) -> None:
    size = 16 * KiB
    cache = await opened(tmp_path, limit=8 * size)
    datas = [chunk(100 + i, size) for i in range(30)]

    async def worker(w: int) -> None:
        for n in range(40):
            x = datas[(w * 7 + n * 3) % len(datas)]
            with cache.pinned(key_of(x)) if n % 5 == 0 else nullcontext():
                await cache.put(key_of(x), x)
                got = await cache.get(key_of(x), size)
                assert got in (None, x)  # None only if evicted meanwhile, never wrong bytes
                if n % 5 == 0:
                    assert got == x  # a pinned chunk stays

    async with trio.open_nursery() as nursery:
        for w in range(20):
            nursery.start_soon(worker, w)
    await cache.flush()
    assert_consistent(cache)
    st = cache.stats()
    assert st.bytes_used <= cache.limit and st.evictions > 0 and st.corrupt == 0 and st.pinned == 0


async def test_cancelled_puts_leave_a_consistent_cache(tmp_path: Path) -> None:
    size = 64 * KiB
    cache = await opened(tmp_path, limit=6 * size, fsync=True)
    datas = [chunk(200 + i, size) for i in range(40)]
    for round_ in range(10):
        with trio.move_on_after(0.002 * (round_ + 1)):
            async with trio.open_nursery() as nursery:
                for x in datas:
                    nursery.start_soon(cache.put, key_of(x), x)
    await cache.flush()
    assert_consistent(cache)
    for x in datas:
        if cache.contains(key_of(x)):
            assert await cache.get(key_of(x), size) == x
    assert cache.stats().bytes_used <= cache.limit


# --- not blocking the loop ------------------------------------------------------------------------


async def test_warm_reads_stay_in_the_loop_cold_reads_go_to_a_thread(tmp_path: Path) -> None:
    cache = await opened(tmp_path, fsync=True)
    data = chunk(300, 4 * MiB)
    key = key_of(data)
    await cache.put(key, data)
    assert await cache.get(key, len(data)) == data
    st = cache.stats()
    assert st.nowait_supported and (st.nowait_reads, st.nowait_misses) == (1, 0)

    if not page_cache_can_be_dropped(cache.path(key)):
        pytest.skip(f"the filesystem of {tmp_path} does not drop pages or refuse RWF_NOWAIT reads")
    drop_pages(cache.path(key))
    assert await cache.get(key, len(data)) == data
    st = cache.stats()
    assert (st.nowait_reads, st.nowait_misses) == (1, 1)
    assert await cache.get(key, len(data)) == data  # the thread's read brought the pages back
    assert cache.stats().nowait_reads == 2


async def test_reads_work_where_rwf_nowait_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = await opened(tmp_path)
    data = chunk(301, 64 * KiB)
    await cache.put(key_of(data), data)
    real = os.preadv

    def preadv(fd: int, buffers: list, offset: int, flags: int = 0) -> int:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    assert await cache.get(key_of(data), len(data)) == data
    assert await cache.get(key_of(data), len(data)) == data
    st = cache.stats()
    assert not st.nowait_supported and st.nowait_misses == 2 and st.hits == 2


async def test_an_open_that_would_block_goes_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = await opened(tmp_path)
    data = chunk(302, 64 * KiB)
    await cache.put(key_of(data), data)

    def would_block(path: bytes) -> int:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(cache._opener, "open_cached", would_block)
    assert await cache.get(key_of(data), len(data)) == data
    assert cache.stats().open_fallbacks == 1


class LoopThreadSpy:
    """Records every potentially blocking call the cache makes on the loop's thread while watching.
    Allowed there: openat2(RESOLVE_CACHED) (not an os function), fstat, close, preadv(RWF_NOWAIT), and
    hashing of short strings (the fan-out directory of a `layer-` key)."""

    BLOCKING = ["open", "pread", "write", "fsync", "rename", "unlink", "utime", "stat", "listdir", "mkdir"]

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loop_thread = threading.get_ident()
        self.watching = False
        self.on_loop: list[str] = []
        self.off_loop: set[str] = set()
        for name in self.BLOCKING:
            monkeypatch.setattr(os, name, self._spy(name, getattr(os, name)))
        real_preadv, real_sha256 = os.preadv, hashlib.sha256

        def preadv(fd: int, buffers: list, offset: int, flags: int = 0) -> int:
            if not flags & os.RWF_NOWAIT:
                self._note("preadv without RWF_NOWAIT")
            return real_preadv(fd, buffers, offset, flags)

        def sha256(data: bytes = b"", **kw: object) -> object:
            if len(data) > 1024:
                self._note(f"sha256 of {len(data)} bytes")
            return real_sha256(data, **kw)

        monkeypatch.setattr(os, "preadv", preadv)
        monkeypatch.setattr(hashlib, "sha256", sha256)

    def _note(self, what: str) -> None:
        if not self.watching:
            return
        if threading.get_ident() == self.loop_thread:
            self.on_loop.append(what)
        else:
            self.off_loop.add(what)

    def _spy(self, name: str, real: Callable[..., object]) -> Callable[..., object]:
        def spy(*args: object, **kw: object) -> object:
            self._note(name)
            return real(*args, **kw)

        return spy


async def test_blocking_work_never_runs_on_the_loop_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deterministic half of "never block the loop": every call that may wait for the disk or burn
    milliseconds of CPU (write, fsync, rename, unlink, blocking reads and opens, scans, hashing chunks)
    happens in a worker thread, for every path through put, get, eviction, restart and flush."""
    size = 256 * KiB
    datas = [chunk(400 + i, size) for i in range(6)]
    digest_keys = [key_of(x) for x in datas[:3]]
    layer_keys = [ChunkCache.key(None, "sha256:" + "66" * 32, i) for i in range(3)]
    pairs = list(zip(digest_keys + layer_keys, datas, strict=True))
    spy = LoopThreadSpy(monkeypatch)

    spy.watching = True
    cache = await opened(tmp_path, limit=4 * size, fsync=True)
    for key, data in pairs:
        await cache.put(key, data)  # evictions on the way
        assert await cache.get(key, size) == data  # warm: in the loop
    key, data = pairs[-1]
    spy.watching = False
    drop_pages(cache.path(key))
    spy.watching = True
    assert await cache.get(key, size) == data  # cold: a thread
    with open(cache.path(key), "r+b") as f:
        f.truncate(size - 1)
    assert await cache.get(key, size) is None  # corrupt: unlinked in a thread
    await cache.flush()

    again = await opened(tmp_path, limit=4 * size)  # scan in a thread
    for key, data in pairs:
        if again.contains(key):
            assert await again.get(key, size) == data  # digest keys: hashed once, in a thread
    await again.flush()
    spy.watching = False
    assert again.stats().verified_on_read > 0 and cache.stats().nowait_misses > 0
    assert spy.on_loop == [], f"blocking calls on the loop thread: {spy.on_loop}"
    assert {"write", "fsync", "rename", "unlink", "listdir", "sha256 of 262144 bytes"} <= spy.off_loop


async def test_the_loop_keeps_ticking_while_200_mb_are_put_and_got(tmp_path: Path) -> None:
    """The end-to-end half: a task ticking every millisecond never waits 50 ms while 200 MiB are put
    (fsync on, digests re-checked, evictions) and got (half of them from the disk).

    This machine is shared: at times other work stalls any process for longer than that (seen: 60-220
    ms with the loop idle and plain threads writing). So the best of three attempts counts, and when all
    three stall, a control (the same bytes written, fsynced and read by plain threads, no cache) decides:
    if it stalls too, the machine is too loaded to tell and the test is skipped; otherwise it fails."""
    attempts: list[float] = []
    for attempt in range(3):
        root = tmp_path / f"attempt{attempt}"
        attempts.append(await max_tick_gap(cache_workload, root))
        shutil.rmtree(root)
        if attempts[-1] < 0.050:
            return
    control = await max_tick_gap(plain_thread_workload, tmp_path / "control")
    ms = [round(a * 1000, 1) for a in attempts]
    if control >= 0.050:
        pytest.skip(
            f"machine too loaded: plain threads stalled the loop {control * 1000:.0f} ms (cache: {ms})"
        )
    assert min(attempts) < 0.050, f"the loop stalled for {ms} ms (plain threads: {control * 1000:.1f} ms)"


SIZE, COUNT = 4 * MiB, 50  # 200 MiB


def workload_chunks() -> list[tuple[str, bytes]]:
    """A third under digest keys (hashed again by put), made before the clock starts."""
    bases = [os.urandom(SIZE) for _ in range(4)]
    work: list[tuple[str, bytes]] = []
    for i in range(COUNT):
        if i % 3:
            work.append((ChunkCache.key(None, "sha256:" + "55" * 32, i), bases[i % 4]))
        else:
            data = bases[i % 4][:-8] + i.to_bytes(8, "big")
            work.append((key_of(data), data))
    return work


async def max_tick_gap(
    workload: Callable[[Path, list[tuple[str, bytes]]], Awaitable[None]], root: Path
) -> float:
    work = workload_chunks()
    gaps: list[float] = []
    done = trio.Event()

    async def ticker() -> None:
        last = trio.current_time()
        while not done.is_set():
            await trio.sleep(0.001)
            now = trio.current_time()
            gaps.append(now - last)
            last = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await workload(root, work)
        done.set()
    assert len(gaps) > 50
    return max(gaps)


async def cache_workload(root: Path, work: list[tuple[str, bytes]]) -> None:
    cache = await opened(root, limit=120 * MiB, fsync=True)  # evictions happen too

    async def worker(w: int) -> None:
        for i in range(w, COUNT, 4):
            key, data = work[i]
            await cache.put(key, data)
            if i % 2:
                drop_pages(cache.path(key))  # half of the reads must go to the disk
            assert await cache.get(key, SIZE) == data

    async with trio.open_nursery() as workers:
        for w in range(4):
            workers.start_soon(worker, w)
    st = cache.stats()
    assert st.stored == COUNT and st.evictions > 0 and st.nowait_misses > 0 and st.nowait_reads > 0


async def plain_thread_workload(root: Path, work: list[tuple[str, bytes]]) -> None:
    root.mkdir()
    limiter = trio.CapacityLimiter(2)

    def write_and_read(i: int, data: bytes) -> bytes:
        path = root / str(i)
        with open(path, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        if i % 2:
            drop_pages(path)
        return path.read_bytes()

    async def worker(w: int) -> None:
        for i in range(w, COUNT, 4):
            assert await trio.to_thread.run_sync(write_and_read, i, work[i][1], limiter=limiter) == work[i][1]

    async with trio.open_nursery() as workers:
        for w in range(4):
            workers.start_soon(worker, w)
