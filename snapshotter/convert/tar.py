"""Streaming tar parsing for the layer writers: raw header bytes plus the metadata Go's archive/tar reads.

The writers copy every input header byte for byte (extension headers included) into the new layer, so the
converted tar keeps exactly the metadata the original had; what they need to know about an entry (name,
type, size, mode, owners, times, link target, device numbers, xattrs) is parsed here the way Go's
archive/tar parses it, because the TOCs they write must agree with what stargz-snapshotter and
containers/storage read from the same headers (containers/storage even checks that they agree).

Supported: V7, USTAR, PAX (local and global headers, `SCHILY.xattr.*`), GNU (long names and links,
atime/ctime), star prefixes, base-256 numbers. Sparse files are refused with a clear error: no container
layer tool writes them, and the seekable formats cannot describe them.

Nothing here holds more than one header (and its extension records, capped) in memory.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field
from typing import Protocol

from fuse.formats.spec import TAR_BLOCK, TAR_TYPES

BLOCK = TAR_BLOCK
ZERO_BLOCK = bytes(BLOCK)
MAX_EXTENSION_SIZE = 16 << 20  # one PAX / GNU long-name record set; tar tools use far less

TYPE_NAMES = TAR_TYPES  # how the TOCs name each type flag
REGULAR = tuple(flag for flag, name in TAR_TYPES.items() if name == "reg")


class TarFormatError(ValueError):
    """The input is not a tar archive this writer can convert; the message says where and why."""


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


@dataclass
class TarEntry:
    """One tar member: its raw header blocks (extension headers first) and the parsed metadata."""

    raw: bytes
    name: str  # as Go's tar reader gives Header.Name (UTF-8, undecodable bytes as surrogates)
    typeflag: bytes
    size: int  # bytes of data that follow the header (PAX size applied)
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime_ns: int = 0
    atime_ns: int | None = None
    ctime_ns: int | None = None
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    offset: int = 0  # where its first header block starts in the input stream

    @property
    def kind(self) -> str:
        """ "reg", "dir", ... as the TOCs name types; "" for types the formats cannot carry."""
        return TYPE_NAMES.get(self.typeflag, "")

    @property
    def is_regular(self) -> bool:
        return self.typeflag in REGULAR

    @property
    def clean_name(self) -> str:
        return clean_name(self.name)

    @property
    def padding(self) -> int:
        return -self.size % BLOCK


def clean_name(name: str) -> str:
    """The path relative to the root, as stargz's cleanEntryName makes it ("./a/" and "/a" are "a")."""
    return posixpath.normpath("/" + name).lstrip("/")


class Source:
    """A buffered reader over a stream that counts (and hashes) every byte it hands out."""

    def __init__(self, stream: Readable, *, buffer_size: int = 1 << 20):
        self._stream = stream
        self._buffer_size = buffer_size
        self._buf = b""
        self._pos = 0
        self.offset = 0  # bytes consumed so far
        self._hash = hashlib.sha256()

    def _fill(self, want: int) -> None:
        while len(self._buf) - self._pos < want:
            data = self._stream.read(max(self._buffer_size, want - (len(self._buf) - self._pos)))
            if not data:
                return
            self._buf = self._buf[self._pos :] + data
            self._pos = 0

    def read_exact(self, n: int, what: str) -> bytes:
        out = self.read_up_to(n)
        if len(out) != n:
            raise TarFormatError(
                f"tar stream ends inside {what} (offset {self.offset}, {n - len(out)} bytes short)"
            )
        return out

    def read_up_to(self, n: int) -> bytes:
        if n <= 0:
            return b""
        avail = len(self._buf) - self._pos
        if avail == 0 and n >= self._buffer_size:  # large reads bypass the buffer
            parts = []
            got = 0
            while got < n:
                data = self._stream.read(n - got)
                if not data:
                    break
                parts.append(data)
                got += len(data)
            out = parts[0] if len(parts) == 1 else b"".join(parts)
        else:
            self._fill(n)
            out = self._buf[self._pos : self._pos + n]
            self._pos += len(out)
            if self._pos == len(self._buf):
                self._buf, self._pos = b"", 0
        self._hash.update(out)
        self.offset += len(out)
        return out

    def drain(self) -> None:
        """Consume (and hash) the rest of the stream: trailing zero blocks belong to the DiffID."""
        while self.read_up_to(self._buffer_size):
            pass

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


# --- numbers and strings -----------------------------------------------------------------------------


def parse_numeric(field_bytes: bytes, what: str) -> int:
    """An octal field, or base-256 when the high bit of the first byte is set (GNU / star)."""
    if field_bytes and field_bytes[0] & 0x80:
        bits = 8 * len(field_bytes) - 1
        value = int.from_bytes(field_bytes, "big") & ((1 << bits) - 1)
        if value >> (bits - 1):  # negative: the top remaining bit is the sign
            value -= 1 << bits
        return value
    text = field_bytes.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarFormatError(f"invalid number {field_bytes!r} in the {what} field of a tar header") from None


def _cstring(b: bytes) -> bytes:
    return b.split(b"\x00", 1)[0]


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _checksum_ok(block: bytes) -> bool:
    stored = parse_numeric(block[148:156], "checksum")
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)
    return stored == signed


def parse_pax_time(value: bytes) -> int:
    """A PAX time ("1700000000.5", "-1.25") as integer nanoseconds, as Go's parsePAXTime reads it."""
    text = value.decode("ascii", "replace")
    whole, _, frac = text.partition(".")
    try:
        seconds = int(whole)
    except ValueError:
        raise TarFormatError(f"invalid PAX time {text!r}") from None
    digits = (frac + "000000000")[:9]
    if not digits.isdigit():
        raise TarFormatError(f"invalid PAX time {text!r}")
    nanos = int(digits)
    negative = whole.strip().startswith("-")
    return seconds * 1_000_000_000 + (-nanos if negative else nanos)


def parse_pax(data: bytes) -> dict[str, bytes]:
    """PAX extended header records: "<len> <key>=<value>\\n", values kept as bytes."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # some writers pad the record block with NULs
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise TarFormatError("malformed PAX record: no length")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError(f"malformed PAX record length {data[pos:space]!r}") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise TarFormatError("malformed PAX record")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return records


# --- reading entries ------------------------------------------------------------------------------------


class TarReader:
    """Yields `TarEntry` objects from a `Source`; the caller must consume each entry's data (and padding)
    before asking for the next one (`skip_data` does both)."""

    def __init__(self, source: Source):
        self.source = source
        self._globals: dict[str, bytes] = {}
        self._first = True
        self.ended = False

    def next(self) -> TarEntry | None:
        src = self.source
        raw: list[bytes] = []
        local: dict[str, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        start = src.offset
        while True:
            block = src.read_up_to(BLOCK)
            if not block and not raw:  # a tar without end-of-archive blocks ends here too
                self.ended = True
                return None
            if len(block) < BLOCK:
                raise TarFormatError(f"tar stream ends inside a header (offset {src.offset})")
            if block == ZERO_BLOCK:
                if raw:
                    raise TarFormatError(f"end-of-archive block after an extension header (offset {start})")
                self.ended = True
                return None
            if not _checksum_ok(block):
                if self._first:
                    raise TarFormatError("not a tar archive (the first header's checksum does not match)")
                raise TarFormatError(f"corrupt tar header at offset {src.offset - BLOCK} (checksum mismatch)")
            self._first = False
            typeflag = block[156:157]
            size = parse_numeric(block[124:136], "size")
            if typeflag in (b"x", b"g", b"L", b"K"):
                if size < 0 or size > MAX_EXTENSION_SIZE:
                    raise TarFormatError(f"tar extension header of {size} bytes at offset {start}")
                data = src.read_exact(size, "an extension header")
                pad = src.read_exact(-size % BLOCK, "an extension header's padding")
                raw += [block, data, pad]
                if typeflag == b"x":
                    local.update(parse_pax(data))
                elif typeflag == b"g":
                    for key, value in parse_pax(data).items():
                        if value:
                            self._globals[key] = value
                        else:
                            self._globals.pop(key, None)
                elif typeflag == b"L":
                    long_name = _cstring(data)
                else:
                    long_link = _cstring(data)
                continue
            raw.append(block)
            entry = self._entry(block, b"".join(raw), {**self._globals, **local}, long_name, long_link)
            entry.offset = start
            return entry

    def _entry(
        self,
        block: bytes,
        raw: bytes,
        pax: dict[str, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> TarEntry:
        typeflag = block[156:157]
        magic, version = block[257:263], block[263:265]
        name = _cstring(block[0:100])
        gnu = magic == b"ustar " and version == b" \x00"
        ustar = magic == b"ustar\x00"
        atime = ctime = None
        if ustar:
            star = block[508:512] == b"tar\x00"
            prefix = _cstring(block[345:476] if star else block[345:500])
            if prefix:
                name = prefix + b"/" + name
        elif gnu:
            if block[345]:
                atime = parse_numeric(block[345:357], "atime") * 1_000_000_000
            if block[357]:
                ctime = parse_numeric(block[357:369], "ctime") * 1_000_000_000
        if typeflag == b"S" or any(k.startswith("GNU.sparse.") for k in pax):
            raise TarFormatError(f"{_decode(name)!r} is a sparse file; sparse tar entries are not supported")
        if typeflag not in TYPE_NAMES:
            raise TarFormatError(
                f"{_decode(name)!r} has tar type {typeflag!r}, which container layers cannot hold"
            )
        if long_name is not None:
            name = long_name
        linkname = long_link if long_link is not None else _cstring(block[157:257])
        if typeflag == b"\x00":  # old-style regular file; a trailing slash made it a directory
            typeflag = b"5" if name.endswith(b"/") else b"0"
        has_magic = ustar or gnu
        entry = TarEntry(
            raw=raw,
            name=_decode(name),
            typeflag=typeflag,
            size=parse_numeric(block[124:136], "size"),
            mode=parse_numeric(block[100:108], "mode"),
            uid=parse_numeric(block[108:116], "uid"),
            gid=parse_numeric(block[116:124], "gid"),
            uname=_decode(_cstring(block[265:297])) if has_magic else "",
            gname=_decode(_cstring(block[297:329])) if has_magic else "",
            mtime_ns=parse_numeric(block[136:148], "mtime") * 1_000_000_000,
            atime_ns=atime,
            ctime_ns=ctime,
            linkname=_decode(linkname),
        )
        if has_magic and typeflag in (b"3", b"4"):
            entry.devmajor = parse_numeric(block[329:337], "devmajor")
            entry.devminor = parse_numeric(block[337:345], "devminor")
        for key, value in pax.items():
            if key == "path":
                entry.name = _decode(value)
            elif key == "linkpath":
                entry.linkname = _decode(value)
            elif key == "size":
                entry.size = _pax_int(value, key)
            elif key == "uid":
                entry.uid = _pax_int(value, key)
            elif key == "gid":
                entry.gid = _pax_int(value, key)
            elif key == "uname":
                entry.uname = _decode(value)
            elif key == "gname":
                entry.gname = _decode(value)
            elif key == "mtime":
                entry.mtime_ns = parse_pax_time(value)
            elif key == "atime":
                entry.atime_ns = parse_pax_time(value)
            elif key == "ctime":
                entry.ctime_ns = parse_pax_time(value)
            elif key.startswith("SCHILY.xattr."):
                entry.xattrs[key[len("SCHILY.xattr.") :]] = value
        if entry.size < 0:
            raise TarFormatError(f"{entry.name!r} has a negative size")
        return entry

    def skip_data(self, entry: TarEntry) -> None:
        remaining = entry.size + entry.padding
        while remaining:
            got = len(self.source.read_up_to(min(remaining, 1 << 20)))
            if not got:
                raise TarFormatError(f"tar stream ends inside the data of {entry.name!r}")
            remaining -= got


def _pax_int(value: bytes, key: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise TarFormatError(f"invalid PAX {key} {value!r}") from None


# --- writing headers of our own entries ---------------------------------------------------------------


def ustar_header(name: str, size: int, *, mode: int = 0o644, mtime: int = 0) -> bytes:
    """A USTAR header for a regular file the writer adds (landmarks, the eStargz TOC)."""
    encoded = name.encode()
    if len(encoded) > 100:
        raise ValueError(f"name too long for a plain USTAR header: {name!r}")
    block = bytearray(BLOCK)
    block[0 : len(encoded)] = encoded
    block[100:108] = b"%07o\x00" % mode
    block[108:116] = b"%07o\x00" % 0
    block[116:124] = b"%07o\x00" % 0
    block[124:136] = b"%011o\x00" % size
    block[136:148] = b"%011o\x00" % mtime
    block[148:156] = b" " * 8
    block[156:157] = b"0"
    block[257:263] = b"ustar\x00"
    block[263:265] = b"00"
    block[329:337] = b"%07o\x00" % 0
    block[337:345] = b"%07o\x00" % 0
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)
