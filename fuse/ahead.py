"""Fetching what a starting program reads next, before it asks: the ELF loader's reads.

When the head of an ELF file arrives for an on-demand read (the kernel starting a program, ld.so
opening a library), what the loader reads next is known (`fuse.elf`):
- the file's dynamic section and writable segment, relocated right after the mapping;
- its interpreter and the libraries its dynamic section needs, found as the loader finds them
  (RUNPATH, then the system library directories; symlinks followed) in the layers a process reading
  this layer sees (`Fetcher.stack`, set by the daemon from the snapshots' parent chains), and then
  theirs, each once.
Their chunks are fetched at once, side by side, instead of one round trip after another as the loader
reaches them. What is fetched is read by the loader a moment later: no bytes are spent on guesses, and
a library already local costs nothing. Everything here is best effort within `read_timeout`: a
malformed file or a library not found ends the guess, never a read.
"""

from __future__ import annotations

import logging
import posixpath
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

log = logging.getLogger("lazysnap.ahead")
FOLLOWED = 4096  # files whose libraries were looked up, remembered (least recently seen go first)
MAX_HOPS = 16  # symlinks followed resolving one path (the kernel's limit is 40)
LD_SO_CACHE = "/etc/ld.so.cache"

Stack = Callable[[LayerHandle], list[LayerHandle]]  # the layers a reader of this one sees, top first


def resolve(stack: list[LayerHandle], path: str) -> tuple[LayerHandle, int] | None:
    """The regular file at an absolute path as a process sees it in the merged layers (top first),
    symlinks followed; None when there is none. Whiteouts are not looked at: a guess, not a lookup."""
    parts = [p for p in path.split("/") if p and p != "."]
    done: list[str] = []
    hops = 0
    found: tuple[LayerHandle, int] | None = None
    while parts:
        name = parts.pop(0)
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
            parts = [p for p in target.split("/") if p and p != "."] + parts
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
        self._followed: OrderedDict[tuple[str, int], None] = OrderedDict()
        fetcher.on_head = self.elf_head

    def elf_head(self, handle: LayerHandle, ino: int, head: bytes) -> None:
        """The first chunk of a file was fetched for a read at offset 0: when it is an ELF file,
        start fetching what the loader reads next."""
        if head[:4] != ELF_MAGIC or (header := parse_header(head)) is None:
            return
        ix = handle.layer.index
        if ix.chunk_count[ino] > 1:
            ids: list[int] = []
            for offset, length in loader_ranges(head, ix.size[ino]):
                ids.extend(c for c in ix.chunks_of(ino, offset, length) if c not in ids)
            started = self.fetcher.fetch_missing(handle, sorted(ids))
            if log.isEnabledFor(logging.DEBUG):
                what = (handle.name, ix.path(ino), ids, started)
                log.debug("ahead %s: %s: loader reads chunks %s, fetching %s", *what)
        key = (handle.id, ino)
        if key in self._followed:
            self._followed.move_to_end(key)
            return
        self._followed[key] = None
        if len(self._followed) > FOLLOWED:
            self._followed.popitem(last=False)
        self.fetcher.spawn(self._follow, handle, ino, header, head)

    async def _follow(self, handle: LayerHandle, ino: int, header: Header, head: bytes) -> None:
        """Find the interpreter and the needed libraries; fetch each one's head (and so on)."""
        stack = self.stack(handle)
        path = "/" + handle.layer.index.path(ino)
        interp = interpreter(header, head)
        if interp is not None:  # the kernel opens it right after the header: before the dynamic section
            self._fetch_head(resolve(stack, interp))
            if "ld-linux" in interp:  # glibc's loader reads its cache of library paths first
                if (cache := resolve(stack, LD_SO_CACHE)) is not None:
                    self.fetcher.fetch_missing(cache[0], cache[0].layer.index.chunks_of(cache[1]))
        with trio.move_on_after(self.fetcher.options.read_timeout):
            names, runpath = await needed(header, lambda offset, n: self._bytes(handle, ino, offset, n))
            dirs = library_dirs(header, runpath, posixpath.dirname(path))
            found = []
            for name in names:
                if "/" in name:  # a path: relative to the working directory, which is not known here
                    found.append(resolve(stack, name) if name.startswith("/") else None)
                else:
                    found.append(next(filter(None, (resolve(stack, f"{d}/{name}") for d in dirs)), None))
            if log.isEnabledFor(logging.DEBUG):
                where = [t[0].layer.index.path(t[1]) if t else None for t in found]
                log.debug("ahead %s: %s: needs %s %s: %s", handle.name, path, interp, names, where)
            for target in dict.fromkeys(found):
                self._fetch_head(target)

    def _fetch_head(self, target: tuple[LayerHandle, int] | None) -> None:
        if target is not None and (target[0].id, target[1]) not in self._followed:
            self.fetcher.spawn(self._head_of, *target)

    async def _head_of(self, handle: LayerHandle, ino: int) -> None:
        """Fetch the first chunk of a library (alone: its neighbours are not what the loader reads)."""
        ix = handle.layer.index
        if ix.chunk_count[ino] == 0:
            return
        first = ix.first_chunk[ino]
        self.fetcher.fetch_missing(handle, [first])
        with trio.move_on_after(self.fetcher.options.read_timeout):
            self.elf_head(handle, ino, await self.fetcher.chunk(handle, first))

    async def _bytes(self, handle: LayerHandle, ino: int, offset: int, length: int) -> bytes:
        """Bytes of a file (fewer at its end), through the fetcher's chunks."""
        ix = handle.layer.index
        end = min(offset + length, ix.size[ino])
        if offset >= end:
            return b""
        ids = ix.chunks_of(ino, offset, end - offset)
        datas = [await self.fetcher.chunk(handle, cid) for cid in ids]
        return self.fetcher.slice(ix, ids, datas, offset, end)
