"""Layer annotations that accelerated images carry in their manifests, as other tools write them."""

from __future__ import annotations

TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"  # eStargz (both compressions): sha256 of TOC JSON
UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
CHUNKED_CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"  # sha256 of the compressed TOC
CHUNKED_POSITION = "io.github.containers.zstd-chunked.manifest-position"  # "offset:length:ulength:1"
CHUNKED_TARSPLIT = "io.github.containers.zstd-chunked.tarsplit-position"  # "offset:length:ulength"
LEGACY_CHUNKED_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"  # older writers, ctr-remote
LEGACY_CHUNKED_POSITION = "io.containers.zstd-chunked.manifest-position"


def expected_toc_digest(annotations: dict[str, str] | None) -> str | None:
    """The TOC digest a layer's manifest annotations promise, if any (the reader accepts either kind)."""
    a = annotations or {}
    return a.get(TOC_DIGEST) or a.get(CHUNKED_CHECKSUM) or a.get(LEGACY_CHUNKED_CHECKSUM)
