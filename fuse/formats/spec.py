"""The facts of each seekable layer format, in one place: format names, media types, magics, footer
sizes, layer annotation keys, the TOC's name and the landmark files. The readers (footer, index, reader,
annotations) and the writers (snapshotter.convert.writer) take them from here.

Byte layouts: shared/reference/formats.md (and the footer module's docstring).
"""

from __future__ import annotations

# Format names, as `lazysnap convert --format` and convertd's `format` spell them.
ESTARGZ = "estargz"  # gzip members; the TOC is a tar member named TOC_NAME
ESTARGZ_ZSTD = "estargz-zstd"  # stargz's zstd variant: zstd frames, the TOC as a zstd frame
ZSTD_CHUNKED = "zstd-chunked"  # containers/storage's zstd:chunked (TOC and tar-split in zstd frames)
FORMATS = (ESTARGZ, ESTARGZ_ZSTD, ZSTD_CHUNKED)

# Layer media types (OCI) and the one each format is pushed with.
MEDIA_TYPE_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
GZIP_LAYER_TYPES = frozenset({MEDIA_TYPE_GZIP, MEDIA_TYPE_DOCKER_GZIP})
MEDIA_TYPE_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_TYPES = {ESTARGZ: MEDIA_TYPE_GZIP, ESTARGZ_ZSTD: MEDIA_TYPE_ZSTD, ZSTD_CHUNKED: MEDIA_TYPE_ZSTD}

# Magics and footers.
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"  # a zstd skippable frame: the zstd footers' container
STARGZ_ZSTD_MAGIC = b"GnUlInUx"  # 47 6e 55 6c 49 6e 55 78: eStargz's zstd footer
CHUNKED_MAGIC = b"GNUlInUx"  # 47 4e 55 6c 49 6e 55 78: zstd:chunked's footer
ESTARGZ_FOOTER = 51  # bytes: an empty gzip member whose FEXTRA "SG" subfield holds the TOC offset
LEGACY_FOOTER = 47  # bytes: legacy stargz, the same without the subfield header
MANIFEST_TYPE_CRFS = 1  # the zstd footers' TOC type field

# The TOC and the landmark files (regular files of one byte that mark the prioritized region's end).
TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"  # the files before it are prefetched at mount time
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"  # nothing is prioritized
LANDMARK_CONTENTS = b"\x0f"
RESERVED_NAMES = frozenset({TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})

# Layer annotations in image manifests, as other tools write them. TOC_DIGEST is also the Prepare label
# containerd passes on (containerd-protocol.md).
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"  # eStargz (both compressions): sha256 of TOC JSON
UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
CHUNKED_CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"  # sha256 of the compressed TOC
CHUNKED_POSITION = "io.github.containers.zstd-chunked.manifest-position"  # "offset:length:ulength:1"
CHUNKED_TARSPLIT = "io.github.containers.zstd-chunked.tarsplit-position"  # "offset:length:ulength"
CHUNKED_TARSPLIT_CHECKSUM = "io.github.containers.zstd-chunked.tarsplit-checksum"
LEGACY_CHUNKED_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"  # older writers, ctr-remote
LEGACY_CHUNKED_POSITION = "io.containers.zstd-chunked.manifest-position"
FORMAT_ANNOTATIONS = frozenset(
    {
        TOC_DIGEST,
        UNCOMPRESSED_SIZE,
        CHUNKED_CHECKSUM,
        CHUNKED_POSITION,
        CHUNKED_TARSPLIT,
        CHUNKED_TARSPLIT_CHECKSUM,
        LEGACY_CHUNKED_CHECKSUM,
        LEGACY_CHUNKED_POSITION,
    }
)  # a converter drops these from a layer it rewrites

# SOCI (AWS): an index of zTOCs beside an unchanged image, found as a referrer of its manifest
SOCI_INDEX_V1 = "application/vnd.amazon.soci.index.v1+json"  # artifactType and config media type
ZTOC_MEDIA_TYPE = "application/octet-stream"  # a zTOC blob (fuse.formats.ztoc)
ANNOTATION_LAYER_DIGEST = "com.amazon.soci.image-layer-digest"  # on a zTOC: the layer it indexes
ANNOTATION_LAYER_MEDIA_TYPE = "com.amazon.soci.image-layer-mediaType"
ANNOTATION_SPAN_SIZE = "com.amazon.soci.span-size"
ANNOTATION_BUILD_TOOL = "com.amazon.soci.build-tool-identifier"

# tar (POSIX ustar, GNU, PAX), as the converter's writer and the zTOC builder read it
TAR_BLOCK = 512
TAR_TYPES = {  # type flag -> the entry type TOCs name
    b"0": "reg",
    b"\0": "reg",  # pre-POSIX regular file
    b"7": "reg",  # contiguous file: a regular file everywhere but on a few old Unixes
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "char",
    b"4": "block",
    b"5": "dir",
    b"6": "fifo",
}
