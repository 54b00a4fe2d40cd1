"""The compact in-memory index of a layer's TOC: path tree, attributes, chunks.

Built once per layer from the TOC JSON (eStargz and zstd:chunked share the entry schema), it answers
what the filesystem asks: lookup by (directory, name), attributes, directory listings, symlink targets,
xattrs, and for any byte range of a file the chunks that hold it. Memory is columnar (`array` columns,
one shared digest buffer, sorted child lists) so a 100,000-entry layer costs about 200 bytes an entry.

Inode numbers are local to the layer and a pure function of the TOC: 2, 3, ... in TOC order (the root
is 1), an implicit parent directory just before the first entry below it, so a restarted daemon gives
the same ones.

Overlay semantics for use as an overlayfs lower layer: `.wh.<name>` becomes a character device 0/0
named `<name>`; `.wh..wh..opq` marks its directory opaque (`trusted.overlay.opaque = y`); the landmark
files `.prefetch.landmark` / `.no.prefetch.landmark` are hidden and tell where the prioritized region
ends. A layer without entries for parent directories is normal input: they are created (0755, root).

Every violation of the format is a `FormatError` naming the entry: `..`, absolute or duplicate names,
hardlinks to nothing, negative or out-of-range offsets, chunk lists that do not cover the file,
absurd sizes or counts.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import datetime as _dt
from array import array
from dataclasses import dataclass
from typing import Any

from .errors import FormatError

ROOT = 1
DIR, REG, SYMLINK, CHAR, BLOCK, FIFO = range(6)
GZIP, ZSTD, ZEROS = range(3)  # how a chunk is stored
KIND_NAMES = {"dir": DIR, "reg": REG, "symlink": SYMLINK, "char": CHAR, "block": BLOCK, "fifo": FIFO}
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_NO_DIGEST = bytes(32)
_U32_FIELDS = frozenset({"mode", "uid", "gid", "devMajor", "devMinor"})


@dataclass(frozen=True)
class Limits:
    max_entries: int = 4_000_000
    max_file_size: int = 1 << 40  # 1 TiB
    max_chunk_size: int = 1 << 30  # one chunk is decompressed in memory
    max_path: int = 4096
    max_xattr_size: int = 64 << 10


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
    """Build the index of a parsed TOC document. `data_end` is where the compressed data region ends
    (the TOC offset); `storage` says how chunks are compressed (GZIP or ZSTD)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise FormatError(f"{what}: TOC is not an object with an 'entries' list")
    entries = doc["entries"]
    if len(entries) > limits.max_entries:
        raise FormatError(
            f"{what}: TOC has {len(entries)} entries, more than the limit of {limits.max_entries}"
        )
    return _Builder(what, data_end, storage, limits).build(entries)


class _Builder:
    def __init__(self, what: str, data_end: int, storage: int, limits: Limits):
        self.what, self.data_end, self.storage, self.limits = what, data_end, storage, limits
        self.ix = LayerIndex()
        self.ix._extra_names = {}
        self.by_path: dict[str, int] = {"": ROOT}
        self.children: dict[int, list[int]] = {ROOT: []}
        self.mtimes: dict[str, int] = {}
        self.ends: dict[int, int] = {}  # chunk id -> endOffset given by the TOC
        self.current_file = -1  # inode of the regular file whose chunks may follow
        self.current_name = ""
        self.current_index = -1
        self.whiteouts: set[int] = set()  # inodes that stand for a whiteout

    def fail(self, i: int, e: dict, message: str) -> FormatError:
        name = e.get("name") if isinstance(e, dict) else None
        shown = repr(name) if not isinstance(name, str) or len(name) < 200 else repr(name[:200]) + "..."
        return FormatError(f"{self.what}: TOC entry {i} ({shown}): {message}")

    def build(self, entries: list) -> LayerIndex:
        for i, e in enumerate(entries):
            if not isinstance(e, dict):
                raise FormatError(f"{self.what}: TOC entry {i} is not an object")
            kind = e.get("type")
            name = self.clean(i, e)
            if kind == "chunk":
                self.add_chunk(i, e, name)
                continue
            self.close_file(i, e)
            if kind == "hardlink":
                self.add_hardlink(i, e, name)
            elif kind in KIND_NAMES:
                self.add_entry(i, e, name, KIND_NAMES[kind])
            else:
                raise self.fail(i, e, f"unknown type {kind!r}")
        self.close_file(len(entries), {})
        self.finish_chunks()
        self.finish_children()
        return self.ix

    def clean(self, i: int, e: dict) -> str:
        name = e.get("name")
        if not isinstance(name, str):
            raise self.fail(i, e, "no name")
        if len(name) > self.limits.max_path or "\x00" in name:
            raise self.fail(i, e, "name too long or with a NUL byte")
        if name.startswith("/"):
            raise self.fail(i, e, "absolute name")
        if name.startswith("./"):
            name = name[2:]
        name = name.rstrip("/")
        parts = name.split("/") if name else []
        if any(p in ("..", ".", "") for p in parts):
            raise self.fail(i, e, "name with '..', '.' or an empty component")
        return name

    def add_entry(self, i: int, e: dict, name: str, kind: int) -> None:
        ix = self.ix
        if name == "":
            if kind != DIR:
                raise self.fail(i, e, "the root must be a directory")
            self.set_attrs(ROOT, i, e)
            return
        parent_path, _, base = name.rpartition("/")
        if parent_path == "" and base in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
            if base == PREFETCH_LANDMARK:
                ix.prefetch_end = self.int_field(i, e, "offset")
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
            e = {**e, "devMajor": 0, "devMinor": 0, "size": 0, "mode": 0, "uid": 0, "gid": 0}
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
            ino = self.new_inode(parent, base, kind)
            self.by_path[name] = ino
            if whiteout:
                self.whiteouts.add(ino)
        self.set_attrs(ino, i, e)
        if kind == DIR:
            self.children[ino] = []
            ix.nlink[ino] = 2
            ix.nlink[parent] += 1
        elif kind == SYMLINK:
            target = e.get("linkName")
            if not isinstance(target, str) or not target:
                raise self.fail(i, e, "symlink without linkName")
            ix.links[ino] = target
            ix.size[ino] = len(target.encode())
        elif kind in (CHAR, BLOCK):
            ix.rdev[ino] = (self.int_field(i, e, "devMajor"), self.int_field(i, e, "devMinor"))
        elif kind == REG:
            size = self.int_field(i, e, "size")
            if size > self.limits.max_file_size:
                raise self.fail(i, e, f"size {size} beyond the limit of {self.limits.max_file_size}")
            ix.size[ino] = size
            ix.first_chunk[ino] = len(ix.c_start)
            self.current_file, self.current_name, self.current_index = ino, name, i
            if size:
                self.add_chunk(i, e, name, first=True)

    def new_inode(self, parent: int, base: str, kind: int) -> int:
        ix = self.ix
        ino = len(ix.names)
        ix.names.append(base)
        ix.parent.append(parent)
        ix.kind.append(kind)
        for col in (ix.mode, ix.uid, ix.gid, ix.size, ix.mtime, ix.first_chunk, ix.chunk_count):
            col.append(0)
        ix.nlink.append(1)
        self.children[parent].append(ino)
        return ino

    def directory(self, path: str, i: int, e: dict) -> int:
        """The inode of a directory path, creating missing parents (0755 root) implicitly."""
        ino = self.by_path.get(path)
        if ino is not None:
            if self.ix.kind[ino] != DIR:
                raise self.fail(i, e, f"parent {path!r} is not a directory")
            return ino
        parent_path, _, base = path.rpartition("/")
        parent = self.directory(parent_path, i, e)
        ino = self.new_inode(parent, base, DIR)
        self.ix.mode[ino] = 0o755
        self.ix.implicit.add(ino)
        self.ix.nlink[ino] = 2
        self.ix.nlink[parent] += 1
        self.children[ino] = []
        self.by_path[path] = ino
        return ino

    def set_attrs(self, ino: int, i: int, e: dict) -> None:
        ix = self.ix
        ix.mode[ino] = self.int_field(i, e, "mode") & 0o7777
        ix.uid[ino] = self.int_field(i, e, "uid")
        ix.gid[ino] = self.int_field(i, e, "gid")
        ix.mtime[ino] = self.mtime(i, e)
        xattrs = e.get("xattrs")
        if xattrs:
            if not isinstance(xattrs, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in xattrs.items()
            ):
                raise self.fail(i, e, "xattrs must map names to base64 strings")
            try:
                if (
                    sum(len(base64.b64decode(v, validate=True)) for v in xattrs.values())
                    > self.limits.max_xattr_size
                ):
                    raise self.fail(i, e, "xattrs larger than the limit")
            except binascii.Error as err:
                raise self.fail(i, e, "xattr value is not base64") from err
            ix.xattrs[ino] = dict(xattrs)

    def add_hardlink(self, i: int, e: dict, name: str) -> None:
        target_name = e.get("linkName")
        if not isinstance(target_name, str):
            raise self.fail(i, e, "hardlink without linkName")
        target_name = target_name.removeprefix("./").rstrip("/")
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

    def add_chunk(self, i: int, e: dict, name: str, first: bool = False) -> None:
        ix = self.ix
        ino = self.current_file
        if not first and (ino < 0 or name != self.current_name):
            raise self.fail(i, e, "chunk entry that does not follow its regular file")
        file_size = ix.size[ino]
        file_offset = self.int_field(i, e, "chunkOffset")
        expected = ix.c_file_offset[-1] + ix.c_size[-1] if ix.chunk_count[ino] else 0
        if file_offset != expected:
            raise self.fail(i, e, f"chunk at file offset {file_offset}, expected {expected}")
        size = self.int_field(i, e, "chunkSize") or file_size - file_offset
        if size <= 0 or file_offset + size > file_size or size > self.limits.max_chunk_size:
            raise self.fail(i, e, f"chunk size {size} does not fit the file of {file_size} bytes")
        storage = ZEROS if e.get("chunkType") == "zeros" else self.storage
        start = self.int_field(i, e, "offset")
        inner = self.int_field(i, e, "innerOffset")
        if storage != ZEROS and not 0 <= start < self.data_end:
            raise self.fail(i, e, f"offset {start} outside the data region [0, {self.data_end})")
        cid = len(ix.c_start)
        if "endOffset" in e:
            end = self.int_field(i, e, "endOffset")
            if storage != ZEROS and not start < end <= self.data_end:
                raise self.fail(i, e, f"endOffset {end} outside ({start}, {self.data_end}]")
            self.ends[cid] = end
        digest = e.get("chunkDigest") or (e.get("digest") if first and size == file_size else None)
        ix.c_storage.append(storage)
        ix.c_start.append(start)
        ix.c_end.append(0)
        ix.c_inner.append(inner)
        ix.c_file_offset.append(file_offset)
        ix.c_size.append(size)
        ix.c_digest += self.digest(i, e, digest)
        ix.chunk_count[ino] += 1

    def close_file(self, i: int, e: dict) -> None:
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
        """Compressed span ends: endOffset where given, else the next member that starts after."""
        ix = self.ix
        starts = sorted({s for s, k in zip(ix.c_start, ix.c_storage, strict=True) if k != ZEROS})
        if ix.prefetch_end:
            starts = sorted(set(starts) | {ix.prefetch_end})
        for cid in range(len(ix.c_start)):
            if ix.c_storage[cid] == ZEROS:
                continue
            end = self.ends.get(cid)
            if end is None:
                j = bisect.bisect_right(starts, ix.c_start[cid])
                end = starts[j] if j < len(starts) else self.data_end
            ix.c_end[cid] = end

    def finish_children(self) -> None:
        ix, names = self.ix, self.ix.names
        ix.child_start = array("I", bytes(4 * len(names)))
        ix.child_count = array("I", bytes(4 * len(names)))
        for ino, kids in self.children.items():
            kids.sort(key=lambda c: names[c])
            ix.child_start[ino] = len(ix.child_list)
            ix.child_count[ino] = len(kids)
            ix.child_list.extend(kids)

    def int_field(self, i: int, e: dict, key: str) -> int:
        v = e.get(key, 0)
        if v is None:
            return 0
        limit = 1 << 32 if key in _U32_FIELDS else 1 << 63
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= limit:
            raise self.fail(i, e, f"{key} must be an integer in [0, {limit}), not {v!r}")
        return v

    def mtime(self, i: int, e: dict) -> int:
        text = e.get("modtime")
        if not text:
            return 0
        ns = self.mtimes.get(text)
        if ns is None:
            if not isinstance(text, str):
                raise self.fail(i, e, "modtime is not a string")
            try:
                t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError as err:
                raise self.fail(i, e, f"modtime {text!r} is not RFC 3339") from err
            if t.tzinfo is None:
                t = t.replace(tzinfo=_dt.UTC)
            delta = t - _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
            ns = (delta.days * 86400 + delta.seconds) * 10**9 + delta.microseconds * 1000
            self.mtimes[text] = ns
        return ns

    def digest(self, i: int, e: dict, value: Any) -> bytes:
        if value is None:
            return _NO_DIGEST
        if not isinstance(value, str) or not value.startswith("sha256:") or len(value) != 71:
            raise self.fail(i, e, f"unsupported digest {value!r} (sha256 expected)")
        try:
            return bytes.fromhex(value[7:])
        except ValueError as err:
            raise self.fail(i, e, f"digest {value!r} is not hex") from err
