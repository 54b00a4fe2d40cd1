"""HTTP byte ranges: Range headers, Content-Range validation, multipart/byteranges bodies.

Spans are (offset, length) pairs with length > 0; HTTP ranges are inclusive (first, last).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .errors import ProtocolViolation

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

Span = tuple[int, int]  # (offset, length)
Early = tuple[int, Callable[[bytes], None]]  # (n, fn): fn(the first n bytes of a body) once they are in
Tap = Callable[[int, bytes], None]  # tap(offset in the body, piece) as each arrives (a retry: from 0)
PART_OVERHEAD = 1024  # bytes a multipart/byteranges part may add to its data: delimiter and part headers


def requested_bytes(spans: list[Span]) -> int:
    return sum(length for _, length in spans)


def multipart_cap(spans: list[Span]) -> int:
    """The most bytes a multipart/byteranges answer to `spans` may take: their data plus the framing of
    one part each (and of a preamble and the closing delimiter)."""
    return requested_bytes(spans) + PART_OVERHEAD * (len(spans) + 4)


def uncovered(spans: list[Span], first: int, last: int) -> str | None:
    """The first requested span (as "a-b") outside the inclusive range first-last, or None."""
    for off, length in spans:
        if off < first or off + length - 1 > last:
            return f"{off}-{off + length - 1}"
    return None


def range_header(spans: list[Span]) -> str:
    for off, length in spans:
        if off < 0 or length <= 0:
            raise ValueError(f"invalid span offset={off} length={length}")
    return "bytes=" + ",".join(f"{off}-{off + length - 1}" for off, length in spans)


def parse_content_range(value: str | None) -> tuple[int, int, int | None]:
    """'bytes a-b/total' -> (a, b, total or None)."""
    m = _CONTENT_RANGE.match((value or "").strip())
    if not m:
        raise ProtocolViolation(f"invalid Content-Range {value!r}")
    first, last, total = int(m[1]), int(m[2]), None if m[3] == "*" else int(m[3])
    # RFC 9110 14.4: invalid when last < first, or when the complete length is not beyond last
    if first > last or (total is not None and total <= last):
        raise ProtocolViolation(f"invalid Content-Range {value!r}")
    return first, last, total


def boundary_of(content_type: str) -> str | None:
    """The boundary of a multipart/byteranges Content-Type, or None for any other type."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/byteranges":
        return None
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary" and value.strip('"'):
            return value.strip('"')
    raise ProtocolViolation(f"multipart/byteranges without a boundary: {content_type!r}")


def parse_multipart(body: bytes, boundary: str) -> list[tuple[int, bytes]]:
    """Parts of a multipart/byteranges body as (first byte offset, data).

    Each part's length comes from its Content-Range, so data that happens to contain the boundary
    string cannot cut a part short."""
    delimiter = b"--" + boundary.encode("latin-1")
    parts: list[tuple[int, bytes]] = []
    pos = body.find(delimiter)
    if pos < 0:
        raise ProtocolViolation("multipart/byteranges body without its boundary")
    while True:
        pos += len(delimiter)
        if body[pos : pos + 2] == b"--":
            return parts
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise ProtocolViolation("truncated multipart/byteranges part header")
        headers = {}
        for line in body[pos:head_end].decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        first, last, _ = parse_content_range(headers.get("content-range"))
        start = head_end + 4
        end = start + (last - first + 1)
        if end > len(body):
            raise ProtocolViolation(f"truncated multipart/byteranges part bytes {first}-{last}")
        parts.append((first, body[start:end]))
        pos = body.find(delimiter, end)
        if pos < 0:
            raise ProtocolViolation("multipart/byteranges body without its closing boundary")


def slice_spans(spans: list[Span], parts: list[tuple[int, bytes]]) -> list[bytes]:
    """The bytes of each requested span, cut from the parts a server sent (which it may have merged)."""
    out = []
    for off, length in spans:
        for first, data in parts:
            if first <= off and off + length <= first + len(data):
                out.append(data[off - first : off - first + length])
                break
        else:
            raise ProtocolViolation(f"the response did not contain requested bytes {off}-{off + length - 1}")
    return out
