"""`lazysnap convert`: turn an ordinary image into an accelerated one (eStargz, stargz's zstd variant, or
zstd:chunked), registry to registry.

For each layer of each selected platform: stream-download the blob to a temporary file (verified
against its digest), decompress it (gzip, zstd or none, by media type) into the layer writer
(`snapshotter.convert.writer`, all cores), check that the decompressed tar has the DiffID the image config
promises, upload the new blob in bounded chunks (skipped when the repository already has it, mounted when
another repository of the same registry has it), and build a new config (the original, with the new
DiffIDs; history kept) and an OCI manifest whose layers carry the annotations readers expect. A
multi-platform index becomes an index of the converted manifests. The result is pushed under DST, by
default SRC's tag + `_accelerated` in the same repository.

Layers already in the requested format are kept as they are (unless files are prioritized); layers that
are not distributable (foreign) are kept too. Layers are downloaded and uploaded concurrently; one is
converted at a time, since the writer uses every core.

Sources and destinations are registries; OCI layout directories are not supported yet. The command line
is `snapshotter.convert.cli`; which layers count as accelerated already, `snapshotter.convert.image`.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import trio
import zstandard

from fuse.formats.spec import ESTARGZ, FORMAT_ANNOTATIONS
from fuse.registry import (
    ManifestError,
    NotFound,
    Platform,
    Reference,
    RegistryClient,
    RegistryError,
    Unauthorized,
)
from fuse.registry import manifests as mf
from snapshotter.convert.image import (
    ATTESTATION,
    COMPRESSION_OF,
    FOREIGN,
    IMAGE_CONFIGS,
    OCI_CONFIG,
    SUFFIX,
    accelerated_format,
)
from snapshotter.convert.tar import TarFormatError
from snapshotter.convert.writer import (
    DEFAULT_CHUNK_SIZE,
    LayerResult,
    WriteOptions,
    WriterError,
    write_layer,
)
from snapshotter.progress import Progress

READ_SIZE = 1 << 20
PARALLEL_TRANSFERS = 3  # layers downloaded or uploaded at once


class ConvertError(Exception):
    """The conversion failed; the message says for which image and layer, and what to do."""


@dataclass
class LayerReport:
    index: int
    source_digest: str
    source_size: int
    digest: str
    media_type: str
    size: int
    diff_id: str
    action: str  # "converted", "kept" (already accelerated or foreign), "reused" (same layer earlier)
    uncompressed_size: int = 0
    seconds: float = 0.0
    prioritized_missing: list[str] = field(default_factory=list)


@dataclass
class ManifestReport:
    platform: str | None
    source_digest: str
    digest: str
    size: int
    config_digest: str
    layers: list[LayerReport]


@dataclass
class ConvertResult:
    source: str
    destination: str
    digest: str  # of what DST names: the manifest, or the index
    media_type: str
    manifests: list[ManifestReport]
    seconds: float

    @property
    def layers(self) -> list[LayerReport]:
        return [layer for m in self.manifests for layer in m.layers]


def default_destination(src: Reference) -> Reference:
    """SRC's repository, tag + `_accelerated`."""
    if not src.tag:
        raise ConvertError(f"{src} has no tag to derive a destination from: give DST explicitly")
    tag = src.tag + SUFFIX
    if len(tag) > 128:
        raise ConvertError(f"{src}: tag {tag!r} would be longer than 128 characters: give DST explicitly")
    return replace(src, tag=tag, digest=None)


def read_prioritized(path: Path) -> list[str]:
    """Paths, one a line; blank lines and #-comments skipped; JSON lines with a "path" (the record
    format of `ctr-remote optimize --record-out`) accepted too."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConvertError(f"cannot read the prioritized files list {path}: {e.strerror}") from e
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConvertError(f"{path}: line {line[:80]!r} is not valid JSON: {e}") from e
            if isinstance(record, dict) and isinstance(record.get("path"), str):
                out.append(record["path"])
                continue
            raise ConvertError(f'{path}: JSON line without a "path": {line[:80]!r}')
        out.append(line)
    return out


# --- decompression --------------------------------------------------------------------------------------


class _GzipStream:
    """A multi-member gzip file as a stream of its decompressed bytes (one decompressobj per member;
    `gzip.decompress` would be quadratic in the number of members)."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self._d = zlib.decompressobj(31)
        self._input = b""  # compressed bytes not yet given to the decompressor
        self._in_member = False

    def read(self, n: int = -1) -> bytes:
        limit = max(n, 0)
        while True:
            if not self._input:
                self._input = self._f.read(READ_SIZE)
                if not self._input:
                    if self._in_member:
                        raise TarFormatError(
                            "the gzip stream ends in the middle of a member (truncated blob)"
                        )
                    return b""
            if not self._in_member and self._input[:1] == b"\x00":
                return b""  # zero padding after the last member, as some tools write it
            out = self._d.decompress(self._input, limit)
            self._in_member = True
            if self._d.eof:
                self._input = self._d.unused_data
                self._d = zlib.decompressobj(31)
                self._in_member = False
            else:
                self._input = self._d.unconsumed_tail
            if out:
                return out


def open_decompressed(f: IO[bytes], compression: str) -> IO[bytes] | _GzipStream:
    if compression == "gzip":
        return _GzipStream(f)
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(f, read_size=READ_SIZE, read_across_frames=True)
    return f


def _convert_file(
    src: Path, compression: str, dst: Path, options: WriteOptions, progress: Progress, task: str
) -> LayerResult:
    with open(src, "rb") as raw, open(dst, "wb") as out:
        try:
            return write_layer(
                open_decompressed(progress.reader(task, raw), compression),
                progress.writer(task, out),
                options,
            )
        except (zlib.error, zstandard.ZstdError, EOFError, gzip.BadGzipFile) as e:
            raise TarFormatError(f"the layer does not decompress as {compression}: {e}") from e


# --- the conversion -------------------------------------------------------------------------------------


@dataclass
class _Job:
    done: trio.Event = field(default_factory=trio.Event)
    descriptor: dict | None = None
    report: LayerReport | None = None
    error: BaseException | None = None


class _Converter:
    def __init__(
        self,
        client: RegistryClient,
        src: Reference,
        dst: Reference,
        options: WriteOptions,
        work: Path,
        log: Callable[[str], None],
        progress: Progress | None = None,
    ):
        self.client, self.src, self.dst, self.options, self.work, self.log = (
            client,
            src,
            dst,
            options,
            work,
            log,
        )
        self.progress = progress or Progress(mode="off")
        self.transfers = trio.CapacityLimiter(PARALLEL_TRANSFERS)
        self.cpu = trio.CapacityLimiter(1)
        self.jobs: dict[str, _Job] = {}
        self.mount_from = (
            src.repository if src.host == dst.host and src.repository != dst.repository else None
        )

    async def manifest(self, digest: str, doc: dict, platform: str | None) -> tuple[ManifestReport, bytes]:
        """Convert one image manifest's layers, push its config; returns the new manifest (not pushed)."""
        what = f"{self.src}" + (f" ({platform})" if platform else "")
        config_desc = doc["config"]
        if config_desc.get("mediaType") not in IMAGE_CONFIGS:
            raise ConvertError(
                f"{what} is not a container image: its config has media type "
                f"{config_desc.get('mediaType')!r} (an artifact, not an image to convert)"
            )
        try:
            config = json.loads(await self.client.get_blob(self.src, config_desc["digest"]))
            diff_ids = config["rootfs"]["diff_ids"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ConvertError(f"{what}: the image config is not valid ({e}); the image is damaged") from e
        layers = doc["layers"]
        if len(diff_ids) != len(layers):
            raise ConvertError(
                f"{what}: the manifest has {len(layers)} layers but the config {len(diff_ids)} DiffIDs"
            )
        results: list[tuple[dict, LayerReport] | None] = [None] * len(layers)

        async def one(i: int) -> None:
            results[i] = await self.layer(i, len(layers), layers[i], diff_ids[i], what)

        try:
            async with trio.open_nursery() as nursery:
                for i in range(len(layers)):
                    nursery.start_soon(one, i)
        except BaseExceptionGroup as group:
            raise _first(group) from None
        descriptors = [r[0] for r in results if r]
        reports = [r[1] for r in results if r]
        new_config = dict(config)
        new_config["rootfs"] = {**config["rootfs"], "diff_ids": [r.diff_id for r in reports]}
        config_body = json.dumps(new_config, separators=(",", ":"), ensure_ascii=False).encode()
        config_digest = await self.client.push_blob(self.dst, config_body)
        manifest: dict = {
            "schemaVersion": 2,
            "mediaType": mf.OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_body)},
            "layers": descriptors,
        }
        if doc.get("annotations"):
            manifest["annotations"] = doc["annotations"]
        body = json.dumps(manifest, indent=2).encode()
        return ManifestReport(platform, digest, _sha(body), len(body), config_digest, reports), body

    async def layer(
        self, i: int, count: int, desc: dict, diff_id: str, what: str
    ) -> tuple[dict, LayerReport]:
        digest = desc["digest"]
        job = self.jobs.get(digest)
        if job is not None:  # the same layer in another platform's manifest
            await job.done.wait()
            if job.error or job.descriptor is None or job.report is None:
                raise ConvertError(f"layer {i + 1} ({digest}) of {what}: failed earlier") from job.error
            return job.descriptor, replace(job.report, index=i, action="reused")
        job = self.jobs[digest] = _Job()
        try:
            job.descriptor, job.report = await self._layer(i, count, desc, diff_id, what)
            return job.descriptor, job.report
        except BaseException as e:
            job.error = e
            raise
        finally:
            job.done.set()

    async def _layer(
        self, i: int, count: int, desc: dict, diff_id: str, what: str
    ) -> tuple[dict, LayerReport]:
        digest, media_type, size = desc["digest"], desc.get("mediaType", ""), desc.get("size", 0)
        where = f"layer {i + 1}/{count} ({digest}) of {what}"
        annotations = desc.get("annotations") or {}
        if media_type in FOREIGN:  # fetched from its URLs, never from the registry
            self.log(f"{where}: kept as it is (a non-distributable layer)")
            return dict(desc), LayerReport(i, digest, size, digest, media_type, size, diff_id, "kept")
        if accelerated_format(desc) == self.options.format and not self.options.prioritized:
            await self._ensure_blob(digest, size, where)
            self.log(f"{where}: kept as it is (already {self.options.format})")
            return dict(desc), LayerReport(i, digest, size, digest, media_type, size, diff_id, "kept")
        compression = COMPRESSION_OF.get(media_type)
        if compression is None:
            raise ConvertError(
                f"{where}: media type {media_type!r} is not a layer this converter can read "
                f"(gzip, zstd or uncompressed tar)"
            )
        hexd = digest.split(":", 1)[-1][:16]
        src_path, out_path = self.work / f"{hexd}.src", self.work / f"{hexd}.out"
        try:
            async with self.transfers:
                await self.client.download_blob(self.src, digest, src_path, size=size or None)
            started = time.monotonic()
            self.progress.start(digest, size or None, f"layer {i + 1}/{count} {digest[:19]}")
            try:
                result = await trio.to_thread.run_sync(
                    functools.partial(
                        _convert_file, src_path, compression, out_path, self.options, self.progress, digest
                    ),
                    limiter=self.cpu,
                )
            except (TarFormatError, WriterError) as e:
                raise ConvertError(f"{where}: {e}") from e
            seconds = time.monotonic() - started
            src_path.unlink()
            if result.input_digest != diff_id:
                raise ConvertError(
                    f"{where}: the decompressed layer has digest {result.input_digest}, but the image config "
                    f"says {diff_id}: the image is damaged; rebuild or re-push it"
                )
            async with self.transfers:
                await self.client.upload_blob_file(
                    self.dst, out_path, digest=result.digest, mount_from=self.mount_from
                )
        finally:
            src_path.unlink(missing_ok=True)
            out_path.unlink(missing_ok=True)
        kept_annotations = {k: v for k, v in annotations.items() if k not in FORMAT_ANNOTATIONS}
        descriptor = {
            "mediaType": result.media_type,
            "digest": result.digest,
            "size": result.size,
            "annotations": {**kept_annotations, **result.annotations},
        }
        rate = result.input_size / seconds / 1e6 if seconds > 0 else 0.0
        self.progress.finish(digest)
        self.log(
            f"{where}: {result.input_size / 1e6:.1f} MB tar -> {result.size / 1e6:.1f} MB {result.format} "
            f"in {seconds:.1f}s ({rate:.0f} MB/s)"
        )
        if result.prioritized_missing and self.options.prioritized:
            found = len(result.prioritized_found)
            self.log(
                f"{where}: {found} of {len(self.options.prioritized)} prioritized files are in this layer"
            )
        report = LayerReport(
            i,
            digest,
            size,
            result.digest,
            result.media_type,
            result.size,
            result.diff_id,
            "converted",
            result.uncompressed_size,
            seconds,
            result.prioritized_missing,
        )
        return descriptor, report

    async def _ensure_blob(self, digest: str, size: int, where: str) -> None:
        """Make a kept layer available in DST: already there, mounted, or copied through a temp file."""
        if self.src.name == self.dst.name or await self.client.blob_exists(self.dst, digest):
            return
        path = self.work / (digest.split(":", 1)[-1][:16] + ".copy")
        try:
            async with self.transfers:
                await self.client.download_blob(self.src, digest, path, size=size or None)
                await self.client.upload_blob_file(self.dst, path, digest=digest, mount_from=self.mount_from)
        except NotFound as e:
            raise ConvertError(f"{where}: the blob is not in the source repository: {e}") from e
        finally:
            path.unlink(missing_ok=True)


async def convert_image(
    client: RegistryClient,
    src: Reference | str,
    dst: Reference | str | None = None,
    *,
    format: str = ESTARGZ,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritize: Sequence[str] | Path | None = None,
    level: int | None = None,
    platform: Platform | str | None = None,
    all_platforms: bool = False,
    threads: int = 0,
    tmpdir: Path | None = None,
    log: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert the image SRC into FORMAT and push it as DST (default: SRC's tag + `_accelerated`).

    `prioritize` is a list of paths, or a file listing them (see `read_prioritized`); they go first in
    every layer that has them. From a multi-platform index, the host's platform is converted (or
    `platform`), or every platform with `all_platforms`. Raises ConvertError with what failed.
    """
    started = time.monotonic()
    log = log or (lambda _msg: None)
    try:
        src_ref = Reference.parse(src) if isinstance(src, str) else src
        dst_ref = (Reference.parse(dst) if isinstance(dst, str) else dst) or default_destination(src_ref)
        want = Platform.parse(platform) if isinstance(platform, str) else platform
    except (RegistryError, ValueError) as e:
        raise ConvertError(str(e)) from e
    if dst_ref.digest:
        raise ConvertError(f"DST {dst_ref} names a digest: give a tag to push the converted image under")
    if (dst_ref.name, dst_ref.tag) == (src_ref.name, src_ref.tag):
        raise ConvertError(f"DST {dst_ref} is SRC: give another tag or repository")
    if isinstance(prioritize, Path):
        prioritize = read_prioritized(prioritize)
    options = WriteOptions(
        format=format,
        chunk_size=chunk_size,
        level=level,
        prioritized=tuple(prioritize or ()),
        threads=threads,
    )
    try:
        options.validated()
    except WriterError as e:
        raise ConvertError(str(e)) from e
    try:
        body, media_type, top_digest = await client.get_manifest(src_ref)
        doc, kind = mf.parse(body, media_type, str(src_ref))
    except NotFound as e:
        raise ConvertError(f"image {src_ref} not found: check the repository and tag ({e})") from e
    except Unauthorized as e:
        raise ConvertError(f"cannot read {src_ref}: {e}") from e
    except ManifestError as e:
        raise ConvertError(f"{src_ref} is not an image this converter handles: {e}") from e
    with tempfile.TemporaryDirectory(prefix="lazysnap-convert-", dir=tmpdir) as work:
        conv = _Converter(
            client, src_ref, dst_ref, replace(options, spool_dir=work), Path(work), log, progress
        )
        try:
            if kind in mf.INDEXES:
                result = await _convert_index(conv, doc, top_digest, want, all_platforms)
            else:
                report, body = await conv.manifest(top_digest, doc, None)
                digest = await client.push_manifest(dst_ref, body, mf.OCI_MANIFEST)
                result = ConvertResult(str(src_ref), str(dst_ref), digest, mf.OCI_MANIFEST, [report], 0.0)
        except Unauthorized as e:
            raise ConvertError(f"converting {src_ref} to {dst_ref}: {e}") from e
        except RegistryError as e:
            raise ConvertError(f"converting {src_ref} to {dst_ref}: {e}") from e
    result.seconds = time.monotonic() - started
    return result


async def _convert_index(
    conv: _Converter, index: dict, digest: str, want: Platform | None, all_platforms: bool
) -> ConvertResult:
    client, src = conv.client, conv.src
    entries = [e for e in index["manifests"] if not ATTESTATION.matches(e.get("platform") or {})]
    skipped = len(index["manifests"]) - len(entries)
    if skipped:
        conv.log(f"{src}: {skipped} attestation manifest(s) not carried over (they describe the original)")
    if not all_platforms:
        try:
            entries = [mf.select({"manifests": entries}, want or Platform.host(), str(src))]
        except ManifestError as e:
            raise ConvertError(f"{e}: choose one with --platform, or --all-platforms") from e
    reports: list[ManifestReport] = []
    descriptors = []
    for entry in entries:
        platform = entry.get("platform") or {}
        name = str(
            Platform(platform.get("os", "?"), platform.get("architecture", "?"), platform.get("variant", ""))
        )
        body, media_type, sub_digest = await client.get_manifest(src.with_digest(entry["digest"]))
        try:
            doc, kind = mf.parse(body, media_type, f"{src}@{entry['digest']}")
        except ManifestError as e:
            raise ConvertError(f"{src} ({name}): {e}") from e
        if kind in mf.INDEXES:
            raise ConvertError(f"{src} ({name}): nested indexes are not supported")
        report, manifest_body = await conv.manifest(sub_digest, doc, name)
        await client.push_manifest(
            replace(conv.dst, tag=None, digest=report.digest), manifest_body, mf.OCI_MANIFEST
        )
        reports.append(report)
        descriptor = {"mediaType": mf.OCI_MANIFEST, "digest": report.digest, "size": report.size}
        if entry.get("platform"):
            descriptor["platform"] = entry["platform"]
        descriptors.append(descriptor)
    new_index: dict = {"schemaVersion": 2, "mediaType": mf.OCI_INDEX, "manifests": descriptors}
    if index.get("annotations"):
        new_index["annotations"] = index["annotations"]
    body = json.dumps(new_index, indent=2).encode()
    pushed = await client.push_manifest(conv.dst, body, mf.OCI_INDEX)
    return ConvertResult(str(src), str(conv.dst), pushed, mf.OCI_INDEX, reports, 0.0)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _first(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first
