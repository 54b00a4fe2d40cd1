"""Range headers, Content-Range validation and multipart/byteranges bodies."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuse.registry.errors import ProtocolViolation
from fuse.registry.ranges import (
    Span,
    boundary_of,
    parse_content_range,
    parse_multipart,
    range_header,
    slice_spans,
)

BOUNDARY = "3d6b6a416f9b5"


def multipart(
    parts: list[tuple[int, bytes]],
    total: int | str,
    boundary: str = BOUNDARY,
    *,
    preamble: bytes = b"",
    close: bool = True,
) -> bytes:
    """A multipart/byteranges body as RFC 9110 describes it (CRLF line ends, closing delimiter)."""
    delimiter = b"--" + boundary.encode("latin-1")
    out = preamble
    for first, data in parts:
        out += delimiter + b"\r\n"
        out += b"Content-Type: application/octet-stream\r\n"
        out += f"Content-Range: bytes {first}-{first + len(data) - 1}/{total}\r\n\r\n".encode()
        out += data + b"\r\n"
    if close:
        out += delimiter + b"--\r\n"
    return out


# --- range_header ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spans", "header"),
    [
        ([(0, 1)], "bytes=0-0"),
        ([(0, 100)], "bytes=0-99"),
        ([(10, 5), (100, 1), (4096, 4096)], "bytes=10-14,100-100,4096-8191"),
    ],
)
def test_range_header(spans: list[Span], header: str) -> None:
    assert range_header(spans) == header


@pytest.mark.parametrize("spans", [[(-1, 10)], [(0, 0)], [(5, -3)], [(0, 10), (20, 0)]])
def test_range_header_rejects_invalid_spans(spans: list[Span]) -> None:
    with pytest.raises(ValueError, match="invalid span"):
        range_header(spans)


# --- parse_content_range --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes 0-9/100", (0, 9, 100)),
        ("bytes 5-5/6", (5, 5, 6)),
        ("bytes 0-0/1", (0, 0, 1)),
        ("bytes 42-99/*", (42, 99, None)),
        ("  bytes 1-2/3  ", (1, 2, 3)),
        ("bytes 1000000000000-1000000000001/9999999999999", (1000000000000, 1000000000001, 9999999999999)),
    ],
)
def test_parse_content_range(value: str, expected: tuple[int, int, int | None]) -> None:
    assert parse_content_range(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "bytes 9-0/100",  # last before first
        "bytes 0-9/9",  # complete length not beyond the last byte
        "bytes 0-9/5",
        "bytes */100",  # the unsatisfied-range form has no bytes
        "bytes=0-9/100",
        "bytes 0-9",
        "bytes 0-9/",
        "items 0-9/100",
        "bytes a-b/c",
        "bytes -1-9/100",
        "bytes 0-9/100, 20-29/100",
    ],
)
def test_parse_content_range_rejects(value: str | None) -> None:
    with pytest.raises(ProtocolViolation, match="invalid Content-Range"):
        parse_content_range(value)


# --- boundary_of ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        ("multipart/byteranges; boundary=3d6b6a416f9b5", "3d6b6a416f9b5"),
        ('multipart/byteranges; boundary="quoted:boundary"', "quoted:boundary"),
        ("Multipart/ByteRanges;BOUNDARY=abc", "abc"),
        ('multipart/byteranges; charset=x; boundary="b c" ', "b c"),
        ("multipart/byteranges ;boundary=THIS_STRING_SEPARATES", "THIS_STRING_SEPARATES"),
    ],
)
def test_boundary_of(content_type: str, boundary: str) -> None:
    assert boundary_of(content_type) == boundary


@pytest.mark.parametrize(
    "content_type",
    ["application/octet-stream", "", "multipart/mixed; boundary=abc", "text/plain; boundary=abc"],
)
def test_boundary_of_other_types_is_none(content_type: str) -> None:
    assert boundary_of(content_type) is None


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/byteranges",
        "multipart/byteranges; charset=utf-8",
        "multipart/byteranges; boundary=",
        'multipart/byteranges; boundary=""',
        "multipart/byteranges; notboundary=abc",
    ],
)
def test_boundary_of_multipart_without_boundary(content_type: str) -> None:
    with pytest.raises(ProtocolViolation, match="without a boundary"):
        boundary_of(content_type)


# --- parse_multipart ------------------------------------------------------------------------------


def test_parse_multipart_several_parts() -> None:
    parts = [(0, b"hello"), (100, b"world!"), (5000, bytes(range(256)))]
    body = multipart(parts, 10_000, preamble=b"ignored preamble\r\n")
    assert parse_multipart(body, BOUNDARY) == parts


def test_parse_multipart_unknown_total_and_header_case() -> None:
    body = (
        f"--{BOUNDARY}\r\nCONTENT-RANGE:bytes 7-9/*\r\ncontent-type: x\r\n\r\nabc\r\n--{BOUNDARY}--"
    ).encode()
    assert parse_multipart(body, BOUNDARY) == [(7, b"abc")]


def test_parse_multipart_with_no_parts() -> None:
    assert parse_multipart(f"--{BOUNDARY}--\r\n".encode(), BOUNDARY) == []


def test_data_containing_the_boundary_does_not_end_the_part() -> None:
    tricky = f"\r\n--{BOUNDARY}\r\nContent-Range: bytes 0-1/2\r\n\r\nxx\r\n--{BOUNDARY}--\r\n".encode()
    parts = [(10, tricky), (1000, b"--" + BOUNDARY.encode() + b"--"), (2000, b"\r\n\r\n")]
    assert parse_multipart(multipart(parts, 4096), BOUNDARY) == parts


@pytest.mark.parametrize("cut", [1, 10, 30, 60, 70, 75])
def test_truncated_body(cut: int) -> None:
    body = multipart([(0, b"a" * 20), (50, b"b" * 20)], 100)
    assert len(body) > 75
    with pytest.raises(ProtocolViolation, match="truncated|closing boundary|without its boundary"):
        parse_multipart(body[:cut], BOUNDARY)


def test_truncated_part_data() -> None:
    body = multipart([(0, b"x" * 1000)], 2000)
    head_end = body.index(b"\r\n\r\n") + 4
    with pytest.raises(ProtocolViolation, match="truncated multipart/byteranges part bytes 0-999"):
        parse_multipart(body[: head_end + 999], BOUNDARY)


def test_missing_closing_boundary() -> None:
    body = multipart([(0, b"abc"), (10, b"def")], 20, close=False)
    with pytest.raises(ProtocolViolation, match="closing boundary"):
        parse_multipart(body, BOUNDARY)


def test_body_without_the_boundary() -> None:
    body = multipart([(0, b"abc")], 20, boundary="other")
    with pytest.raises(ProtocolViolation, match="without its boundary"):
        parse_multipart(body, BOUNDARY)


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Type: application/octet-stream",
        b"",
        b"Content-Range: bytes 5-1/10",
        b"Content-Range: bytes 0-3/3",
    ],
)
def test_part_without_a_valid_content_range(headers: bytes) -> None:
    body = (
        b"--" + BOUNDARY.encode() + b"\r\n" + headers + b"\r\n\r\nabcd\r\n--" + BOUNDARY.encode() + b"--\r\n"
    )
    with pytest.raises(ProtocolViolation, match="Content-Range"):
        parse_multipart(body, BOUNDARY)


# --- slice_spans ------------------------------------------------------------------------------------


def test_slice_spans_from_exact_parts() -> None:
    parts = [(0, b"0123"), (10, b"abcdef")]
    assert slice_spans([(0, 4), (10, 6)], parts) == [b"0123", b"abcdef"]


def test_slice_spans_from_server_merged_parts() -> None:
    blob = bytes(range(100))
    # asked for 10-19, 25-29 and 60-61; the server merged the first two and sent a larger third
    parts = [(10, blob[10:30]), (50, blob[50:70])]
    spans = [(10, 10), (25, 5), (60, 2)]
    assert slice_spans(spans, parts) == [blob[10:20], blob[25:30], blob[60:62]]


def test_slice_spans_keeps_the_request_order() -> None:
    blob = bytes(range(50))
    parts = [(0, blob[0:10]), (40, blob[40:50])]
    assert slice_spans([(45, 2), (3, 3)], parts) == [blob[45:47], blob[3:6]]


@pytest.mark.parametrize(
    "span",
    [(20, 5), (8, 4), (9, 2), (30, 1), (5, 10)],  # absent, overhanging either end, split over two parts
)
def test_slice_spans_missing_span(span: Span) -> None:
    parts = [(0, b"x" * 10), (10, b"y" * 5), (30, b"")]
    with pytest.raises(ProtocolViolation, match=f"bytes {span[0]}-{span[0] + span[1] - 1}"):
        slice_spans([span], parts)


# --- property: building a body from random spans of random data and parsing it back ------------------


@st.composite
def blob_and_spans(draw: st.DrawFn) -> tuple[bytes, str, list[Span]]:
    boundary = draw(st.from_regex(r"[A-Za-z0-9'()+_,./:=?-]{1,40}", fullmatch=True))
    # data that sometimes contains the delimiter, CRLFs and header-like text
    chunks = st.one_of(
        st.binary(max_size=64),
        st.just(b"--" + boundary.encode()),
        st.just(b"\r\n--" + boundary.encode() + b"--\r\n"),
        st.just(b"\r\n\r\nContent-Range: bytes 0-0/1\r\n"),
    )
    blob = b"".join(draw(st.lists(chunks, min_size=1, max_size=12)))
    if not blob:
        blob = b"\0"
    offsets = st.integers(min_value=0, max_value=len(blob) - 1)
    spans = []
    for off in draw(st.lists(offsets, min_size=1, max_size=6)):
        spans.append((off, draw(st.integers(min_value=1, max_value=len(blob) - off))))
    return blob, boundary, spans


@settings(max_examples=200, deadline=None)
@given(blob_and_spans(), st.booleans())
def test_multipart_round_trip(case: tuple[bytes, str, list[Span]], total_known: bool) -> None:
    blob, boundary, spans = case
    parts = [(off, blob[off : off + length]) for off, length in spans]
    body = multipart(parts, len(blob) if total_known else "*", boundary)
    content_type = f'multipart/byteranges; boundary="{boundary}"'
    parsed = parse_multipart(body, boundary_of(content_type) or "")
    assert parsed == parts
    assert slice_spans(spans, parsed) == [data for _, data in parts]
    assert range_header(spans).count(",") == len(spans) - 1
