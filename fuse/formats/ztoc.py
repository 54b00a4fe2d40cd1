"""SOCI's zTOC for one ordinary gzip layer: the layer's file list (each file's offset in the
uncompressed tar stream) plus the gzip checkpoints (`zran`), built in one streaming pass over the blob
and serialized as SOCI's FlatBuffers document, so that indexes made by SOCI or by lazysnap serve both.

Schema (SOCI's `ztoc/fbs/ztoc.fbs`, vendored in tests/fixtures/soci/; root `Ztoc`, fields in slot order):
  Ztoc { version: string, build_tool_identifier: string, compressed_archive_size: long,
         uncompressed_archive_size: long, toc: TOC, compression_info: CompressionInfo }
  TOC { metadata: [FileMetadata] }
  FileMetadata { name, type: string, uncompressed_offset, uncompressed_size: long, linkname: string,
                 mode: long, uid, gid: uint32, uname, gname, mod_time: string, devmajor, devminor: long,
                 xattrs: [Xattr { key, value: string }] }
  CompressionInfo { compression_algorithm: byte (Gzip = 1, Uncompressed), max_span_id: int,
                    span_digests: [string], checkpoints: [ubyte] }
The FlatBuffers runtime (`flatbuffers` on PyPI) builds the document; reading is a small bounds-checked
walker here (`_Buf`), because the runtime trusts its input and this one comes from a registry.

Field meanings, as SOCI's builder (`ztoc/toc_builder.go`) fills them:
- `uncompressed_offset`: where the entry's data starts in the uncompressed tar (just after its header
  blocks); `uncompressed_size`: the data's size (0 for header-only types: links, dirs, devices, fifos).
- `mod_time`: Go's `time.MarshalText`, RFC 3339 with nanoseconds and no trailing zeros
  ("2023-11-14T22:13:20Z", "2023-11-14T22:13:20.5Z"); lazysnap writes UTC ("Z"), reads any offset.
- `xattrs`: despite the name, the entry's raw PAX records (SOCI keeps them all). lazysnap writes only
  the extended attributes, as `SCHILY.xattr.<name>` records, and reads only those back.
- `checkpoints`: SOCI's zinfo-v2 blob (`zran.Index.to_bytes`); `span_digests[i]`: "sha256:<hex>" of
  span i's compressed bytes (`zran.Index.comp_digests`); `max_span_id`: checkpoints - 1.

What `ZtocEntry` holds is what a full unpack of the layer (containerd's, through Go's archive/tar)
creates: names normalized (no "./" prefix, no trailing "/", "." for the root; ".." or absolute names are
refused), GNU long names and links, PAX path/linkpath/size/uid/gid/uname/gname/mtime and
SCHILY.xattr.*, ustar prefixes and base-256 numbers applied, and an entry repeated later in the layer
replacing the earlier one (last one wins). Layers an unpack would treat in ways a file list cannot show
(sparse files, a directory with children replaced by a file, a hardlink whose target is replaced or
missing) are refused: such a layer can only be pulled in full. The same rules apply to a zTOC read from
a registry (`parse_ztoc`), together with checks that every offset lies inside the archive, entries do
not overlap, and the checkpoint blob is consistent; memory stays within `index.Limits` whatever the
layer or the zTOC claims."""

from __future__ import annotations

import datetime as _dt
import functools
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import flatbuffers
import trio

from . import zran
from .errors import FormatError
from .index import DEFAULT_LIMITS, Limits
from .source import BlobSource
from .spec import TAR_BLOCK, TAR_TYPES

VERSION = "0.9"  # SOCI's only zTOC version (ztoc/ztoc.go Version09)
BUILD_TOOL = "lazysnap"
TYPES = ("reg", "dir", "symlink", "hardlink", "char", "block", "fifo")
HEADER_ONLY = frozenset(TYPES) - {"reg"}  # types whose entries carry no data in the tar stream
XATTR_PREFIX = "SCHILY.xattr."
GZIP_ALGORITHM, UNCOMPRESSED_ALGORITHM = 1, 2  # CompressionInfo.compression_algorithm
MAX_ZTOC_BYTES = 128 << 20  # a serialized zTOC: ~4,000 checkpoints (16 GiB uncompressed at 4 MiB spans)
ROOT = "."

# Estimated bytes one kept entry costs (the object, its ints and strings' overhead), on top of the
# strings' own bytes: what the entry budget (Limits.max_index_bytes) counts.
_ENTRY_COST = 400
_XATTR_COST = 120
_GNU_UNSUPPORTED = {
    b"S": "a GNU sparse file",
    b"M": "a GNU multi-volume continuation",
    b"V": "a volume label",
}
_USTAR, _GNU = b"ustar\x0000", b"ustar  \x00"
_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)\Z", re.ASCII
)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z", re.ASCII)


@dataclass(frozen=True, slots=True)
class ZtocEntry:
    """One entry of the layer, as an unpack creates it (module docstring)."""

    name: str  # normalized relative path; "." is the layer root
    type: str  # one of TYPES
    size: int  # bytes of data in the tar stream (0 for every type but "reg")
    uncompressed_offset: int  # where the data starts in the uncompressed tar stream
    mode: int  # permission bits plus setuid/setgid/sticky (mode & 0o7777)
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: str = ""  # RFC 3339 as SOCI stores it ("" when unknown); see mtime_ns
    linkname: str = ""  # symlink target as written; hardlink target normalized like `name`
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)  # name (without SCHILY.xattr.) -> value

    @property
    def mtime_ns(self) -> int:
        """mtime as nanoseconds since the epoch (0 when SOCI stored none)."""
        return parse_mtime(self.mtime, self.name) if self.mtime else 0


@dataclass(frozen=True)
class Ztoc:
    """A layer's zTOC: its entries in tar order and its checkpoint index (with SOCI's compressed span
    digests as `index.comp_digests`; a zTOC has no digests of the uncompressed spans)."""

    version: str
    build_tool: str
    compressed_archive_size: int
    uncompressed_archive_size: int
    entries: list[ZtocEntry]
    index: zran.Index
    compression_algorithm: str = "gzip"

    @property
    def max_span_id(self) -> int:
        return len(self.index.points) - 1


# ---- times ---------------------------------------------------------------------------------------


def format_mtime(ns: int) -> str:
    """Go's `time.MarshalText` of a tar mtime, in UTC: RFC 3339, fraction without trailing zeros; ""
    outside years 0-9999 (where Go's MarshalText fails and SOCI stores the empty string)."""
    sec, frac = divmod(ns, 1_000_000_000)
    try:
        t = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC) + _dt.timedelta(seconds=sec)
    except OverflowError:
        return ""
    text = t.strftime("%Y-%m-%dT%H:%M:%S")
    if len(text) != 19:  # years below 1000 are not zero-padded by every strftime
        text = f"{t.year:04d}" + text[text.index("-") :]
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


def parse_mtime(text: str, what: str = "mtime") -> int:
    """Nanoseconds since the epoch of an RFC 3339 time as SOCI stores it; FormatError if it is not one."""
    m = _RFC3339.match(text)
    if not m:
        raise FormatError(f"{what}: modification time {text[:64]!r} is not an RFC 3339 time")
    year, month, day, hour, minute, second = (int(m[k]) for k in range(1, 7))
    if m[8] == "Z":
        offset = 0
    else:
        sign = -1 if m[8][0] == "-" else 1
        offset = sign * (int(m[8][1:3]) * 3600 + int(m[8][4:6]) * 60)
    try:
        t = _dt.datetime(max(year, 1), month, day, hour, minute, min(second, 59), tzinfo=_dt.UTC)
    except ValueError as e:
        raise FormatError(f"{what}: modification time {text!r} is not a valid date ({e})") from None
    epoch = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
    seconds = (t - epoch) // _dt.timedelta(seconds=1) - offset
    return seconds * 1_000_000_000 + int((m[7] or "").ljust(9, "0"))


def _tar_time_ns(text: bytes, what: str) -> int:
    """A PAX mtime record ("1700000000", "1700000000.25", "-1.5") as nanoseconds."""
    m = re.fullmatch(rb"(-?)(\d{1,19})(?:\.(\d*))?", text)
    if not m:
        raise FormatError(f"{what}: PAX mtime {text[:40]!r} is not a number")
    ns = int(m[2]) * 1_000_000_000 + int((m[3] or b"")[:9].ljust(9, b"0"))
    return -ns if m[1] else ns


# ---- names and the entry table (shared by the builder and the parser) ------------------------------


def _dec(raw: bytes) -> str:
    """Tar names are bytes; keep any that are not UTF-8 round-trippable."""
    return raw.decode("utf-8", "surrogateescape")


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def normalize_name(raw: str, what: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """The path an unpack creates for a tar name: "./" prefixes, "." components, repeated and trailing
    slashes dropped; "." for the root. FormatError for absolute names, "..", or names Linux refuses."""
    if raw.startswith("/"):
        raise FormatError(f"{what}: entry {raw[:200]!r} has an absolute name; refusing the layer")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FormatError(f"{what}: entry {raw[:200]!r} climbs out of the layer with '..'; refusing it")
    if "\0" in raw:
        raise FormatError(f"{what}: entry name {raw[:200]!r} contains a NUL byte")
    name = "/".join(parts) or ROOT
    if len(_enc(name)) >= limits.max_path or any(len(_enc(p)) > limits.max_name for p in parts):
        raise FormatError(
            f"{what}: entry {raw[:200]!r}… is longer than Linux allows (a component over "
            f"{limits.max_name} bytes or a path of {limits.max_path} bytes or more)"
        )
    return name


def _check_sizes(e: ZtocEntry, what: str, limits: Limits) -> None:
    xattr_bytes = sum(len(_enc(k)) + len(v) for k, v in e.xattrs.items())
    if xattr_bytes > limits.max_xattr_size:
        raise FormatError(
            f"{what}: entry {e.name!r} has {xattr_bytes} bytes of xattrs, over {limits.max_xattr_size}"
        )
    for label, text in (("link target", e.linkname), ("user name", e.uname), ("group name", e.gname)):
        if len(_enc(text)) >= limits.max_path:
            raise FormatError(f"{what}: entry {e.name!r} has a {label} of {limits.max_path} bytes or more")


def _entry_cost(e: ZtocEntry) -> int:
    """What one kept entry costs in memory (roughly), for the budget of Limits.max_index_bytes."""
    strings = len(e.name) + len(e.linkname) + len(e.uname) + len(e.gname) + len(e.mtime)
    xattrs = sum(len(k) + len(v) + _XATTR_COST for k, v in e.xattrs.items())
    return _ENTRY_COST + strings + xattrs


class _Table:
    """The entries kept so far, name -> entry in tar order, with unpack's rules for repeated names and
    hardlinks, and the memory budget (`Limits.max_entries`, `max_index_bytes`)."""

    def __init__(self, what: str, limits: Limits):
        self.what, self.limits = what, limits
        self.entries: dict[str, ZtocEntry] = {}
        self.parents: set[str] = set()  # directories that have entries below them
        self.link_targets: set[str] = set()  # names that hardlinks point to
        self.count = 0
        self.cost = 0

    def add(self, e: ZtocEntry) -> None:
        what, limits = self.what, self.limits
        self.count += 1
        if self.count > limits.max_entries:
            raise FormatError(
                f"{what}: more than {limits.max_entries} entries, the limit of a lazily loaded layer; "
                "pull it in full"
            )
        _check_sizes(e, what, limits)
        self.cost += _entry_cost(e)
        if self.cost > limits.max_index_bytes:
            raise FormatError(
                f"{what}: the file list would take over {limits.max_index_bytes >> 20} MiB of memory by "
                f"entry {self.count}; pull the layer in full"
            )
        old = self.entries.pop(e.name, None)
        if old is not None:
            if old.type == "dir" and e.type != "dir" and e.name in self.parents:
                raise FormatError(
                    f"{what}: entry {e.name!r} replaces a directory that has entries with a {e.type}; "
                    "lazysnap cannot index such a layer: pull it in full"
                )
            if e.name in self.link_targets:
                raise FormatError(
                    f"{what}: entry {e.name!r} is replaced after a hardlink to it was made; "
                    "lazysnap cannot index such a layer: pull it in full"
                )
        if e.name != ROOT:
            parent = e.name.rpartition("/")[0] or ROOT
            p = self.entries.get(parent)
            if p is not None and p.type != "dir":
                raise FormatError(f"{what}: entry {e.name!r} lies below {parent!r}, which is a {p.type}")
            if parent not in self.parents:
                self.parents.add(parent)
                self.cost += _ENTRY_COST // 4 + len(parent)
        if e.type == "hardlink":
            target = self.entries.get(e.linkname)
            if target is None or target.type == "dir":
                raise FormatError(
                    f"{what}: hardlink {e.name!r} points to {e.linkname!r}, which is "
                    f"{'a directory' if target else 'not in the layer before it'}"
                )
            self.link_targets.add(e.linkname)
        if e.name == ROOT and e.type != "dir":
            raise FormatError(f"{what}: the layer root entry is a {e.type}, not a directory")
        self.entries[e.name] = e


# ---- the streaming tar scanner (zran.build_index's sink) -----------------------------------------


def _number(field_: bytes, what: str, name: str) -> int:
    """A tar numeric field: octal text (NUL/space padded) or base-256 (top bit of the first byte)."""
    if field_ and field_[0] & 0x80:
        if field_[0] == 0xFF:
            return int.from_bytes(field_, "big", signed=True)
        return int.from_bytes(bytes([field_[0] & 0x7F]) + field_[1:], "big")
    text = field_.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not all(0x30 <= c <= 0x37 for c in text):
        raise FormatError(f"{what}: tar header {name} field {field_!r} is not an octal number")
    return int(text, 8)


def _cstr(field_: bytes) -> bytes:
    return field_.split(b"\0", 1)[0]


class _TarScanner:
    """Parses the tar stream as zran hands it over (any chunk sizes), keeping only the entries."""

    def __init__(self, what: str, limits: Limits):
        self.what, self.limits = what, limits
        self.table = _Table(what, limits)
        self.meta_max = limits.header_allowance  # one PAX or GNU long-name payload
        self.pos = 0  # uncompressed offset of the next byte
        self.skip = 0  # bytes to pass over (file data and padding)
        self.buf = bytearray()
        self.need = TAR_BLOCK
        self.meta: tuple[bytes, int] | None = None  # (typeflag, size) of the payload being collected
        self.pax: dict[str, bytes] = {}
        self.long_name: bytes | None = None
        self.long_link: bytes | None = None
        self.ended = False

    def feed(self, chunk: memoryview) -> None:
        i, n = 0, len(chunk)
        while i < n:
            if self.ended:  # unpack stops at the end-of-archive block; the padding after it is unread
                self.pos += n - i
                return
            if self.skip:
                k = min(self.skip, n - i)
                self.skip -= k
                i += k
                self.pos += k
                continue
            k = min(self.need - len(self.buf), n - i)
            self.buf += chunk[i : i + k]
            i += k
            self.pos += k
            if len(self.buf) == self.need:
                data = bytes(self.buf)
                self.buf.clear()
                if self.meta is None:
                    self._header(data)
                else:
                    self._meta(data)

    def finish(self) -> list[ZtocEntry]:
        if self.skip or self.buf or self.meta is not None or self.pax or self.long_name or self.long_link:
            raise FormatError(f"{self.what}: the tar stream ends inside an entry at offset {self.pos}")
        return list(self.table.entries.values())

    def _header(self, h: bytes) -> None:
        what = self.what
        if h.count(0) == TAR_BLOCK:
            if self.pax or self.long_name or self.long_link:
                raise FormatError(f"{what}: tar extended header at {self.pos - TAR_BLOCK} precedes no entry")
            self.ended = True
            return
        stored = _number(h[148:156], what, "checksum")
        unsigned = sum(h[:148]) + 8 * 32 + sum(h[156:])
        signed = unsigned - 2 * sum(b for b in h[:148] + h[156:] if b & 0x80)
        if stored not in (unsigned, signed):
            raise FormatError(
                f"{what}: bad tar header checksum at uncompressed offset {self.pos - TAR_BLOCK}: not a tar "
                "layer, or a corrupt one"
            )
        flag = h[156:157]
        size = _number(h[124:136], what, "size")
        if size < 0:
            raise FormatError(f"{what}: tar header at {self.pos - TAR_BLOCK} has a negative size")
        if flag in (b"x", b"g", b"L", b"K"):
            cap = self.limits.max_path if flag in (b"L", b"K") else self.meta_max
            if size > cap:
                raise FormatError(
                    f"{what}: tar {'GNU long name' if flag in (b'L', b'K') else 'PAX header'} of {size} "
                    f"bytes at {self.pos - TAR_BLOCK}, over the limit of {cap}"
                )
            self.meta = (flag, size)
            self.need = -(-size // TAR_BLOCK) * TAR_BLOCK if size else 0
            if not self.need:
                self._meta(b"")
            return
        if flag in _GNU_UNSUPPORTED or (flag not in TAR_TYPES and flag != b"D"):
            kind = _GNU_UNSUPPORTED.get(flag, f"an entry of tar type {flag!r}")
            raise FormatError(
                f"{what}: {kind} at uncompressed offset {self.pos - TAR_BLOCK}; lazysnap cannot index "
                "it: pull the layer in full"
            )
        self._entry(h, flag, size)

    def _meta(self, payload: bytes) -> None:
        flag, size = self.meta
        self.meta, self.need = None, TAR_BLOCK
        body = payload[:size]
        if flag == b"L":
            self.long_name = _cstr(body)
        elif flag == b"K":
            self.long_link = _cstr(body)
        else:
            records = self._pax_records(body)
            if flag == b"x":  # global headers ('g') are ignored, as containerd's unpack does
                self.pax.update(records)

    def _pax_records(self, body: bytes) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        pos = 0
        while pos < len(body):
            space = body.find(b" ", pos, pos + 21)
            length = int(body[pos:space]) if space > pos and body[pos:space].isdigit() else 0
            end = pos + length
            if length <= 0 or end > len(body) or body[end - 1 : end] != b"\n" or b"=" not in body[space:end]:
                if not body[pos:].strip(b"\0"):
                    break  # NUL padding
                raise FormatError(f"{self.what}: malformed PAX record near uncompressed offset {self.pos}")
            key, _, value = body[space + 1 : end - 1].partition(b"=")
            out[_dec(key)] = value
            pos = end
        return out

    def _entry(self, h: bytes, flag: bytes, size: int) -> None:
        what, pax = self.what, self.pax
        magic = h[257:265]
        name_raw = _cstr(h[0:100])
        if magic[:6] == _USTAR[:6] and magic != _GNU and (prefix := _cstr(h[345:500])):
            name_raw = prefix + b"/" + name_raw
        if self.long_name is not None:
            name_raw = self.long_name
        if "path" in pax:
            name_raw = pax["path"]
        link_raw = self.long_link if self.long_link is not None else _cstr(h[157:257])
        if "linkpath" in pax:
            link_raw = pax["linkpath"]
        if any(k.startswith("GNU.sparse.") for k in pax):
            raise FormatError(
                f"{what}: {_dec(name_raw)[:200]!r} is a sparse file (PAX GNU.sparse); lazysnap cannot "
                "index it: pull the layer in full"
            )
        if flag == b"D":
            raise FormatError(f"{what}: GNU dump directory {_dec(name_raw)[:200]!r}: pull the layer in full")
        kind = TAR_TYPES[flag]
        if flag == b"\0" and name_raw.endswith(b"/"):
            kind = "dir"  # old V7 tars mark directories by the trailing slash only
        size = self._pax_int("size", size)
        if "mtime" in pax:
            mtime_ns = _tar_time_ns(pax["mtime"], what)
        else:
            mtime_ns = _number(h[136:148], what, "mtime") * 1_000_000_000
        xattrs = {k[len(XATTR_PREFIX) :]: v for k, v in pax.items() if k.startswith(XATTR_PREFIX)}
        name = normalize_name(_dec(name_raw), what, self.limits)
        linkname = _dec(link_raw)
        if kind == "hardlink":
            linkname = normalize_name(linkname, what, self.limits)
        data = 0 if kind in HEADER_ONLY else size
        uid = self._pax_int("uid", _number(h[108:116], what, "uid"))
        gid = self._pax_int("gid", _number(h[116:124], what, "gid"))
        for label, v in (("uid", uid), ("gid", gid)):
            if not 0 <= v < 1 << 32:
                raise FormatError(f"{what}: entry {name!r} has {label} {v}, outside 0..2^32-1")
        entry = ZtocEntry(
            name=name,
            type=kind,
            size=data,
            uncompressed_offset=self.pos,
            mode=_number(h[100:108], what, "mode") & 0o7777,
            uid=uid,
            gid=gid,
            uname=_dec(pax.get("uname", _cstr(h[265:297]))),
            gname=_dec(pax.get("gname", _cstr(h[297:329]))),
            mtime=format_mtime(mtime_ns),
            linkname=linkname if kind in ("symlink", "hardlink") else "",
            devmajor=_number(h[329:337], what, "devmajor") if kind in ("char", "block") else 0,
            devminor=_number(h[337:345], what, "devminor") if kind in ("char", "block") else 0,
            xattrs=xattrs,
        )
        if data > self.limits.max_file_size:
            raise FormatError(f"{what}: entry {name!r} of {data} bytes, over {self.limits.max_file_size}")
        self.table.add(entry)
        self.pax, self.long_name, self.long_link = {}, None, None
        self.skip = -(-data // TAR_BLOCK) * TAR_BLOCK

    def _pax_int(self, key: str, default: int) -> int:
        if key not in self.pax:
            return default
        value = self.pax[key]
        if not value.isdigit() or len(value) > 19:
            raise FormatError(f"{self.what}: PAX {key} record {value[:40]!r} is not a number")
        return int(value)


def build_ztoc(
    read: Callable[[int], bytes],
    *,
    span_out: int = zran.DEFAULT_SPAN_OUT,
    span: int | None = None,
    what: str = "gzip layer",
    build_tool: str = BUILD_TOOL,
    limits: Limits = DEFAULT_LIMITS,
) -> Ztoc:
    """Stream a gzip tar layer once through `read(n) -> bytes` (b"" at the end) and return its zTOC.
    `span=None` spaces checkpoints every `span_out` uncompressed bytes exactly as SOCI does (the
    checkpoint blob is then byte-identical to SOCI's); a `span` also caps compressed bytes between them.
    The caller checks `ztoc.index.blob_digest` against the layer digest. FormatError for a layer that is
    not a valid gzip tar or that a file list cannot represent (module docstring)."""
    scanner = _TarScanner(what, limits)
    index = zran.build_index(read, span=span, span_out=span_out, sink=scanner.feed, what=what)
    entries = scanner.finish()
    return Ztoc(VERSION, build_tool, index.comp_size, index.uncomp_size, entries, index)


# ---- FlatBuffers: writing ------------------------------------------------------------------------


def to_bytes(ztoc: Ztoc) -> bytes:
    """The zTOC as SOCI's FlatBuffers document (module docstring)."""
    if ztoc.index.comp_digests is None:
        raise ValueError(f"{ztoc.index.what}: a zTOC needs the compressed span digests of its index")
    b = flatbuffers.Builder(1024 + 600 * len(ztoc.entries))
    metadata = [_write_entry(b, e) for e in ztoc.entries]
    toc_vec = _offsets_vector(b, metadata)
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, toc_vec, 0)
    toc = b.EndObject()

    checkpoints = b.CreateByteVector(ztoc.index.to_bytes())
    digests = _offsets_vector(b, [b.CreateString("sha256:" + d.hex()) for d in ztoc.index.comp_digests])
    b.StartObject(4)
    b.PrependUOffsetTRelativeSlot(3, checkpoints, 0)
    b.PrependUOffsetTRelativeSlot(2, digests, 0)
    b.PrependInt32Slot(1, ztoc.max_span_id, 0)
    algorithm = {"gzip": GZIP_ALGORITHM, "uncompressed": UNCOMPRESSED_ALGORITHM}[ztoc.compression_algorithm]
    b.PrependInt8Slot(0, algorithm, GZIP_ALGORITHM)
    info = b.EndObject()

    version, tool = b.CreateString(ztoc.version), b.CreateString(ztoc.build_tool)
    b.StartObject(6)
    b.PrependUOffsetTRelativeSlot(5, info, 0)
    b.PrependUOffsetTRelativeSlot(4, toc, 0)
    b.PrependInt64Slot(3, ztoc.uncompressed_archive_size, 0)
    b.PrependInt64Slot(2, ztoc.compressed_archive_size, 0)
    b.PrependUOffsetTRelativeSlot(1, tool, 0)
    b.PrependUOffsetTRelativeSlot(0, version, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


def _offsets_vector(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _write_entry(b: flatbuffers.Builder, e: ZtocEntry) -> int:
    xattrs = []
    for key in sorted(e.xattrs):  # SOCI sorts its records by key
        k = b.CreateString(_enc(XATTR_PREFIX + key))
        value = e.xattrs[key]
        v = b.CreateString(value if isinstance(value, bytes) else _enc(value))
        b.StartObject(2)
        b.PrependUOffsetTRelativeSlot(1, v, 0)
        b.PrependUOffsetTRelativeSlot(0, k, 0)
        xattrs.append(b.EndObject())
    xattr_vec = _offsets_vector(b, xattrs)
    strings = [b.CreateString(_enc(s)) for s in (e.name, e.type, e.linkname, e.uname, e.gname, e.mtime)]
    name, kind, linkname, uname, gname, mtime = strings
    b.StartObject(14)
    b.PrependUOffsetTRelativeSlot(13, xattr_vec, 0)
    b.PrependInt64Slot(12, e.devminor, 0)
    b.PrependInt64Slot(11, e.devmajor, 0)
    b.PrependUOffsetTRelativeSlot(10, mtime, 0)
    b.PrependUOffsetTRelativeSlot(9, gname, 0)
    b.PrependUOffsetTRelativeSlot(8, uname, 0)
    b.PrependUint32Slot(7, e.gid, 0)
    b.PrependUint32Slot(6, e.uid, 0)
    b.PrependInt64Slot(5, e.mode, 0)
    b.PrependUOffsetTRelativeSlot(4, linkname, 0)
    b.PrependInt64Slot(3, e.size, 0)
    b.PrependInt64Slot(2, e.uncompressed_offset, 0)
    b.PrependUOffsetTRelativeSlot(1, kind, 0)
    b.PrependUOffsetTRelativeSlot(0, name, 0)
    return b.EndObject()


# ---- FlatBuffers: reading ------------------------------------------------------------------------


class _Buf:
    """Bounds-checked FlatBuffers access: every offset read from the buffer is checked before use."""

    def __init__(self, data: bytes, what: str):
        self.data, self.n, self.what = data, len(data), what

    def fail(self, why: str) -> FormatError:
        return FormatError(f"{self.what}: malformed zTOC ({why}); rebuild the index")

    def _unpack(self, fmt: str, pos: int) -> int:
        size = struct.calcsize(fmt)
        if not 0 <= pos <= self.n - size:
            raise self.fail(f"offset {pos} outside the {self.n}-byte document")
        return struct.unpack_from(fmt, self.data, pos)[0]

    def table(self, pos: int) -> tuple[int, int, int]:
        """(table position, vtable position, vtable length)."""
        vt = pos - self._unpack("<i", pos)
        vt_len = self._unpack("<H", vt)
        if vt_len < 4 or vt_len % 2 or vt + vt_len > self.n:
            raise self.fail(f"bad vtable at {vt}")
        return pos, vt, vt_len

    def field(self, t: tuple[int, int, int], slot: int) -> int | None:
        pos, vt, vt_len = t
        entry = 4 + 2 * slot
        if entry + 2 > vt_len:
            return None
        off = self._unpack("<H", vt + entry)
        return pos + off if off else None

    def scalar(self, t, slot: int, fmt: str, default: int = 0) -> int:
        p = self.field(t, slot)
        return default if p is None else self._unpack(fmt, p)

    def ref(self, t, slot: int) -> int | None:
        p = self.field(t, slot)
        return None if p is None else p + self._unpack("<I", p)

    def string(self, t, slot: int, limit: int) -> bytes:
        """The string in a field ("" when absent), refused when over `limit` bytes."""
        p = self.ref(t, slot)
        return b"" if p is None else self.string_at(p, limit)

    def string_at(self, p: int, limit: int) -> bytes:
        length = self._unpack("<I", p)
        if length > limit:
            raise self.fail(f"string of {length} bytes at {p}, over the limit of {limit}")
        if p + 4 + length > self.n:
            raise self.fail(f"string of {length} bytes at {p} runs past the end")
        return self.data[p + 4 : p + 4 + length]

    def vector(self, t, slot: int, elem: int) -> tuple[int, int]:
        """(count, position of element 0)."""
        p = self.ref(t, slot)
        if p is None:
            return 0, 0
        count = self._unpack("<I", p)
        if p + 4 + count * elem > self.n:
            raise self.fail(f"vector of {count} elements at {p} runs past the end")
        return count, p + 4

    def tables(self, t, slot: int):
        count, start = self.vector(t, slot, 4)
        for k in range(count):
            p = start + 4 * k
            yield self.table(p + self._unpack("<I", p))


def _text(raw: bytes) -> str:
    return _dec(raw)


def parse_ztoc(
    blob: bytes, *, what: str = "zTOC", max_bytes: int = MAX_ZTOC_BYTES, limits: Limits = DEFAULT_LIMITS
) -> Ztoc:
    """Read a zTOC (SOCI's or lazysnap's) and check it; FormatError for anything inconsistent or beyond
    the limits: see the module docstring. Entries are in tar order, normalized, last one wins."""
    if len(blob) > max_bytes:
        raise FormatError(f"{what}: zTOC of {len(blob)} bytes, over the limit of {max_bytes}")
    buf = _Buf(blob, what)
    root = buf.table(buf._unpack("<I", 0))
    version = _text(buf.string(root, 0, 64))
    if version != VERSION:
        raise FormatError(f"{what}: zTOC version {version[:20]!r} is not supported (only {VERSION})")
    build_tool = _text(buf.string(root, 1, 4096))
    csize, usize = buf.scalar(root, 2, "<q"), buf.scalar(root, 3, "<q")
    if not (0 < csize and 0 <= usize <= zran.MAX_OUT):
        raise FormatError(f"{what}: impossible archive sizes ({csize} compressed, {usize} uncompressed)")

    info_pos = buf.ref(root, 5)
    if info_pos is None:
        raise FormatError(f"{what}: zTOC has no compression_info")
    info = buf.table(info_pos)
    algorithm = buf.scalar(info, 0, "<b", GZIP_ALGORITHM)
    if algorithm != GZIP_ALGORITHM:
        raise FormatError(
            f"{what}: zTOC for compression algorithm {algorithm} (only gzip layers, 1, are supported)"
        )
    max_span_id = buf.scalar(info, 1, "<i")
    n_digests, _ = buf.vector(info, 2, 4)
    if n_digests != max_span_id + 1:
        raise FormatError(f"{what}: {n_digests} span digests for max_span_id {max_span_id}")
    digests = []
    for t in _string_refs(buf, info, 2, 80):
        text = _text(t)
        if not _DIGEST.match(text):
            raise FormatError(f"{what}: span digest {text[:80]!r} is not sha256:<64 hex digits>")
        digests.append(bytes.fromhex(text[7:]))
    n, start = buf.vector(info, 3, 1)
    checkpoints = blob[start : start + n]
    index = zran.Index.from_bytes(checkpoints, comp_size=csize, comp_digests=digests, what=what)
    index = replace(index, uncomp_size=usize)
    if len(index.points) != n_digests:
        raise FormatError(f"{what}: {len(index.points)} checkpoints but {n_digests} span digests")

    toc_pos = buf.ref(root, 4)
    raw: list[ZtocEntry] = []
    if toc_pos is not None:
        toc = buf.table(toc_pos)
        count, _ = buf.vector(toc, 0, 4)
        if count > limits.max_entries:
            raise FormatError(f"{what}: {count} entries, over the limit of {limits.max_entries}")
        spent = 0
        for t in buf.tables(toc, 0):
            e = _read_entry(buf, t, usize, what, limits)
            spent += _entry_cost(e)
            if spent > limits.max_index_bytes:
                raise FormatError(
                    f"{what}: the file list would take over {limits.max_index_bytes >> 20} MiB of memory; "
                    "pull the layer in full"
                )
            raw.append(e)
    raw.sort(key=lambda e: e.uncompressed_offset)  # SOCI's reader sorts too
    table = _Table(what, limits)
    prev_end = 0
    for e in raw:
        if e.uncompressed_offset < prev_end + TAR_BLOCK:
            raise FormatError(
                f"{what}: entry {e.name!r} at {e.uncompressed_offset} overlaps the previous entry's data or "
                "has no room for its tar header"
            )
        prev_end = -(-(e.uncompressed_offset + e.size) // TAR_BLOCK) * TAR_BLOCK
        table.add(e)
    return Ztoc(version, build_tool, csize, usize, list(table.entries.values()), index)


def _string_refs(buf: _Buf, t, slot: int, limit: int):
    count, start = buf.vector(t, slot, 4)
    for k in range(count):
        p = start + 4 * k
        yield buf.string_at(p + buf._unpack("<I", p), limit)


def _read_entry(buf: _Buf, t, usize: int, what: str, limits: Limits) -> ZtocEntry:
    path_max = limits.max_path
    name = normalize_name(_text(buf.string(t, 0, path_max)), what, limits)
    kind = _text(buf.string(t, 1, 16))
    if kind not in TYPES:
        raise FormatError(f"{what}: entry {name!r} has unknown type {kind!r}")
    offset, size = buf.scalar(t, 2, "<q"), buf.scalar(t, 3, "<q")
    if kind in HEADER_ONLY:
        size = 0  # as an unpack reads it: no data for these types, whatever the header said
    if not (TAR_BLOCK <= offset and 0 <= size <= limits.max_file_size and offset + size <= usize):
        raise FormatError(
            f"{what}: entry {name!r} claims data at {offset}+{size}, outside the {usize}-byte archive"
        )
    if offset % TAR_BLOCK:
        raise FormatError(f"{what}: entry {name!r} data offset {offset} is not on a tar block boundary")
    mode = buf.scalar(t, 5, "<q")
    devmajor, devminor = buf.scalar(t, 11, "<q"), buf.scalar(t, 12, "<q")
    for label, v in (("mode", mode), ("devmajor", devmajor), ("devminor", devminor)):
        if not 0 <= v < 1 << 32:
            raise FormatError(f"{what}: entry {name!r} has {label} {v}, outside 0..2^32-1")
    mtime = _text(buf.string(t, 10, 64))
    if mtime:
        parse_mtime(mtime, f"{what}: entry {name!r}")
    linkname = _text(buf.string(t, 4, path_max))
    if kind == "hardlink":
        linkname = normalize_name(linkname, what, limits)
    elif kind != "symlink":
        linkname = ""
    xattrs: dict[str, bytes] = {}
    budget = limits.max_xattr_size
    for x in buf.tables(t, 13):
        key = _text(buf.string(x, 0, budget))
        value = buf.string(x, 1, budget)
        budget -= len(key) + len(value) + 1
        if budget < 0:
            raise FormatError(f"{what}: entry {name!r} has over {limits.max_xattr_size} bytes of PAX records")
        if key.startswith(XATTR_PREFIX):
            xattrs[key[len(XATTR_PREFIX) :]] = value
    return ZtocEntry(
        name=name,
        type=kind,
        size=size,
        uncompressed_offset=offset,
        mode=mode & 0o7777,
        uid=buf.scalar(t, 6, "<I"),
        gid=buf.scalar(t, 7, "<I"),
        uname=_text(buf.string(t, 8, path_max)),
        gname=_text(buf.string(t, 9, path_max)),
        mtime=mtime,
        linkname=linkname,
        devmajor=devmajor if kind in ("char", "block") else 0,
        devminor=devminor if kind in ("char", "block") else 0,
        xattrs=xattrs,
    )


STREAM_PIECE = 8 << 20  # bytes of blob per read while streaming a layer
STREAM_AHEAD = 2  # pieces read ahead of the inflater (memory: about STREAM_AHEAD + 2 pieces)


async def stream_ztoc(
    source: BlobSource,
    size: int,
    *,
    span_out: int = zran.DEFAULT_SPAN_OUT,
    what: str = "gzip layer",
    limiter: trio.CapacityLimiter | None = None,
) -> Ztoc:
    """`build_ztoc` of a blob read from `source` once, in STREAM_PIECE reads made ahead by a task while
    a thread inflates and parses. The caller checks `index.blob_digest` against the layer digest."""
    send, recv = trio.open_memory_channel[bytes](STREAM_AHEAD)
    token = trio.lowlevel.current_trio_token()
    failure: list[BaseException] = []

    async def produce() -> None:
        async with send:
            try:
                for offset in range(0, size, STREAM_PIECE):
                    await send.send(await source.read(offset, min(STREAM_PIECE, size - offset)))
            except Exception as e:  # a registry failure: reported instead of the truncated stream
                failure.append(e)

    piece, pos = b"", 0

    def read(n: int) -> bytes:
        nonlocal piece, pos
        while pos >= len(piece):
            try:
                piece, pos = trio.from_thread.run(recv.receive, trio_token=token), 0
            except trio.EndOfChannel:
                return b""
        out = piece[pos : pos + n]
        pos += len(out)
        return out

    result: Ztoc | FormatError | None = None
    async with trio.open_nursery() as nursery:  # nothing raises in here: no exception groups
        nursery.start_soon(produce)
        try:
            result = await trio.to_thread.run_sync(
                functools.partial(build_ztoc, read, span_out=span_out, what=what), limiter=limiter
            )
        except FormatError as e:
            result = e
        finally:
            nursery.cancel_scope.cancel()  # the reader, if the build ended before the blob did
            recv.close()
    if failure:
        raise failure[0]
    if isinstance(result, FormatError):
        raise result
    assert result is not None
    return result
