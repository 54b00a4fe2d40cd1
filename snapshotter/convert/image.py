"""Image facts the converter and convertd decide by: image config and layer media types, the compression
of each layer type, foreign layers, attestation manifests, and the ONE rule for "is this layer (or
image) accelerated already?"."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fuse.formats.annotations import expected_toc_digest
from fuse.formats.spec import (
    ESTARGZ,
    ESTARGZ_ZSTD,
    MEDIA_TYPE_DOCKER_GZIP,
    MEDIA_TYPE_GZIP,
    MEDIA_TYPE_TAR,
    MEDIA_TYPE_ZSTD,
    TOC_DIGEST,
    ZSTD_CHUNKED,
)
from fuse.registry import Platform

SUFFIX = "_accelerated"  # the default destination: SRC's tag + this
MAX_TAG = 128  # characters in a tag (the distribution reference grammar)
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
IMAGE_CONFIGS = (OCI_CONFIG, DOCKER_CONFIG)
COMPRESSION_OF = {
    MEDIA_TYPE_TAR: "none",
    MEDIA_TYPE_GZIP: "gzip",
    MEDIA_TYPE_ZSTD: "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    MEDIA_TYPE_DOCKER_GZIP: "gzip",
}
FOREIGN = (
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)
ATTESTATION = Platform("unknown", "unknown")  # the platform of buildkit's attestation manifests


def is_accelerated(descriptor: Mapping) -> bool:
    """The one rule for "is this layer accelerated already?": its annotations promise a TOC digest, so
    the reader (`fuse.formats.open_layer`, which tells the format by the blob's footer) can open it lazily.
    optimize and convertd skip an image whose layers all are; the converter refines it by format."""
    return expected_toc_digest(descriptor.get("annotations")) is not None


def accelerated_format(descriptor: Mapping) -> str | None:
    """The seekable format an accelerated layer is in, by its compression (media type) and the kind of
    TOC annotation; None for a layer that is not accelerated. The converter keeps a layer already in the
    format asked for."""
    if not is_accelerated(descriptor):
        return None
    compression = COMPRESSION_OF.get(descriptor.get("mediaType", ""))
    annotations = descriptor.get("annotations") or {}
    if compression == "gzip" and TOC_DIGEST in annotations:
        return ESTARGZ
    if compression == "zstd":
        # stargz's zstd variant also carries the legacy zstd:chunked keys (ctr-remote and our writer)
        return ESTARGZ_ZSTD if TOC_DIGEST in annotations else ZSTD_CHUNKED
    return None


def all_accelerated(layers: Iterable[Mapping]) -> bool:
    """Whether an image's (distributable) layers are all accelerated, so it can be mounted lazily as it
    is; False for no layers."""
    layers = list(layers)
    return bool(layers) and all(is_accelerated(d) for d in layers)


def digest_tag(digest: str, suffix: str = SUFFIX) -> str:
    """The tag of the accelerated copy of the manifest `digest` (convertd pushes it, the webhook looks
    it up for digest-pinned pods): "sha256:H" -> "sha256-H_accelerated"."""
    algorithm, _, hex_part = digest.partition(":")
    return f"{algorithm}-{hex_part}{suffix}"
