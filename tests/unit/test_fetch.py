"""The fetcher over an in-memory blob: few requests, no duplicate fetches, bounded waits, and a layer
that needs no network once the background fetch is done."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from fuse.ahead import LoaderAhead
from fuse.cache import ChunkCache
from fuse.fetch import (
    MERGE_UNMEASURED,
    UNIT_CHUNKS,
    UNREAD_ALLOWANCE,
    Fetcher,
    FetchOptions,
    FetchTimeout,
    LayerHandle,
    LinkEstimate,
    NeighbourUse,
)
from fuse.formats import BytesSource, open_layer
from snapshotter.convert.writer import WriteOptions, convert_bytes
from tests.harness import images as im

FILES = {f"f{i:02d}": im.pseudo_random(100_000 + i, seed=i) for i in range(20)}
BIG = im.pseudo_random(3 << 20, seed=99)


def layer_tar(prioritized: tuple[str, ...] = ()) -> tuple[bytes, str]:
    tar = im.Layer([*(im.File(n, d) for n, d in FILES.items()), im.File("big", BIG)]).tar()
    blob, result = convert_bytes(tar, WriteOptions(chunk_size=1 << 20, prioritized=prioritized))
    return blob, result.toc_digest


class CountingSource(BytesSource):
    """An in-memory blob that can be made slow or broken."""

    def __init__(self, data: bytes):
        super().__init__(data, "test layer")
        self.requests = 0
        self.delay = 0.0
        self.gate: trio.Event | None = None  # requests wait until it is set
        self.broken = False

    async def read_many(self, spans, early=None, tap=None):
        self.requests += 1
        if self.delay:
            await trio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        if self.broken:
            raise OSError("registry unreachable")
        return await super().read_many(spans, early, tap)


async def setup(tmp_path: Path, options: FetchOptions | None = None, prioritized=()):
    blob, toc = layer_tar(prioritized)
    source = CountingSource(blob)
    layer = await open_layer(source, toc)
    cache = ChunkCache(tmp_path / "cache", 1 << 30, fsync=False)
    await cache.open()
    fetcher = Fetcher(cache, options or FetchOptions())
    return source, LayerHandle(layer, "layer-1", "test layer"), fetcher


async def test_one_request_for_a_hundred_readers(tmp_path: Path, nursery) -> None:
    source, handle, fetcher = await setup(tmp_path)
    await nursery.start(fetcher.run)
    ix = handle.layer.index
    ino = ix.find("f05")
    source.delay = 0.05
    results = []

    async def reader() -> None:
        results.append(await fetcher.read(handle, ino, 0, 200_000))

    async with trio.open_nursery() as readers:
        for _ in range(100):
            readers.start_soon(reader)
    assert results == [FILES["f05"]] * 100
    assert source.requests == 1


async def test_neighbours_come_in_the_same_range(tmp_path: Path, nursery) -> None:
    source, handle, fetcher = await setup(tmp_path, FetchOptions(merge_cap=1 << 20, merge_min=1 << 20))
    await nursery.start(fetcher.run)
    ix = handle.layer.index
    assert await fetcher.read(handle, ix.find("f00"), 0, 10) == FILES["f00"][:10]
    assert source.requests == 1
    for name in ("f01", "f02", "f03", "f04", "f05", "f06", "f07"):  # ~100 KB each: within the 1 MiB cap
        assert await fetcher.read(handle, ix.find(name), 0, 200_000) == FILES[name]
    assert source.requests == 1
    big = ix.find("big")
    assert await fetcher.read(handle, big, (1 << 20) - 5, 10) == BIG[(1 << 20) - 5 : (1 << 20) + 5]


async def test_a_read_gives_up_in_bounded_time_and_recovers(tmp_path: Path, nursery) -> None:
    source, handle, fetcher = await setup(tmp_path, FetchOptions(read_timeout=0.3, merge_cap=64 << 10))
    await nursery.start(fetcher.run)
    ix = handle.layer.index
    source.gate = trio.Event()
    with trio.fail_after(2):
        with pytest.raises(FetchTimeout, match="f03"):
            await fetcher.read(handle, ix.find("f03"), 0, 10)
    source.gate.set()  # the registry answers after all: the fetch went on without the reader
    await trio.sleep(0.1)
    requests = source.requests
    assert await fetcher.read(handle, ix.find("f03"), 0, 10) == FILES["f03"][:10]
    assert source.requests == requests

    source.broken = True  # an error reaches the reader, and the next read tries again
    with pytest.raises(OSError, match="unreachable"):
        await fetcher.read(handle, ix.find("f19"), 0, 10)
    source.broken = False
    assert await fetcher.read(handle, ix.find("f19"), 0, 10) == FILES["f19"][:10]


async def test_prefetch_and_background_make_the_layer_local(tmp_path: Path, nursery) -> None:
    source, handle, fetcher = await setup(
        tmp_path, FetchOptions(prefetch_piece=256 << 10), prioritized=("f10", "f11")
    )
    await nursery.start(fetcher.run)
    covered = await fetcher.prefetch(handle)
    assert covered and source.requests >= 1
    requests = source.requests
    ix = handle.layer.index
    assert await fetcher.read(handle, ix.find("f11"), 0, 200_000) == FILES["f11"]
    assert source.requests == requests  # prefetched: no request
    await fetcher.background(handle)
    assert handle.fetched_fraction() == 1.0
    source.broken = True  # no network needed any more, even after a restart with a new fetcher
    fetcher2 = Fetcher(fetcher.cache, FetchOptions())
    await nursery.start(fetcher2.run)
    handle2 = LayerHandle(handle.layer, "layer-1", "test layer")
    for name, data in FILES.items():
        assert await fetcher2.read(handle2, ix.find(name), 0, 200_000) == data
    assert await fetcher2.read(handle2, ix.find("big"), 0, 4 << 20) == BIG
    assert fetcher.counters.bytes_prefetch > 0 and fetcher.counters.bytes_background > 0


def test_the_link_decides_how_many_neighbours_a_miss_fetches() -> None:
    link = LinkEstimate()
    assert link.neighbours(32 << 10, 1 << 20) == MERGE_UNMEASURED  # nothing measured yet
    link.observe(4096, 0.005)  # a small request costs 5 ms whatever its size
    link.observe(1 << 20, 0.005 + (1 << 20) / 12.5e6)  # 100 Mbit/s
    assert 50_000 < link.neighbours(32 << 10, 1 << 20) < 70_000  # what the link carries in 5 ms
    far = LinkEstimate()
    far.observe(4096, 0.1)
    far.observe(4 << 20, 0.1 + (4 << 20) / 1e9)
    assert far.neighbours(32 << 10, 1 << 20) == 1 << 20  # 100 ms away: up to merge_cap
    fast = LinkEstimate()  # 1 GB/s, 2 ms: the link would carry 2 MB, serving them takes 25 ms
    fast.observe(4096, 0.002)
    fast.observe(4 << 20, 0.002 + (4 << 20) / 1e9)
    assert 120_000 < fast.neighbours(32 << 10, 1 << 20) < 180_000  # what is served in 2 ms
    slow = LinkEstimate()
    slow.observe(4096, 0.0005)
    slow.observe(1 << 20, 0.0005 + (1 << 20) / 1e6)
    assert slow.neighbours(32 << 10, 1 << 20) == 32 << 10  # a slow link: merge_min


def test_neighbours_count_as_much_as_they_are_read() -> None:
    """The link's budget, but no more than leaves UNREAD_ALLOWANCE unread at the share of neighbour
    bytes reads asked for (over a window)."""
    use = NeighbourUse()
    assert use.share == 1.0  # trusted until measured
    link = LinkEstimate()  # 1 GB/s, 100 ms away: the link would take merge_cap
    link.observe(4096, 0.1)
    link.observe(64 << 20, 0.1 + (64 << 20) / 1e9)
    assert link.neighbours(32 << 10, 1 << 20, use.share) == 1 << 20
    use.add_fetched(3 * (256 << 10))  # 1 MiB fetched in all (the prior included), a quarter read
    assert use.share == 0.25
    assert link.neighbours(32 << 10, 1 << 20, use.share) == int(UNREAD_ALLOWANCE / 0.75)
    slow = LinkEstimate()  # 100 Mbit/s, 5 ms: its own budget leaves less than that unread
    slow.observe(4096, 0.005)
    slow.observe(1 << 20, 0.005 + (1 << 20) / 12.5e6)
    assert slow.neighbours(32 << 10, 1 << 20, use.share) == slow.neighbours(32 << 10, 1 << 20) > 50_000
    for _ in range(200):  # a long run of neighbours nobody reads: the old share fades
        use.add_fetched(1 << 20)
    assert use.share < 0.01
    assert UNREAD_ALLOWANCE <= link.neighbours(32 << 10, 1 << 20, use.share) < UNREAD_ALLOWANCE * 1.01
    assert link.neighbours(128 << 10, 1 << 20, use.share) == 128 << 10  # merge_min still
    use.add_read(1 << 40)  # never more read than fetched
    assert use.share == 1.0


async def test_a_miss_fetches_fewer_neighbours_when_they_go_unread(tmp_path: Path, nursery) -> None:
    source, handle, fetcher = await setup(tmp_path, FetchOptions(merge_cap=1 << 20, merge_min=0))
    await nursery.start(fetcher.run)
    fetcher.link(handle).observe(4096, 0.1)  # fast and far: a miss takes its neighbours up to merge_cap
    fetcher.link(handle).observe(64 << 20, 0.1 + (64 << 20) / 1e9)
    ix = handle.layer.index
    await fetcher.read(handle, ix.find("f00"), 0, 10)
    first = sum(handle.neighbour)
    assert first >= 5  # f01... (~100 KB each) came along
    before = fetcher.neighbour_use.share
    await fetcher.read(handle, ix.find("f01"), 0, 10)  # one of them is read
    assert fetcher.neighbour_use.share > before and sum(handle.neighbour) == first - 1
    fetcher.neighbour_use.add_fetched(64 << 20)  # as if many went unread since
    requests = source.requests
    assert not any(handle.cached) and not handle.neighbour[ix.first_chunk[ix.find("f14")]]  # beyond f00's
    await fetcher.read(handle, ix.find("f14"), 0, 10)
    assert source.requests == requests + 1
    assert sum(handle.neighbour) == first - 1  # the miss came alone: f15 is not local
    await fetcher.read(handle, ix.find("f15"), 0, 10)
    assert source.requests == requests + 2


async def test_a_first_read_at_offset_zero_is_not_read_ahead(tmp_path: Path, nursery) -> None:
    # the dynamic loader reads a library's ELF header, then maps only parts of it: reading the rest of
    # the file ahead wasted megabytes per library; a read that continues the previous one is read ahead
    source, handle, fetcher = await setup(tmp_path, FetchOptions(merge_min=0))
    await nursery.start(fetcher.run)
    big = handle.layer.index.find("big")
    assert await fetcher.read(handle, big, 0, 4096) == BIG[:4096]
    await trio.sleep(0.1)
    assert source.requests == 1 and fetcher.counters.bytes_on_demand < 1.1 * (1 << 20)
    assert await fetcher.read(handle, big, 4096, 4096) == BIG[4096:8192]  # sequential now
    await trio.sleep(0.1)
    assert source.requests == 2 and fetcher.counters.bytes_on_demand > 2.9 * (1 << 20)


async def test_the_background_fetch_waits_for_the_start_to_settle(tmp_path: Path, nursery) -> None:
    source, handle, fetcher = await setup(
        tmp_path, FetchOptions(background_delay=0.6, background_idle=0.3, merge_min=0)
    )
    await nursery.start(fetcher.run)
    done = trio.Event()

    async def background() -> None:
        await fetcher.background(handle)
        done.set()

    started = trio.current_time()
    nursery.start_soon(background)
    await trio.sleep(0.4)
    assert fetcher.counters.bytes_background == 0  # the layer was just mounted: a container is starting
    assert await fetcher.read(handle, handle.layer.index.find("f05"), 0, 10) == FILES["f05"][:10]
    await trio.sleep(0.2)
    assert fetcher.counters.bytes_background == 0  # a read just needed the network
    with trio.fail_after(5):
        await done.wait()
    assert handle.fetched_fraction() == 1.0 and trio.current_time() - started >= 0.7


async def test_the_head_of_an_elf_file_brings_what_the_loader_reads_next(tmp_path: Path, nursery) -> None:
    # ld.so reads the header, maps the file, then relocates its writable segment near the end of the
    # file: that chunk is fetched as soon as the head arrives, not one round trip later; the code in
    # between is left to the page faults that need it
    from tests.unit.test_elf import PT_DYNAMIC, PT_LOAD, R, W, X, elf

    mib = 1 << 20
    segments = [(PT_LOAD, R | X, 0, 3 * mib), (PT_LOAD, R | W, 3 * mib + 4096, 65536)]
    head = elf(True, "<", [*segments, (PT_DYNAMIC, R | W, 3 * mib + 8192, 512)])
    body = head + im.pseudo_random(4 * mib - len(head), seed=7)
    tar = im.Layer([im.File("usr/lib/libx.so.1", body), im.File("usr/lib/notes.txt", body[4:])]).tar()
    blob, result = convert_bytes(tar, WriteOptions(chunk_size=mib))
    source = CountingSource(blob)
    handle = LayerHandle(await open_layer(source, result.toc_digest), "layer-elf", "elf layer")
    cache = ChunkCache(tmp_path / "cache", 1 << 30, fsync=False)
    await cache.open()
    fetcher = Fetcher(cache, FetchOptions(merge_min=0, merge_cap=0))
    LoaderAhead(fetcher)
    await nursery.start(fetcher.run)
    ix = handle.layer.index

    lib = ix.find("usr/lib/libx.so.1")
    assert await fetcher.read(handle, lib, 0, 4096) == body[:4096]
    await trio.sleep(0.2)
    assert source.requests == 2
    assert fetcher.counters.bytes_on_demand < 2.2 * mib  # the head and the last chunk, not the code
    assert await fetcher.read(handle, lib, 3 * mib + 4096, 65536) == body[3 * mib + 4096 : 3 * mib + 69632]
    assert source.requests == 2  # already there

    notes = ix.find("usr/lib/notes.txt")  # the same bytes without the magic: no guess
    assert await fetcher.read(handle, notes, 0, 4096) == body[4:4100]
    await trio.sleep(0.2)
    assert source.requests == 3


class Streaming(CountingSource):
    """Streams a range up to blob offset `until` (in pieces of `piece`), then waits for `gate`."""

    until = 1 << 62
    piece = 16 << 10

    async def read_many(self, spans, early=None, tap=None):
        self.requests += 1
        [(o, n)] = spans
        if early is not None:
            early[1](self.data[o : o + early[0]])
        data = self.data[o : o + n]
        first = max(0, min(n, self.until - o))
        if tap is not None:
            for i in range(0, first, self.piece):
                tap(i, data[i : min(i + self.piece, first)])
        assert self.gate is not None
        await self.gate.wait()  # the rest of the range is slow to come
        if tap is not None:
            for i in range(first, n, self.piece):
                tap(i, data[i : i + self.piece])
        return [data]


async def streamed(tmp_path: Path, nursery, until: str | None = None):
    blob, toc = layer_tar()
    source = Streaming(blob)
    source.gate = trio.Event()
    handle = LayerHandle(await open_layer(source, toc), "layer-s", "streamed layer")
    ix = handle.layer.index
    if until is not None:  # the range arrives up to the end of this file's last chunk
        source.until = max(ix.chunk(c).end for c in ix.chunks_of(ix.find(until), 0, ix.size[ix.find(until)]))
    cache = ChunkCache(tmp_path / "cache", 1 << 30, fsync=False)
    await cache.open()
    fetcher = Fetcher(cache, FetchOptions(merge_min=1 << 20))
    await nursery.start(fetcher.run)
    return source, handle, fetcher


async def test_a_reader_goes_on_while_its_neighbours_are_still_arriving(tmp_path: Path, nursery) -> None:
    # a miss fetches the chunk and its neighbours in one range; the reader of the first chunk is served
    # as soon as that chunk is in, not when the whole range has arrived
    source, handle, fetcher = await streamed(tmp_path, nursery, until="f00")
    ix = handle.layer.index
    with trio.fail_after(5):
        assert await fetcher.read(handle, ix.find("f00"), 0, 4096) == FILES["f00"][:4096]
    assert source.requests == 1 and not source.gate.is_set()
    source.gate.set()
    assert await fetcher.read(handle, ix.find("f03"), 0, 100_003) == FILES["f03"]
    assert source.requests == 1  # the neighbour came with it


async def test_each_chunk_of_a_range_is_served_as_soon_as_its_bytes_are_in(tmp_path: Path, nursery) -> None:
    # the range is decoded while it arrives: a neighbour's reader is served once that neighbour's bytes
    # are in, before the range has ended, and with the bytes the blob holds
    source, handle, fetcher = await streamed(tmp_path, nursery, until="f02")
    ix = handle.layer.index
    with trio.fail_after(5):
        assert await fetcher.read(handle, ix.find("f00"), 0, 4096) == FILES["f00"][:4096]
        assert await fetcher.read(handle, ix.find("f02"), 0, 1 << 20) == FILES["f02"]
    assert source.requests == 1 and not source.gate.is_set()
    waiting = trio.Event()

    async def read_f03() -> None:
        assert await fetcher.read(handle, ix.find("f03"), 0, 100_003) == FILES["f03"]
        waiting.set()

    nursery.start_soon(read_f03)
    await trio.sleep(0.05)
    assert not waiting.is_set()  # its bytes have not come yet
    source.gate.set()
    with trio.fail_after(5):
        await waiting.wait()
    assert source.requests == 1


def test_the_round_trip_leaves_out_the_transfer() -> None:
    # on a 10 Mbit/s link a 60 KB request takes 49 ms, nearly all of it transfer: its round trip is
    # 1 ms (what decides whether guessing the next reads pays, fuse.ahead)
    slow = LinkEstimate()
    slow.observe(1 << 20, 0.001 + (1 << 20) / 1.25e6)
    for _ in range(10):
        slow.observe(60_000, 0.001 + 60_000 / 1.25e6)
    assert slow.latency is not None and slow.latency > 0.04
    assert slow.round_trip is not None and slow.round_trip < 0.005
    far = LinkEstimate()  # 100 Mbit/s, 20 ms away
    far.observe(1 << 20, 0.02 + (1 << 20) / 1.25e7)
    for _ in range(10):
        far.observe(60_000, 0.02 + 60_000 / 1.25e7)
    assert far.round_trip is not None and far.round_trip > 0.015


def test_the_round_trip_is_bounded_by_the_first_byte_until_it_is_measured() -> None:
    # a start whose reads overlap their requests' tails may have no request alone for a while: the
    # shortest wait for a first byte bounds the round trip from the first request on
    link = LinkEstimate()
    assert link.round_trip_bound() is None
    for wait in (0.045, 0.021, 0.030):  # sharing the link only ever made the wait longer
        link.observe_first_byte(wait)
    assert link.round_trip is None and link.round_trip_bound() == 0.021
    link.observe(1 << 20, 0.02 + (1 << 20) / 1.25e7)
    link.observe(60_000, 0.02 + 60_000 / 1.25e7)
    assert link.round_trip_bound() == link.round_trip and 0.015 < link.round_trip < 0.021


async def test_a_fetch_measures_its_wait_for_the_first_byte(tmp_path: Path, nursery) -> None:
    source, handle, fetcher = await setup(tmp_path)
    await nursery.start(fetcher.run)
    source.delay = 0.03  # the registry answers 30 ms after the request
    ix = handle.layer.index
    assert await fetcher.read(handle, ix.find("f05"), 0, 4096) == FILES["f05"][:4096]
    bound = fetcher.link(handle).round_trip_bound()
    assert bound is not None and 0.03 <= bound < 0.5


async def test_cache_writes_wait_until_the_start_settles(tmp_path: Path, nursery) -> None:
    # a file created per chunk cost a tenth of the daemon's CPU in a start: chunks read on demand go to
    # the disk once no miss came for write_quiet, and are served from the queue meanwhile
    source, handle, fetcher = await setup(
        tmp_path, FetchOptions(write_quiet=0.4, memory_cache=1, merge_min=0, merge_cap=0)
    )
    await nursery.start(fetcher.run)
    ix = handle.layer.index
    assert await fetcher.read(handle, ix.find("f00"), 0, 100_000) == FILES["f00"]
    await trio.sleep(0.1)
    assert fetcher.cache.stats().entries == 0
    fetcher._memory.clear()
    assert await fetcher.read(handle, ix.find("f00"), 0, 100_000) == FILES["f00"]
    assert source.requests == 1  # not fetched again while waiting for the disk
    await trio.sleep(0.6)
    assert fetcher.cache.stats().entries == 1


async def test_cache_writes_go_at_once_beyond_the_backlog(tmp_path: Path, nursery) -> None:
    source, handle, fetcher = await setup(
        tmp_path, FetchOptions(write_quiet=60, write_backlog=250_000, merge_min=0, merge_cap=0)
    )
    await nursery.start(fetcher.run)
    ix = handle.layer.index
    for name in ("f00", "f01", "f02", "f03"):
        assert await fetcher.read(handle, ix.find(name), 0, 200_000) == FILES[name]
    await trio.sleep(0.2)
    assert fetcher.cache.stats().entries == 2  # 400 KB read, 200 KB may wait
    await fetcher.flush()  # a planned stop writes the rest
    assert fetcher.cache.stats().entries == 4


def test_round_trips_are_dear_on_a_far_or_a_fast_link() -> None:
    """Where a small request's time carries UNIT_BDP bytes or more, a miss brings its FETCH_UNIT."""
    assert not LinkEstimate().round_trips_dear()  # nothing measured: chunks alone

    def link(latency: float, rate: float) -> LinkEstimate:
        measured = LinkEstimate()
        measured.observe(4096, latency)
        measured.observe(4 << 20, latency + (4 << 20) / rate)
        return measured

    assert not link(0.004, 12.5e6).round_trips_dear()  # 100 Mbit/s, 4 ms: 50 KB, bytes are dear
    assert link(0.025, 12.5e6).round_trips_dear()  # 20 ms more: 300 KB
    assert link(0.002, 1e9).round_trips_dear()  # unshaped: 2 MB
    shared = LinkEstimate()  # no small request had the link alone yet: the fastest one bounds it
    shared.observe(4 << 20, 0.025 + (4 << 20) / 12.5e6)
    shared.observe(4096, 0.03, alone=False)
    assert shared.latency is None and shared.round_trips_dear()
    shared.observe(4096, 0.003, alone=False)  # sharing never made a request faster: the link is near
    assert not shared.round_trips_dear()


UNIT_FILES = [
    im.File("a", im.pseudo_random(10 << 20, seed=1)),
    im.File("b", im.pseudo_random(1 << 20, seed=2)),
]


def frozen_link(latency: float) -> LinkEstimate:
    """A registry link as measured: 100 Mbit/s, `latency` per small request; what the fetcher would
    measure of a test's in-memory blob (no such link) is not taken."""
    link = LinkEstimate()
    link.observe(4096, latency)
    link.observe(4 << 20, latency + (4 << 20) / 12.5e6)
    link.observe = lambda *args: None  # type: ignore[method-assign]
    return link


async def unit_setup(tmp_path: Path, latency: float) -> tuple[CountingSource, LayerHandle, Fetcher]:
    blob, result = convert_bytes(im.Layer(UNIT_FILES).tar(), WriteOptions(chunk_size=1 << 20))
    source = CountingSource(blob)
    cache = ChunkCache(tmp_path / "cache", 1 << 30, fsync=False)
    await cache.open()
    fetcher = Fetcher(cache, FetchOptions(merge_min=0, merge_cap=0, background=False))  # no neighbours
    handle = LayerHandle(await open_layer(source, result.toc_digest), "layer-1", "test layer")
    fetcher.links[handle.host] = frozen_link(latency)
    return source, handle, fetcher


def fetched(fetcher: Fetcher, handle: LayerHandle, path: str) -> list[int]:
    """Which of a file's chunks (counted from its first) are in memory or in flight."""
    ix = handle.layer.index
    ino = ix.find(path)
    first = ix.first_chunk[ino]
    return [
        c - first
        for c in range(first, first + ix.chunk_count[ino])
        if (handle.id, c) in fetcher._memory or (handle.id, c) in fetcher._pending
    ]


@pytest.mark.parametrize("latency", [0.025, 0.004])
async def test_a_miss_brings_its_files_aligned_unit_where_round_trips_are_dear(
    tmp_path: Path, nursery, latency: float
) -> None:
    source, handle, fetcher = await unit_setup(tmp_path, latency)
    await nursery.start(fetcher.run)
    ix = handle.layer.index
    a, data = ix.find("a"), UNIT_FILES[0].data
    dear = latency > 0.01
    assert await fetcher.read(handle, a, 5 << 20 | 12345, 4096) == data[(5 << 20) + 12345 :][:4096]
    assert source.requests == 1
    assert fetched(fetcher, handle, "a") == ([4, 5, 6, 7] if dear else [5])  # before it and after
    # the last unit ends with the file: never the next file's chunks; what is here is not fetched again
    await fetcher.read(handle, a, 6 << 20, 4096)
    assert source.requests == (1 if dear else 2)
    assert await fetcher.read(handle, a, (10 << 20) - 10, 10) == data[-10:]
    assert source.requests == (2 if dear else 3)
    assert fetched(fetcher, handle, "a") == ([4, 5, 6, 7, 8, 9] if dear else [5, 6, 9])
    assert fetched(fetcher, handle, "b") == []


async def test_a_unit_of_tiny_chunks_is_bounded(tmp_path: Path, nursery) -> None:
    """A file cut in 4 KiB chunks (a TOC may): a miss takes at most UNIT_CHUNKS on each side."""
    data = im.pseudo_random(2 << 20, seed=3)
    blob, result = convert_bytes(im.Layer([im.File("tiny", data)]).tar(), WriteOptions(chunk_size=4096))
    cache = ChunkCache(tmp_path / "cache", 1 << 30, fsync=False)
    await cache.open()
    fetcher = Fetcher(cache, FetchOptions(merge_min=0, merge_cap=0, background=False))
    handle = LayerHandle(await open_layer(CountingSource(blob), result.toc_digest), "layer-1", "tiny")
    fetcher.link(handle).observe(4096, 0.025)
    fetcher.link(handle).observe(4 << 20, 0.025 + (4 << 20) / 12.5e6)
    await nursery.start(fetcher.run)
    ix = handle.layer.index
    assert await fetcher.read(handle, ix.find("tiny"), 1 << 20, 10) == data[1 << 20 :][:10]
    assert fetched(fetcher, handle, "tiny") == list(range(256 - UNIT_CHUNKS, 256 + UNIT_CHUNKS + 1))
