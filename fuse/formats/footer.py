"""Layer footers: which seekable format a blob is, and where its table of contents (TOC) lies.

Byte layouts (shared/reference/formats.md):
- eStargz (gzip): the last 51 bytes are an empty gzip member whose FEXTRA subfield "SG" holds
  "%016x" % toc_offset + "STARGZ"; legacy stargz has a 47-byte footer without the subfield header.
  The TOC is the gzip member at toc_offset (a tar holding stargz.index.json).
- zstd variants: the blob ends with a zstd skippable frame (magic 50 2a 4d 18, LE u32 length) holding
  LE u64 fields and an 8-byte magic: stargz's "GnUlInUx" (40 bytes: TOC offset, compressed length,
  uncompressed length, type) or containers/storage zstd:chunked's "GNUlInUx" (64 bytes: the same four
  fields plus the tar-split offset, compressed and uncompressed length; older writers used 40 bytes).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from .errors import FormatError, NotLazy
from .spec import (
    CHUNKED_MAGIC,
    ESTARGZ,
    ESTARGZ_FOOTER,
    ESTARGZ_ZSTD,
    LEGACY_FOOTER,
    SKIPPABLE_MAGIC,
    STARGZ_ZSTD_MAGIC,
    ZSTD_CHUNKED,
)

TAIL_NEEDED = 72  # the longest footer on the wire
_GZIP_HEAD = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
_EMPTY_DEFLATE = b"\x01\x00\x00\xff\xff" + b"\x00" * 8
_HEX16 = re.compile(rb"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class Footer:
    format: str  # ESTARGZ, ESTARGZ_ZSTD or ZSTD_CHUNKED
    size: int  # bytes of footer at the end of the blob (skippable frame header included)
    toc_offset: int  # where the compressed TOC starts
    toc_length: int  # compressed TOC length
    toc_uncompressed: int | None  # when the footer says it
    tarsplit: tuple[int, int, int] | None = None  # zstd:chunked (offset, length, uncompressed)


def parse_footer(tail: bytes, blob_size: int, what: str) -> Footer:
    """Find the footer in the last bytes of a blob (at least TAIL_NEEDED of them, or the whole blob)."""
    if blob_size < len(tail):
        raise ValueError("tail longer than the blob")
    if tail.endswith((STARGZ_ZSTD_MAGIC, CHUNKED_MAGIC)):
        footer = _zstd_footer(tail, blob_size, what)
    elif (
        len(tail) >= ESTARGZ_FOOTER
        and tail[-ESTARGZ_FOOTER:].startswith(_GZIP_HEAD)
        and tail[-ESTARGZ_FOOTER + 10 : -ESTARGZ_FOOTER + 14] == b"\x1a\x00SG"
    ):
        footer = _gzip_footer(tail[-ESTARGZ_FOOTER:], ESTARGZ_FOOTER, 16, blob_size, what)
    elif (
        len(tail) >= LEGACY_FOOTER
        and tail[-LEGACY_FOOTER:].startswith(_GZIP_HEAD)
        and tail[-LEGACY_FOOTER + 10 : -LEGACY_FOOTER + 12] == b"\x16\x00"
    ):
        footer = _gzip_footer(tail[-LEGACY_FOOTER:], LEGACY_FOOTER, 12, blob_size, what)
    else:
        raise NotLazy(_plain_reason(tail, blob_size, what))
    end = blob_size - footer.size
    if footer.toc_offset < 0 or footer.toc_length <= 0 or footer.toc_offset + footer.toc_length > end:
        raise FormatError(
            f"{what}: TOC at {footer.toc_offset}+{footer.toc_length} lies outside the blob "
            f"({blob_size} bytes)"
        )
    return footer


def _gzip_footer(footer: bytes, size: int, hex_at: int, blob_size: int, what: str) -> Footer:
    hex_offset = footer[hex_at : hex_at + 16]
    if footer[hex_at + 16 : hex_at + 22] != b"STARGZ" or not _HEX16.match(hex_offset):
        raise FormatError(f"{what}: eStargz footer without a valid 'STARGZ' TOC offset")
    if footer[hex_at + 22 :] != _EMPTY_DEFLATE:
        raise FormatError(f"{what}: eStargz footer is not an empty gzip member")
    toc_offset = int(hex_offset, 16)
    return Footer(ESTARGZ, size, toc_offset, blob_size - size - toc_offset, None)


def _zstd_footer(tail: bytes, blob_size: int, what: str) -> Footer:
    for payload in (64, 40, 56):
        start = len(tail) - payload - 8
        if start < 0:
            continue
        header = tail[start : start + 8]
        if header[:4] == SKIPPABLE_MAGIC and struct.unpack("<I", header[4:])[0] == payload:
            fields = struct.unpack(f"<{(payload - 8) // 8}Q", tail[start + 8 : -8])
            break
    else:
        raise FormatError(f"{what}: zstd footer magic without a valid skippable frame around it")
    offset, length, ulen, kind = fields[:4]
    if kind != 1:
        raise FormatError(f"{what}: zstd footer names manifest type {kind}; only type 1 (TOC) is known")
    chunked = tail.endswith(CHUNKED_MAGIC)
    tarsplit = (fields[4], fields[5], fields[6]) if chunked and len(fields) >= 7 and fields[5] else None
    return Footer(ZSTD_CHUNKED if chunked else ESTARGZ_ZSTD, payload + 8, offset, length, ulen, tarsplit)


def _plain_reason(tail: bytes, blob_size: int, what: str) -> str:
    if blob_size == 0:
        return f"{what}: empty blob"
    return (
        f"{what}: no eStargz or zstd:chunked footer: an ordinary layer (convert the image to load it lazily)"
    )
