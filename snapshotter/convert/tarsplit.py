"""tar-split metadata for zstd:chunked layers: the JSON-lines stream containers/storage stores beside a
layer so that it can rebuild the exact tar (and so its DiffID) from the files alone.

The stream is what github.com/vbatts/tar-split's JSON packer writes, one JSON object per line:
``{"type":2,"payload":"<base64 raw bytes>","position":N}`` for raw segments (padding of the previous member
plus the next member's header blocks, and the end-of-archive blocks), and
``{"type":1,"name":"<path>","size":N,"payload":"<base64 CRC-64>","position":N}`` for each member's data
(`payload` null for empty members). The CRC is Go's hash/crc64 with the ISO polynomial, big-endian.

`Crc64Iso` computes that CRC without a C extension: the message is one Python integer, reduced modulo
the polynomial P = x^64 + x^4 + x^3 + x + 1 by folding with P^(2^j) = x^(64*2^j) + x^(4*2^j) + x^(3*2^j)
+ x^(2^j) + 1 (squaring is linear over GF(2)), which is a multiple of P with only five terms: each fold
halves the integer with a handful of shifts and xors that run at memory speed (hundreds of MB/s).
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from typing import IO

import zstandard

_MASK64 = (1 << 64) - 1
_Q = 0b11011  # P = x^64 + x^4 + x^3 + x + 1 (ISO 3309), without its x^64 term
_REVERSE_BITS = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def _reduce(a: int) -> int:
    """a mod P over GF(2), for an integer of any size."""
    n = a.bit_length()
    while n > 4096:
        # the largest 64*2^j not above ~0.52 n: a = h*x^d + l, and x^d = x^(4s)+x^(3s)+x^s+1 mod P^(2^j)
        j = max(0, ((n * 16 // 31) // 64).bit_length() - 1)
        d, s = 64 << j, 1 << j
        h = a >> d
        a = a ^ (h << d) ^ h ^ (h << s) ^ (h << (3 * s)) ^ (h << (4 * s))
        n = a.bit_length()
    while n > 64:
        h = a >> 64
        a = (a & _MASK64) ^ h ^ (h << 1) ^ (h << 3) ^ (h << 4)
        n = a.bit_length()
    return a


class Crc64Iso:
    """Go's crc64.New(crc64.MakeTable(crc64.ISO)): a reflected CRC-64 with all-ones init and xorout."""

    def __init__(self) -> None:
        # The CRC in the non-reflected domain, before the final xor: (init * x^n + M * x^64) mod P.
        self._state = _MASK64

    def update(self, data: bytes) -> None:
        k = 8 * len(data)
        if not k:
            return
        # Reflected CRC of the data = non-reflected CRC of the data with each byte's bits reversed.
        m = int.from_bytes(data.translate(_REVERSE_BITS), "big")
        if k >= 64:
            self._state = _reduce(_reduce(m ^ (self._state << (k - 64))) << 64)
        else:
            self._state = _reduce((self._state << k) ^ (m << 64))

    def value(self) -> int:
        reflected = int(f"{self._state:064b}"[::-1], 2)
        return reflected ^ _MASK64

    def digest(self) -> bytes:
        return self.value().to_bytes(8, "big")


def crc64_iso_reference(data: bytes) -> int:
    """Bit-by-bit reference implementation (slow: tests only)."""
    crc = _MASK64
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xD800000000000000 if crc & 1 else 0)
    return crc ^ _MASK64


class TarSplitWriter:
    """Packs tar-split entries and zstd-compresses them into a spool file (bounded memory)."""

    def __init__(self, level: int):
        self._spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=8 << 20)
        self._compressor = zstandard.ZstdCompressor(level=level).compressobj()
        self._position = 0
        self.uncompressed_size = 0
        self._pending = bytearray()

    def _add(self, entry: dict) -> None:
        entry["position"] = self._position
        self._position += 1
        line = json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace") + b"\n"
        self.uncompressed_size += len(line)
        self._pending += line
        if len(self._pending) >= 1 << 20:
            self._flush_pending()

    def _flush_pending(self) -> None:
        if self._pending:
            self._spool.write(self._compressor.compress(bytes(self._pending)))
            self._pending.clear()

    def segment(self, raw: bytes) -> None:
        self._add({"type": 2, "payload": base64.b64encode(raw).decode()})

    def file(self, name: str, size: int, crc: bytes | None) -> None:
        entry: dict = {"type": 1}
        try:
            name.encode("utf-8")
            if name:
                entry["name"] = name
        except UnicodeEncodeError:  # not valid UTF-8: tar-split keeps the raw bytes
            entry["name_raw"] = base64.b64encode(name.encode("utf-8", "surrogateescape")).decode()
        if size:
            entry["size"] = size
        entry["payload"] = base64.b64encode(crc).decode() if crc is not None else None
        self._add(entry)

    def finish(self) -> tuple[IO[bytes], int, str]:
        """(spool positioned at 0, compressed length, sha256 digest of the compressed stream)."""
        self._flush_pending()
        self._spool.write(self._compressor.flush())
        length = self._spool.tell()
        self._spool.seek(0)
        digest = hashlib.sha256()
        while chunk := self._spool.read(1 << 20):
            digest.update(chunk)
        self._spool.seek(0)
        return self._spool, length, "sha256:" + digest.hexdigest()

    def close(self) -> None:
        self._spool.close()
