"""The fetcher against what breaks it: a chunk cache disk that fills up or refuses writes, a layer whose
TOC declares decompression bombs, a corrupt chunk among good ones, and a registry that stalls.

What a user must see: reads keep returning the right bytes (from memory and the network) whatever the
cache disk does, and the data path never dies; a small read inflates what its own chunk declares, not
gigabytes of neighbours; one corrupt chunk fails alone and is fetched again next time, never served;
a read that cannot be served fails after one read_timeout, not two.

The bomb tests run in a child process under RLIMIT_AS, so a regression fails there instead of eating
the machine; the FUSE test runs in a child too (pyfuse3 allows one mount per process)."""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import trio

from fuse.cache import CacheError, ChunkCache
from fuse.fetch import Fetcher, FetchOptions, FetchTimeout, LayerHandle
from fuse.formats import FormatError, Unverified, open_layer
from tests.harness.procs import peak_rss_mib
from tests.unit.test_cache import tmpfs
from tests.unit.test_fetch import BIG, FILES, CountingSource, setup
from tests.unit.test_formats_reader import estargz_tail, sha

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def gzip_member(data: bytes = b"", zeros: int = 0) -> bytes:
    """One gzip member of `data`, or of `zeros` zero bytes (streamed: never held uncompressed)."""
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    out = [c.compress(data)]
    block = bytes(MiB)
    for _ in range(zeros // MiB):
        out.append(c.compress(block))
    out.append(c.compress(bytes(zeros % MiB)))
    out.append(c.flush())
    return b"".join(out)


def estargz(files: list[tuple[str, bytes, list[dict]]], blob: bytes) -> tuple[bytes, str]:
    """An eStargz blob from prepared data `blob` and TOC entries; returns (blob, TOC digest)."""
    entries = [entry for _, _, chunk_entries in files for entry in chunk_entries]
    tail, digest = estargz_tail({"version": 1, "entries": entries}, len(blob))
    return blob + tail, digest


def chunk_entries(name: str, chunks: list[tuple[int, int, int]], digest: str) -> list[dict]:
    """TOC entries of a file whose chunks are (blob offset, innerOffset, size), all with one digest."""
    size = sum(s for _, _, s in chunks)
    out, at = [], 0
    for i, (offset, inner, s) in enumerate(chunks):
        e = {"name": name, "offset": offset, "innerOffset": inner, "chunkOffset": at, "chunkSize": s}
        e["chunkDigest"] = digest
        out.append({"type": "reg", "size": size, "mode": 0o644, **e} if i == 0 else {"type": "chunk", **e})
        at += s
    return out


BOMB_CHUNK = 64 * MiB  # declared size of each bomb chunk (all zeros: 64 KiB of gzip each)
SMALL = os.urandom(4096)


def bomb_layer() -> tuple[bytes, str]:
    """`a` (4 KiB), then `same`: 4 chunks of 64 MiB inside one gzip member (one compressed start,
    innerOffsets 0, 64, 128, 192 MiB), then `sep`: 8 chunks of 64 MiB, one member each. The whole
    blob is under 1 MiB: every chunk lies within one on-demand request's merge_cap of `a`."""
    zero_digest = sha(bytes(BOMB_CHUNK))
    blob = gzip_member(SMALL)
    files = [("a", SMALL, chunk_entries("a", [(0, 0, len(SMALL))], sha(SMALL)))]
    same_at = len(blob)
    blob += gzip_member(zeros=4 * BOMB_CHUNK)
    same = [(same_at, k * BOMB_CHUNK, BOMB_CHUNK) for k in range(4)]
    files.append(("same", b"", chunk_entries("same", same, zero_digest)))
    sep = []
    for _ in range(8):
        sep.append((len(blob), 0, BOMB_CHUNK))
        blob += gzip_member(zeros=BOMB_CHUNK)
    files.append(("sep", b"", chunk_entries("sep", sep, zero_digest)))
    return estargz(files, blob)


def sparse_layer() -> tuple[bytes, str]:
    """`hole`: one zero-run chunk (zstd:chunked's `chunkType: zeros`, a sparse file's hole) declaring
    1 GiB, then 4 KiB of data; no byte of the hole is stored in the blob."""
    blob = gzip_member(SMALL)
    entries = chunk_entries("hole", [(0, 0, 1 << 30), (0, 0, len(SMALL))], sha(SMALL))
    entries[0] = {**entries[0], "chunkType": "zeros", "chunkDigest": None}
    entries[0]["size"] = (1 << 30) + len(SMALL)
    return estargz([("hole", b"", entries)], blob)


def bomb_child(mode: str, cache_dir: str) -> None:
    """Runs in the child under RLIMIT_AS: prints one JSON line with what it saw."""

    async def main() -> dict:
        blob, toc = sparse_layer() if mode.startswith("hole") else bomb_layer()
        source = CountingSource(blob)
        layer = await open_layer(source, toc)
        cache = ChunkCache(Path(cache_dir), 1 << 40, fsync=False)
        await cache.open()
        fetcher = Fetcher(cache, FetchOptions(memory_cache=0))
        handle = LayerHandle(layer, "bomb", "bomb layer")
        ix = layer.index
        out: dict = {}
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.run)
            if mode == "read":
                out["ok"] = await fetcher.read(handle, ix.find("a"), 0, 4096) == SMALL
            elif mode == "hole-layer":  # the format reader's own read path, without the fetcher
                hole = ix.find("hole")
                middle = await layer.read(hole, 512 * MiB, 128 << 10)
                across = await layer.read(hole, (1 << 30) - 100, 200)
                out["ok"] = middle == bytes(128 << 10) and across == bytes(100) + SMALL[:100]
            elif mode == "hole":
                hole = ix.find("hole")
                middle = await fetcher.read(handle, hole, 512 * MiB, 128 << 10)
                across = await fetcher.read(handle, hole, (1 << 30) - 100, 200)
                out["ok"] = middle == bytes(128 << 10) and across == bytes(100) + SMALL[:100]
            else:
                await fetcher.background(handle)
                out["fraction"] = handle.fetched_fraction()
                out["ok"] = await fetcher.read(handle, ix.find("sep"), 7 * BOMB_CHUNK, 10) == bytes(10)
            nursery.cancel_scope.cancel()
        return out

    try:
        out = trio.run(main)
    except BaseException as e:  # MemoryError, or a group holding one: reported, not a traceback
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    out["max_rss_mib"] = peak_rss_mib()
    print(json.dumps(out), flush=True)


def run_bomb_child(mode: str, cache_dir: Path, limit: int) -> dict:
    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    code = f"from tests.unit.test_fetch_hostile import bomb_child; bomb_child({mode!r}, {str(cache_dir)!r})"
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}  # address space reserved per thread arena, kept small
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        preexec_fn=limit_memory,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert lines, f"child died (rc {p.returncode}): {p.stderr[-2000:]}"
    return json.loads(lines[-1])


BOMB_LIMIT = 512 * MiB  # the address space the child may use: two thirds of what the bombs declare


def test_a_small_read_inflates_its_own_chunk_not_its_neighbours_bombs(tmp_path: Path) -> None:
    # before: the plan took every neighbour (same compressed start, or within merge_cap) and inflated
    # them all, 768 MiB held plus a 256 MiB transient for one 4 KiB read: MemoryError here
    out = run_bomb_child("read", tmp_path / "cache", BOMB_LIMIT)
    assert out["ok"], out
    assert out["max_rss_mib"] < 256, out  # 4 KiB inflated, not the 64 MiB neighbours


def test_background_walk_of_bombs_inflates_one_chunk_at_a_time(tmp_path: Path) -> None:
    # a legitimate chunk is inflated (its innerOffset + size), but a walk piece holds at most
    # inflate_cap of them: before, the whole layer (768 MiB declared) was one piece
    out = run_bomb_child("background", tmp_path / "cache", BOMB_LIMIT)
    assert out["ok"] and out["fraction"] == 1.0, out
    assert out["max_rss_mib"] < 700, out


@pytest.mark.parametrize("mode", ["hole", "hole-layer"])
def test_a_read_of_a_huge_hole_makes_only_the_zeros_it_returns(tmp_path: Path, mode: str) -> None:
    # before: the fetcher (and the reader's Layer.read) made the whole declared zero run (1 GiB) for
    # every read of it: MemoryError
    out = run_bomb_child(mode, tmp_path / "cache", BOMB_LIMIT)
    assert out["ok"], out
    assert out["max_rss_mib"] < 256, out


# --- a failing chunk cache disk ---------------------------------------------------------------------


async def test_a_full_cache_disk_never_stops_reads_and_makes_room(tmp_path: Path, nursery) -> None:
    with tmpfs(tmp_path / "small", 2 * MiB) as disk:
        source, handle, fetcher = await setup(tmp_path, FetchOptions(memory_cache=MiB))
        fetcher.cache = cache = ChunkCache(disk / "cache", 1 << 30, fsync=False)  # limit far above the disk
        await cache.open()
        await nursery.start(fetcher.run)
        ix = handle.layer.index
        for _ in range(2):  # every file twice: the second pass reads what the disk kept, or fetches
            for name, data in FILES.items():
                assert await fetcher.read(handle, ix.find(name), 0, 200_000) == data
            assert await fetcher.read(handle, ix.find("big"), 0, 4 * MiB) == BIG
            await fetcher.flush()  # what waits for the disk cache
        await fetcher.background(handle)  # the background walk runs into the full disk too
        st = cache.stats()
        assert st.effective_limit <= 2 * MiB < st.limit  # it learned what fits
        assert 0 < st.bytes_used <= 2 * MiB and st.evictions > 0
        # and the data path is alive: a read that needs a fetch still works
        assert await fetcher.read(handle, ix.find("f07"), 5, 10) == FILES["f07"][5:15]


async def test_a_cache_that_refuses_every_write_is_counted_and_logged_once(
    tmp_path: Path, nursery, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, handle, fetcher = await setup(tmp_path, FetchOptions(merge_cap=64 << 10))

    async def broken_put(key: str, data: bytes) -> None:
        raise CacheError(f"chunk cache: cannot store {key}: [Errno 5] Input/output error")

    monkeypatch.setattr(fetcher.cache, "put", broken_put)
    await nursery.start(fetcher.run)
    ix = handle.layer.index
    caplog.set_level(logging.WARNING, "lazysnap.fetch")
    for name, data in FILES.items():
        assert await fetcher.read(handle, ix.find(name), 0, 200_000) == data
    await fetcher.flush()
    assert fetcher.counters.cache_write_errors >= len(FILES)
    failures = [r for r in caplog.records if "chunk cache write failed" in r.getMessage()]
    assert len(failures) == 1  # once per interval, not once per chunk
    requests = source.requests
    await fetcher.background(handle)  # nothing it fetched could be kept: it stops after one piece
    assert source.requests <= requests + 1
    assert any("background fetch of test layer stopped" in r.getMessage() for r in caplog.records)
    assert await fetcher.read(handle, ix.find("f03"), 0, 10) == FILES["f03"][:10]  # still serving


async def test_a_read_only_cache_disk_serves_what_it_holds_and_fetches_the_rest(
    tmp_path: Path, nursery
) -> None:
    with tmpfs(tmp_path / "ro", 8 * MiB) as disk:
        source, handle, fetcher = await setup(tmp_path)
        fetcher.cache = cache = ChunkCache(disk / "cache", 1 << 30, fsync=False)
        await cache.open()
        await nursery.start(fetcher.run)
        ix = handle.layer.index
        assert await fetcher.read(handle, ix.find("f00"), 0, 200_000) == FILES["f00"]
        await fetcher.flush()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        fetcher2 = Fetcher(cache, FetchOptions())
        await nursery.start(fetcher2.run)
        handle2 = LayerHandle(handle.layer, "layer-1", "test layer")
        requests = source.requests
        assert await fetcher2.read(handle2, ix.find("f00"), 0, 200_000) == FILES["f00"]  # from disk
        assert source.requests == requests
        for name in ("f12", "f13"):  # not cached, cannot be: fetched, served, counted
            assert await fetcher2.read(handle2, ix.find(name), 0, 200_000) == FILES[name]
        await fetcher2.flush()
        assert fetcher2.counters.cache_write_errors > 0 and cache.stats().write_errors > 0


async def test_no_exception_of_a_fetcher_task_ends_its_nursery(tmp_path: Path, nursery) -> None:
    source, handle, fetcher = await setup(tmp_path)
    await nursery.start(fetcher.run)

    async def explode(key: str, data: bytes) -> None:
        raise RuntimeError("a bug in the cache")

    fetcher.cache.put = explode  # type: ignore[method-assign]
    ix = handle.layer.index
    assert await fetcher.read(handle, ix.find("f01"), 0, 10) == FILES["f01"][:10]
    await trio.sleep(0.05)
    source.read_many = None  # type: ignore[assignment]  # fetch tasks now fail with TypeError
    with pytest.raises(TypeError):
        await fetcher.read(handle, ix.find("big"), 0, 10)
    assert await fetcher.read(handle, ix.find("f01"), 0, 10) == FILES["f01"][:10]  # alive


# --- a corrupt chunk among good ones ------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["digest", "deflate"])
async def test_a_corrupt_chunk_fails_alone_and_is_fetched_again(tmp_path: Path, nursery, damage: str) -> None:
    good, bad, after = os.urandom(50_000), os.urandom(50_000), os.urandom(50_000)
    blob, files = b"", []
    for name, data in (("good", good), ("bad", bad), ("after", after)):
        member = gzip_member(data)
        digest = sha(data)
        if name == "bad" and damage == "digest":
            digest = sha(data[::-1])  # decompresses fine, does not verify
        elif name == "bad":
            member = member[:40] + bytes(b ^ 0x55 for b in member[40:60]) + member[60:]
        files.append((name, data, chunk_entries(name, [(len(blob), 0, len(data))], digest)))
        blob += member
    blob, toc = estargz(files, blob)
    source = CountingSource(blob)
    layer = await open_layer(source, toc)
    cache = ChunkCache(tmp_path / "cache", 1 << 30, fsync=False)
    await cache.open()
    fetcher = Fetcher(cache, FetchOptions())
    await nursery.start(fetcher.run)
    handle = LayerHandle(layer, "layer-c", "corrupt layer")
    ix = layer.index

    assert await fetcher.read(handle, ix.find("good"), 0, 4096) == good[:4096]
    assert source.requests == 1  # all three came in one range
    assert await fetcher.read(handle, ix.find("after"), 0, 50_000) == after
    assert source.requests == 1
    with trio.fail_after(5):  # the bad chunk of that range may still be decoding: a read would join it
        while fetcher.counters.bad_chunks < 1:
            await trio.sleep(0.01)
    for attempt in (1, 2):  # each read of the bad chunk fetches it again; its bytes are never served
        with pytest.raises(Unverified if damage == "digest" else FormatError):
            await fetcher.read(handle, ix.find("bad"), 0, 4096)
        assert source.requests == 1 + attempt
    assert fetcher.counters.bad_chunks == 3
    await fetcher.flush()
    st = cache.stats()
    assert st.entries == 2  # good and after; never the bad one


# --- one deadline per read ------------------------------------------------------------------------


async def test_the_kernels_retry_of_a_timed_out_read_fails_at_once(tmp_path: Path, nursery) -> None:
    """FUSE: a read-ahead request that fails is retried by the kernel with a read of its own page;
    the caller of read() waits for both. Both together must take one read_timeout."""
    timeout = 0.5
    source, handle, fetcher = await setup(tmp_path, FetchOptions(read_timeout=timeout))
    await nursery.start(fetcher.run)
    ix = handle.layer.index
    source.gate = trio.Event()  # the registry stalls
    started = trio.current_time()
    with pytest.raises(FetchTimeout):
        await fetcher.read(handle, ix.find("big"), 0, 1 << 20)  # the read-ahead
    with pytest.raises(FetchTimeout, match="big"):
        await fetcher.read(handle, ix.find("big"), 0, 4096)  # the retry of the page
    assert trio.current_time() - started < timeout + 0.2
    source.gate.set()  # the fetch ends after all: reads work again, without a new request
    await trio.sleep(0.1)
    requests = source.requests
    assert await fetcher.read(handle, ix.find("big"), 0, 4096) == BIG[:4096]
    assert source.requests == requests


async def test_a_stalled_cache_disk_read_is_bounded_by_the_timeout(
    tmp_path: Path, nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeout = 0.5
    source, handle, fetcher = await setup(tmp_path, FetchOptions(read_timeout=timeout))
    await nursery.start(fetcher.run)
    ix = handle.layer.index
    big = ix.find("big")
    assert await fetcher.read(handle, big, 0, 10) == BIG[:10]
    await fetcher.flush()  # stored
    fetcher._memory.clear()  # only the disk holds it now

    async def stalled_get(*args, **kw):
        await trio.sleep_forever()

    monkeypatch.setattr(fetcher.cache, "get", stalled_get)
    started = trio.current_time()
    with trio.fail_after(timeout + 2), pytest.raises(FetchTimeout, match="big"):
        await fetcher.read(handle, big, 1 << 19, 4096)  # a small random read: the disk part path
    assert trio.current_time() - started < timeout + 0.2  # before: it waited for the disk forever


FUSE_CHILD = """
import os, sys, time, trio, pyfuse3
from pathlib import Path
from fuse.cache import ChunkCache
from fuse.fetch import Fetcher, FetchOptions, LayerHandle
from fuse.formats import open_layer
from fuse.fs import LazyFS, MOUNT_OPTIONS
from fuse.mount import raise_read_ahead
from tests.unit.test_fetch import CountingSource, layer_tar

async def main(tmp: Path, timeout: float) -> None:
    blob, toc = layer_tar()
    source = CountingSource(blob)
    source.gate = trio.Event()  # the registry stalls
    layer = await open_layer(source, toc)
    cache = ChunkCache(tmp / "cache", 1 << 30, fsync=False)
    await cache.open()
    fetcher = Fetcher(cache, FetchOptions(read_timeout=timeout, prefetch=False, background=False))
    fs = LazyFS(fetcher)
    fs.add_layer("0", 1, LayerHandle(layer, "l0", "stalled layer"))
    mnt = tmp / "mnt"
    mnt.mkdir()
    pyfuse3.init(fs, str(mnt), list(MOUNT_OPTIONS))
    raise_read_ahead(str(mnt))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.run)
            nursery.start_soon(pyfuse3.main)

            def user_read() -> str:
                fd = os.open(mnt / "0" / "big", os.O_RDONLY)
                started = time.monotonic()
                try:
                    os.pread(fd, 4096, 0)
                    return "data"
                except OSError as e:
                    return f"{e.strerror} after {time.monotonic() - started:.3f}"
                finally:
                    os.close(fd)

            print(await trio.to_thread.run_sync(user_read), flush=True)
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)

trio.run(main, Path(sys.argv[1]), float(sys.argv[2]))
"""


def test_a_users_read_of_a_stalled_layer_fails_within_one_timeout(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("mounts FUSE: needs root and /dev/fuse")
    timeout = 1.5
    p = subprocess.run(
        [sys.executable, "-c", FUSE_CHILD, str(tmp_path), str(timeout)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    result = p.stdout.strip().splitlines()[-1]
    assert result.startswith("Input/output error after "), result
    took = float(result.rsplit(" ", 1)[1])
    assert timeout - 0.1 < took < timeout + 0.5, f"read() failed after {took:.2f}s, read_timeout {timeout}s"
