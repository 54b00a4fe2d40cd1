"""Bounded reads of HTTP response bodies: never more bytes than the caller asked for.

A registry (or a CDN in front of it) decides what it claims in Content-Length and Content-Range and how
much it streams; none of that may decide how much we read. Every body is read against a limit the caller
derived from its own request (the requested bytes, or a fixed cap for manifests, configs and tokens).
A claim over the limit fails before the body is read, a body that runs past it fails at the limit, and
in both cases the connection is closed instead of drained, so a lying server costs at most one socket
buffer. Errors name the host that answered and what it claimed.
"""

from __future__ import annotations

import httpx

from .errors import ProtocolViolation, RangeNotSatisfiable
from .ranges import Early, Tap


def origin(resp: httpx.Response) -> str:
    """host[:port] that sent a response (a mirror or blob storage may not be the registry asked)."""
    return resp.url.netloc.decode("ascii", "replace")


def claimed_length(resp: httpx.Response) -> int | None:
    """The Content-Length a response claims, or None when it gives none (or one that is not a number)."""
    value = resp.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


async def abandon(resp: httpx.Response) -> None:
    """Close the connection a response arrived on without reading the rest of its body.

    HTTP/1.1: httpcore closes a connection whose response was closed before its end. HTTP/2: it would
    only forget the stream, whose unread data keeps eating the connection's flow-control window, so the
    whole connection goes (other requests on it fail over to a new one through the usual retries)."""
    if not resp.is_closed and resp.http_version == "HTTP/2":
        stream = resp.extensions.get("network_stream")
        if stream is not None:
            await stream.aclose()
    await resp.aclose()


async def too_much(resp: httpx.Response, what: str, claim: str, limit: int) -> ProtocolViolation:
    """Close the connection; the error to raise for a response that claims or sends over `limit`."""
    await abandon(resp)
    return ProtocolViolation(
        f"{what}: {origin(resp)} {claim}, more than the {limit} bytes asked for; connection closed "
        "(a misbehaving registry, mirror or proxy)"
    )


async def read_capped(
    resp: httpx.Response, cap: int, what: str, early: Early | None = None, tap: Tap | None = None
) -> bytes:
    """The whole body, which must be at most `cap` bytes (checked on the claim, then while reading).
    `early` (n, fn): fn(the body's first n bytes) as soon as they are in, before the rest; `tap` is given
    each piece as it arrives."""
    claimed = claimed_length(resp)
    if claimed is not None and claimed > cap:
        raise await too_much(resp, what, f"claimed Content-Length {claimed}", cap)
    buf = bytearray()
    async for chunk in resp.aiter_raw():
        buf += chunk
        if len(buf) > cap:
            raise await too_much(resp, what, f"sent over {len(buf)} bytes", cap)
        if tap is not None:
            tap(len(buf) - len(chunk), chunk)
        if early is not None and len(buf) >= early[0]:
            early[1](bytes(buf[: early[0]]))
            early = None
    if claimed is not None and claimed != len(buf):
        raise ProtocolViolation(
            f"{what}: body of {len(buf)} bytes from {origin(resp)}, Content-Length said {claimed}"
        )
    return bytes(buf)


async def read_window(resp: httpx.Response, offset: int, length: int, what: str) -> bytes:
    """Bytes [offset, offset + length) of a whole-blob body (a 200 to a range request): reads up to the
    last wanted byte and no further, and keeps only the wanted ones."""
    end = offset + length
    claimed = claimed_length(resp)
    if claimed is not None and claimed < end:
        await abandon(resp)
        raise RangeNotSatisfiable(
            f"{what}: {origin(resp)} ignored the Range and sent the whole blob of {claimed} bytes, "
            f"which ends before the requested bytes {offset}-{end - 1}"
        )
    out = bytearray()
    seen = 0
    async for chunk in resp.aiter_raw():
        start = seen
        seen += len(chunk)
        if seen > offset:
            out += chunk[max(0, offset - start) : end - start]
        if seen >= end:
            break
    await abandon(resp)  # the rest of the blob is not wanted
    if len(out) < length:
        raise RangeNotSatisfiable(
            f"{what}: {origin(resp)} ignored the Range and its body ended at byte {seen}, "
            f"before the requested bytes {offset}-{end - 1}"
        )
    return bytes(out)
