"""`lazysnap index`: build SOCI indexes for an image's gzip layers and publish them beside the image,
which stays as it is (lazy loading without conversion).

For each platform's manifest (every one of an index, attestation manifests aside) and each of its gzip
layers of at least `--min-layer-size` (SOCI's default, 10 MiB) that is not eStargz already, the blob is
streamed from the registry once (ranges fetched ahead while the previous ones inflate) through
`fuse.formats.ztoc.build_ztoc`, its sha256 checked against the layer digest, and the zTOC pushed as a
blob. Then a SOCI index manifest (SOCI's v1 layout: an OCI image manifest whose config is the empty
JSON `{}` with media type = artifactType `application/vnd.amazon.soci.index.v1+json`, whose layers are
the zTOCs with SOCI's annotations, and whose `subject` is the image manifest) is pushed and made
findable through the referrers API or its tag fallback (`fuse.registry.referrers`). Builds are
deterministic, so a second run publishes the same manifest and the referrers list does not grow.
SOCI's v2 layout is not used: it has no subject and needs a rewritten image index beside the image."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from fuse.formats import RegistrySource
from fuse.formats import ztoc as ztoc_format
from fuse.formats.errors import FormatError
from fuse.formats.spec import (
    ANNOTATION_BUILD_TOOL,
    ANNOTATION_LAYER_DIGEST,
    ANNOTATION_LAYER_MEDIA_TYPE,
    ANNOTATION_SPAN_SIZE,
    SOCI_INDEX_V1,
    ZTOC_MEDIA_TYPE,
)
from fuse.registry import CredentialStore, HostsConfig, Platform, RegistryClient, RegistryError
from fuse.registry import manifests as mf
from fuse.registry.reference import Reference
from fuse.registry.referrers import push_referrer
from snapshotter.convert.image import ATTESTATION, COMPRESSION_OF, FOREIGN, is_accelerated
from snapshotter.settings import size_arg

DESCRIPTION = __doc__.split("\n\n")[0]

EMPTY_JSON = b"{}"
DEFAULT_SPAN_OUT = 4 << 20  # SOCI's default span size
DEFAULT_MIN_LAYER_SIZE = 10 << 20  # SOCI's defaultMinLayerSize


class IndexError_(Exception):
    """A layer or image that cannot be indexed as asked (the message says which and why)."""


@dataclass(frozen=True)
class LayerResult:
    manifest: str  # digest of the image manifest
    digest: str
    size: int
    action: str  # "indexed" or "skipped"
    reason: str = ""
    ztoc_digest: str = ""
    ztoc_size: int = 0
    entries: int = 0
    spans: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ManifestResult:
    manifest: str
    platform: str
    layers: list[LayerResult]
    soci_index: str | None  # digest of the SOCI index manifest pushed, None when no layer was indexed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `lazysnap index`."""
    parser.add_argument("image", metavar="IMAGE", help="image to index, e.g. registry.example.com/app:1.0")
    parser.add_argument(
        "--span-out",
        type=size_arg,
        default=DEFAULT_SPAN_OUT,
        metavar="SIZE",
        help="uncompressed bytes between gzip checkpoints (SOCI's span size; default: 4MiB)",
    )
    parser.add_argument(
        "--min-layer-size",
        type=size_arg,
        default=DEFAULT_MIN_LAYER_SIZE,
        metavar="SIZE",
        help="smaller layers (compressed size) are not indexed but pulled in full (default: 10MiB)",
    )
    parser.add_argument(
        "--plain-http", action="store_true", help="use plain HTTP for registries not in hosts.toml"
    )
    parser.add_argument(
        "--hosts-dir", type=Path, metavar="DIR", help="containerd hosts directory (certs.d layout)"
    )
    parser.add_argument(
        "--docker-config", type=Path, metavar="FILE", help="docker config.json with credentials"
    )


async def run(args: argparse.Namespace) -> int:
    """`lazysnap index`: 0 on success, 1 on failure (the error on stderr)."""
    if args.span_out <= 0:
        print("lazysnap index: --span-out must be more than 0 bytes", file=sys.stderr)
        return 2
    hosts = HostsConfig(args.hosts_dir, plain_http=args.plain_http)
    credentials = CredentialStore(args.docker_config) if args.docker_config else CredentialStore()
    try:
        async with RegistryClient(hosts=hosts, credentials=credentials) as client:
            results = await index_image(
                client,
                args.image,
                span_out=args.span_out,
                min_layer_size=args.min_layer_size,
                log=lambda line: print(line, flush=True),
            )
    except (IndexError_, RegistryError) as e:
        print(f"lazysnap index: {e}", file=sys.stderr)
        return 1
    pushed = [r for r in results if r.soci_index]
    indexed = sum(1 for r in results for layer in r.layers if layer.action == "indexed")
    print(f"{args.image}: {indexed} layer(s) indexed, {len(pushed)} SOCI index(es) published")
    return 0


async def index_image(
    client: RegistryClient,
    image: str,
    *,
    span_out: int = DEFAULT_SPAN_OUT,
    min_layer_size: int = DEFAULT_MIN_LAYER_SIZE,
    log: Callable[[str], None] = lambda line: None,
) -> list[ManifestResult]:
    """Index every platform's manifest of `image` and publish the SOCI indexes (module docstring)."""
    ref = Reference.parse(image)
    body, kind, digest = await client.get_manifest(ref)
    doc, kind = mf.parse(body, kind, str(ref))
    targets: list[tuple[str, bytes, str, dict]] = []  # (platform, body, media type, manifest)
    if kind in mf.INDEXES:
        for entry in doc["manifests"]:
            p = entry.get("platform") or {}
            platform = Platform(p.get("os", "?"), p.get("architecture", "?"), p.get("variant", ""))
            if platform == ATTESTATION:
                continue
            sub_body, sub_kind, _ = await client.get_manifest(ref.with_digest(entry["digest"]))
            sub_doc, sub_kind = mf.parse(sub_body, sub_kind, f"{ref.name}@{entry['digest']}")
            if sub_kind in mf.INDEXES:
                log(f"{entry['digest']}: nested index skipped")
                continue
            targets.append((str(platform), sub_body, sub_kind, sub_doc))
    else:
        targets.append(("", body, kind, doc))
    results = []
    for platform, m_body, m_kind, m_doc in targets:
        results.append(
            await _index_manifest(client, ref, platform, m_body, m_kind, m_doc, span_out, min_layer_size, log)
        )
    return results


async def _index_manifest(
    client: RegistryClient,
    ref: Reference,
    platform: str,
    body: bytes,
    kind: str,
    doc: dict,
    span_out: int,
    min_layer_size: int,
    log: Callable[[str], None],
) -> ManifestResult:
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    subject = {"mediaType": kind, "digest": digest, "size": len(body)}
    where = f"{ref.name}@{digest}" + (f" ({platform})" if platform else "")
    layers: list[LayerResult | None] = [None] * len(doc["layers"])
    ztocs: list[dict | None] = [None] * len(doc["layers"])
    limiter = trio.CapacityLimiter(max(1, os.cpu_count() or 1))  # layers indexed at once, one core each

    async def one(i: int, desc: dict) -> None:
        reason = _skip_reason(desc, min_layer_size)
        if reason:
            layers[i] = LayerResult(digest, desc["digest"], desc["size"], "skipped", reason)
            return
        async with limiter:
            started = time.monotonic()
            try:
                z = await _build_layer(client, ref.with_digest(digest), desc, span_out)
            except FormatError as e:
                layers[i] = LayerResult(digest, desc["digest"], desc["size"], "skipped", f"cannot index: {e}")
                return
            # threads of a layer holding its token of `limiter` take none of it again (a deadlock)
            blob = await trio.to_thread.run_sync(ztoc_format.to_bytes, z)
            ztoc_digest = await client.push_blob(ref, blob)
            seconds = time.monotonic() - started
        ztocs[i] = {
            "mediaType": ZTOC_MEDIA_TYPE,
            "digest": ztoc_digest,
            "size": len(blob),
            "annotations": {
                ANNOTATION_LAYER_MEDIA_TYPE: desc["mediaType"],
                ANNOTATION_LAYER_DIGEST: desc["digest"],
                ANNOTATION_SPAN_SIZE: str(span_out),
            },
        }
        layers[i] = LayerResult(
            digest,
            desc["digest"],
            desc["size"],
            "indexed",
            ztoc_digest=ztoc_digest,
            ztoc_size=len(blob),
            entries=len(z.entries),
            spans=len(z.index.points),
            seconds=seconds,
        )

    async with trio.open_nursery() as nursery:
        for i, desc in enumerate(doc["layers"]):
            nursery.start_soon(one, i, desc)
    for r in layers:
        log(_describe(r))
    ztoc_descs = [d for d in ztocs if d is not None]
    if not ztoc_descs:
        log(f"{where}: no layer indexed, no SOCI index pushed (its layers are pulled in full)")
        return ManifestResult(digest, platform, layers, None)
    await client.push_blob(ref, EMPTY_JSON)
    manifest = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_MANIFEST,
        "artifactType": SOCI_INDEX_V1,
        "config": {
            "mediaType": SOCI_INDEX_V1,
            "digest": "sha256:" + hashlib.sha256(EMPTY_JSON).hexdigest(),
            "size": len(EMPTY_JSON),
        },
        "layers": ztoc_descs,
        "subject": subject,
        "annotations": {ANNOTATION_BUILD_TOOL: ztoc_format.BUILD_TOOL},
    }
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()

    def ours(d: dict) -> bool:  # an index an earlier `lazysnap index` published (other spans, say)
        built_by = (d.get("annotations") or {}).get(ANNOTATION_BUILD_TOOL)
        return d.get("artifactType") == SOCI_INDEX_V1 and built_by == ztoc_format.BUILD_TOOL

    pushed = await push_referrer(
        client, ref, manifest_bytes, mf.OCI_MANIFEST, subject, SOCI_INDEX_V1, replaces=ours
    )
    log(f"{where}: SOCI index {pushed['digest']} published ({len(ztoc_descs)} zTOC(s))")
    return ManifestResult(digest, platform, layers, pushed["digest"])


def _skip_reason(desc: dict, min_layer_size: int) -> str:
    media_type = desc.get("mediaType", "")
    if media_type in FOREIGN:
        return "foreign layer (not stored in this registry)"
    if COMPRESSION_OF.get(media_type) != "gzip":
        return f"not a gzip layer ({media_type})"
    if is_accelerated(desc):
        return "lazily loadable already (eStargz)"
    if desc["size"] < min_layer_size:
        return f"smaller than --min-layer-size ({_mib(desc['size'])} < {_mib(min_layer_size)})"
    return ""


async def _build_layer(client: RegistryClient, ref: Reference, desc: dict, span_out: int) -> ztoc_format.Ztoc:
    """The zTOC of one layer, streaming its blob once (`ztoc.stream_ztoc`). The blob's sha256 and size
    must match the descriptor."""
    digest, size = desc["digest"], desc["size"]
    what = f"layer {digest} of {ref.name}"
    source = RegistrySource(client, ref, digest, size)
    z = await ztoc_format.stream_ztoc(source, size, span_out=span_out, what=what)
    actual = "sha256:" + z.index.blob_digest.hex()
    if actual != digest or z.compressed_archive_size != size:
        raise IndexError_(
            f"{what}: the blob streamed has digest {actual} and {z.compressed_archive_size} bytes, not "
            f"{digest} and {size}: the registry served other content; nothing was published"
        )
    return z


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _describe(r: LayerResult) -> str:
    if r.action == "skipped":
        return f"layer {r.digest} ({_mib(r.size)}): skipped, {r.reason}"
    return (
        f"layer {r.digest} ({_mib(r.size)}): zTOC {r.ztoc_digest} of {r.ztoc_size} bytes "
        f"({r.ztoc_size / r.size:.2%} of the layer), {r.entries} entries, {r.spans} spans, "
        f"built in {r.seconds:.1f}s"
    )
