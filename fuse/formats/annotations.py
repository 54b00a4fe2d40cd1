"""What a layer's manifest annotations promise: the TOC digest the reader verifies against (the keys
themselves are in `spec`)."""

from __future__ import annotations

from .spec import CHUNKED_CHECKSUM, LEGACY_CHUNKED_CHECKSUM, TOC_DIGEST


def expected_toc_digest(annotations: dict[str, str] | None) -> str | None:
    """The TOC digest a layer's manifest annotations promise, if any (the reader accepts either kind)."""
    a = annotations or {}
    return a.get(TOC_DIGEST) or a.get(CHUNKED_CHECKSUM) or a.get(LEGACY_CHUNKED_CHECKSUM)
