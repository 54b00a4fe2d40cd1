"""Open a remote layer with its eStargz TOC indexed while it downloads (`fetch_layer`, `open_layer`).

A TOC larger than the suffix read comes in a second read: 1.6 MB for a 28,000-entry layer, 0.13 s at
100 Mbit/s, and indexing it takes as long again. `TocStream` takes the stored TOC piece by piece as it
arrives (`BlobSource.read`'s tap) and, in a worker thread, inflates it, takes the TOC JSON out of its
tar and cuts that JSON after the last whole entry of each piece (`},`): each run of entries is decoded
by msgspec (`TocEntry`, as `read_toc` decodes a whole TOC) into the index builder. Nothing it built is
used before `finish` has checked every byte against the expected digest.

It reads exactly what `read_toc` would, or gives up: on anything `read_toc`'s whole decode would not
take (a `\\u` escape, xattrs, a second "entries", bytes that are not UTF-8, a TOC too large for it:
`reader.decoded_whole`, read_toc parses that one with the json module and limits of its own), a TOC
JSON that is not cut after a whole entry (a name holding `},`, an entry longer than
`Limits.max_entry_bytes`), a tar header other than one plain entry for the TOC, a gzip member that
does not end whole after it (`read_toc` may read into a broken end: the stream reads it all), a retried
download, an index beyond `STREAM_INDEX_BYTES`, or any error. Then the TOC is read the usual way once it
is in (`layer_from_toc`), which says what is wrong with it. Memory: at most `TOC_STREAMS` streams at
once, each holding its index (at most `STREAM_INDEX_BYTES`) and one piece of text; the others read the
usual way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
import tarfile

import msgspec
import trio
from isal import isal_zlib

from .errors import FormatError, Unverified
from .footer import Footer
from .index import DEFAULT_LIMITS, GZIP, IndexBuilder, LayerIndex, Limits, TocEntry
from .reader import (
    OUTPUT_PIECE,
    TOC_DECODER,
    Layer,
    TocInfo,
    decoded_whole,
    layer_from_toc,
    plain_json,
    read_rest,
    read_tail,
)
from .source import BlobSource
from .spec import ESTARGZ, TAR_BLOCK, TOC_NAME

log = logging.getLogger("lazysnap.formats")

TOC_STREAMS = trio.CapacityLimiter(2)  # TOCs indexed while they download, at once (others: the usual way)
STREAM_INDEX_BYTES = 48 << 20  # the index a stream may build (a larger one is read the usual way)
HEADER_TEXT = 64 << 10  # TOC JSON before "entries": [ (a real TOC has a dozen bytes there)
TAR_TRAILER = 1 << 20  # tar bytes after the TOC JSON: padding and end blocks (a writer puts 1-10 KiB)
_ENTRIES_OPEN = re.compile(rb'"entries"[ \t\n\r]*:[ \t\n\r]*\[')
_ENTRIES_DECODER = msgspec.json.Decoder(list[TocEntry])


async def open_layer(
    source: BlobSource,
    expected_toc_digest: str | None,
    *,
    allow_unverified: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> Layer:
    """Open a layer: footer, TOC (verified), index. Raises NotLazy for ordinary layers."""
    _, _, layer = await fetch_layer(
        source, expected_toc_digest, allow_unverified=allow_unverified, limits=limits
    )
    return layer


async def fetch_layer(
    source: BlobSource,
    expected_toc_digest: str | None,
    *,
    allow_unverified: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    tail: bytes | None = None,
) -> tuple[bytes, bytes, Layer]:
    """(footer bytes, stored TOC, the opened layer): `fetch_toc` then `layer_from_toc`, but an eStargz TOC
    beyond the suffix read is indexed while its head downloads, where a `TOC_STREAMS` slot is free.
    `tail`: the suffix read, when the caller made it already (`reader.read_tail`)."""
    what = source.description
    footer_bytes, footer, held = await read_tail(source, tail)  # an ordinary layer: NotLazy
    if expected_toc_digest is None and not allow_unverified:
        raise Unverified(f"{what}: no expected TOC digest given; refusing an unverifiable TOC")
    layer = None
    if len(held) == footer.toc_length or footer.format != ESTARGZ:
        raw = await read_rest(source, footer, held)
    else:
        try:
            TOC_STREAMS.acquire_nowait()
        except trio.WouldBlock:
            raw = await read_rest(source, footer, held)
        else:
            try:
                stream = TocStream(footer, what, limits)
                raw = await _read_streamed(source, footer, held, stream)
                got = await trio.to_thread.run_sync(stream.finish, raw, held, expected_toc_digest)
            finally:
                TOC_STREAMS.release()
            if got is not None:
                layer = Layer(source, footer, *got, allow_unverified_chunks=allow_unverified)
                log.debug("%s: TOC indexed while it downloaded", what)
            else:
                log.debug("%s: TOC read after it downloaded: %s", what, stream.gave_up)
    if layer is None:
        layer = await layer_from_toc(
            source, footer_bytes, raw, expected_toc_digest, allow_unverified=allow_unverified, limits=limits
        )
    return footer_bytes, raw, layer


async def _read_streamed(source: BlobSource, footer: Footer, held: bytes, stream: TocStream) -> bytes:
    """`read_rest`, each piece of the head handed to `stream.feed` in a worker thread as it arrives
    (what arrived while a piece was fed is fed next, at once)."""
    send, receive = trio.open_memory_channel[bytes](math.inf)  # bounded by the TOC's size
    received = 0

    def tap(offset: int, piece: bytes) -> None:
        nonlocal received
        if offset != received:  # a retried request starts again: what was fed is not the TOC's head
            stream.give_up("the TOC's download was retried")
        elif stream.gave_up is None:
            send.send_nowait(piece)
            received += len(piece)

    async def feed() -> None:
        async for piece in receive:
            pieces = [piece]
            while True:
                try:
                    pieces.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await trio.to_thread.run_sync(stream.feed, b"".join(pieces))

    failed: Exception | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        with send:
            try:
                raw = await read_rest(source, footer, held, tap)
            except Exception as e:  # raised as read_rest raises it (the nursery would wrap it in a group)
                failed = e
                nursery.cancel_scope.cancel()
    if failed is not None:
        raise failed
    return raw


class TocStream:
    """An eStargz TOC indexed from its stored bytes fed in order (`feed`, blocking: call from a worker
    thread); `finish` gives the index and `TocInfo`, or None where it gave up (`gave_up` says why)."""

    def __init__(self, footer: Footer, what: str, limits: Limits = DEFAULT_LIMITS):
        self.footer, self.what = footer, what
        limits = dataclasses.replace(limits, max_index_bytes=min(limits.max_index_bytes, STREAM_INDEX_BYTES))
        self.max_entry = limits.max_entry_bytes
        self.builder = IndexBuilder(what, footer.toc_offset, GZIP, limits)
        self.gave_up: str | None = None
        self.fed = 0  # stored bytes fed
        self._stored_hash = hashlib.sha256()
        self._text_hash = hashlib.sha256()
        self.size = 0  # TOC JSON bytes taken out of the tar
        self._inflate = isal_zlib.decompressobj(wbits=31)
        self._tar = b""  # the tar header, until it is whole
        self._json_left: int | None = None  # TOC JSON bytes still to come (None: header not read)
        self._trailer = 0  # tar bytes after the TOC JSON
        self._objects = 0  # "{" in the TOC JSON (as `_TocText.hold` counts them)
        self._ascii = True  # the TOC JSON so far is ASCII
        self._header: bytes | None = None  # the JSON up to and including `"entries": [`
        self._text = b""  # the JSON text before the header is found
        self._parts: list[bytes] = []  # JSON text not yet decoded (it begins at an entry); no `},` in it
        self._held = 0  # bytes in _parts
        self._first = True  # no entries cut yet

    def give_up(self, why: str) -> None:
        if self.gave_up is None:
            self.gave_up = why

    def feed(self, data: bytes) -> None:
        """The next stored bytes. Never raises: whatever goes wrong makes the stream give up."""
        if self.gave_up is not None:
            return
        try:
            self.fed += len(data)
            self._stored_hash.update(data)
            while not self._inflate.eof:  # to the member's end: read_toc may read into a broken one
                out = self._inflate.decompress(data, OUTPUT_PIECE)
                data = self._inflate.unconsumed_tail
                if out:
                    self._tar_bytes(out)
                if self.gave_up is not None or (not data and len(out) < OUTPUT_PIECE):
                    break
        except Exception as e:  # MemoryError too: the usual way reads it with its own bounds, and reports
            self.give_up(f"{type(e).__name__}: {e}")

    def finish(self, raw: bytes, held: bytes, expected: str | None) -> tuple[LayerIndex, TocInfo] | None:
        """After the head has arrived: `raw` is the whole stored TOC, `held` its end that the suffix read
        gave (fed now). The index and TocInfo when every byte was read and `raw` matches `expected` (any
        other outcome, None, is for the usual way to read and report: what was built is let go first)."""
        got = self._finish(raw, held, expected)
        self.builder, self._text, self._parts, self._header = None, b"", [], None  # type: ignore[assignment]
        return got

    def _finish(self, raw: bytes, held: bytes, expected: str | None) -> tuple[LayerIndex, TocInfo] | None:
        if self.fed == 0:  # a source that does not stream (a local file): all of it now
            self.feed(raw)
        elif self.fed == len(raw) - len(held):
            self.feed(held)
        else:
            self.give_up(f"{self.fed} bytes fed of a TOC head of {len(raw) - len(held)}")
        compressed = hashlib.sha256(raw)
        json_digest = "sha256:" + self._text_hash.hexdigest()
        compressed_digest = "sha256:" + compressed.hexdigest()
        if compressed.digest() != self._stored_hash.digest():
            self.give_up("the bytes fed are not the TOC's")
        elif self._json_left != 0:
            self.give_up("the TOC JSON did not end in the stored TOC")
        elif not self._inflate.eof:
            self.give_up("the TOC's gzip member does not end in the stored TOC")
        elif expected not in (None, json_digest, compressed_digest):
            self.give_up(f"TOC digest {json_digest} is not the expected {expected}")
        elif self.footer.toc_uncompressed and self.size != self.footer.toc_uncompressed:
            self.give_up(f"TOC of {self.size} bytes, the footer says {self.footer.toc_uncompressed}")
        rest = b"".join(self._parts)  # after the last cut: entries that follow a ',' (one at least), the end
        if self.gave_up is None and (
            self._header is None or (not self._first and rest.lstrip(b" \t\n\r")[:1] != b"{")
        ):
            self.give_up("no entry after the last ','")
        if self.gave_up is not None:
            return None
        text = self._header + rest
        if not plain_json(text) or text.count(b'"entries"') != 1:
            self.give_up("the TOC's end is not plain JSON")
            return None
        try:
            for entry in TOC_DECODER.decode(text).entries:
                self.builder.add(entry)
            return self.builder.finish(), TocInfo(json_digest, compressed_digest, self.size)
        except (FormatError, msgspec.MsgspecError, RecursionError, MemoryError) as e:
            self.give_up(f"{type(e).__name__}: {e}")
            return None

    # --- in the worker thread ------------------------------------------------------------------

    def _tar_bytes(self, out: bytes) -> None:
        if self._json_left is None:
            self._tar += out
            if len(self._tar) < TAR_BLOCK:
                return
            member = tarfile.TarInfo.frombuf(self._tar[:TAR_BLOCK], "utf-8", "surrogateescape")
            if member.name != TOC_NAME or member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                return self.give_up(f"the TOC tar begins with {member.name!r} (type {member.type!r})")
            if not decoded_whole(member.size, 0, True):  # read_toc parses it with the json module
                return self.give_up(f"TOC of {member.size} bytes")
            self._json_left = member.size
            out, self._tar = self._tar[TAR_BLOCK:], b""
        piece = out[: self._json_left]
        self._trailer += len(out) - len(piece)
        if self._trailer > TAR_TRAILER:
            return self.give_up(f"more than {TAR_TRAILER} tar bytes after the TOC JSON")
        if not piece:
            return
        self._json_left -= len(piece)
        self.size += len(piece)
        self._text_hash.update(piece)
        self._objects += piece.count(b"{")
        self._ascii = self._ascii and piece.isascii()
        if not decoded_whole(self.size, self._objects, self._ascii):
            return self.give_up("a TOC that read_toc parses with the json module (not decoded at once)")
        if self._header is None:
            self._find_header(piece)
        else:
            self._decode(piece)

    def _find_header(self, piece: bytes) -> None:
        """Find `"entries": [` in the text before it; decode what follows."""
        text = self._text = self._text + piece if self._text else piece
        at = text.find(b'"entries"')
        found = _ENTRIES_OPEN.match(text, at) if at >= 0 else None
        if found is None:
            if len(text) > HEADER_TEXT:
                self.give_up("no entries list at the start of the TOC")
            return
        self._header, self._text = text[: found.end()], b""
        if not plain_json(self._header):
            return self.give_up("the TOC's header is not plain JSON")
        if found.end() < len(text):
            self._decode(text[found.end() :])

    def _decode(self, piece: bytes) -> None:
        """Decode the entries the text holds whole, up to its last `},` (looked for in `piece` and the
        byte before it only: the text held has none)."""
        edge = self._parts[-1][-1:] if self._parts else b""
        cut = (edge + piece).rfind(b"},")
        if cut < 0:
            self._parts.append(piece)
            self._held += len(piece)
            if self._held > self.max_entry + OUTPUT_PIECE:
                self.give_up("no entry ends in the text")
            return
        cut -= len(edge)  # in piece (-1: the `}` ends the text held)
        run = b"".join([*self._parts, piece[: cut + 1]])
        rest = piece[cut + 2 :]  # the text after a cut begins at an entry
        self._parts, self._held = ([rest] if rest else []), len(rest)
        if not plain_json(run) or b'"entries"' in run:
            return self.give_up("entries that are not plain JSON")
        entries = _ENTRIES_DECODER.decode(b"[" + run + b"]")
        del run
        self._first = False
        for i, entry in enumerate(entries):
            entries[i] = None
            self.builder.add(entry)
