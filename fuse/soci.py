"""A plain gzip layer opened from the SOCI index published beside its image (`lazysnap index`, or
SOCI's own v1 layout), for the daemon (`fuse.layers`) and `lazysnap mount` alike.

Trust, link by link: the image manifest (one that lists the layer digest) -> the SOCI index manifest,
listed among its referrers (OCI referrers API or the `sha256-<hex>` tag) and fetched by digest, checked
-> the zTOC, by its digest in that manifest, checked -> each span's compressed bytes, by their sha256 in
the zTOC, checked before a byte of the span is served (`fuse.formats.zranlayer`) -> the whole blob
against the layer digest, and the zTOC rebuilt from it, once the layer is local (`verify`)."""

from __future__ import annotations

import functools
import hashlib
import json
import re

import trio

from .formats import FormatError, RegistrySource, Unverified
from .formats.spec import ANNOTATION_LAYER_DIGEST, GZIP_LAYER_TYPES, SOCI_INDEX_V1
from .formats.zranlayer import ZranLayer, open_zran_layer
from .formats.ztoc import MAX_ZTOC_BYTES, parse_ztoc, stream_ztoc
from .registry import Reference, RegistryClient
from .registry.referrers import referrers

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_plain_gzip(desc: dict) -> bool:
    """A layer a SOCI index can serve: gzip, without a TOC."""
    return desc.get("mediaType") in GZIP_LAYER_TYPES


async def ztocs(client: RegistryClient, ref: Reference, manifest_digest: str) -> dict[str, dict]:
    """Layer digest -> zTOC descriptor, from the newest SOCI index among the referrers of the image
    manifest (the referrers tag lists them in the order they were published); {} when there is none."""
    listed = await referrers(client, ref, manifest_digest, artifact_type=SOCI_INDEX_V1)
    if not listed:
        return {}
    body, _kind, _digest = await client.get_manifest(ref.with_digest(listed[-1]["digest"]))  # checked
    doc = json.loads(body)
    return {
        layer["annotations"][ANNOTATION_LAYER_DIGEST]: layer
        for layer in doc.get("layers", [])
        if isinstance(layer, dict) and ANNOTATION_LAYER_DIGEST in (layer.get("annotations") or {})
    }


async def fetch_ztoc(client: RegistryClient, ref: Reference, ztoc_desc: dict, what: str) -> tuple[str, bytes]:
    """(digest, bytes) of a zTOC its SOCI index lists, checked against that digest (bounded size)."""
    digest, size = ztoc_desc.get("digest"), ztoc_desc.get("size")
    if not (isinstance(digest, str) and _DIGEST.match(digest)) or not (
        isinstance(size, int) and 0 < size <= MAX_ZTOC_BYTES
    ):
        raise FormatError(f"{what}: its SOCI index lists a zTOC of {size!r} bytes at {digest!r}")
    blob = await RegistrySource(client, ref, digest, size).read(0, size)
    if sha256(blob) != digest:
        raise Unverified(f"{what}: its zTOC does not match its digest {digest}")
    return digest, blob


async def open_layer(source: RegistrySource, ztoc_blob: bytes) -> ZranLayer:
    """The layer of `source` served through the zTOC `ztoc_blob` (checked: it must describe this blob)."""
    what = source.description
    parsed = await trio.to_thread.run_sync(functools.partial(parse_ztoc, ztoc_blob, what=f"{what} zTOC"))
    if parsed.compressed_archive_size != source.size:
        raise FormatError(
            f"{what}: its zTOC describes {parsed.compressed_archive_size} bytes, the layer has {source.size}"
        )
    return await open_zran_layer(source, parsed.entries, parsed.index)


async def verify(layer: ZranLayer, what: str) -> None:
    """The last link: the blob, streamed once more, must have the layer digest and rebuild the same
    zTOC (file list, offsets, checkpoints and their windows). Unverified otherwise."""
    source = layer.source
    assert isinstance(source, RegistrySource)
    rebuilt = await stream_ztoc(source, source.size, span_out=layer.zindex.span_size, what=what)
    digest = "sha256:" + (rebuilt.index.blob_digest or b"").hex()
    if digest != source.digest:
        raise Unverified(f"the blob has digest {digest}, not the layer's {source.digest}")
    if rebuilt.index.to_bytes() != layer.zindex.to_bytes():
        raise Unverified("its zTOC's checkpoints are not the blob's")
    if list(layer.entries) != list(rebuilt.entries):
        raise Unverified("its zTOC's file list is not the blob's")
