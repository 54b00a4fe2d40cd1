"""The compact in-memory index of a layer's TOC: path tree, attributes, chunks.

Built once per layer from the TOC entries (eStargz and zstd:chunked share the entry schema: `TocEntry`,
whose fields' JSON types and ranges msgspec checks), one entry at a time (`IndexBuilder.add`), so a
streamed TOC is never held whole; it answers what the filesystem
asks: lookup by (directory, name), attributes, directory listings, symlink targets, xattrs, and for any
byte range of a file the chunks that hold it. Memory is columnar (`array` columns, one shared digest
buffer, sorted child lists) so a 100,000-entry layer costs about 200 bytes an entry.

Inode numbers are local to the layer and a pure function of the TOC: 2, 3, ... in TOC order (the root
is 1), an implicit parent directory just before the first entry below it, so a restarted daemon gives
the same ones.

What the index shows is what a full unpack of the layer would create (shared/reference/formats.md):
- a root entry (`.`, `./` or an empty name) gives the layer root its mode, owner and mtime; names
  prefixed `./` are ordinary names;
- a layer without entries for parent directories is normal input: they are created (0755, root);
- symlinks have mode 0777, whatever the TOC says (Linux has no lchmod);
- overlayfs lower-layer semantics: `.wh.<name>` becomes a character device 0/0 named `<name>`;
  `.wh..wh..opq` marks its directory opaque (`trusted.overlay.opaque = y`); the landmark files
  `.prefetch.landmark` / `.no.prefetch.landmark` are hidden and tell where the prioritized region ends.

Every violation of the format is a `FormatError` naming the entry: `..`, absolute or duplicate names,
names a full unpack cannot create (a component over NAME_MAX bytes, a path of PATH_MAX bytes or more),
hardlinks to nothing, negative or out-of-range offsets, chunk lists that do not cover the file, chunk
geometry no honest compressor can produce (see `IndexBuilder.finish`), and TOCs whose index would not fit
the memory budget (`Limits`). Nothing recurses on the depth of the input.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import datetime as _dt
import re
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from .errors import FormatError
from .spec import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TAR_BLOCK

ROOT = 1
DIR, REG, SYMLINK, CHAR, BLOCK, FIFO = range(6)
# How a chunk is stored: in a gzip or zstd member of its own (or shared, at innerOffset), a run of
# zeros, or inside a span of a plain gzip layer decoded from a checkpoint (fuse.formats.zranlayer)
GZIP, ZSTD, ZEROS, ZRAN = range(4)
KIND_NAMES = {"dir": DIR, "reg": REG, "symlink": SYMLINK, "char": CHAR, "block": BLOCK, "fifo": FIFO}
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
ROOT_NAMES = frozenset({"", ".", "./"})  # how tar writers spell the layer root (formats.md)
SYMLINK_MODE = 0o777  # what a full unpack on Linux shows for every symlink
_NO_DIGEST = bytes(32)
_U32, _I64 = 1 << 32, 1 << 63  # ranges of TOC integer fields: [0, _U32) for _U32_FIELDS, else [0, _I64)
_U32Field = Annotated[int, msgspec.Meta(ge=0, lt=_U32)]
_I64Field = Annotated[int, msgspec.Meta(ge=0, le=_I64 - 1)]

# The most bytes one compressed byte can inflate to: deflate emits at most 258 bytes per 2-bit code
# (1032:1); a zstd block yields at most 128 KiB and an RLE block takes 4 bytes (32768:1).
MAX_RATIO = {GZIP: 1032, ZSTD: 32768, ZRAN: 1032}

# Estimated bytes the index and its builder keep per inode / chunk / symlink / xattr map, on top of
# the strings themselves (measured with tracemalloc on bench/index_build.py's TOC; see Limits).
_INODE_COST = 160
_CHUNK_COST = 80
_LINK_COST = 60
_XATTR_COST = 250
_MTIME_CACHE = 4096  # distinct modtime strings remembered while building


class TocEntry(msgspec.Struct, gc=False):
    """One TOC entry: the fields the index reads (eStargz and zstd:chunked share them; others are
    ignored), their JSON types and integer ranges checked as it is made (`msgspec`)."""

    name: str
    type: str = ""
    size: _I64Field = 0
    modtime: str = ""
    linkName: str = ""
    mode: _U32Field = 0
    uid: _U32Field = 0
    gid: _U32Field = 0
    devMajor: _U32Field = 0
    devMinor: _U32Field = 0
    xattrs: dict[str, str] | None = None
    digest: str = ""
    offset: _I64Field = 0
    endOffset: _I64Field | None = None  # where the compressed span ends, when the TOC says
    chunkOffset: _I64Field = 0
    chunkSize: _I64Field = 0
    chunkDigest: str = ""
    innerOffset: _I64Field = 0
    chunkType: str = ""


class TocDocument(msgspec.Struct, gc=False):
    entries: list[TocEntry]


_U32_FIELDS = frozenset({"mode", "uid", "gid", "devMajor", "devMinor"})  # the _U32Field fields
_I64_FIELDS = frozenset({"size", "offset", "endOffset", "chunkOffset", "chunkSize", "innerOffset"})
_ERROR_FIELD = re.compile(r"at `\$\.(\w+)")


@dataclass(frozen=True)
class Limits:
    """What the reader accepts. A TOC beyond them is a FormatError: the layer can only be pulled in full.

    `max_index_bytes` bounds the memory the index (and its builder) may take, estimated while
    building (bench/index_build.py's TOC costs ~340 bytes an entry while building, ~200 kept): 128 MiB
    holds about 400,000 entries of such a layer, far above real layers, and keeps one TOC parse under
    ~200 MiB of resident memory whatever the TOC claims.
    `max_entries` bounds the work (entries that add nothing, such as a directory listed again, cost
    time but no memory); `max_entry_bytes` bounds one entry's JSON text (the longest honest entry has a
    PATH_MAX name and link target and 64 KiB of xattrs in base64, well under 256 KiB)."""

    max_entries: int = 1_000_000
    max_index_bytes: int = 128 << 20
    max_entry_bytes: int = 256 << 10
    max_file_size: int = 1 << 40  # 1 TiB
    max_chunk_size: int = 1 << 30  # declared size of one chunk
    max_path: int = 4096  # Linux PATH_MAX: a path or symlink target must be shorter (it counts the NUL)
    max_name: int = 255  # Linux NAME_MAX: bytes in one path component
    max_xattr_size: int = 64 << 10

    @property
    def header_allowance(self) -> int:
        """The most tar bytes one entry can put between two payloads of a compressed member: padding,
        its ustar header, PAX or GNU records for a long name and link target, and its xattrs."""
        return 4 * TAR_BLOCK + 2 * self.max_path + 2 * self.max_xattr_size


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Stat:
    ino: int
    kind: int
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int
    rdev: tuple[int, int]


@dataclass(frozen=True)
class Chunk:
    id: int
    storage: int  # GZIP, ZSTD or ZEROS
    start: int  # compressed span [start, end) in the blob
    end: int
    inner: int  # offset of the chunk in the decompressed span
    file_offset: int
    size: int
    digest: bytes | None  # raw sha256, None when the TOC gives none


class LayerIndex:
    """Read-only after `build_index`; safe to share between tasks."""

    def __init__(self) -> None:
        self.names: list[str] = ["", ""]  # index 0 unused, 1 = root
        self.parent = array("I", [0, ROOT])
        self.kind = bytearray([DIR, DIR])
        self.mode = array("I", [0, 0o755])
        self.uid = array("I", [0, 0])
        self.gid = array("I", [0, 0])
        self.size = array("Q", [0, 0])
        self.mtime = array("q", [0, 0])
        self.nlink = array("I", [0, 2])
        self.first_chunk = array("I", [0, 0])
        self.chunk_count = array("I", [0, 0])
        self.child_start = array("I")
        self.child_count = array("I")
        self.child_list = array("I")
        self.rdev: dict[int, tuple[int, int]] = {}
        self.links: dict[int, str] = {}
        self.xattrs: dict[int, dict[str, str]] = {}  # base64 values, decoded on demand
        self.opaque: set[int] = set()
        # chunks, columnar
        self.c_storage = bytearray()
        self.c_start = array("Q")
        self.c_end = array("Q")
        self.c_inner = array("Q")
        self.c_file_offset = array("Q")
        self.c_size = array("Q")
        self.c_digest = bytearray()
        self.implicit: set[int] = set()  # directories the TOC does not list (made for their children)
        self.prefetch_end: int | None = None  # compressed offset where the prioritized region ends
        self.no_prefetch = False

    # --- queries -------------------------------------------------------------------------------

    @property
    def inode_count(self) -> int:
        return len(self.names) - 1

    def stat(self, ino: int) -> Stat:
        self._check(ino)
        return Stat(
            ino,
            self.kind[ino],
            self.mode[ino],
            self.uid[ino],
            self.gid[ino],
            self.size[ino],
            self.mtime[ino],
            self.nlink[ino],
            self.rdev.get(ino, (0, 0)),
        )

    def lookup(self, parent: int, name: str) -> int | None:
        self._check(parent)
        if self.kind[parent] != DIR:
            return None
        lo, n = self.child_start[parent], self.child_count[parent]
        names, children = self.names, self.child_list
        i = bisect.bisect_left(children, name, lo, lo + n, key=lambda ino: names[ino])
        if i < lo + n and names[children[i]] == name:
            return children[i]
        return self._hardlink_lookup(parent, name)

    def children(self, ino: int) -> list[tuple[str, int]]:
        """(name, inode) of a directory's entries, sorted by name."""
        self._check(ino)
        if self.kind[ino] != DIR:
            return []
        lo = self.child_start[ino]
        out = [(self.names[c], c) for c in self.child_list[lo : lo + self.child_count[ino]]]
        if ino in self._extra_names:
            out = sorted(out + self._extra_names[ino])
        return out

    def find(self, path: str) -> int | None:
        ino: int | None = ROOT
        for part in path.strip("/").split("/"):
            if part and ino is not None:
                ino = self.lookup(ino, part)
        return ino

    def readlink(self, ino: int) -> str:
        return self.links[ino]

    def xattr_names(self, ino: int) -> list[str]:
        names = list(self.xattrs.get(ino, ()))
        return names + ["trusted.overlay.opaque"] if ino in self.opaque else names

    def xattr(self, ino: int, name: str) -> bytes | None:
        if name == "trusted.overlay.opaque" and ino in self.opaque:
            return b"y"
        value = self.xattrs.get(ino, {}).get(name)
        return None if value is None else base64.b64decode(value)

    def chunk(self, cid: int) -> Chunk:
        d = bytes(self.c_digest[cid * 32 : cid * 32 + 32])
        return Chunk(
            cid,
            self.c_storage[cid],
            self.c_start[cid],
            self.c_end[cid],
            self.c_inner[cid],
            self.c_file_offset[cid],
            self.c_size[cid],
            None if d == _NO_DIGEST else d,
        )

    def chunks_of(self, ino: int, offset: int = 0, length: int | None = None) -> range:
        """Ids of the chunks holding bytes [offset, offset+length) of a regular file."""
        first, count = self.first_chunk[ino], self.chunk_count[ino]
        if count == 0 or length == 0:
            return range(0)
        end = self.size[ino] if length is None else min(self.size[ino], offset + length)
        if offset >= end:
            return range(0)
        offs = self.c_file_offset
        lo = bisect.bisect_right(offs, offset, first, first + count) - 1
        hi = bisect.bisect_left(offs, end, first, first + count)
        return range(max(lo, first), hi)

    def inherit_implicit(self, stat_lower) -> int:
        """Give directories the TOC does not list the attributes the same directory has in the layers
        below (`stat_lower(path)` -> os.stat_result or None), as an unpack into an overlay would keep
        them; without one below they stay 0755 root. Returns how many were changed."""
        changed = 0
        for ino in sorted(self.implicit):
            st = stat_lower(self.path(ino))
            if st is not None:
                self.mode[ino] = st.st_mode & 0o7777
                self.uid[ino], self.gid[ino] = st.st_uid, st.st_gid
                self.mtime[ino] = st.st_mtime_ns
                changed += 1
        return changed

    def path(self, ino: int) -> str:
        parts = []
        while ino > ROOT:
            parts.append(self.names[ino])
            ino = self.parent[ino]
        return "/".join(reversed(parts))

    def _check(self, ino: int) -> None:
        if not 0 < ino < len(self.names):
            raise KeyError(ino)

    # Hardlinks: a second name in a directory pointing at an existing inode.
    _extra_names: dict[int, list[tuple[str, int]]]

    def _hardlink_lookup(self, parent: int, name: str) -> int | None:
        for n, ino in self._extra_names.get(parent, ()):
            if n == name:
                return ino
        return None


def build_index(
    doc: Any, *, data_end: int, storage: int, what: str, limits: Limits = DEFAULT_LIMITS
) -> LayerIndex:
    """Build the index of a parsed TOC document (a TocDocument, or the JSON as json.loads gives it).
    `data_end` is where the compressed data region ends (the TOC offset); `storage` says how chunks are
    compressed (GZIP or ZSTD)."""
    if isinstance(doc, TocDocument):
        entries: Any = doc.entries
    elif isinstance(doc, dict) and isinstance(doc.get("entries"), list):
        entries = doc["entries"]
    else:
        raise FormatError(f"{what}: TOC is not an object with an 'entries' list")
    builder = IndexBuilder(what, data_end, storage, limits)
    builder.add_all(entries)
    return builder.finish()


class IndexBuilder:
    """Builds a `LayerIndex` from TOC entries given one at a time, within `Limits`; `finish` checks
    what needs the whole TOC and returns the index."""

    def __init__(self, what: str, data_end: int, storage: int, limits: Limits = DEFAULT_LIMITS):
        self.what, self.data_end, self.storage, self.limits = what, data_end, storage, limits
        self.entries = 0  # entries added so far
        self.cost = 0  # estimated bytes kept, against limits.max_index_bytes
        self._max_entries, self._max_cost = limits.max_entries, limits.max_index_bytes
        self.ix = LayerIndex()
        self.ix._extra_names = {}
        self.by_path: dict[str, int] = {"": ROOT}
        self.children: dict[int, list[int]] = {ROOT: []}
        self.mtimes: dict[str, int] = {}
        self.c_entry = array("Q")  # chunk id -> index of its TOC entry (for the member geometry checks)
        self.c_ino = array("Q")  # chunk id -> its file (for error messages)
        self.current_file = -1  # inode of the regular file whose chunks may follow
        self.current_name = ""
        self.current_index = -1
        self.whiteouts: set[int] = set()  # inodes that stand for a whiteout

    def fail(self, i: int, e: Any, message: str) -> FormatError:
        name = e.get("name") if isinstance(e, dict) else getattr(e, "name", None)
        shown = repr(name) if not isinstance(name, str) or len(name) < 200 else repr(name[:200]) + "..."
        return FormatError(f"{self.what}: TOC entry {i} ({shown}): {message}")

    def add_all(self, entries: Iterable[Any]) -> None:
        for e in entries:
            self.add(e)

    def add(self, e: Any) -> None:
        i = self.entries
        if i >= self._max_entries:
            raise FormatError(
                f"{self.what}: TOC has more than {self.limits.max_entries} entries, the limit of this "
                "reader: too many to index in memory; such a layer can only be pulled in full"
            )
        self.entries = i + 1
        if type(e) is not TocEntry:
            e = self.entry(i, e)
        kind = e.type
        name = self.clean(i, e)
        if kind == "chunk":
            self.add_chunk(i, e, name)
        else:
            self.close_file()
            if kind == "hardlink":
                self.add_hardlink(i, e, name)
            elif kind in KIND_NAMES:
                self.add_entry(i, e, name, KIND_NAMES[kind])
            else:
                raise self.fail(i, e, f"unknown type {kind!r}")
        if self.cost > self._max_cost:
            raise FormatError(
                f"{self.what}: the index of this TOC would take more than "
                f"{self.limits.max_index_bytes >> 20} MiB by entry {i} (names and entries too many or "
                "too long to index in memory); such a layer can only be pulled in full"
            )

    def entry(self, i: int, e: Any) -> TocEntry:
        """A parsed JSON entry as a TocEntry (a null field is a missing one); a field of the wrong type
        or range is a FormatError."""
        if type(e) is not dict:
            raise FormatError(f"{self.what}: TOC entry {i} is not an object")
        try:
            return msgspec.convert({k: v for k, v in e.items() if v is not None}, TocEntry)
        except msgspec.ValidationError as err:
            text = str(err)
            found = _ERROR_FIELD.search(text)
            key = found.group(1) if found else ""
            if key in _U32_FIELDS or key in _I64_FIELDS:
                limit = _U32 if key in _U32_FIELDS else _I64
                message = f"{key} must be an integer in [0, {limit}), not {e.get(key)!r}"
            elif "missing required field `name`" in text:
                message = "no name"
            else:
                message = f"{key}: {text.partition(' - at ')[0]}"
            raise self.fail(i, e, message) from None

    def finish(self) -> LayerIndex:
        self.close_file()
        self.finish_chunks()
        self.finish_children()
        self.c_entry, self.c_ino = array("Q"), array("Q")
        return self.ix

    def clean(self, i: int, e: TocEntry) -> str:
        """The entry's path relative to the root ("" for the root), refused where a full unpack could
        not create it."""
        name = e.name
        limits = self.limits
        if len(name) >= limits.max_path:
            raise self.fail(
                i, e, f"name of {len(name)} characters: a path must be under {limits.max_path} bytes"
            )
        if name.startswith("/"):
            raise self.fail(i, e, "absolute name")
        if name in ROOT_NAMES:
            return ""
        if name.startswith("./"):
            name = name[2:]
        if name.endswith("/"):
            name = name.rstrip("/")
        if "\x00" in name:
            raise self.fail(i, e, "name with a NUL byte")
        if (name.startswith(".") or "/." in name or "//" in name or not name) and any(
            p in ("..", ".", "") for p in name.split("/")
        ):
            raise self.fail(i, e, "name with '..', '.' or an empty component")
        if name.isascii():
            size = len(name)
        else:
            try:
                size = len(name.encode("utf-8", "surrogateescape"))
            except UnicodeEncodeError:
                raise self.fail(i, e, "name is not valid UTF-8") from None
        if size >= limits.max_path:
            raise self.fail(i, e, f"name of {size} bytes: a path must be under {limits.max_path} bytes")
        if (
            size > limits.max_name
            and (longest := max(len(p.encode("utf-8", "surrogateescape")) for p in name.split("/")))
            > limits.max_name
        ):
            raise self.fail(
                i, e, f"a name component of {longest} bytes: at most {limits.max_name} can be created"
            )
        return name

    def add_entry(self, i: int, e: TocEntry, name: str, kind: int) -> None:
        ix = self.ix
        if name == "":
            if kind != DIR:
                raise self.fail(i, e, "the root must be a directory")
            self.set_attrs(ROOT, i, e)
            return
        parent_path, _, base = name.rpartition("/")
        if parent_path == "" and base in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
            if base == PREFETCH_LANDMARK:
                ix.prefetch_end = e.offset
            else:
                ix.no_prefetch = True
            return
        parent = self.directory(parent_path, i, e)
        if base == OPAQUE:
            ix.opaque.add(parent)
            return
        whiteout = base.startswith(WHITEOUT)
        if whiteout:
            base, kind = base[len(WHITEOUT) :], CHAR
            name = f"{parent_path}/{base}" if parent_path else base
            e = msgspec.structs.replace(e, devMajor=0, devMinor=0, size=0, mode=0, uid=0, gid=0)
        existing = self.by_path.get(name)
        if existing is not None:
            if kind == DIR and ix.kind[existing] == DIR:
                self.set_attrs(existing, i, e)  # listed twice, or made implicitly first: this entry wins
                ix.implicit.discard(existing)
                return
            if whiteout and existing not in self.whiteouts:
                return  # a whiteout hides lower layers only, never an entry of its own layer
            if existing not in self.whiteouts:
                raise self.fail(i, e, "duplicate name")
            # what the layer puts where it whited out a lower entry (a file that becomes a directory):
            # that entry replaces the whiteout, keeping its inode number
            self.whiteouts.discard(existing)
            ix.kind[existing] = kind
            ix.rdev.pop(existing, None)
            ino = existing
        else:
            ino = self.new_inode(parent, base, kind, name)
            if whiteout:
                self.whiteouts.add(ino)
        self.set_attrs(ino, i, e)
        if kind == DIR:
            self.children[ino] = []
            ix.nlink[ino] = 2
            ix.nlink[parent] += 1
        elif kind == SYMLINK:
            target = e.linkName
            if not target:
                raise self.fail(i, e, "symlink without linkName")
            size = len(target.encode("utf-8", "surrogateescape")) if not target.isascii() else len(target)
            if size >= self.limits.max_path or "\x00" in target:
                raise self.fail(
                    i,
                    e,
                    f"symlink target of {size} bytes or with a NUL: it must be under {self.limits.max_path}",
                )
            ix.links[ino] = target
            ix.size[ino] = size
            ix.mode[ino] = SYMLINK_MODE
            self.cost += _LINK_COST + size
        elif kind in (CHAR, BLOCK):
            ix.rdev[ino] = (e.devMajor, e.devMinor)
        elif kind == REG:
            size = e.size
            if size > self.limits.max_file_size:
                raise self.fail(i, e, f"size {size} beyond the limit of {self.limits.max_file_size}")
            ix.size[ino] = size
            ix.first_chunk[ino] = len(ix.c_start)
            self.current_file, self.current_name, self.current_index = ino, name, i
            if size:
                self.add_chunk(i, e, name, first=True)

    def new_inode(self, parent: int, base: str, kind: int, path: str) -> int:
        ix = self.ix
        ino = len(ix.names)
        ix.names.append(base)
        ix.parent.append(parent)
        ix.kind.append(kind)
        ix.mode.append(0)
        ix.uid.append(0)
        ix.gid.append(0)
        ix.size.append(0)
        ix.mtime.append(0)
        ix.first_chunk.append(0)
        ix.chunk_count.append(0)
        ix.nlink.append(1)
        self.children[parent].append(ino)
        self.by_path[path] = ino
        self.cost += _INODE_COST + len(base) + len(path)
        return ino

    def directory(self, path: str, i: int, e: TocEntry) -> int:
        """The inode of a directory path, creating missing parents (0755 root) implicitly, outermost
        first (a loop, not recursion: paths may have thousands of components)."""
        ino = self.by_path.get(path)
        missing = []
        while ino is None:
            missing.append(path)
            path = path.rpartition("/")[0]
            ino = self.by_path.get(path)
        if self.ix.kind[ino] != DIR:
            raise self.fail(i, e, f"parent {path!r} is not a directory")
        ix = self.ix
        for sub in reversed(missing):
            parent = ino
            ino = self.new_inode(parent, sub.rpartition("/")[2], DIR, sub)
            ix.mode[ino] = 0o755
            ix.implicit.add(ino)
            ix.nlink[ino] = 2
            ix.nlink[parent] += 1
            self.children[ino] = []
        return ino

    def set_attrs(self, ino: int, i: int, e: TocEntry) -> None:
        ix = self.ix
        ix.mode[ino] = e.mode & 0o7777
        ix.uid[ino] = e.uid
        ix.gid[ino] = e.gid
        ix.mtime[ino] = self.mtimes.get(e.modtime) or self.mtime(i, e)
        xattrs = e.xattrs
        if xattrs:
            try:
                if (
                    sum(len(base64.b64decode(v, validate=True)) for v in xattrs.values())
                    > self.limits.max_xattr_size
                ):
                    raise self.fail(i, e, "xattrs larger than the limit")
            except binascii.Error as err:
                raise self.fail(i, e, "xattr value is not base64") from err
            ix.xattrs[ino] = dict(xattrs)
            self.cost += _XATTR_COST + sum(_XATTR_COST + len(k) + len(v) for k, v in xattrs.items())

    def add_hardlink(self, i: int, e: TocEntry, name: str) -> None:
        target_name = e.linkName
        if not target_name:
            raise self.fail(i, e, "hardlink without linkName")
        target_name = "" if target_name in ROOT_NAMES else target_name.removeprefix("./").rstrip("/")
        target = self.by_path.get(target_name)
        if target is None:
            raise self.fail(i, e, f"hardlink to nothing ({target_name!r} is not an earlier entry)")
        if self.ix.kind[target] == DIR:
            raise self.fail(i, e, "hardlink to a directory")
        if name in self.by_path:
            raise self.fail(i, e, "duplicate name")
        parent_path, _, base = name.rpartition("/")
        parent = self.directory(parent_path, i, e)
        self.by_path[name] = target
        self.ix._extra_names.setdefault(parent, []).append((base, target))
        self.ix.nlink[target] += 1
        self.cost += _INODE_COST + len(base) + len(name)

    def add_chunk(self, i: int, e: TocEntry, name: str, first: bool = False) -> None:
        ix = self.ix
        ino = self.current_file
        if not first and (ino < 0 or name != self.current_name):
            raise self.fail(i, e, "chunk entry that does not follow its regular file")
        file_size = ix.size[ino]
        file_offset, size, start, inner = e.chunkOffset, e.chunkSize, e.offset, e.innerOffset
        expected = ix.c_file_offset[-1] + ix.c_size[-1] if ix.chunk_count[ino] else 0
        if file_offset != expected:
            raise self.fail(i, e, f"chunk at file offset {file_offset}, expected {expected}")
        size = size or file_size - file_offset
        if size <= 0 or file_offset + size > file_size or size > self.limits.max_chunk_size:
            raise self.fail(i, e, f"chunk size {size} does not fit the file of {file_size} bytes")
        storage = ZEROS if e.chunkType == "zeros" else self.storage
        end = 0  # 0: up to the next member (finish_chunks)
        if storage != ZEROS:
            if start >= self.data_end:
                raise self.fail(i, e, f"offset {start} outside the data region [0, {self.data_end})")
            if e.endOffset is not None:
                end = e.endOffset
                if not start < end <= self.data_end:
                    raise self.fail(i, e, f"endOffset {end} outside ({start}, {self.data_end}]")
        digest = e.chunkDigest or (e.digest if first and size == file_size else "")
        ix.c_storage.append(storage)
        ix.c_start.append(start)
        ix.c_end.append(end)
        ix.c_inner.append(inner)
        ix.c_file_offset.append(file_offset)
        ix.c_size.append(size)
        ix.c_digest += self.digest(i, e, digest)
        ix.chunk_count[ino] += 1
        self.c_entry.append(i)
        self.c_ino.append(ino)
        self.cost += _CHUNK_COST

    def close_file(self) -> None:
        ino = self.current_file
        if ino < 0:
            return
        ix = self.ix
        covered = ix.c_file_offset[-1] + ix.c_size[-1] if ix.chunk_count[ino] else 0
        if covered != ix.size[ino]:
            raise FormatError(
                f"{self.what}: TOC entry {self.current_index} ({self.current_name!r}): "
                f"chunks cover {covered} of its {ix.size[ino]} bytes"
            )
        self.current_file = -1

    def finish_chunks(self) -> None:
        """Compressed span ends (endOffset where given, else the next member that starts after), and
        the geometry checks of `check_members`; a chunk alone in its member at innerOffset 0 (the
        common case) is checked here. Spans of a plain gzip layer (ZRAN) hold many files' pieces and
        the data of entries a later one replaced: their geometry is the checkpoint index's to check."""
        ix = self.ix
        if self.storage == ZRAN:
            return
        c_start, c_end, c_storage = ix.c_start, ix.c_end, ix.c_storage
        has_zeros = ZEROS in c_storage
        per_start = Counter(
            c_start if not has_zeros else (s for s, k in zip(c_start, c_storage, strict=True) if k != ZEROS)
        )
        starts = sorted(per_start.keys() | ({ix.prefetch_end} if ix.prefetch_end else set()))
        ratio, shared, n_starts, data_end = MAX_RATIO[self.storage], [], len(starts), self.data_end
        chunks = zip(c_start, c_end, c_storage, ix.c_inner, ix.c_size, strict=True)
        for cid, (start, end, kind, inner, size) in enumerate(chunks):
            if kind == ZEROS:
                continue
            if not end:
                j = bisect.bisect_right(starts, start)
                c_end[cid] = end = starts[j] if j < n_starts else data_end
            if inner or per_start[start] > 1:
                shared.append(cid)
            elif size > (end - start) * ratio:
                raise self._member_error(cid, self._ratio_message(cid, end - start, ratio))
        self.check_members(shared)

    def check_members(self, chunks: list[int]) -> None:
        """Refuse chunk geometry that no honest writer produces, so that decoding a chunk never
        inflates more than its member can hold. Chunks sharing a compressed start lie in one member
        (eStargz packs small files into one gzip member, `innerOffset` telling where each begins).
        In that member's output, sorted by innerOffset, chunks must not overlap (the same chunk named
        twice is allowed); before each one only the tar headers of the TOC entries since the previous
        payload may lie (`Limits.header_allowance` each); and the member cannot inflate to more than
        MAX_RATIO times its compressed span."""
        ix = self.ix
        c_start, c_inner, c_size, c_end, c_entry = ix.c_start, ix.c_inner, ix.c_size, ix.c_end, self.c_entry
        chunks = sorted(chunks, key=lambda c: (c_start[c], c_inner[c]))
        allowance, ratio = self.limits.header_allowance, MAX_RATIO[self.storage]
        first = 0
        while first < len(chunks):
            start = c_start[chunks[first]]
            last = first + 1
            while last < len(chunks) and c_start[chunks[last]] == start:
                last += 1
            member, first = chunks[first:last], last
            span = max(c_end[c] for c in member) - start
            pos, prev = 0, member[0] - 1  # before the first payload: the headers since the chunk before
            for c in member:
                inner, size = c_inner[c], c_size[c]
                if inner < pos:
                    if (inner, size) == (c_inner[prev], c_size[prev]) and self._same_digest(c, prev):
                        continue
                    raise self._member_error(
                        c, f"innerOffset {inner} overlaps the chunk before it in its member (ends at {pos})"
                    )
                headers = max(1, c_entry[c] - (c_entry[prev] if prev >= 0 else -1))
                if inner - pos > headers * allowance:
                    raise self._member_error(
                        c,
                        f"innerOffset {inner} leaves {inner - pos} bytes before it in its member, more "
                        f"than the tar headers of {headers} entries can take ({headers * allowance})",
                    )
                pos, prev = inner + size, c
                if pos > span * ratio:
                    raise self._member_error(c, self._ratio_message(c, span, ratio))

    def _same_digest(self, a: int, b: int) -> bool:
        d = self.ix.c_digest
        return d[a * 32 : a * 32 + 32] == d[b * 32 : b * 32 + 32]

    def _ratio_message(self, cid: int, span: int, ratio: int) -> str:
        ix = self.ix
        return (
            f"innerOffset {ix.c_inner[cid]} + size {ix.c_size[cid]} is more than a member of {span} "
            f"compressed bytes can inflate to ({ratio}:1)"
        )

    def _member_error(self, cid: int, message: str) -> FormatError:
        return FormatError(
            f"{self.what}: TOC entry {self.c_entry[cid]} ({self.ix.path(self.c_ino[cid])!r}): chunk at "
            f"offset {self.ix.c_start[cid]}: {message}: the TOC does not describe this blob"
        )

    def finish_children(self) -> None:
        ix, names = self.ix, self.ix.names
        ix.child_start = array("I", bytes(4 * len(names)))
        ix.child_count = array("I", bytes(4 * len(names)))
        for ino, kids in self.children.items():
            kids.sort(key=lambda c: names[c])
            ix.child_start[ino] = len(ix.child_list)
            ix.child_count[ino] = len(kids)
            ix.child_list.extend(kids)
        self.children = {}

    def mtime(self, i: int, e: TocEntry) -> int:
        text = e.modtime
        if not text:
            return 0
        ns = self.mtimes.get(text)
        if ns is None:
            try:
                t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError as err:
                raise self.fail(i, e, f"modtime {text!r} is not RFC 3339") from err
            if t.tzinfo is None:
                t = t.replace(tzinfo=_dt.UTC)
            delta = t - _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
            ns = (delta.days * 86400 + delta.seconds) * 10**9 + delta.microseconds * 1000
            if len(self.mtimes) >= _MTIME_CACHE:
                self.mtimes.clear()
            self.mtimes[text] = ns
        return ns

    def digest(self, i: int, e: TocEntry, value: str) -> bytes:
        if not value:
            return _NO_DIGEST
        if not value.startswith("sha256:") or len(value) != 71:
            raise self.fail(i, e, f"unsupported digest {value!r} (sha256 expected)")
        try:
            return bytes.fromhex(value[7:])
        except ValueError as err:
            raise self.fail(i, e, f"digest {value!r} is not hex") from err
