"""Random-access blob sources: "read these bytes" over HTTP ranges or a local file.

A layer reader needs only the blob size and ranged reads; `read_many` lets a source serve several
spans in one round trip (a multi-range request) where it can, and hand over the head of its first span
before the rest has arrived (`Early`: a reader waiting for the first chunk of a range goes on while its
neighbours are still on the wire).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import trio

from ..registry.ranges import Early, Tap

TAP_PIECE = 64 << 10  # an in-memory source hands its bytes to a tap in pieces of this size


class BlobSource(Protocol):
    size: int
    description: str  # for error messages: image/layer or file name

    async def read(self, offset: int, length: int, tap: Tap | None = None) -> bytes:
        """Bytes [offset, offset + length). `tap`, where the source streams, is given each piece of them
        (its offset in the span, the bytes) as it arrives; a retried request starts again from 0; a
        source that does not stream never calls it."""
        ...

    async def read_many(
        self, spans: list[tuple[int, int]], early: Early | None = None, tap: Tap | None = None
    ) -> list[bytes]:
        """The bytes of each span. Where the source streams, and for a single span only: `early` is
        called with the head of the span as soon as it is in, at most once per attempt (a retried
        request may call it again), and `tap` as in `read`; a source that does not stream never calls
        them."""
        ...


class BytesSource:
    """An in-memory blob (tests, small layers)."""

    def __init__(self, data: bytes, description: str = "in-memory blob"):
        self.data = data
        self.size = len(data)
        self.description = description
        self.reads: list[tuple[int, int]] = []  # what was asked, for tests that count round trips

    async def read(self, offset: int, length: int, tap: Tap | None = None) -> bytes:
        self.reads.append((offset, length))
        data = self.data[offset : offset + length]
        if tap is not None:
            _tap_pieces(data, tap)
        return data

    async def read_many(
        self, spans: list[tuple[int, int]], early: Early | None = None, tap: Tap | None = None
    ) -> list[bytes]:
        self.reads.extend(spans)
        if early is not None and spans:
            early[1](self.data[spans[0][0] : spans[0][0] + early[0]])
        datas = [self.data[o : o + n] for o, n in spans]
        if tap is not None and len(spans) == 1:
            _tap_pieces(datas[0], tap)
        return datas


class FileSource:
    """A blob in a local file, read with pread in a worker thread."""

    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size
        self.description = str(path)

    async def read(self, offset: int, length: int, tap: Tap | None = None) -> bytes:
        def pread() -> bytes:
            with open(self.path, "rb") as f:
                return os.pread(f.fileno(), length, offset)

        return await trio.to_thread.run_sync(pread)

    async def read_many(
        self, spans: list[tuple[int, int]], early: Early | None = None, tap: Tap | None = None
    ) -> list[bytes]:
        return [await self.read(o, n) for o, n in spans]


class RegistrySource:
    """A layer blob in a registry, read with range requests through the registry client."""

    def __init__(self, client, ref, digest: str, size: int):
        self.client, self.ref, self.digest, self.size = client, ref, digest, size
        self.description = f"layer {digest} of {ref.name}"

    async def read(self, offset: int, length: int, tap: Tap | None = None) -> bytes:
        return await self.client.read_range(self.ref, self.digest, offset, length, tap)

    async def read_many(
        self, spans: list[tuple[int, int]], early: Early | None = None, tap: Tap | None = None
    ) -> list[bytes]:
        return await self.client.read_ranges(self.ref, self.digest, spans, early, tap)


def _tap_pieces(data: bytes, tap: Tap) -> None:
    for i in range(0, len(data), TAP_PIECE):
        tap(i, data[i : i + TAP_PIECE])
