"""The fetcher: turns "give me chunk N of this layer" into as few verified range requests as possible.

- A chunk is served from a small in-memory LRU of decoded chunks (sequential FUSE reads of 128 KiB-1 MiB
  walk through one chunk of 1-4 MiB), else from the on-disk chunk cache, else fetched.
- In-flight deduplication by chunk: a hundred readers of one chunk cause one request; a chunk already
  being fetched as part of a neighbour's range is waited for, never fetched twice.
- A miss fetches the missing chunks that follow it in the blob too (the rest of a large file, the next
  small files, which are often read next), in the same range, as many bytes of them as the link makes
  worth it: a neighbour fetched now saves a request later if it is read, and costs its transfer time
  whether or not it is. So the neighbours' budget is what the link carries in the time one request
  costs (per-request latency x the rate fetched bytes become usable: the link's bandwidth, both
  measured per registry host (`LinkEstimate`), and the data path's own `DECODE_RATE`), but no more
  than leaves `UNREAD_ALLOWANCE` unread as the share of neighbour bytes that reads then asked for says
  (`NeighbourUse`, over the last ~32 MiB of them), between
  `merge_min` and `merge_cap` compressed bytes: with every neighbour read, about 55 KB at 100 Mbit/s
  with a 5 ms request, about 150 KB on a 1 GB/s link with 2 ms requests (more would cost more
  decoding than the round trips it saves), 1 MiB with 100 ms round trips. (Measured, MB before ready
  without the allowance / with it / the peer's: python-scipy unshaped 52.0 / 46.8 / 47.0; unshaped with
  20 ms added, python-numpy 19.3 / 18.5 / 18.9 and gcc 29.0 / 23.1 / 23.6.)
- A miss's range is decoded as it arrives (`fuse.formats.ChunkStream`): each gzip chunk is inflated and
  hashed piece by piece while the rest is on the wire, and served once its last byte is in and it
  verifies, not after the whole range and a decode (about 8 ms a 4 MiB chunk). (Measured at 100
  Mbit/s, ctr-remote's 4 MiB chunks: python-scipy 5.40 -> 5.21 s, the peer 5.86 s.)
- Where round trips are dear against bytes (a small request's time carries `UNIT_BDP` bytes or more:
  a long round trip, or a fast link; `LinkEstimate.round_trips_dear`), a miss in a large file also
  fetches the missing chunks of the file's aligned `FETCH_UNIT` (4 MiB) around it (`Fetcher.unit`),
  before and after: a program that maps a large library touches it in many places, each a round trip
  of its own otherwise. Where bytes are dear (100 Mbit/s and ~1 ms), a miss brings its own chunk
  only, so the converter's 1 MiB chunks fetch a quarter of what 4 MiB ones did for a library touched
  sparsely. (Measured against the peer on images with 1 MiB chunks, time to ready with the unit /
  without: gcc with 20 ms added 3.47 / 3.92 s, peer 4.13 s; unshaped gcc 1.02 / 1.13 s, peer 1.33 s.)
  Every request also stays within `inflate_cap` decompressed bytes as the TOC declares them
  (innerOffset + size per chunk: what decoding it inflates), so a small read of a hostile layer
  cannot inflate gigabytes. Prefetch and background pieces keep to the same decompressed budget.
- A file read sequentially (a read that starts where the previous one of the file ended) is read ahead
  within the file, up to `read_ahead`. A first read at offset 0 is not sequential: the dynamic loader
  reads a library's ELF header, then maps only parts of it. Which parts it reads at once is in the
  header, though: when the head of an ELF file arrives, the chunks of its dynamic section and writable
  segment, and the heads of its interpreter and libraries, are fetched at once (`ahead.LoaderAhead`,
  called through `on_head`), instead of one round trip after another as the loader reaches them.
- Each chunk of a fetched range is decoded and verified on its own: a corrupt chunk fails alone (its
  readers get the FormatError, nothing is cached, the next read fetches it again); its neighbours are
  served.
- One deadline per read: `read_timeout` covers everything a FUSE read waits for (cache disk reads,
  fetches in flight, refetches). A fetch that has already made a reader give up is "late": further
  reads of its chunks fail at once until it ends (the kernel retries a failed read-ahead with a read
  of its own; without this the caller of read() waited twice the timeout).
- Fetches run in the fetcher's own nursery, so a reader that gives up (its `read_timeout` passed:
  EIO, with a log line naming image, layer and file) does not cancel work other readers will use.
  Every task started there runs guarded: an exception stops that task alone, never the nursery (which
  would take every lazy layer's data path with it).
- A chunk cache that cannot store (disk full even after evicting, read-only, EIO) never stops a read:
  the chunk is served from memory and the network, counted in `Counters.cache_write_errors` and
  logged once per `LOG_INTERVAL`; a prefetch or background walk stops, since what it fetches could
  not be kept. A cache read that fails is a miss, refetched.
- Prefetch at mount fetches the prioritized region (everything before `.prefetch.landmark`) in
  `prefetch_piece` pieces, each chunk usable as soon as its piece arrives. The background fetch then
  walks the rest of the layer at `background_rate` bytes/s (0: as fast as the link allows) whenever no
  on-demand read has needed the network for `background_idle` seconds, and not before `background_delay`
  after the last layer was mounted (a container starts reading a moment after its layers are mounted),
  until the layer needs no network. While on-demand reads are recent (`BUSY_WINDOW`), its pieces are
  what the link carries in `BUSY_PIECE_SECONDS`, so a read that comes meanwhile shares the link with a
  small request only; once the start has settled, pieces are `background_piece` at full speed.
- Decompression and verification run in worker threads (`formats.reader.DECODE_LIMIT`), but for
  chunks of at most `INLINE_DECODE` bytes, which take less time than the hop to a thread (~0.1 ms);
  requests to one registry host are bounded by a per-host limiter.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import trio

from .cache import ChunkCache, LogThrottle
from .formats import Layer, Unverified
from .formats.index import ZEROS, Chunk, LayerIndex
from .formats.reader import DECODE_LIMIT, merge_spans

log = logging.getLogger("lazysnap.fetch")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf)


class FetchTimeout(Exception):
    """A read could not be served within read_timeout."""


@dataclass(frozen=True)
class FetchOptions:
    merge_cap: int = 1 << 20  # bytes of blob one on-demand request may cover (neighbours included)
    inflate_cap: int = (
        32 << 20
    )  # declared decompressed bytes a request or piece may add beyond its first chunk
    read_timeout: float = 30.0  # a read waits this long at most, then EIO
    per_host: int = 8  # concurrent requests to one registry host
    memory_cache: int = 64 << 20  # decoded chunks kept in memory
    prefetch: bool = True
    background: bool = True
    background_rate: float = 0.0  # bytes/s; 0 = unlimited
    prefetch_piece: int = 4 << 20  # the prioritized region comes in pieces, each usable on arrival
    background_piece: int = 4 << 20
    background_idle: float = 1.0  # the background fetch waits until no read needed the network this long
    background_delay: float = 3.0  # ... and this long after the last layer was mounted
    read_ahead: int = 8 << 20  # a file read sequentially: fetch this much of what follows
    merge_min: int = 32 << 10  # neighbours' bytes a miss fetches at least (the link decides up to merge_cap)
    write_quiet: float = 0.25  # chunks read on demand go to the disk cache once no miss came for this long
    # ... or at once, beyond this many bytes waiting. A start reads 130 MB of python-scipy: at 64 MiB
    # the writes ran during it, 0.35 s of the daemon's CPU on cores the start needs (100 Mbit/s, A/B
    # in one run: 5.13 -> 4.91 s with 256 MiB; peak RSS 190 -> 220 MiB)
    write_backlog: int = 256 << 20


@dataclass
class Counters:
    bytes_on_demand: int = 0
    bytes_prefetch: int = 0
    bytes_background: int = 0
    requests: int = 0
    cache_hits: int = 0  # memory or disk
    cache_misses: int = 0
    timeouts: int = 0
    errors: int = 0  # failed fetches (network, short reads) and fetcher tasks that raised
    bad_chunks: int = 0  # chunks that did not decompress or verify: never served, fetched again when read
    cache_write_errors: int = 0  # chunks the cache could not store (full, read-only, EIO): served anyway
    cache_read_errors: int = 0  # cache reads that failed: treated as misses and fetched
    latency: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))  # fetch latency histogram
    latency_sum: float = 0.0

    def add_bytes(self, kind: str, n: int) -> None:
        if kind == "demand":
            self.bytes_on_demand += n
        elif kind == "prefetch":
            self.bytes_prefetch += n
        else:
            self.bytes_background += n

    def observe(self, seconds: float) -> None:
        self.latency_sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency[i] += 1
                return


INLINE_DECODE = 64 << 10  # compressed and declared decompressed bytes decoded on the event loop
DECODE_RATE = (
    80e6  # compressed bytes/s the data path turns into served chunks (HTTP, ISA-L, sha256; measured)
)
MERGE_UNMEASURED = 128 << 10  # neighbours' budget before a host's link is measured
UNREAD_ALLOWANCE = 64 << 10  # neighbour bytes one miss may be expected to leave unread (python-scipy
# unshaped, against the peer in the same run: 48 KiB 0.94x its time, 64 KiB 0.87x, 96 KiB 1.5 MB more bytes)
FETCH_UNIT = 4 << 20  # where round trips are dear: a miss brings its file's aligned region of this size
UNIT_BDP = 128 << 10  # ... that is, where a small request's time carries this many bytes
UNIT_CHUNKS = 64  # chunks a unit takes at most on each side of a miss (a TOC may cut a file in 4 KiB chunks)
BUSY_WINDOW = 10.0  # seconds after an on-demand read during which background pieces stay small
BUSY_PIECE_SECONDS = 0.05  # ... what the link carries in this long (at least 256 KiB)


class LinkEstimate:
    """What the fetcher has measured of one registry host: the fixed cost of a request (round trip,
    registry, client; seen in small requests) and the bandwidth (seen in large ones), as moving
    averages of requests that had the link to themselves (one sharing it would read as a slow link, and
    a long latency means larger merges: a fetch that runs beside others fed more bytes into them)."""

    SMALL = 64 << 10
    LARGE = 256 << 10

    def __init__(self) -> None:
        self.latency: float | None = None  # seconds a small request costs (its few bytes included)
        self.bandwidth: float | None = None  # bytes/s
        self.round_trip: float | None = None  # seconds a request costs beyond its bytes' transfer
        self.fastest: float | None = None  # seconds the fastest small request took, alone or not
        self.first_byte: float | None = None  # the shortest wait for a response's first byte
        self._in_flight = 0
        self._begun = 0

    def begin(self) -> int:
        """A request starts; the token `end` takes."""
        self._in_flight += 1
        self._begun += 1
        return self._begun if self._in_flight == 1 else -1

    def end(self, token: int) -> bool:
        """A request ended: True when it had the link to itself from start to end (it is a measurement
        of the link, not of the link's share it got)."""
        self._in_flight -= 1
        return token == self._begun

    def observe(self, nbytes: int, seconds: float, alone: bool = True) -> None:
        """A request of one range took `seconds`; only one that had the link `alone` is averaged in,
        but any small one bounds the round trip (sharing the link never made a request faster)."""
        if nbytes <= self.SMALL:
            self.fastest = seconds if self.fastest is None else min(self.fastest, seconds)
        if not alone:
            return
        if nbytes <= self.SMALL:
            self.latency = seconds if self.latency is None else 0.8 * self.latency + 0.2 * seconds
            if self.bandwidth is not None:
                fixed = max(seconds - nbytes / self.bandwidth, 0.0)
                self.round_trip = fixed if self.round_trip is None else 0.8 * self.round_trip + 0.2 * fixed
        elif nbytes >= self.LARGE:
            transfer = seconds - min(self.latency or 0.0, seconds / 2)
            bw = nbytes / max(transfer, 1e-6)
            self.bandwidth = bw if self.bandwidth is None else 0.8 * self.bandwidth + 0.2 * bw

    def observe_first_byte(self, seconds: float) -> None:
        self.first_byte = seconds if self.first_byte is None else min(self.first_byte, seconds)

    def round_trip_bound(self) -> float | None:
        """The round trip as measured, else the shortest wait for a first byte: sharing the link never
        shortened one, and it needs neither a request alone nor the bandwidth (which a start whose
        reads overlap their requests' tails may measure late)."""
        return self.round_trip if self.round_trip is not None else self.first_byte

    def worth(self, seconds: float, default: int) -> int:
        """Bytes the link carries in `seconds` (`default` until its bandwidth is measured)."""
        return default if self.bandwidth is None else int(self.bandwidth * seconds)

    def round_trips_dear(self) -> bool:
        """True where the time of a small request carries `UNIT_BDP` bytes or more: a long round trip,
        or a fast link (measured: 100 Mbit/s ~50 KB, with 20 ms added ~300 KB, unshaped ~1 MB)."""
        latency = self.latency if self.latency is not None else self.fastest  # before one had the link alone
        return latency is not None and self.bandwidth is not None and latency * self.bandwidth >= UNIT_BDP

    def neighbours(self, low: int, high: int, read: float = 1.0) -> int:
        """Neighbouring bytes worth fetching with a miss: what the link carries in one request's time,
        at the rate fetched bytes become usable (the link's, and decoding them: on a fast link the
        neighbours are not free, their decoding is what a start waits for); but no more than leaves
        `UNREAD_ALLOWANCE` of them unread, as the share `read` of neighbour bytes reads asked for says
        (`NeighbourUse`): an unread neighbour is a byte fetched for nothing."""
        if self.latency is None or self.bandwidth is None:
            budget = float(MERGE_UNMEASURED)
        else:
            budget = self.latency / (1 / self.bandwidth + 1 / DECODE_RATE)
        if read < 1.0:
            budget = min(budget, UNREAD_ALLOWANCE / (1.0 - read))
        return max(low, min(high, int(budget)))


class NeighbourUse:
    """The share of the bytes fetched as a miss's neighbours that a read then asked for, over about the
    last `WINDOW` bytes of them (a start of the same kind of program reads alike)."""

    WINDOW = 32 << 20
    PRIOR = 256 << 10  # counted as fetched and read before anything is: start by trusting neighbours

    def __init__(self) -> None:
        self.fetched = self.read = self.PRIOR

    def add_fetched(self, nbytes: int) -> None:
        self.fetched += nbytes
        if self.fetched > self.WINDOW:  # forget the older half
            self.fetched, self.read = self.fetched // 2, self.read // 2

    def add_read(self, nbytes: int) -> None:
        self.read = min(self.read + nbytes, self.fetched)

    @property
    def share(self) -> float:
        return self.read / self.fetched


class LayerHandle:
    """A layer as the fetcher serves it: the opened format reader, a stable id, its host."""

    def __init__(self, layer: Layer, layer_id: str, name: str, host: str = "local"):
        self.layer, self.id, self.name, self.host = layer, layer_id, name, host
        self.cached = bytearray(len(layer.index.c_start))  # 1 = known to be in the cache
        self.neighbour = bytearray(len(layer.index.c_start))  # 1 = fetched as a neighbour, not read yet
        self.closed = False
        self.bad: str | None = None  # why the layer failed its final verification: every read fails

    @property
    def chunk_count(self) -> int:
        return len(self.cached)

    def fetched_fraction(self) -> float:
        return sum(self.cached) / len(self.cached) if self.cached else 1.0

    def local_bytes(self) -> int:
        """Bytes of file content (decompressed) the cache holds for this layer."""
        return sum(itertools.compress(self.layer.index.c_size, self.cached))


class _Pending:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.late = False  # a reader gave up waiting for it: new readers fail at once until it ends
        self.wanted = False  # a read waits for it: decoded before the neighbours fetched with it


def _inflated(ix: LayerIndex, cid: int) -> int:
    """Bytes decoding a chunk inflates, as the TOC declares them: its inner offset, then its size."""
    return ix.c_inner[cid] + ix.c_size[cid]


class Fetcher:
    def __init__(self, cache: ChunkCache, options: FetchOptions | None = None):
        self.cache = cache
        self.options = options or FetchOptions()
        self.counters = Counters()
        self._nursery: trio.Nursery | None = None
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._memory: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._memory_bytes = 0
        # read on demand, not yet in the disk cache: written once the start has settled (write_quiet)
        self._unwritten: OrderedDict[tuple[str, int], tuple[LayerHandle, bytes]] = OrderedDict()
        self._unwritten_bytes = 0
        self._writing = False
        self._backlog_full = trio.Event()
        self.neighbour_use = NeighbourUse()
        self._positions: OrderedDict[tuple[str, int], int] = (
            OrderedDict()
        )  # where each file's last read ended
        self._hosts: dict[str, trio.CapacityLimiter] = {}
        self.links: dict[str, LinkEstimate] = {}  # by registry host
        self._last_mount = -1e9
        self._demand_waiting = 0
        self._demand_idle = trio.Event()
        self._demand_idle.set()
        self._last_demand = -1e9
        self._store_log = LogThrottle(log)
        self._read_log = LogThrottle(log)
        self._bad_log = LogThrottle(log)
        self._task_log = LogThrottle(log)
        # called with the first chunk of a file fetched for a read at offset 0 (ahead.LoaderAhead)
        self.on_head: Callable[[LayerHandle, int, bytes], None] | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the fetcher's nursery (fetches, cache writes, background work) until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # --- reads -----------------------------------------------------------------------------------

    async def read(self, handle: LayerHandle, ino: int, offset: int, length: int) -> bytes:
        """Bytes of a file, for a FUSE read. Raises FetchTimeout when they are not there within
        read_timeout (one deadline for everything the read waits for), FormatError for a chunk that
        does not decompress or verify."""
        if handle.bad is not None:
            raise Unverified(handle.bad)
        ix = handle.layer.index
        ids = ix.chunks_of(ino, offset, length)
        if not ids:
            return b""
        for cid in ids:
            if handle.neighbour[cid]:  # a neighbour fetched before it was asked for, read
                handle.neighbour[cid] = 0
                self.neighbour_use.add_read(ix.c_end[cid] - ix.c_start[cid])
        end = min(offset + length, ix.size[ino])
        memory = self._memory
        datas = [memory.get((handle.id, cid)) for cid in ids]
        sequential = self._note_position(handle, ino, offset, end)
        if sequential:  # also when this read is in memory: the next chunks are fetched before it ends
            self._read_ahead(handle, ids[-1], ix.first_chunk[ino] + ix.chunk_count[ino])
        if None in datas or len(ids) > 1:
            late: FetchTimeout | None = None
            with trio.move_on_after(self.options.read_timeout) as scope:
                try:
                    if len(ids) == 1 and not sequential and length <= ix.c_size[ids[0]] // 4:
                        c_off = ix.c_file_offset[ids[0]]
                        part = await self._disk_part(handle, ids[0], offset - c_off, end - offset)
                        if part is not None:  # a small random read of a cached chunk: just those bytes
                            return part
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug(
                            "read %s: %s [%d, +%d) seq=%s",
                            handle.name,
                            ix.path(ino),
                            offset,
                            length,
                            sequential,
                        )
                    datas = await self._demand(handle, list(ids))
                    if offset == 0 and self.on_head is not None:
                        try:
                            self.on_head(handle, ino, datas[0])
                        except Exception as e:  # a guess: never the read's problem
                            log.debug("guess after %s: %s failed: %s", handle.name, ix.path(ino), e)
                except FetchTimeout as e:
                    late = e
            if scope.cancelled_caught or late is not None:
                for cid in ids:  # the kernel retries a failed read-ahead at once: do not wait again
                    if (pending := self._pending.get((handle.id, cid))) is not None:
                        pending.late = True
                self.counters.timeouts += 1
                why = f" ({late})" if late is not None else ""
                raise FetchTimeout(
                    f"{handle.name}: {ix.path(ino)}: no data within {self.options.read_timeout:g}s{why}; "
                    "is the registry reachable? (read_timeout sets the wait)"
                )
        else:
            memory.move_to_end((handle.id, ids[0]))
            self.counters.cache_hits += 1
        return self.slice(ix, ids, datas, offset, end)

    @staticmethod
    def slice(ix: LayerIndex, ids: Sequence[int], datas: list[bytes], offset: int, end: int) -> bytes:
        """Bytes [offset, end) of a file out of the chunks that hold them."""
        parts = []
        for cid, data in zip(ids, datas, strict=True):
            c_off = ix.c_file_offset[cid]
            lo, hi = max(0, offset - c_off), min(end - c_off, ix.c_size[cid])
            parts.append(bytes(hi - lo) if ix.c_storage[cid] == ZEROS else data[lo:hi])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _demand(self, handle: LayerHandle, ids: list[int]) -> list[bytes]:
        """The chunks of an on-demand read (the caller holds the deadline); background work pauses
        meanwhile. The first chunk that fails fails the read with its own error."""
        self._demand_waiting += 1
        self._last_demand = trio.current_time()
        self._demand_idle = trio.Event() if self._demand_idle.is_set() else self._demand_idle
        datas: list[bytes] = [b""] * len(ids)
        errors: list[Exception] = []
        try:
            if len(ids) == 1:
                datas[0] = await self.chunk(handle, ids[0])
            else:
                async with trio.open_nursery() as nursery:

                    async def one(i: int, cid: int) -> None:
                        try:
                            datas[i] = await self.chunk(handle, cid)
                        except Exception as e:
                            errors.append(e)
                            nursery.cancel_scope.cancel()

                    for i, cid in enumerate(ids):
                        nursery.start_soon(one, i, cid)
        finally:
            self._demand_waiting -= 1
            if self._demand_waiting == 0:
                self._demand_idle.set()
        if errors:
            raise errors[0]
        return datas

    def _note_position(self, handle: LayerHandle, ino: int, offset: int, end: int) -> bool:
        """Remember where a file's last read ended; True when this read continues it."""
        key = (handle.id, ino)
        sequential = offset > 0 and self._positions.get(key) == offset
        self._positions[key] = end
        self._positions.move_to_end(key)
        if len(self._positions) > 4096:
            self._positions.popitem(last=False)
        return sequential

    def _read_ahead(self, handle: LayerHandle, last: int, file_end: int) -> None:
        """A file read sequentially: start fetching its next chunks (up to read_ahead bytes)."""
        self.fetch_missing(handle, range(last + 1, file_end))

    def fetch_missing(self, handle: LayerHandle, candidates: Iterable[int]) -> list[int]:
        """Start fetching those of the candidate chunks that are neither local nor in flight, in order,
        up to read_ahead declared decompressed bytes; the chunks it fetches."""
        ix = handle.layer.index
        budget = self.options.read_ahead
        ids = []
        for cid in candidates:
            budget -= _inflated(ix, cid)
            if budget < 0:
                break
            if ix.c_storage[cid] == ZEROS or self._local(handle, cid):
                continue
            if self.cache.contains(self._cache_key(handle, cid)):
                continue
            ids.append(cid)
        if ids:
            self._start(handle, ids, "demand")
        return ids

    async def _disk_part(self, handle: LayerHandle, cid: int, offset: int, length: int) -> bytes | None:
        key = self._cache_key(handle, cid)
        if not (handle.cached[cid] or self.cache.contains(key)):
            return None
        data = await self._cache_get(handle, key, handle.layer.index.c_size[cid], offset, length)
        if data is not None:
            self.counters.cache_hits += 1
        return data

    async def _cache_get(
        self, handle: LayerHandle, key: str, size: int, offset: int = 0, length: int | None = None
    ) -> bytes | None:
        """A chunk (or part) from the disk cache; None when absent or when the cache fails to read it
        (the chunk is then fetched: a failing cache disk never fails a read the network can serve)."""
        try:
            return await self.cache.get(key, size, offset=offset, length=length)
        except Exception as e:
            self.counters.cache_read_errors += 1
            self._read_log.warning(
                "chunk cache read failed (%s): %s: fetching the chunk instead", handle.name, e
            )
            return None

    async def chunk(self, handle: LayerHandle, cid: int) -> bytes:
        """One verified chunk: memory, disk cache, a fetch in flight, or a new fetch."""
        key = (handle.id, cid)
        data = self._memory.get(key)
        if data is not None:
            self._memory.move_to_end(key)
            self.counters.cache_hits += 1
            return data
        if (kept := self._unwritten.get(key)) is not None:  # out of memory, not yet on disk
            self.counters.cache_hits += 1
            self._remember(key, kept[1])
            return kept[1]
        ix = handle.layer.index
        if ix.c_storage[cid] == ZEROS:  # never made whole (a TOC may declare 1 GiB): read() slices zeros
            return b""
        pending = self._pending.get(key)
        if pending is None:
            cache_key = self._cache_key(handle, cid)
            if handle.cached[cid] or self.cache.contains(cache_key):
                data = await self._cache_get(handle, cache_key, ix.c_size[cid])
                if data is not None:
                    self.counters.cache_hits += 1
                    handle.cached[cid] = 1
                    self._remember(key, data)
                    return data
                handle.cached[cid] = 0  # corrupt or evicted: fetch again
            pending = self._pending.get(key)  # another task may have started it meanwhile
            if pending is None:
                self.counters.cache_misses += 1
                plan = self._plan(handle, cid)
                self._start(handle, plan, "demand")
                pending = self._pending[key]
        elif pending.late:
            raise FetchTimeout(f"the fetch of its chunk at {ix.c_start[cid]} is already over the timeout")
        pending.wanted = True
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.data is not None
        return pending.data

    def _plan(self, handle: LayerHandle, cid: int) -> list[int]:
        """The chunk and the missing chunks after it in the blob, within merge_cap of blob and
        inflate_cap of declared decompressed bytes (chunks of one compressed member may be split
        between requests: each decode inflates only what its own chunk needs)."""
        ix = handle.layer.index
        link = self.link(handle)
        neighbours = link.neighbours(self.options.merge_min, self.options.merge_cap, self.neighbour_use.share)
        plan = self.unit(handle, cid)
        last = max(plan)
        wanted_end = ix.c_end[last]
        unit_count = len(plan)
        budget = self.options.inflate_cap - sum(_inflated(ix, c) for c in plan[1:])
        nxt = last + 1
        while nxt < handle.chunk_count:
            if ix.c_storage[nxt] == ZEROS:
                nxt += 1
                continue
            budget -= _inflated(ix, nxt)
            if ix.c_end[nxt] - wanted_end > neighbours or budget < 0:
                break
            if self._local(handle, nxt):
                break
            plan.append(nxt)
            nxt += 1
        for nxt in plan[unit_count:]:
            handle.neighbour[nxt] = 1
            self.neighbour_use.add_fetched(ix.c_end[nxt] - ix.c_start[nxt])
        return plan

    def unit(self, handle: LayerHandle, cid: int) -> list[int]:
        """What a miss of chunk cid fetches of its file: cid; and where round trips are dear, the
        missing chunks of the FETCH_UNIT-aligned region of the file around it (a file's chunks are
        consecutive; each but the first starts at a file offset above 0)."""
        ix = handle.layer.index
        if ix.c_size[cid] >= FETCH_UNIT or not self.link(handle).round_trips_dear():
            return [cid]
        low = ix.c_file_offset[cid] // FETCH_UNIT * FETCH_UNIT
        high = low + FETCH_UNIT
        first = cid
        while ix.c_file_offset[first] > low and cid - first < UNIT_CHUNKS:  # not its file's first chunk:
            first -= 1  # the one before is the file's too
        out = [cid]
        inflate = 0  # declared decompressed bytes: within inflate_cap, as any request
        nxt = first
        end = min(handle.chunk_count, cid + UNIT_CHUNKS + 1)
        while nxt < end and ix.c_file_offset[nxt] < high and (nxt == first or ix.c_file_offset[nxt] > 0):
            if nxt != cid and ix.c_storage[nxt] != ZEROS and not self._local(handle, nxt):
                inflate += _inflated(ix, nxt)
                if inflate > self.options.inflate_cap:
                    break
                out.append(nxt)
            nxt += 1
        return out

    def _local(self, handle: LayerHandle, cid: int) -> bool:
        """In the cache, in memory, or in flight (as far as the fetcher knows without a disk lookup)."""
        key = (handle.id, cid)
        return (
            bool(handle.cached[cid]) or key in self._pending or key in self._memory or key in self._unwritten
        )

    def _start(self, handle: LayerHandle, ids: list[int], kind: str) -> None:
        """Register chunks as in flight and start fetching them in the fetcher's nursery."""
        pendings = {cid: self._pending.setdefault((handle.id, cid), _Pending()) for cid in ids}
        self.spawn(self._fetch, handle, pendings, kind)

    def spawn(self, fn, *args: object) -> None:
        """Start a task in the fetcher's nursery, guarded."""
        assert self._nursery is not None, "Fetcher.run() is not running"
        self._nursery.start_soon(self._guarded, fn, *args)

    async def _guarded(self, fn, *args: object) -> None:
        """Run a task of the fetcher's nursery: an exception ends this task alone, logged and counted.
        Letting it out would end the nursery, and with it every lazy layer's data path (ENOTCONN)."""
        try:
            await fn(*args)
        except Exception as e:
            self.counters.errors += 1
            self._task_log.warning(
                "fetcher task %s failed: %s: %s", fn.__name__, type(e).__name__, e, exc_info=e
            )

    async def _fetch(self, handle: LayerHandle, pendings: dict[int, _Pending], kind: str) -> None:
        layer = handle.layer
        ix = layer.index
        chunks = sorted((ix.chunk(cid) for cid in pendings), key=lambda c: (c.start, c.inner))
        started = time.monotonic()
        head_done = trio.Event()
        fired = False
        head: list[Chunk] = []
        try:
            limiter = self._hosts.setdefault(handle.host, trio.CapacityLimiter(self.options.per_host))
            groups = merge_spans(chunks, cap=max(self.options.merge_cap, self.options.background_piece))
            first, end, members = groups[0]
            link = self.link(handle)
            sent, token = 0.0, 0  # when the request went out, and its `link.begin` token
            arrival: tuple[float, bool] | None = None  # when its last byte came; had it the link alone

            def arrived() -> None:
                """The request is over as a measure of the link when its last byte is in: before its
                chunks are served, since a read served at once makes the next miss, a request that
                would share the link with this one's teardown."""
                nonlocal arrival
                if arrival is None:
                    arrival = (time.monotonic(), link.end(token))

            early = None
            stream = layer.chunk_stream(first, members) if len(groups) == 1 and kind == "demand" else None
            streams = stream is not None and bool(stream.streams)

            def tap(offset: int, piece: bytes) -> None:
                if offset == 0:
                    link.observe_first_byte(time.monotonic() - sent)
                if offset + len(piece) >= end - first:
                    arrived()
                if streams:  # a miss's range is decoded as it arrives: each chunk served once it is in
                    for c, result in stream.feed(offset, piece):
                        self._settle(handle, c.id, pendings[c.id], result, kind)

            if not streams:
                # what reads wait for at the start of the range is decoded as soon as it is in, while
                # the neighbours fetched with it are still on the wire
                head = [c for c in members if pendings[c.id].wanted]
                head_end = max((c.end for c in head), default=end)
                if head_end < end:

                    async def decode_head(data: bytes) -> None:  # its waiters are served whatever happens
                        try:
                            await self._decode_and_resolve(handle, pendings, kind, first, data, head)
                        except BaseException as e:
                            self._fail(handle, {c.id: pendings[c.id] for c in head}, e)
                            raise
                        finally:
                            head_done.set()

                    def on_head(data: bytes) -> None:
                        nonlocal fired
                        if not fired:  # once, though a retried request streams the head again
                            self.spawn(decode_head, data)
                            fired = True

                    early = (head_end - first, on_head)
            async with limiter:
                sent, token = time.monotonic(), link.begin()
                try:
                    datas = await layer.source.read_many([(s, e - s) for s, e, _ in groups], early, tap)
                finally:
                    arrived()
                assert arrival is not None
                took, alone = arrival[0] - sent, arrival[1]
            self.counters.requests += 1
            self.counters.observe(time.monotonic() - started)
            fetched = sum(len(d) for d in datas)
            if len(groups) == 1:  # one range: a measure of the link (if it had it `alone`, see observe)
                link.observe(fetched, took, alone)
            self.counters.add_bytes(kind, fetched)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "fetched %s: %s, %d chunks from %d, %d bytes in %d ranges, %.1f ms%s",
                    handle.name,
                    kind,
                    len(chunks),
                    chunks[0].start,
                    fetched,
                    len(groups),
                    (time.monotonic() - started) * 1000,
                    " (head early)" if fired else "",
                )
            if fired:
                await head_done.wait()
            for (start, _end, members), data in zip(groups, datas, strict=True):
                # what reads wait for first: its readers go on while the neighbours are decoded
                members = [c for c in members if not pendings[c.id].done.is_set()]
                wanted = [c for c in members if pendings[c.id].wanted]
                rest = [c for c in members if not pendings[c.id].wanted]
                for batch in (wanted, rest):
                    if batch:
                        await self._decode_and_resolve(handle, pendings, kind, start, data, batch)
        except BaseException as e:  # resolve every waiter, then let cancellation propagate
            self.counters.errors += 1
            log.warning("fetch failed: %s: chunks %s: %s", handle.name, sorted(pendings), e)
            head_ids = {c.id for c in head} if fired else set()  # served by their own task
            self._fail(handle, {c: p for c, p in pendings.items() if c not in head_ids}, e)
            if not isinstance(e, Exception):
                raise

    def _fail(self, handle: LayerHandle, pendings: dict[int, _Pending], e: BaseException) -> None:
        """Every waiter of these chunks not yet served gets the error (a fetch cancelled: FetchTimeout)."""
        for cid, p in pendings.items():
            if not p.done.is_set():
                p.error = e if isinstance(e, Exception) else FetchTimeout(f"{handle.name}: fetch cancelled")
                self._pending.pop((handle.id, cid), None)
                p.done.set()

    async def _decode_and_resolve(
        self,
        handle: LayerHandle,
        pendings: dict[int, _Pending],
        kind: str,
        start: int,
        data: bytes,
        members: list[Chunk],
    ) -> None:
        ix = handle.layer.index
        small = sum(c.end - c.start for c in members) <= INLINE_DECODE
        if small and sum(_inflated(ix, c.id) for c in members) <= INLINE_DECODE:
            decoded = handle.layer.decode_members(start, data, members)  # tens of us: no thread hop
        else:
            decoded = await trio.to_thread.run_sync(
                handle.layer.decode_members, start, data, members, limiter=DECODE_LIMIT
            )
        bonus = {}  # chunks a format decoded along with those asked for (a plain layer's whole span)
        for cid, result in decoded.items():
            if cid not in pendings:
                if not isinstance(result, Exception) and not handle.cached[cid]:
                    bonus[cid] = result
            else:
                self._settle(handle, cid, pendings[cid], result, kind)
        if kind != "demand":  # prefetch and background: stored before the walk goes on
            for cid, result in decoded.items():
                if cid in pendings and not isinstance(result, Exception):
                    await self._store(handle, cid, result)
        for cid, result in bonus.items():  # cached for the reads to come, never fetched again
            await self._store(handle, cid, result)

    def _settle(
        self, handle: LayerHandle, cid: int, pending: _Pending, result: bytes | Exception, kind: str
    ) -> None:
        if isinstance(result, Exception):
            self._reject(handle, cid, pending, result)
        else:
            self._resolve(handle, cid, pending, result, store_now=kind == "demand")

    def _resolve(
        self, handle: LayerHandle, cid: int, pending: _Pending, data: bytes, store_now: bool
    ) -> None:
        if pending.done.is_set():  # served already (a waiter joined two fetches of the chunk)
            return
        pending.data = data
        self._forget_pending(handle, cid, pending)
        pending.done.set()
        self._remember((handle.id, cid), data)
        if store_now:  # waiters go on at once; the cache write comes later
            self._write_later(handle, cid, data)

    def _write_later(self, handle: LayerHandle, cid: int, data: bytes) -> None:
        """Queue a chunk for the disk cache. Creating a file per chunk took a tenth of the daemon's CPU
        in a start (and the GIL from the reads' handlers): writes wait until no miss came for
        `write_quiet`, or go at once while more than `write_backlog` bytes wait (one writer: the
        queue is what memory the writes take)."""
        key = (handle.id, cid)
        if handle.cached[cid]:
            return
        old = self._unwritten.get(key)
        if old is not None and not old[0].closed:
            return
        if old is not None:  # a layer released and taken again: the new handle's chunk
            self._unwritten_bytes -= len(old[1])
        self._unwritten[key] = (handle, data)
        self._unwritten_bytes += len(data)
        if self._unwritten_bytes > self.options.write_backlog:
            self._backlog_full.set()  # the writer stops waiting for quiet
        if not self._writing:
            self._writing = True
            self.spawn(self._write_behind)

    async def flush(self) -> None:
        """Write every chunk still waiting for the disk cache now (a planned stop keeps what it read)."""
        while await self._write_next():
            pass

    async def _write_behind(self) -> None:
        try:
            while self._unwritten:
                if self._unwritten_bytes <= self.options.write_backlog:
                    self._backlog_full = trio.Event()
                    quiet = self.options.write_quiet
                    while (wait := quiet - (trio.current_time() - self._last_demand)) > 0:
                        with trio.move_on_after(wait):
                            await self._backlog_full.wait()
                        if self._backlog_full.is_set():
                            break
                    else:
                        await self._demand_idle.wait()
                await self._write_next()
        finally:
            self._writing = False

    async def _write_next(self) -> bool:
        """Write the oldest waiting chunk (it stays served from the queue until it is on disk); False
        when none waits."""
        while self._unwritten:
            key, (handle, data) = next(iter(self._unwritten.items()))
            if handle.closed:  # released: its chunks are not wanted
                del self._unwritten[key]
                self._unwritten_bytes -= len(data)
                continue
            await self._store(handle, key[1], data)
            return True
        return False

    def _reject(self, handle: LayerHandle, cid: int, pending: _Pending, error: Exception) -> None:
        """A chunk that did not decode or verify: its waiters get the error; nothing is kept, so the
        next read fetches it again."""
        if pending.done.is_set():
            return
        self.counters.bad_chunks += 1
        self._bad_log.warning("bad chunk %d of %s: %s", cid, handle.name, error)
        pending.error = error
        self._forget_pending(handle, cid, pending)
        pending.done.set()

    def _forget_pending(self, handle: LayerHandle, cid: int, pending: _Pending) -> None:
        """The chunk is no longer in flight, unless a newer fetch of it is."""
        if self._pending.get((handle.id, cid)) is pending:
            del self._pending[(handle.id, cid)]

    async def _store(self, handle: LayerHandle, cid: int, data: bytes) -> bool:
        """Put a chunk in the disk cache; False when the cache could not store it (counted, logged
        once per interval): the chunk stays served from memory and the network."""
        try:
            if handle.cached[cid]:
                return True
            try:
                await self.cache.put(self._cache_key(handle, cid), data)
            except (
                Exception
            ) as e:  # CacheError (full, read-only, EIO) or anything else: never the read's problem
                self.counters.cache_write_errors += 1
                self._store_log.warning("chunk cache write failed (%s): %s", handle.name, e)
                return False
            handle.cached[cid] = 1
            return True
        finally:  # on disk, or not to be: out of the queue (which served it while it was written)
            kept = self._unwritten.get((handle.id, cid))
            if kept is not None and kept[0] is handle:
                del self._unwritten[(handle.id, cid)]
                self._unwritten_bytes -= len(kept[1])

    def _remember(self, key: tuple[str, int], data: bytes) -> None:
        if key in self._memory:
            return
        self._memory[key] = data
        self._memory_bytes += len(data)
        while self._memory_bytes > self.options.memory_cache and len(self._memory) > 1:
            _, old = self._memory.popitem(last=False)
            self._memory_bytes -= len(old)

    def link(self, handle: LayerHandle) -> LinkEstimate:
        link = self.links.get(handle.host)
        if link is None:
            link = self.links[handle.host] = LinkEstimate()
        return link

    def _cache_key(self, handle: LayerHandle, cid: int) -> str:
        digest = handle.layer.index.chunk(cid).digest
        return self.cache.key(digest, handle.id, cid)

    # --- prefetch and background ------------------------------------------------------------------

    async def prefetch(self, handle: LayerHandle) -> int:
        """Fetch the prioritized region (chunks before the landmark); returns the bytes it covers."""
        span = handle.layer.prefetch_span()
        if not span or not self.options.prefetch:
            return 0
        ix = handle.layer.index
        ids = [c for c in range(handle.chunk_count) if ix.c_storage[c] != ZEROS and ix.c_start[c] < span[1]]
        await self._walk(handle, ids, "prefetch", self.options.prefetch_piece, rate=0.0)
        return span[1]

    async def background(self, handle: LayerHandle) -> None:
        """Fetch every chunk not yet cached, politely, until the layer needs no network."""
        if not self.options.background:
            return
        self._last_mount = trio.current_time()
        ix = handle.layer.index
        ids = [c for c in range(handle.chunk_count) if ix.c_storage[c] != ZEROS]
        await self._walk(
            handle, ids, "background", self.options.background_piece, self.options.background_rate
        )

    async def _until_idle(self) -> None:
        """Until no on-demand read waits, none has for `background_idle` seconds, and no layer was
        mounted for `background_delay` seconds."""
        while True:
            await self._demand_idle.wait()
            now = trio.current_time()
            wait = max(
                self.options.background_idle - (now - self._last_demand),
                self.options.background_delay - (now - self._last_mount),
            )
            if wait <= 0:
                return
            await trio.sleep(wait)

    def _background_piece(self, handle: LayerHandle) -> int:
        """Small pieces while a container may still be starting, large ones once it has settled."""
        if trio.current_time() - self._last_demand > BUSY_WINDOW:
            return self.options.background_piece
        small = self.link(handle).worth(BUSY_PIECE_SECONDS, 256 << 10)
        return max(256 << 10, min(self.options.background_piece, small))

    async def _walk(self, handle: LayerHandle, ids: list[int], kind: str, piece: int, rate: float) -> None:
        """Fetch chunks in blob order, `piece` bytes of blob and at most inflate_cap declared
        decompressed bytes (beyond a piece's first chunk) at a time, each piece stored before the
        next. Stops when the cache refuses to store what it fetched."""
        ix = handle.layer.index
        ids.sort(key=lambda c: (ix.c_start[c], ix.c_inner[c]))
        i = 0
        while i < len(ids) and not handle.closed:
            if kind == "background":
                await self._until_idle()  # on-demand reads first: a container starting reads in bursts
                piece = self._background_piece(handle)
            refused = self.counters.cache_write_errors
            group: list[int] = []
            inflate = 0
            start = ix.c_start[ids[i]]
            while i < len(ids):
                cid = ids[i]
                if group and (
                    ix.c_end[cid] - start > piece or inflate + _inflated(ix, cid) > self.options.inflate_cap
                ):
                    break
                i += 1
                key = (handle.id, cid)
                if handle.cached[cid] or self.cache.contains(self._cache_key(handle, cid)):
                    handle.cached[cid] = 1
                elif (kept := self._memory.get(key) or self._unwritten.get(key, (None, None))[1]) is not None:
                    await self._store(handle, cid, kept)  # fetched on demand, not yet written
                elif key in self._pending:
                    await self._pending[key].done.wait()
                else:
                    if group:
                        inflate += _inflated(ix, cid)
                    group.append(cid)
            if group:
                pendings = {cid: self._pending.setdefault((handle.id, cid), _Pending()) for cid in group}
                await self._fetch(handle, pendings, kind)
            if self.counters.cache_write_errors > refused:
                log.warning(
                    "%s fetch of %s stopped: the chunk cache does not store what it fetches (see its "
                    "errors); the rest of the layer is fetched when read",
                    kind,
                    handle.name,
                )
                return
            if not group:
                continue
            if rate > 0:
                await trio.sleep((ix.c_end[group[-1]] - ix.c_start[group[0]]) / rate)
