"""The on-disk chunk cache: every decompressed, verified chunk a process has read, kept as one file.

Layout: `<root>/<ab>/<key>`, 256 fan-out directories made at `open()`. A chunk with a digest is stored
under `sha256-<hex>` (content-addressed: identical chunks of different layers and images are one
file); a chunk without one under `layer-<escaped layer id>-<chunk id>`. Files are 0600 (images carry
secrets), the root 0700.

Guarantees:
- Atomic writes: a temp file in the target directory, written, fsynced (unless `fsync=False`), renamed.
  A crash leaves either no file or the whole file; stray temp files are removed by the next `open()`.
  The directory is not fsynced: a crash may forget the latest renames, and those chunks are refetched.
- `put` re-checks the sha256 of a `sha256-` key before the file becomes visible; a mismatch raises
  `CacheError` and nothing is stored.
- `get` checks the file's size against the caller's size (fstat, cheap) on every read: a truncated or
  grown file is deleted, counted in `stats().corrupt`, and `get` returns None so the caller refetches.
  The content of a `sha256-` file is hashed again once per process, on its first read after a restart
  (the scan cannot vouch for bytes written by an earlier process, or by one that crashed with
  `fsync=False`); after that, and for files this process wrote itself, reads are size-checked only.
  `layer-` keys have no digest: they are size-checked only, always.
- Bounded: past `limit_bytes`, `put` evicts least recently used entries first, never a pinned one (so
  usage may exceed the limit while pins hold it). A filesystem that fills up first (ENOSPC, EDQUOT)
  lowers the limit to what fit, for `FULL_RECHECK` seconds: `put` evicts to make room and writes once
  more. Recency lives in memory; a hit older than
  `TOUCH_AFTER` seconds is written back as the file's mtime on the next worker-thread trip (or
  `flush()`), and `open()` orders entries by mtime, so LRU order survives restarts approximately.

A failing disk never takes the caller down with it: a write that cannot be done (full even after
eviction, read-only, EIO) is a `CacheError` for that chunk alone, and a directory removed under us is
made again; a read that fails with an I/O error is a miss (the entry is dropped, the chunk refetched).
Each kind of failure is counted in `stats()` and logged at most once per `LOG_INTERVAL`.

Never blocking the trio loop: `get` opens the file with openat2(RESOLVE_CACHED) (fails instead of
reading directories from disk) and reads it with preadv(RWF_NOWAIT) (fails instead of waiting for the
disk); only when either would block does the rest happen in a worker thread. Writes, fsyncs, renames,
unlinks and hashing always run in worker threads (`put` under a CapacityLimiter).

All bookkeeping (index, LRU order, pins, counters) lives on the trio loop, changed only by code that
runs between two checkpoints, so no lock is needed: call every method from the loop thread (other
threads go through `trio.from_thread.run`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import itertools
import logging
import math
import os
import re
import secrets
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from .syscalls import libc

log = logging.getLogger("lazysnap.cache")
T = TypeVar("T")

TMP_PREFIX = ".tmp-"  # temp files of writes in progress; never a valid key
TOUCH_AFTER = 600.0  # seconds: a hit on a file whose mtime is older than this persists its recency
TOUCH_BATCH = 4096  # recency updates carried by one worker-thread trip of `put`
SCRATCH_MAX = 16 << 20  # in-loop reads of larger chunks allocate their own buffer
FULL_RECHECK = 300.0  # seconds a full filesystem's lowered limit holds before the configured one is tried
LOG_INTERVAL = 60.0  # seconds: a recurring failure is logged once per interval, with a count
_FULL = (errno.ENOSPC, errno.EDQUOT)
_TRANSIENT = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN)  # not the file's fault
_KEY_RE = re.compile(r"sha256-[0-9a-f]{64}|layer-[A-Za-z0-9_]{1,180}-[0-9]{1,19}")
_SAFE_LAYER_CHAR = re.compile(r"[^A-Za-z0-9]")
_NOWAIT_UNSUPPORTED = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


class CacheError(Exception):
    """A chunk cache operation that failed; the message names the key and what to do."""


class LogThrottle:
    """Logs a recurring failure at most once per `interval` seconds, with the count of those not logged
    (a full disk fails every chunk write: one line a minute, not thousands). Thread-safe."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL):
        self.logger, self.interval = logger, interval
        self._lock = threading.Lock()
        self._next = -math.inf
        self._quiet = 0

    def warning(self, msg: str, *args: object, **kw) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                self._quiet += 1
                return
            quiet, self._quiet, self._next = self._quiet, 0, now + self.interval
        if quiet:
            msg += " (%d more like it since the last such message)"
            args = (*args, quiet)
        self.logger.warning(msg, *args, **kw)


@dataclass(frozen=True)
class CacheStats:
    hits: int  # get() returned data
    misses: int  # get() returned None (absent, dropped as corrupt, or evicted meanwhile)
    bytes_used: int  # sum of the sizes of the cached chunks
    entries: int
    limit: int
    evictions: int
    corrupt: int  # files dropped: wrong size, failed re-verification after restart, vanished
    pinned: int  # keys pinned now
    stored: int  # put() calls that wrote a file
    duplicate_puts: int  # put() calls for a key already cached or being written: no write
    nowait_reads: int  # get() served entirely by the in-loop preadv(RWF_NOWAIT)
    nowait_misses: int  # get() that finished its read in a worker thread (page not cached, ...)
    open_fallbacks: int  # get() whose open() went to a worker thread (path not in the dentry cache)
    verified_on_read: int  # sha256 checks on a first read after a restart
    nowait_supported: bool  # False once the filesystem refused RWF_NOWAIT (every read then in a thread)
    write_errors: int  # put() calls that stored nothing: disk full even after eviction, read-only, EIO
    read_errors: int  # get() calls that failed with an I/O error (a miss: the chunk is fetched again)
    effective_limit: int  # what put() evicts down to: below `limit` for a while after the disk was full


@dataclass(slots=True)
class _Entry:
    path: bytes
    size: int
    stamp: float  # the file's mtime as we last knew it (persisted recency)
    verified: bool  # content known to match the key's digest in this process (always True for layer-)


@dataclass(slots=True)
class _Doomed:
    path: bytes
    entry: _Entry | None  # None: corrupt, never to be resurrected


def _fanout(key: str) -> str:
    if key.startswith("sha256-"):
        return key[7:9]
    return hashlib.sha256(key.encode()).hexdigest()[:2]


# openat2(2) with RESOLVE_CACHED (Linux 5.12+): fails with EAGAIN instead of reading a directory or an
# inode from disk, so an open() in the loop can never block. 437 on every architecture but alpha.
_SYS_OPENAT2 = 437
_RESOLVE_CACHED = 0x20
_AT_FDCWD = -100


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _CachedOpener:
    """open(path, O_RDONLY) that raises BlockingIOError rather than wait for the disk, where possible."""

    def __init__(self) -> None:
        self.flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOATIME
        self._syscall = None
        if sys.platform == "linux" and os.uname().machine != "alpha":
            try:
                self._syscall = libc.syscall
                self._syscall.restype = ctypes.c_long
            except (OSError, AttributeError):
                self._syscall = None
        self._how = _OpenHow(self.flags, 0, _RESOLVE_CACHED)

    def probe(self, path: bytes) -> None:
        """Find out, on an existing file, what the kernel and filesystem accept."""
        try:
            os.close(os.open(path, self.flags))
        except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER
            self.flags &= ~os.O_NOATIME
        self._how = _OpenHow(self.flags, 0, _RESOLVE_CACHED)
        if self._syscall is not None:
            try:
                os.close(self.open_cached(path))
            except BlockingIOError:
                pass
            except OSError as e:  # ENOSYS: no openat2; EINVAL: no RESOLVE_CACHED (before 5.12)
                log.info("openat2(RESOLVE_CACHED) unavailable (%s): cache files are opened with open()", e)
                self._syscall = None

    def open_cached(self, path: bytes) -> int:
        """Open without blocking; BlockingIOError when the path is not all in the dentry cache."""
        if self._syscall is None:
            return os.open(path, self.flags)
        fd = self._syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(_AT_FDCWD),
            ctypes.c_char_p(path),
            ctypes.byref(self._how),
            ctypes.c_size_t(ctypes.sizeof(self._how)),
        )
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return fd

    def open_blocking(self, path: bytes) -> int:
        return os.open(path, self.flags)


class ChunkCache:
    """Verified chunks on disk, bounded in size, least recently used evicted first.

    `cache = ChunkCache(root, limit); await cache.open()` (or `async with ChunkCache(...) as cache:`,
    which also flushes pending deletions and recency updates at exit).
    """

    def __init__(
        self,
        root: Path,
        limit_bytes: int,
        *,
        fsync: bool = True,
        write_threads: int = 2,
        read_threads: int = 8,
    ):
        if limit_bytes < 0:
            raise ValueError(f"chunk cache limit must be >= 0, not {limit_bytes}")
        self.root = Path(root)
        self.limit = limit_bytes
        self.fsync = fsync
        self._write_limiter = trio.CapacityLimiter(write_threads)
        self._read_limiter = trio.CapacityLimiter(read_threads)
        self._opener = _CachedOpener()
        self._nowait = True
        self._scratch = memoryview(bytearray(0))
        self._opened = False
        self._index: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._used = 0
        self._pins: dict[str, int] = {}
        self._writing: dict[str, trio.Event] = {}  # key -> set when its put finished (either way)
        self._writing_bytes = 0
        self._doomed: dict[str, _Doomed] = {}  # out of the index, file not yet unlinked
        self._deleting: dict[str, trio.Event] = {}  # unlink running in a thread
        self._touch: dict[str, bytes] = {}  # key -> path whose mtime should be set to now
        self._hits = self._misses = self._evictions = self._corrupt = 0
        self._stored = self._duplicates = 0
        self._nowait_reads = self._nowait_misses = self._open_fallbacks = self._verified_on_read = 0
        self._write_errors = self._read_errors = 0
        self._full_limit: int | None = None  # usage at which the filesystem was found full
        self._full_until = 0.0  # time.monotonic() when the configured limit is tried again
        self._write_log = LogThrottle(log)
        self._read_log = LogThrottle(log)
        self._drop_log = LogThrottle(log)
        self._unlink_log = LogThrottle(log)

    # --- keys -------------------------------------------------------------------------------------

    @staticmethod
    def key(digest: bytes | None, layer: str, chunk_id: int) -> str:
        """`sha256-<hex>` for a chunk with a (raw, 32-byte) sha256 digest, shared by every layer that
        holds the same bytes; otherwise `layer-<escaped layer id>-<chunk id>`, private to the layer."""
        if digest is not None:
            if len(digest) != 32:
                raise ValueError(f"chunk digest must be a raw 32-byte sha256, got {len(digest)} bytes")
            return "sha256-" + digest.hex()
        if chunk_id < 0:
            raise ValueError(f"chunk id must be >= 0, not {chunk_id}")
        # injective escape: every character outside [A-Za-z0-9] (including "_") becomes _xx (hex)
        safe = _SAFE_LAYER_CHAR.sub(lambda m: "".join(f"_{b:02x}" for b in m.group().encode()), layer)
        if len(safe) > 180:  # keep file names short; collisions of sha256 do not happen
            safe = "h" + hashlib.sha256(layer.encode()).hexdigest()
        return f"layer-{safe}-{chunk_id}"

    def path(self, key: str) -> Path:
        """Where the chunk of `key` lives (whether or not it is cached)."""
        return Path(os.fsdecode(self._path(key)))

    def _path(self, key: str) -> bytes:
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"not a chunk cache key: {key!r} (make keys with ChunkCache.key)")
        return os.fsencode(os.path.join(self.root, _fanout(key), key))

    # --- start and stop ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Create or scan the cache directory: existing chunks are reused (ordered by mtime, oldest
        first), temp files of interrupted writes removed, usage computed, and the limit enforced."""
        if self._opened:
            return
        found = await trio.to_thread.run_sync(self._scan, limiter=self._write_limiter)
        for key, path, size, mtime in found:
            self._index[key] = _Entry(path, size, mtime, verified=not key.startswith("sha256-"))
            self._used += size
        self._opened = True
        self._evict()
        await self.flush()
        log.info(
            "chunk cache %s: %d chunks, %d bytes of %d",
            self.root,
            len(self._index),
            self._used,
            self.limit,
        )

    def _scan(self) -> list[tuple[str, bytes, int, float]]:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(
                f"chunk cache: cannot create {self.root}: {e}; set cache_path to a writable directory"
            ) from e
        try:
            os.chmod(self.root, 0o700)  # chunks of images carry their secrets
        except OSError as e:  # read-only: the chunks there are still served
            log.warning("chunk cache %s: cannot make it 0700: %s", self.root, e)
        found: list[tuple[str, bytes, int, float]] = []
        removed = 0
        for i in range(256):
            sub = os.path.join(self.root, f"{i:02x}")
            try:
                names = os.listdir(sub)
            except FileNotFoundError:
                with contextlib.suppress(OSError):  # read-only: put() reports it, per chunk
                    os.mkdir(sub, 0o700)
                continue
            for name in names:
                full = os.path.join(sub, name)
                if name.startswith(TMP_PREFIX):
                    try:
                        os.unlink(full)
                        removed += 1
                    except OSError:  # gone, or a read-only directory: never a key, never served
                        pass
                    continue
                if not _KEY_RE.fullmatch(name) or _fanout(name) != sub[-2:]:
                    continue  # not ours: left alone, not counted
                try:
                    st = os.stat(full, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found.append((name, os.fsencode(full), st.st_size, st.st_mtime))
        if removed:
            log.info("chunk cache %s: removed %d temp files of interrupted writes", self.root, removed)
        found.sort(key=lambda f: f[3])
        if found:
            self._opener.probe(found[0][1])
        else:
            probe = os.path.join(self.root, "00", TMP_PREFIX + "probe")
            try:
                with open(probe, "wb"):
                    pass
            except OSError as e:
                log.warning(
                    "chunk cache %s is not writable (%s): chunks are not stored until it is", self.root, e
                )
            else:
                self._opener.probe(os.fsencode(probe))
                os.unlink(probe)
        return found

    async def flush(self) -> None:
        """Finish pending unlinks (of evicted or corrupt chunks) and write pending recency updates."""
        self._check_open()
        while self._doomed or self._touch:
            await self._trip()

    async def __aenter__(self) -> ChunkCache:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.flush()

    def _check_open(self) -> None:
        if not self._opened:
            raise RuntimeError(f"chunk cache {self.root} used before `await cache.open()`")

    # --- lookups ----------------------------------------------------------------------------------

    def contains(self, key: str) -> bool:
        """Whether `get(key)` would find a file (it may still turn out corrupt)."""
        return key in self._index

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            bytes_used=self._used,
            entries=len(self._index),
            limit=self.limit,
            evictions=self._evictions,
            corrupt=self._corrupt,
            pinned=len(self._pins),
            stored=self._stored,
            duplicate_puts=self._duplicates,
            nowait_reads=self._nowait_reads,
            nowait_misses=self._nowait_misses,
            open_fallbacks=self._open_fallbacks,
            verified_on_read=self._verified_on_read,
            nowait_supported=self._nowait,
            write_errors=self._write_errors,
            read_errors=self._read_errors,
            effective_limit=self._limit_now(),
        )

    # --- pins -------------------------------------------------------------------------------------

    def pin(self, key: str) -> None:
        """Never evict `key` until as many `unpin` calls; a key may be pinned before it is cached."""
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: str) -> None:
        n = self._pins.get(key, 0)
        if n <= 0:
            raise RuntimeError(f"chunk cache: unpin({key}) without a matching pin")
        if n == 1:
            del self._pins[key]
        else:
            self._pins[key] = n - 1

    @contextmanager
    def pinned(self, *keys: str) -> Iterator[None]:
        for k in keys:
            self.pin(k)
        try:
            yield
        finally:
            for k in keys:
                self.unpin(k)

    # --- get --------------------------------------------------------------------------------------

    async def get(self, key: str, size: int, *, offset: int = 0, length: int | None = None) -> bytes | None:
        """The cached chunk of `key`, which must be `size` bytes, or None (absent, or dropped as corrupt:
        fetch it again). `offset`/`length` return only that part of the chunk (the size check is the
        whole file's). Served from the loop when the pages are cached, else read in a worker thread."""
        self._check_open()
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise ValueError(f"chunk cache: range {offset}+{length} outside a chunk of {size} bytes ({key})")
        entry = self._index.get(key)
        if entry is None:
            self._misses += 1
            await trio.lowlevel.checkpoint()
            return None
        self._index.move_to_end(key)
        now = time.time()
        if now - entry.stamp > TOUCH_AFTER:
            entry.stamp = now
            self._touch[key] = entry.path

        fd: int | None = None
        try:
            try:
                fd = self._opener.open_cached(entry.path)
            except BlockingIOError:  # a directory or the inode would have to come from disk
                self._open_fallbacks += 1
                fd = await self._in_read_thread(self._opener.open_blocking, entry.path)
            file_size = os.fstat(fd).st_size  # the inode is in memory once the file is open: no I/O
            if file_size != size:
                raise _Corrupt(f"{file_size} bytes on disk, {size} expected")
            if entry.verified:
                data = await self._read(fd, offset, length)
            else:
                data = await self._in_read_thread(_read_verified, fd, key, size)
                entry.verified = True
                self._verified_on_read += 1
                if length != size:
                    data = data[offset : offset + length]
        except _Corrupt as e:
            await self._drop_corrupt(key, entry, str(e))
            return None
        except FileNotFoundError:  # evicted meanwhile (a miss), or deleted behind our back (corrupt)
            self._drop_lost(key, entry, "file vanished")
            return None
        except OSError as e:  # EIO, a damaged filesystem: a miss, the caller fetches the chunk again
            self._read_errors += 1
            self._read_log.warning("chunk cache %s: cannot read %s: %s; fetching it again", self.root, key, e)
            if e.errno in _TRANSIENT:
                self._misses += 1
            else:  # the file is bad: dropped, and replaced by the next put
                await self._drop_corrupt(key, entry, f"unreadable ({e})")
            return None
        finally:
            if fd is not None:
                os.close(fd)
        self._hits += 1
        return data

    async def _read(self, fd: int, offset: int, length: int) -> bytes:
        if self._nowait and length:
            view = self._scratch_for(length)
            try:
                got = os.preadv(fd, [view], offset, os.RWF_NOWAIT)
            except BlockingIOError:
                got = -1
            except OSError as e:
                if e.errno not in _NOWAIT_UNSUPPORTED:
                    raise
                log.info("chunk cache %s: RWF_NOWAIT unsupported (%s); reads go to threads", self.root, e)
                self._nowait = False
                got = -1
            if got == length:
                data = bytes(view)  # before any checkpoint: every get shares the scratch buffer
                self._nowait_reads += 1
                await trio.lowlevel.checkpoint()
                return data
        # not (all) in the page cache: a thread reads the whole range; re-reading a cached head costs
        # a memcpy, and keeps the thread's read a single pread into a fresh bytes object
        self._nowait_misses += 1
        return await self._in_read_thread(_read_blocking, fd, offset, length)

    def _scratch_for(self, length: int) -> memoryview:
        """A buffer for in-loop reads, reused: a fresh 4 MiB bytearray per read costs page faults and
        heap churn (measured 3 ms instead of 0.14 ms per warm 4 MiB read on this machine)."""
        if length > len(self._scratch):
            if length > SCRATCH_MAX:
                return memoryview(bytearray(length))
            self._scratch = memoryview(bytearray(max(length, 2 * len(self._scratch))))[:SCRATCH_MAX]
        return self._scratch[:length]

    async def _in_read_thread(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._read_limiter)

    def _drop_lost(self, key: str, entry: _Entry, why: str) -> None:
        """Count a miss; if `entry` is still the indexed one, take it out as corrupt."""
        self._misses += 1
        if self._index.get(key) is entry:
            del self._index[key]
            self._used -= entry.size
            self._corrupt += 1
            self._touch.pop(key, None)
            self._drop_log.warning(
                "chunk cache %s: dropped %s: %s; it will be fetched again", self.root, key, why
            )

    async def _drop_corrupt(self, key: str, entry: _Entry, why: str) -> None:
        """Take a corrupt file out of the index now and unlink it before returning."""
        if self._index.get(key) is not entry:  # evicted or dropped meanwhile by another task
            self._misses += 1
            return
        self._drop_lost(key, entry, why)
        self._doomed[key] = _Doomed(entry.path, None)
        await self._trip()

    # --- put --------------------------------------------------------------------------------------

    async def put(self, key: str, data: bytes) -> None:
        """Store a verified chunk (no-op when it is cached already or being stored by another task).
        For `sha256-` keys the digest is checked again before the file becomes visible: CacheError.
        A chunk that cannot be written (disk full even after evicting, read-only, EIO) is a CacheError
        too; nothing is stored, the cache stays consistent and usable."""
        self._check_open()
        path = self._path(key)
        while True:
            if key in self._index:
                self._duplicates += 1
                await trio.lowlevel.checkpoint()
                return
            if (busy := self._writing.get(key)) is not None:
                await busy.wait()  # then it is cached, or that put failed and this one tries
                continue
            if (deleting := self._deleting.get(key)) is not None:
                await deleting.wait()
                continue
            doomed = self._doomed.get(key)
            if doomed is not None and doomed.entry is not None:
                # evicted but not unlinked yet: the verified file is still there, take it back
                del self._doomed[key]
                self._index[key] = doomed.entry
                self._used += doomed.entry.size
                self._evictions -= 1
                self._duplicates += 1
                await trio.lowlevel.checkpoint()
                return
            break

        self._doomed.pop(key, None)  # a corrupt file of this key waiting for its unlink: replaced
        done = trio.Event()
        self._writing[key] = done
        self._writing_bytes += len(data)
        try:
            self._evict()  # make room first, counting the bytes being written
            stamp = await self._write(path, data, key)
            self._index[key] = _Entry(path, len(data), stamp, verified=True)
            self._used += len(data)
            self._stored += 1
        finally:
            self._writing_bytes -= len(data)
            del self._writing[key]
            done.set()
        # concurrent puts each made room only for the bytes in flight when they started
        self._evict(keep=key)
        if self._doomed:
            await self._trip()

    async def _write(self, path: bytes, data: bytes, key: str) -> float:
        """Write a chunk file (in a worker-thread trip) and return its mtime. A full filesystem lowers
        the limit and evicts to make room, a removed directory is made again; then one more try."""
        for attempt in range(2):
            try:
                return await self._trip((path, data, key))
            except OSError as e:
                if attempt or not await self._recover(e, path):
                    self._write_errors += 1
                    hint = (
                        "free space there or lower cache_limit"
                        if e.errno in _FULL
                        else "check the cache filesystem (read-only? I/O errors in dmesg?)"
                    )
                    error = CacheError(
                        f"chunk cache: cannot store {key} in {self.root}: {e}; the chunk is served "
                        f"from memory and the network meanwhile; {hint}"
                    )
                    self._write_log.warning("%s", error)
                    raise error from e
        raise AssertionError("unreachable")

    async def _recover(self, e: OSError, path: bytes) -> bool:
        """After a failed write: make a retry worthwhile if possible (True), else False."""
        if e.errno in _FULL:
            self._full_limit = min(
                self._used, self._full_limit if self._full_limit is not None else self._used
            )
            self._full_until = time.monotonic() + FULL_RECHECK
            before = self._used
            self._evict()
            if self._used == before:  # nothing of ours to free (empty, or all pinned)
                return False
            self._write_log.warning(
                "chunk cache %s: the filesystem is full with %d bytes of chunks (limit %d): evicting down "
                "to that for %.0fs",
                self.root,
                before,
                self.limit,
                FULL_RECHECK,
            )
            return True
        if e.errno == errno.ENOENT:  # the cache directory was removed under us: make it again
            try:
                await trio.to_thread.run_sync(self._make_dirs, path, limiter=self._write_limiter)
            except OSError:
                return False
            self._write_log.warning("chunk cache %s: directory was removed; made it again", self.root)
            return True
        return False

    def _make_dirs(self, path: bytes) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.root, 0o700)
        with contextlib.suppress(FileExistsError):
            os.mkdir(os.path.dirname(path), 0o700)

    def _limit_now(self) -> int:
        """The limit `put` evicts down to: the configured one, or lower while the disk is full."""
        if self._full_limit is not None and time.monotonic() >= self._full_until:
            self._full_limit = None
            log.info("chunk cache %s: trying the configured limit of %d bytes again", self.root, self.limit)
        return self.limit if self._full_limit is None else min(self.limit, self._full_limit)

    def _evict(self, keep: str | None = None) -> None:
        """Move least recently used, unpinned entries (but `keep`, just stored) out of the index until
        usage plus the bytes being written fits the limit; the next worker-thread trip unlinks them."""
        over = self._used + self._writing_bytes - self._limit_now()
        if over <= 0:
            return
        victims: list[str] = []
        for key, entry in self._index.items():
            if over <= 0:
                break
            if key not in self._pins and key != keep:
                victims.append(key)
                over -= entry.size
        for key in victims:
            entry = self._index.pop(key)
            self._used -= entry.size
            self._evictions += 1
            self._doomed[key] = _Doomed(entry.path, entry)
            self._touch.pop(key, None)

    async def _trip(self, write: tuple[bytes, bytes, str] | None = None) -> float:
        """One worker-thread trip: unlink doomed files, persist recency, write a chunk (if any) and
        return its mtime. Bookkeeping is settled on the loop, before and after, whatever happens."""
        unlink = dict(self._doomed)
        self._doomed.clear()
        events = {k: trio.Event() for k in unlink}
        self._deleting.update(events)
        touch = dict(itertools.islice(self._touch.items(), TOUCH_BATCH))
        for k in touch:
            del self._touch[k]
        progress: list[str] = []
        try:
            return await trio.to_thread.run_sync(
                self._thread_trip,
                write,
                [d.path for d in unlink.values()],
                list(touch.values()),
                progress,
                limiter=self._write_limiter,
            )
        finally:
            for k, d in unlink.items():
                del self._deleting[k]
                events[k].set()
                if "unlinked" not in progress:  # the thread never ran: next trip
                    self._doomed.setdefault(k, d)
            if "touched" not in progress:
                for k, p in touch.items():
                    if k in self._index:
                        self._touch.setdefault(k, p)

    def _thread_trip(
        self,
        write: tuple[bytes, bytes, str] | None,
        unlink: list[bytes],
        touch: list[bytes],
        progress: list[str],
    ) -> float:
        for p in unlink:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError as e:  # not fatal for the cache: the file is out of the index already
                self._unlink_log.warning("chunk cache %s: cannot remove %s: %s", self.root, os.fsdecode(p), e)
        progress.append("unlinked")
        for p in touch:
            try:
                os.utime(p)
            except OSError:
                pass
        progress.append("touched")
        return 0.0 if write is None else self._write_atomic(*write)

    def _write_atomic(self, path: bytes, data: bytes, key: str) -> float:
        if key.startswith("sha256-"):
            actual = hashlib.sha256(data).hexdigest()
            if actual != key[7:]:
                raise CacheError(
                    f"chunk cache: data for {key} has sha256 {actual}; not stored (chunks must be "
                    "verified before they are cached)"
                )
        tmp = os.path.join(os.path.dirname(path), os.fsencode(f"{TMP_PREFIX}{secrets.token_hex(8)}"))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fsync(fd)
                stamp = os.fstat(fd).st_mtime
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except BaseException:  # OSError goes to `_write`, which may make room and try again
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return stamp


class _Corrupt(Exception):
    """A cache file that must not be served (wrong size, wrong content)."""


def _read_blocking(fd: int, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` (blocking: in a thread); _Corrupt when the file ends first. os.pread
    reads straight into a new bytes object with the GIL released: no copy, no GIL held for long."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        part = os.pread(fd, length - got, offset + got)
        if not part:
            raise _Corrupt("file shorter than its size while reading")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _read_verified(fd: int, key: str, size: int) -> bytes:
    data = _read_blocking(fd, 0, size)
    if hashlib.sha256(data).hexdigest() != key[7:]:
        raise _Corrupt("content does not match its digest")
    return data
