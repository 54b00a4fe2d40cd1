"""Fetching what a starting program reads next, before it asks: what the ELF loader and Python's
import system read.

When the head of an ELF file arrives for an on-demand read (the kernel starting a program, ld.so
opening a library), what the loader reads next is known (`fuse.elf`):
- the file's dynamic section and writable segment, relocated right after the mapping;
- its interpreter and the libraries its dynamic section needs, found as the loader finds them
  (RUNPATH, then the system library directories; symlinks followed) in the layers a process reading
  this layer sees (`Fetcher.stack`, set by the daemon from the snapshots' parent chains), and then
  theirs, each once.
Their chunks are fetched at once, side by side, instead of one round trip after another as the loader
reaches them. What is fetched is read by the loader a moment later: no bytes are spent on guesses, and
a library already local costs nothing.

When a compiled Python module arrives (`__pycache__/*.pyc`), the modules its module-level code imports
(`fuse.pyimports`), found as the import system finds them (next to it, then in the roots the
programs seen import from), are fetched at once and followed in turn when they arrive: the chain of
imports a start walks one round trip at a time comes side by side. Only where a round trip to the
registry is long (`PY_AHEAD_LATENCY`, as measured): on a short one the link, not the round trips, is
what a start waits for, and guessed files took it from the reads (measured: slower). A conditional
import never taken costs its file's bytes.

The program a container of the image runs (the image config's Entrypoint and Cmd) is known before it
starts: `program` fetches its head, and so all of the above, while containerd is still creating the
container (`fuse.layers.RemoteLayers` calls it when an image's top layer is mounted).

Everything here is best effort within `read_timeout`: a malformed file or a module not found ends the
guess, never a read.
"""

from __future__ import annotations

import logging
import posixpath
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio

from .elf import (
    ELF_MAGIC,
    MAX_NAME,
    Header,
    dynamic_range,
    interpreter,
    library_dirs,
    loader_ranges,
    parse_dynamic,
    parse_header,
    string_at,
)
from .fetch import Fetcher, LayerHandle
from .formats.index import REG, SYMLINK
from .pyimports import Listed, compiled, imports, module_files, root_of

log = logging.getLogger("lazysnap.ahead")
MAX_GUESSES = 16  # guesses followed at once (each may hold a chunk and a request)
MAX_DIRS = 32  # library directories searched (RUNPATH may name thousands)
MAX_PYC = 4 << 20  # compiled modules larger than this are not read for imports
MAX_LISTED = 200_000  # directory entries kept in cached listings, in all
MAX_HOPS = 16  # symlinks followed resolving one path (the kernel's limit is 40)
LD_SO_CACHE = "/etc/ld.so.cache"
MAX_ROOTS = 16  # directories Python programs import top-level modules from (stdlib, dist-packages...)
LISTINGS = 512  # directory listings kept for module lookups
MAX_LISTING = 20_000  # entries of a directory listed for them (dist-packages: ~1,000); a larger one is not
MAX_STRINGS = 256 << 10  # bytes of an ELF string table read for library names (libc's: ~25 KiB)
PY_AHEAD_LATENCY = 0.010  # s: a round trip (beyond the transfer) this long makes imports worth guessing
PY_SCANS = trio.CapacityLimiter(1)  # compiled modules read for their imports at once (CPU: ~0.5 ms each)

Stack = Callable[[LayerHandle], list[LayerHandle]]  # the layers a reader of this one sees, top first


def _package_of(module: str | None) -> str | None:
    """The directory of a package from its __init__ file's path (None for a plain module)."""
    if module is None or not posixpath.basename(module).startswith("__init__."):
        return None
    return posixpath.dirname(posixpath.dirname(module))


def resolve(stack: list[LayerHandle], path: str) -> tuple[LayerHandle, int] | None:
    """The regular file at an absolute path as a process sees it in the merged layers (top first),
    symlinks followed; None when there is none. Whiteouts are not looked at: a guess, not a lookup."""
    parts = [p for p in reversed(path.split("/")) if p and p != "."]  # next component last
    done: list[str] = []
    hops = 0
    found: tuple[LayerHandle, int] | None = None
    while parts:
        name = parts.pop()
        if name == "..":
            if done:
                done.pop()
            continue
        here = "/".join([*done, name])
        found = next(((h, ino) for h in stack if (ino := h.layer.index.find(here)) is not None), None)
        if found is None:
            return None
        h, ino = found
        if h.layer.index.kind[ino] == SYMLINK:
            hops += 1
            if hops > MAX_HOPS:
                return None
            target = h.layer.index.readlink(ino)
            parts.extend(p for p in reversed(target.split("/")) if p and p != ".")
            if target.startswith("/"):
                done = []
            continue
        done.append(name)
    if found is None or found[0].layer.index.kind[found[1]] != REG:
        return None
    return found


Reader = Callable[[int, int], Awaitable[bytes]]  # read(offset, n): bytes of a file


async def needed(header: Header, read: Reader) -> tuple[list[str], str | None]:
    """The DT_NEEDED names and the RUNPATH (or RPATH) of an ELF file; `read(offset, n)` reads it."""
    where = dynamic_range(header)
    if where is None:
        return [], None
    dynamic = parse_dynamic(header, await read(*where))
    offsets = [*dynamic.needed, *([dynamic.runpath] if dynamic.runpath is not None else [])]
    if dynamic.strtab is None or not offsets:
        return [], None
    low, high = min(offsets), max(offsets) + MAX_NAME
    if dynamic.strsz:
        high = min(high, dynamic.strsz)
    high = min(high, low + MAX_STRINGS)  # a lying table is read no further than real ones reach
    if not 0 <= low < high:
        return [], None
    table = await read(dynamic.strtab + low, high - low)
    names = [n for off in dynamic.needed if (n := string_at(table, off - low))]
    runpath = string_at(table, dynamic.runpath - low) if dynamic.runpath is not None else None
    return names, runpath


class LoaderAhead:
    """Installed on a fetcher (`Fetcher.on_head`); `stack` says where a reader's libraries are."""

    def __init__(self, fetcher: Fetcher, stack: Stack | None = None):
        self.fetcher = fetcher
        self.stack: Stack = stack or (lambda handle: [handle])
        self._followed: weakref.WeakKeyDictionary[LayerHandle, bytearray] = weakref.WeakKeyDictionary()
        self._running = trio.CapacityLimiter(MAX_GUESSES)  # guesses followed at once (each holds data)
        self._roots: dict[str, None] = {}  # where the Python programs seen import top-level modules from
        self._listings: OrderedDict[tuple[tuple[str, ...], str], Listed] = OrderedDict()
        self._listed = 0  # names in all cached listings
        fetcher.on_head = self.head

    def head(self, handle: LayerHandle, ino: int, head: bytes) -> None:
        """The first chunk of a file was fetched for a read at offset 0: when it is an ELF file or a
        compiled Python module, start fetching what its loader reads next."""
        if head[:4] == ELF_MAGIC:
            self.elf_head(handle, ino, head)
        # a compiled Python module, only where round trips are long: on a short one the next import's
        # miss costs less than a wrong guess (at 100 Mbit/s and 1 ms, guesses made starts slower: they
        # took the link from the reads). The cheap test first: this runs on every first-chunk miss.
        elif (self.fetcher.link(handle).round_trip_bound() or 0) >= PY_AHEAD_LATENCY and len(head) <= MAX_PYC:
            where = compiled(handle.layer.index.path(ino))
            if where is not None and self._first(handle, ino):
                self.fetcher.spawn(self._guess, self._follow_python, handle, where, head)

    def program(self, stack: list[LayerHandle], paths: list[str]) -> str | None:
        """A container is about to run the first of `paths` found in `stack` (top first): fetch its head
        now, and so what its loader reads after it. The path fetched, or None."""
        for path in paths:
            if (found := resolve(stack, path)) is not None:
                self._fetch_head(found)
                return path
        return None

    def _first(self, handle: LayerHandle, ino: int) -> bool:
        """True the first time a file is followed (exactly: a bit per inode of the layer, gone with
        its handle; an import cycle or many images never make a file followed twice)."""
        seen = self._followed.get(handle)
        if seen is None:
            seen = self._followed[handle] = bytearray(len(handle.layer.index.kind))  # inodes from 1
        if not 0 <= ino < len(seen) or seen[ino]:
            return False
        seen[ino] = 1
        return True

    def _was_followed(self, handle: LayerHandle, ino: int) -> bool:
        seen = self._followed.get(handle)
        return seen is not None and 0 <= ino < len(seen) and bool(seen[ino])

    def elf_head(self, handle: LayerHandle, ino: int, head: bytes) -> None:
        if (header := parse_header(head)) is None:
            return
        ix = handle.layer.index
        if ix.chunk_count[ino] > 1:
            budget = self.fetcher.options.read_ahead  # what fetch_missing takes at most: list no more
            ids: dict[int, None] = {}
            for offset, length in loader_ranges(head, ix.size[ino]):
                ids.update(dict.fromkeys(ix.chunks_of(ino, offset, min(length, budget))))
            started = self.fetcher.fetch_missing(handle, sorted(ids))
            if log.isEnabledFor(logging.DEBUG):
                what = (handle.name, ix.path(ino), list(ids), started)
                log.debug("ahead %s: %s: loader reads chunks %s, fetching %s", *what)
        if self._first(handle, ino):
            self.fetcher.spawn(self._guess, self._follow, handle, ino, header, interpreter(header, head))

    async def _guess(self, follow, *args: object) -> None:
        """Run one guess, bounded in number; a guess that fails is no error of anybody's."""
        try:
            async with self._running:
                with trio.move_on_after(self.fetcher.options.read_timeout):
                    await follow(*args)
        except Exception as e:
            log.debug("guess %s stopped: %s: %s", follow.__name__, type(e).__name__, e)

    async def _follow(self, handle: LayerHandle, ino: int, header: Header, interp: str | None) -> None:
        """Find the interpreter and the needed libraries; fetch each one's head (and so on)."""
        stack = self.stack(handle)
        path = "/" + handle.layer.index.path(ino)
        if interp is not None:  # the kernel opens it right after the header: before the dynamic section
            self._fetch_head(resolve(stack, interp))
            if "ld-linux" in interp:  # glibc's loader reads its cache of library paths first
                if (cache := resolve(stack, LD_SO_CACHE)) is not None:
                    self.fetcher.fetch_missing(cache[0], cache[0].layer.index.chunks_of(cache[1]))
        names, runpath = await needed(header, lambda offset, n: self._bytes(handle, ino, offset, n))
        dirs = list(dict.fromkeys(library_dirs(header, runpath, posixpath.dirname(path))))[:MAX_DIRS]
        found = []
        for name in names:
            if "/" in name:  # a path: relative to the working directory, which is not known here
                found.append(resolve(stack, name) if name.startswith("/") else None)
            else:
                found.append(next(filter(None, (resolve(stack, f"{d}/{name}") for d in dirs)), None))
            await trio.lowlevel.checkpoint()  # lookups on the loop: let the reads in between
        if log.isEnabledFor(logging.DEBUG):
            where = [t[0].layer.index.path(t[1]) if t else None for t in found]
            log.debug("ahead %s: %s: needs %s %s: %s", handle.name, path, interp, names, where)
        for target in dict.fromkeys(found):
            self._fetch_head(target)

    async def _follow_python(self, handle: LayerHandle, where: tuple[str, str], data: bytes) -> None:
        """Find the modules a compiled module imports (and the submodules it imports from them);
        fetch each one's first chunk, and follow it in turn."""
        found = await trio.to_thread.run_sync(imports, data, limiter=PY_SCANS)
        stack = self.stack(handle)
        key = tuple(h.id for h in stack)

        def listing(path: str) -> Listed:
            return self._listing(stack, key, path)

        directory, tag = "/" + where[0], where[1]
        root = root_of(directory, tag, listing)
        self._roots[root] = None
        if posixpath.basename(root).startswith("python3"):
            self._roots[posixpath.join(root, "lib-dynload")] = None
        while len(self._roots) > MAX_ROOTS:
            del self._roots[next(iter(self._roots))]
        bases = [directory, *self._roots]
        files: list[str] = []
        for name, names in found:
            modules = module_files(name, bases, tag, listing) if name else []
            files += modules
            package = directory if not name else _package_of(modules[-1] if modules else None)
            for sub in names if package else ():
                files += module_files(sub, [package], tag, listing)
            await trio.lowlevel.checkpoint()  # lookups on the loop: let the reads in between
        if log.isEnabledFor(logging.DEBUG):
            log.debug("ahead %s: %s imports %s", handle.name, where, files)
        for path in dict.fromkeys(files):
            self._fetch_head(resolve(stack, path))

    def _listing(self, stack: list[LayerHandle], key: tuple[str, ...], path: str) -> Listed:
        """The names in a directory of the merged layers (cached: layers never change; at most
        MAX_LISTED names in all)."""
        cached = self._listings.get((key, path))
        if cached is None:
            names: set[str] = set()
            for h in stack:
                ino = h.layer.index.find(path)
                if ino is not None and h.layer.index.child_count[ino] <= MAX_LISTING:
                    names.update(name for name, _ in h.layer.index.children(ino))
            cached = self._listings[(key, path)] = Listed(names)
            self._listed += len(names)
            while self._listed > MAX_LISTED and len(self._listings) > 1:
                _, old = self._listings.popitem(last=False)
                self._listed -= len(old.names)
        return cached

    def _fetch_head(self, target: tuple[LayerHandle, int] | None) -> None:
        if target is not None and not self._was_followed(*target):
            self.fetcher.spawn(self._guess, self._head_of, *target)

    async def _head_of(self, handle: LayerHandle, ino: int) -> None:
        """Fetch the first chunk of a library or module (with no neighbours: they are not what the
        loader reads; but its `Fetcher.unit` where round trips are dear; one larger than read_ahead is
        not guessed), then follow it."""
        ix = handle.layer.index
        if ix.chunk_count[ino] == 0 or handle.closed or handle.bad is not None:
            return
        first = ix.first_chunk[ino]
        if ix.c_inner[first] + ix.c_size[first] > self.fetcher.options.read_ahead:
            return
        self.fetcher.fetch_missing(handle, self.fetcher.unit(handle, first))
        self.head(handle, ino, await self.fetcher.chunk(handle, first))

    async def _bytes(self, handle: LayerHandle, ino: int, offset: int, length: int) -> bytes:
        """Bytes of a file (fewer at its end), through the fetcher's chunks."""
        ix = handle.layer.index
        end = min(offset + length, ix.size[ino])
        if offset >= end:
            return b""
        ids = ix.chunks_of(ino, offset, end - offset)
        datas = [await self.fetcher.chunk(handle, cid) for cid in ids]
        return self.fetcher.slice(ix, ids, datas, offset, end)
