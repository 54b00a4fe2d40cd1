"""Remote layers: the layers served lazily from the FUSE mount, each asked for by a `LayerRequest` (image,
layer digest, TOC digest; the daemon makes them from containerd's Prepare labels, see
`snapshotter.daemon.labels`), and `Fallback`, the reason a layer is pulled in full instead.

`RemoteLayers.acquire` opens the layer (the image manifest gives the blob size and, for
zstd:chunked, the TOC digest the labels lack), verifies its TOC, stores footer and TOC under
`<root>/layers/<name>/` (so a restart needs no network), and shows it in the FUSE mount as
`<root>/mnt/<name>`. Directories a layer creates only implicitly take their attributes from the same
directory in the layers below, resolved as overlayfs merges them and never through a symlink (see
`_inherit`). Layers are reference counted by the snapshots that use them. A request also names
the image's other layers: their TOCs are read and indexed at once, concurrently, so
the Prepares that containerd sends one after another find them ready. Anything that makes a layer not
lazily loadable (an ordinary layer, a TOC that does not verify, a registry that does not answer
in time) is a `Fallback` with its reason: containerd then pulls the layer in full.

Runs on the daemon's trio loop; gRPC threads call it through `trio.from_thread.run`.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import logging
import os
import re
import stat
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from fuse import soci
from fuse.ahead import LoaderAhead
from fuse.fetch import Fetcher, LayerHandle
from fuse.formats import (
    FormatError,
    Layer,
    NotLazy,
    RegistrySource,
    Unverified,
    fetch_layer,
    layer_from_toc,
)
from fuse.formats.annotations import expected_toc_digest
from fuse.formats.index import DIR, ROOT, LayerIndex
from fuse.formats.reader import TAIL_READ
from fuse.formats.zranlayer import ZranLayer
from fuse.fs import LazyFS
from fuse.registry import Reference, RegistryClient, RegistryError
from fuse.registry import manifests as mf

log = logging.getLogger("lazysnap.remote")

MAX_AHEAD = 128  # layers opened ahead from one request (images have far fewer)
AHEAD_KEEP = 120.0  # seconds a layer opened ahead waits for its own Prepare before it is dropped
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
ZRAN_KIND = "zran"  # a stored layer record whose `toc` is a SOCI zTOC (a plain gzip layer)
SOCI_LOOKUP = 5.0  # seconds to find an image's SOCI index before its plain layers are pulled in full
SOCI_RETRY = 300.0  # seconds an image's lookup (found or not) is kept
SLOTS_FILE = "slots"  # in the state root: the highest slot ever given (slots are never reused)


class Fallback(Exception):
    """The layer is not lazily loadable: containerd must pull it in full. `kind` is for metrics."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


@dataclass(frozen=True)
class LayerRequest:
    target: str  # the committed snapshot's name containerd waits for
    ref: Reference
    digest: str  # layer blob digest
    toc_digest: str | None
    manifest_digest: str | None
    image_layers: tuple[str, ...] = ()  # the image's other layers the labels name (opened ahead)


def layer_name(digest: str) -> str:
    """The layer's directory name in the FUSE mount and under layers/: "sha256-<hex>"."""
    return digest.replace(":", "-")


@dataclass
class _Ahead:
    """A layer whose TOC is being read before its own Prepare arrives."""

    done: trio.Event
    toc_digest: str | None = None  # what it was verified against
    result: _Toc | None = None  # None: failed or timed out (its Prepare reads it again, and reports)


@dataclass(frozen=True)
class _Toc:
    desc: dict
    expected: str  # digest of `toc`
    footer: bytes
    toc: bytes  # the verified TOC, or a plain gzip layer's zTOC (kind ZRAN_KIND)
    layer: Layer
    kind: str = "toc"


@dataclass
class _Entry:
    name: str
    slot: int
    handle: LayerHandle
    image: str  # the reference it was first pulled as
    refs: int = 0
    lower: list[str] = dataclasses.field(default_factory=list)  # the layers below, nearest first (paths)
    used: int = 0  # when a snapshot last took it (a count): which image's stack a reader most likely sees


class RemoteLayers:
    def __init__(
        self,
        root: Path,
        mountpoint: Path,
        fs: LazyFS,
        fetcher: Fetcher,
        client: RegistryClient,
        *,
        open_timeout: float = 30.0,
        background: bool = True,
        prefetch_program: bool = True,
    ):
        self.root = root
        self.dir = root / "layers"
        self.mountpoint = mountpoint
        self.fs, self.fetcher, self.client = fs, fetcher, client
        self.open_timeout = open_timeout
        self.background = background
        self.prefetch_program = prefetch_program
        self._layers: dict[str, _Entry] = {}
        self._opening: dict[str, trio.Event] = {}
        self._manifests: dict[str, dict] = {}
        self._manifest_loading: dict[str, trio.Event] = {}
        self._manifest_digests: dict[str, str] = {}  # the digest of each cached manifest
        self._soci: dict[str, dict[str, dict]] = {}  # image -> its layers' zTOC descriptors (maybe none)
        self._soci_loading: dict[str, trio.Event] = {}
        self._ahead: dict[str, _Ahead] = {}  # layers opened ahead of their Prepare, by name
        self.fallbacks: Counter[str] = Counter()
        self._nursery: trio.Nursery | None = None
        self._max_slot = 0
        self._uses = itertools.count(1)
        self.stopped: str | None = None  # why the data path stopped (LazyRuntime): no lazy pulls then
        self.ahead = LoaderAhead(fetcher, self.stack)

    def path(self, name: str) -> str:
        return str(self.mountpoint / name)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The nursery that prefetch and background fetches run in."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # --- start: layers of existing snapshots, from local state only ------------------------------

    async def restore(self, refs: dict[str, int]) -> list[str]:
        """Mount every layer that snapshots use (name -> number of snapshots) from its stored TOC;
        returns the names that could not be restored. Each layer is announced to the filesystem first
        (`LazyFS.expect_layer`): when this process took over a live mount, requests for a layer not yet
        restored wait for it rather than fail."""
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self._max_slot = max(self._max_slot, self._read_high_water())
        metas: dict[str, tuple[int, dict]] = {}
        failed = []
        for name in sorted(refs):
            try:
                meta = json.loads((self.dir / name / "meta.json").read_text())
                slot = int(meta["slot"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("cannot restore remote layer %s: %s", name, e)
                failed.append(name)
                continue
            metas[name] = slot, meta
            self.fs.expect_layer(name, slot)
        try:
            for name, (slot, meta) in metas.items():
                try:
                    entry = await self._restore_one(name, slot, meta, refs[name])
                except Exception as e:  # whatever it is, this layer only: its readers get EIO
                    log.error("cannot restore remote layer %s: %s: %s", name, type(e).__name__, e)
                    self.fs.lose_layer(slot)
                    failed.append(name)
                    continue
                self._start_background(entry)
        finally:  # never leave a reader waiting for a layer nobody restores (cancelled, a bug)
            for name, (slot, _meta) in metas.items():
                if name not in self._layers:
                    self.fs.lose_layer(slot)
        for stale in self.dir.iterdir() if self.dir.exists() else ():
            if stale.name not in refs and stale.name not in self._layers:
                _remove_dir(stale)  # no snapshot uses it any more (a crash between release and delete)
        return failed

    async def _restore_one(self, name: str, slot: int, meta: dict, refs: int) -> _Entry:
        footer = (self.dir / name / "footer").read_bytes()
        toc = (self.dir / name / "toc").read_bytes()
        ref = Reference.parse(meta["ref"])
        source = RegistrySource(self.client, ref, meta["digest"], meta["size"])
        if meta.get("kind") == ZRAN_KIND:
            if soci.sha256(toc) != meta["toc_digest"]:
                raise FormatError(f"{name}: its stored zTOC does not match its digest {meta['toc_digest']}")
            layer = await soci.open_layer(source, toc)
        else:
            layer = await layer_from_toc(source, footer, toc, meta["toc_digest"])
        stored = {path: _Attrs(*attrs) for path, attrs in meta.get("inherited", {}).items()}
        layer.index.inherit_implicit(stored.get)
        entry = self._mount(name, slot, layer, ref, refs)
        lower = meta.get("lower")
        if isinstance(lower, list) and all(isinstance(p, str) for p in lower):
            entry.lower = lower  # where a program reading it finds its libraries (fuse.ahead)
        return entry

    # --- lazy pulls ----------------------------------------------------------------------------

    async def acquire(self, req: LayerRequest, lower: list[str] | None = None) -> str:
        """Mount the layer (or take one more reference to it); its name. Raises Fallback. `lower` are
        the directories of the layers below, nearest first: directories this layer creates only
        implicitly take their attributes from there."""
        name = layer_name(req.digest)
        if self.stopped is not None:
            self.fallbacks["stopped"] += 1
            raise Fallback(
                "stopped", f"{req.ref} layer {req.digest}: the lazy data path stopped: {self.stopped}"
            )
        self._open_ahead(req)
        while name in self._opening:  # another Prepare opens the same layer: share its result
            await self._opening[name].wait()
        entry = self._layers.get(name)
        if entry is None:
            self._opening[name] = trio.Event()
            try:
                with trio.move_on_after(self.open_timeout) as scope:
                    entry = await self._open(req, name, lower or [])
                    self._start_program(req, entry)
                if scope.cancelled_caught:
                    raise Fallback(
                        "timeout",
                        f"{req.ref} layer {req.digest}: the registry did not answer "
                        f"within {self.open_timeout:.0f}s",
                    )
            except Fallback as e:
                self.fallbacks[e.kind] += 1
                log.warning("full pull for %s layer %s: %s", req.ref, req.digest, e.reason)
                raise
            finally:
                self._opening.pop(name).set()
        entry.refs += 1
        entry.lower = lower or entry.lower
        entry.used = next(self._uses)
        return name

    def _start_program(self, req: LayerRequest, entry: _Entry) -> None:
        """When the layer just mounted is its image's top layer (containerd prepares them bottom up: the
        whole image is mounted now), fetch the program the image's containers run."""
        manifest = self._manifests.get(self._manifest_key(req))
        layers = manifest.get("layers") if manifest is not None else None
        top = bool(layers) and layers[-1]["digest"] == req.digest
        if self.prefetch_program and self._nursery is not None and top:
            self._nursery.start_soon(self._program_ahead, req, entry, manifest["config"])

    async def _program_ahead(self, req: LayerRequest, entry: _Entry, config: dict) -> None:
        """Fetch the head of the program the image config names (its Entrypoint, else its Cmd: what a
        container runs unless told otherwise) and so what its loader reads after it (`fuse.ahead`),
        while containerd is still creating the container: a start's first misses, one after another
        (at 100 Mbit/s, python3's 2 MB first chunk alone takes 0.17 s), come before it asks."""
        if not 0 < config["size"] <= mf.MAX_CONFIG_READ:
            return
        try:
            with trio.move_on_after(self.open_timeout):
                body = await self.client.get_blob(req.ref, config["digest"], max_size=mf.MAX_CONFIG_READ)
                command = mf.command(body)
                found = self.ahead.program(self.stack(entry.handle), command.program()) if command else None
                log.debug("program ahead for %s: %s: %s", req.ref, command and command.argv, found)
        except Exception as e:  # a guess: whatever the config or the registry holds, never the daemon's end
            log.debug("no program ahead for %s: %s: %s", req.ref, type(e).__name__, e)

    def stack(self, handle: LayerHandle) -> list[LayerHandle]:
        """The lazy layers a process reading this layer most likely sees, top first: the chain of the
        topmost layer above it (of the image whose snapshot took a layer last), or its own."""
        me = self._layers.get(handle.id)
        if me is None:
            return [handle]
        here = self.path(me.name)
        top = max((e for e in self._layers.values() if here in e.lower), key=lambda e: e.used, default=me)
        by_path = {self.path(n): e for n, e in self._layers.items()}
        return [top.handle, *(by_path[p].handle for p in top.lower if p in by_path)]

    def release(self, name: str) -> None:
        """One snapshot fewer uses the layer; the last one unmounts it and deletes its stored TOC."""
        entry = self._layers.get(name)
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs <= 0:
            del self._layers[name]
            self.fs.release_layer(name)
            _remove_dir(self.dir / name)

    def _open_ahead(self, req: LayerRequest) -> None:
        """Start reading the TOCs of the image's other layers now: containerd prepares layers one
        after another, and each would otherwise wait for its own TOC's round trips and index build."""
        if self._nursery is None:
            return
        for digest in req.image_layers:
            name = layer_name(digest)
            if name in self._layers or name in self._opening or name in self._ahead:
                continue
            ahead = self._ahead[name] = _Ahead(trio.Event())
            other = dataclasses.replace(req, digest=digest, toc_digest=None, image_layers=())
            accelerated = req.toc_digest is not None  # its layers most likely are too
            self._nursery.start_soon(self._read_ahead, other, name, ahead, accelerated)

    async def _read_ahead(self, req: LayerRequest, name: str, ahead: _Ahead, accelerated: bool) -> None:
        with trio.move_on_after(self.open_timeout):
            try:
                ahead.result = await self._read_toc(req, accelerated)
                ahead.toc_digest = ahead.result.expected
            except Exception as e:  # its own Prepare reads it again and reports why
                log.debug("reading %s ahead failed: %s", name, e)
        ahead.done.set()
        await trio.sleep(AHEAD_KEEP)  # never asked for (the image was pulled another way): forget it
        if self._ahead.get(name) is ahead:
            del self._ahead[name]

    async def _toc(self, req: LayerRequest, name: str) -> _Toc:
        """The layer's verified TOC: read ahead by an earlier Prepare of the same image, or now."""
        ahead = self._ahead.pop(name, None)
        if ahead is not None:
            await ahead.done.wait()
            if ahead.result is not None and req.toc_digest in (None, ahead.toc_digest):
                return ahead.result
        return await self._read_toc(req, req.toc_digest is not None)

    async def _read_toc(self, req: LayerRequest, accelerated: bool) -> _Toc:
        """The layer's verified TOC. `accelerated`: the labels say the image is, so the layer's suffix
        read (footer and TOC) is made while its descriptor is looked up (the manifest, a round trip)."""
        what = f"{req.ref} layer {req.digest}"
        began = trio.current_time()
        tail: list[tuple[bytes, int]] = []
        tail_done = trio.Event()
        if accelerated and self._nursery is not None:
            self._nursery.start_soon(self._suffix, req, tail, tail_done)
        else:
            tail_done.set()
        try:
            desc = await self._descriptor(req)
            expected = req.toc_digest or expected_toc_digest(desc.get("annotations"))
            source = RegistrySource(self.client, req.ref, req.digest, desc["size"])
            if expected is None:
                found = await self._zran(req, desc, source)
                if found is None:
                    raise Fallback(
                        "not-lazy", f"{what}: no TOC digest (not an accelerated layer) and no SOCI index"
                    )
                return found
            fetching = trio.current_time()
            await tail_done.wait()
            early = tail[0][0] if tail and tail[0][1] == desc["size"] else None
            footer, toc, layer = await fetch_layer(source, expected, tail=early)
            log.debug(
                "TOC of %s: descriptor %.1f ms, %d bytes fetched and indexed in %.1f ms",
                what,
                (fetching - began) * 1000,
                len(toc),
                (trio.current_time() - fetching) * 1000,
            )
        except NotLazy as e:
            raise Fallback("not-lazy", e.reason) from None
        except Unverified as e:
            raise Fallback("unverified", str(e)) from None
        except FormatError as e:
            raise Fallback("format-error", str(e)) from None
        except RegistryError as e:
            raise Fallback("registry", f"{what}: {e}") from None
        return _Toc(desc, expected, footer, toc, layer)

    async def _suffix(self, req: LayerRequest, out: list[tuple[bytes, int]], done: trio.Event) -> None:
        """The layer's last TAIL_READ bytes and its size into `out`, then `done`; nothing when they
        cannot be had (the usual read after the descriptor then says why)."""
        try:
            with trio.move_on_after(self.open_timeout):
                out.append(await self.client.read_suffix(req.ref, req.digest, TAIL_READ))
        except RegistryError as e:
            log.debug("no suffix read of %s layer %s ahead of its descriptor: %s", req.ref, req.digest, e)
        finally:
            done.set()

    async def _open(self, req: LayerRequest, name: str, lower: list[str]) -> _Entry:
        got = await self._toc(req, name)
        desc, expected, footer, toc, layer = got.desc, got.expected, got.footer, got.toc, got.layer
        inherited: dict[str, list[int]] = {}
        if layer.index.implicit and lower:
            # lazy layers below are read from their indexes (never through our own FUSE mount, which
            # this loop serves); local snapshot directories below from disk, in a worker thread
            lazy = {
                self.path(n): e.handle.layer.index for n, e in self._layers.items() if self.path(n) in lower
            }
            inherited = await trio.to_thread.run_sync(
                _inherit, layer.index, lower, lazy, str(self.mountpoint)
            )
        slot = self._next_slot()
        await trio.to_thread.run_sync(
            self._store, name, req, desc["size"], expected, slot, footer, toc, inherited, got.kind, lower
        )
        entry = self._mount(name, slot, layer, req.ref, 0)
        entry.lower = lower
        self._start_background(entry)
        log.info(
            "mounted remote layer %s (%s, %d entries, slot %d)",
            name,
            layer.format,
            layer.index.inode_count,
            slot,
        )
        return entry

    async def _zran(self, req: LayerRequest, desc: dict, source: RegistrySource) -> _Toc | None:
        """A plain gzip layer served from the SOCI index published beside its image (`fuse.soci`, which
        says how each link is checked; the image manifest is the one by the digest in CRI's labels, or
        the reference as resolved for ctr-remote's, either way one that lists this layer digest); None
        when there is none. Once the layer is local, `_verify_zran` checks the last link."""
        manifest_digest = self._manifest_digests.get(self._manifest_key(req))  # set by _descriptor
        if not soci.is_plain_gzip(desc) or manifest_digest is None:
            return None
        d = (await self._soci_ztocs(req, manifest_digest)).get(req.digest)
        if d is None:
            return None
        digest, blob = await soci.fetch_ztoc(self.client, req.ref, d, f"{req.ref} layer {req.digest}")
        return _Toc(desc, digest, b"", blob, await soci.open_layer(source, blob), ZRAN_KIND)

    async def _soci_ztocs(self, req: LayerRequest, manifest_digest: str) -> dict[str, dict]:
        """Layer digest -> zTOC descriptor, from the first SOCI index among the referrers of the image
        manifest; {} when there is none or it cannot be read within SOCI_LOOKUP (then it is not
        asked again for SOCI_RETRY seconds; every layer of the image shares one lookup)."""
        key = f"{req.ref.name}@{manifest_digest}"
        while key in self._soci_loading:
            await self._soci_loading[key].wait()
        cached = self._soci.get(key)
        if cached is not None:
            return cached
        self._soci_loading[key] = trio.Event()
        found: dict[str, dict] = {}
        try:
            with trio.move_on_after(SOCI_LOOKUP):
                found = await soci.ztocs(self.client, req.ref, manifest_digest)
        except (RegistryError, ValueError, KeyError, TypeError) as e:
            log.info("no usable SOCI index for %s: %s", key, e)
        finally:
            self._soci[key] = found
            self._soci_loading.pop(key).set()
        if self._nursery is not None:
            self._nursery.start_soon(self._forget_soci, key)
        return found

    async def _forget_soci(self, key: str) -> None:
        await trio.sleep(SOCI_RETRY)  # an index published later is found by later pulls
        self._soci.pop(key, None)

    async def _descriptor(self, req: LayerRequest) -> dict:
        """The layer's descriptor in its image manifest (size, annotations), the manifest cached."""
        key = self._manifest_key(req)
        while key in self._manifest_loading:  # layers opened together share one manifest fetch
            await self._manifest_loading[key].wait()
        manifest = self._manifests.get(key)
        if manifest is None:
            self._manifest_loading[key] = trio.Event()
            try:
                if req.manifest_digest:
                    body, kind, _ = await self.client.get_manifest(req.ref.with_digest(req.manifest_digest))
                    manifest, _ = mf.parse(body, kind, key)
                    self._manifest_digests[key] = req.manifest_digest
                else:  # ctr-remote's labels name no manifest: the reference's, as containerd resolved it
                    resolved = await self.client.resolve(req.ref)
                    manifest = resolved.manifest
                    self._manifest_digests[key] = resolved.digest
            finally:
                self._manifest_loading.pop(key).set()
            if len(self._manifests) >= 256:  # a bounded cache: forget the oldest
                oldest = next(iter(self._manifests))
                del self._manifests[oldest]
                self._manifest_digests.pop(oldest, None)
            self._manifests[key] = manifest
        for desc in manifest.get("layers", []):
            if desc.get("digest") == req.digest:
                return desc
        raise Fallback("manifest", f"{req.ref}: layer {req.digest} is not in the image manifest")

    @staticmethod
    def _manifest_key(req: LayerRequest) -> str:
        """The key of the request's image manifest in the caches: by digest when the labels name it (CRI),
        else the reference as containerd resolved it (ctr-remote)."""
        return f"{req.ref.name}@{req.manifest_digest}" if req.manifest_digest else str(req.ref)

    def _store(
        self,
        name: str,
        req: LayerRequest,
        size: int,
        toc_digest: str,
        slot: int,
        footer: bytes,
        toc: bytes,
        inherited: dict[str, list[int]],
        kind: str = "toc",
        lower: list[str] | None = None,
    ) -> None:
        d = self.dir / name
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        meta = {
            "ref": str(req.ref),
            "digest": req.digest,
            "size": size,
            "toc_digest": toc_digest,
            "slot": slot,
            "inherited": inherited,  # attributes implicit directories took from the layers below
            "kind": kind,  # "toc" (eStargz, zstd:chunked) or ZRAN_KIND (`toc` holds the zTOC)
            "lower": lower,  # the layers below, nearest first (RemoteLayers.stack after a restart)
        }
        for fname, data in (("footer", footer), ("toc", toc), ("meta.json", json.dumps(meta).encode())):
            tmp = d / f".{fname}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, d / fname)  # meta.json last: its presence means the rest is complete

    def _mount(self, name: str, slot: int, layer, ref: Reference, refs: int) -> _Entry:
        handle = LayerHandle(layer, name, f"{ref} layer {name}", ref.host)
        self.fs.add_layer(name, slot, handle)
        self._max_slot = max(self._max_slot, slot)
        entry = _Entry(name, slot, handle, str(ref), refs)
        self._layers[name] = entry
        return entry

    def _start_background(self, entry: _Entry) -> None:
        async def fetch() -> None:
            try:
                await self.fetcher.prefetch(entry.handle)
                if self.background:
                    await self.fetcher.background(entry.handle)
                    if isinstance(entry.handle.layer, ZranLayer):
                        await self._verify_zran(entry)
            except Exception as e:  # the on-demand path reports and retries; background just stops
                log.warning("background fetch of %s stopped: %s", entry.name, e)

        if self._nursery is not None:
            self._nursery.start_soon(fetch)

    async def _verify_zran(self, entry: _Entry) -> None:
        """The last link of a plain layer's trust chain: the blob, streamed once more now that the
        layer is local, must have the layer digest, and the zTOC rebuilt from it must equal the one
        served (file list, offsets, checkpoints and their windows). Otherwise the layer is bad: its
        reads fail with EIO from now on, and it is logged and counted."""
        layer = entry.handle.layer
        assert isinstance(layer, ZranLayer)
        what = f"{entry.image} layer {entry.name}"
        try:
            await soci.verify(layer, what)
        except (Unverified, FormatError) as e:
            reason = f"{what}: {e}; the layer is bad, its files fail with EIO"
            entry.handle.bad = reason
            self.fallbacks["bad-index"] += 1
            log.error("%s", reason)
            return
        log.info("verified plain layer %s against its digest and its zTOC", entry.name)

    def _next_slot(self) -> int:
        # Never reused while the mount lives, in this process or the next one that takes it over: the
        # kernel may still cache inodes of a removed layer. Hence the high-water mark on disk.
        self._max_slot += 1
        tmp = self.root / f".{SLOTS_FILE}.tmp"
        tmp.write_text(f"{self._max_slot}\n")
        os.replace(tmp, self.root / SLOTS_FILE)
        return self._max_slot

    def _read_high_water(self) -> int:
        try:
            return int((self.root / SLOTS_FILE).read_text())
        except (OSError, ValueError):
            return 0

    def stats(self) -> list[dict]:
        return [
            {
                "name": e.name,
                "image": e.image,
                "refs": e.refs,
                "fetched": e.handle.fetched_fraction(),
                "bytes": sum(e.handle.layer.index.c_size),
                "bytes_local": e.handle.local_bytes(),
            }
            for e in self._layers.values()
        ]


@dataclass(frozen=True)
class _Attrs:
    """What inherit_implicit reads of an os.stat_result, as stored in meta.json."""

    st_mode: int
    st_uid: int
    st_gid: int
    st_mtime_ns: int


def _inherit(
    index: LayerIndex,
    lower: list[str],
    lazy: Mapping[str, LayerIndex] | None = None,
    served: str | None = None,
) -> dict[str, list[int]]:
    """Apply the lower layers' attributes to implicit directories; what was applied, by path.

    `lower` are the directories of the layers below, nearest first; those in `lazy` are lazy layers,
    read from their index. Paths are resolved one component at a time as overlayfs merges the layers
    (the nearest layer that has a name decides; a non-directory (symlink, file, whiteout) hides the
    layers below it, so does an opaque directory), and no symlink is ever followed: layer 1's
    `x -> /host/dir` under layer 2's `x/inner/` gives `x/inner` nothing, never the host directory's
    attributes. Directories below `served` (our own FUSE mount) that are not in `lazy` are skipped."""
    layers: list[_Lower] = []
    for path in lower:
        found = (lazy or {}).get(path)
        if found is not None:
            layers.append(_IndexLower(found))
        elif served is None or os.path.dirname(path.rstrip("/")) != served.rstrip("/"):
            layers.append(_DiskLower(path))
    seen: dict[str, list[int]] = {}

    def stat_lower(path: str) -> _Attrs | None:
        parts = path.split("/")
        if _hidden_by_own_opaque(index, parts) or not all(p and p not in (".", "..") for p in parts):
            return None
        attrs = _merged_dir(layers, parts)
        if attrs is not None:
            seen[path] = [attrs.st_mode, attrs.st_uid, attrs.st_gid, attrs.st_mtime_ns]
        return attrs

    index.inherit_implicit(stat_lower)
    return seen


def _hidden_by_own_opaque(index: LayerIndex, parts: list[str]) -> bool:
    """Whether a directory above the path (in the layer itself) is opaque: nothing below shows."""
    ino: int | None = ROOT
    for name in [None, *parts[:-1]]:
        if name is not None:
            ino = index.lookup(ino, name) if ino is not None else None
        if ino is None:
            return False
        if ino in index.opaque:
            return True
    return False


@dataclass(frozen=True)
class _Child:
    """A directory found in one lower layer: its attributes, whether it is opaque, how to go on."""

    attrs: _Attrs
    opaque: bool
    handle: object


_ABSENT, _NOT_DIR = "absent", "not-dir"


class _Lower:
    """One layer below, walked one name at a time without following symlinks."""

    def root(self) -> object | None:
        raise NotImplementedError

    def child(self, handle: object, name: str) -> _Child | str:
        raise NotImplementedError

    def close(self, handle: object) -> None:
        pass


class _IndexLower(_Lower):
    """A lazy layer, from its TOC index (symlinks are entries there, never followed)."""

    def __init__(self, index: LayerIndex):
        self.index = index

    def root(self) -> object | None:
        return ROOT

    def child(self, handle: object, name: str) -> _Child | str:
        ix = self.index
        ino = ix.lookup(handle, name)  # type: ignore[arg-type]
        if ino is None:
            return _ABSENT
        if ix.kind[ino] != DIR:  # a whiteout is a character device here
            return _NOT_DIR
        attrs = _Attrs(stat.S_IFDIR | ix.mode[ino], ix.uid[ino], ix.gid[ino], ix.mtime[ino])
        return _Child(attrs, ino in ix.opaque, ino)


_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class _DiskLower(_Lower):
    """A snapshot directory on disk (whiteouts as 0/0 character devices, opaque as an xattr). Each
    name is opened relative to its parent's fd with O_NOFOLLOW|O_DIRECTORY: a symlink or any other
    non-directory is refused by the kernel, so no path ever leaves the layer."""

    def __init__(self, path: str):
        self.path = path

    def root(self) -> object | None:
        try:
            return os.open(self.path, _OPEN_DIR)
        except OSError:
            return None

    def child(self, handle: object, name: str) -> _Child | str:
        try:
            fd = os.open(name, _OPEN_DIR, dir_fd=handle)  # type: ignore[arg-type]
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                return _NOT_DIR
            return _ABSENT
        st = os.fstat(fd)
        return _Child(_Attrs(st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns), _opaque(fd), fd)

    def close(self, handle: object) -> None:
        os.close(handle)  # type: ignore[arg-type]


def _opaque(fd: int) -> bool:
    for name in _OPAQUE_XATTRS:
        try:
            if os.getxattr(fd, name) == b"y":
                return True
        except OSError:
            pass
    return False


def _merged_dir(layers: list[_Lower], parts: list[str]) -> _Attrs | None:
    """The attributes of directory `parts` in the merged tree of `layers` (nearest first), or None
    when it is not a directory there."""
    level = [(layer, h) for layer in layers if (h := layer.root()) is not None]
    try:
        attrs: _Attrs | None = None
        for name in parts:
            below: list[tuple[_Lower, object]] = []
            attrs = None
            for layer, handle in level:
                found = layer.child(handle, name)
                if found == _ABSENT:
                    continue
                if isinstance(found, str):  # not a directory: it hides this name in every layer below
                    break
                attrs = attrs or found.attrs  # the nearest layer's directory is the one shown
                below.append((layer, found.handle))
                if found.opaque:
                    break
            _close(level)
            level = below
            if attrs is None:
                return None
        return attrs
    finally:
        _close(level)


def _close(level: list[tuple[_Lower, object]]) -> None:
    for layer, handle in level:
        layer.close(handle)
    level.clear()


def _remove_dir(d: Path) -> None:
    for child in d.iterdir() if d.exists() else ():
        child.unlink(missing_ok=True)
    try:
        d.rmdir()
    except OSError:
        pass
