"""`lazysnap mount IMAGE MOUNTPOINT`: an accelerated image's merged root filesystem, read-only, without
containerd (or a plain image whose SOCI index `lazysnap index` published: `fuse.soci`). The same data
path as the daemon: one FUSE mount (a private directory) with one subdirectory per layer, and an
overlayfs at MOUNTPOINT whose lower directories are those layers
(whiteouts and opaque directories applied by the kernel, as for a container). It stays in the
foreground until MOUNTPOINT is unmounted or the process is interrupted, then cleans up.

The view at MOUNTPOINT is mounted `ro,nosuid,nodev`: a setuid file of the image does not raise the
privileges of whoever runs it, and a device node of the image opens nothing (an image may carry a
0666 node with the host disk's numbers). `--allow-suid-dev` lifts both, for a trusted image only.

With `--record FILE` it writes, when it exits, the files opened through the mount (one absolute path a
line, in first-open order; the list `lazysnap convert --prioritize-from` reads).

A layer that is refused (not lazily loadable, unverified, a registry error) ends the command with one
line on stderr and status 1. If the fetcher or the FUSE server stops unexpectedly, the FUSE connection
is aborted (readers get an error, never a hang), everything is unmounted and the exit status is 1.
The FUSE mount is `fuse.mount.FuseMount`, as for the daemon. Test hook: `LAZYSNAP_FAILPOINTS=fuse.read=error`
(see `snapshotter.daemon.lazy.ServedFS`) makes a read's
handler fail the way a bug would, which stops the FUSE server."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import trio

from fuse import soci
from fuse.ahead import LoaderAhead
from fuse.cache import ChunkCache
from fuse.fetch import Fetcher, FetchOptions, LayerHandle
from fuse.formats import FormatError, NotLazy, RegistrySource, Unverified, open_layer
from fuse.formats.annotations import expected_toc_digest
from fuse.formats.zranlayer import ZranLayer
from fuse.mount import FuseMount, MountFailed, ServingStopped
from fuse.registry import CredentialStore, HostsConfig, Platform, Reference, RegistryClient, RegistryError
from snapshotter import failpoints, host
from snapshotter.daemon.lazy import ServedFS
from snapshotter.settings import DEFAULT_CACHE_LIMIT, duration_arg, parse_size, size_arg

log = logging.getLogger("lazysnap.mount")
DEFAULT_CACHE = Path("/var/lib/lazysnap/cache")
SAFE_VIEW = "nosuid,nodev"  # the view's options unless --allow-suid-dev
TRUSTED_VIEW = "suid,dev"
UNMOUNT_TIMEOUT = 10.0  # seconds a clean unmount of the view may take before it is detached instead
FLUSH_TIMEOUT = 3.0  # seconds spent writing chunks still waiting for the chunk cache at the end


class MountError(Exception):
    """Why `lazysnap mount` cannot go on: one line on stderr (what failed and what to do), status 1."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="accelerated image reference, e.g. registry.example/app:v1_accelerated")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--platform", help="os/arch[/variant] (default: this host's)")
    p.add_argument("--plain-http", action="store_true", help="talk HTTP to registries without hosts.toml")
    p.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"chunk cache directory ({DEFAULT_CACHE})"
    )
    p.add_argument(
        "--cache-limit",
        type=size_arg,
        default=parse_size(DEFAULT_CACHE_LIMIT),
        metavar="SIZE",
        help=f"chunk cache size limit, e.g. 20GiB (default {DEFAULT_CACHE_LIMIT})",
    )
    p.add_argument("--hosts-dir", type=Path, help="containerd hosts configuration (certs.d layout)")
    p.add_argument("--docker-config", type=Path, help="docker config.json with credentials")
    p.add_argument("--no-background", action="store_true", help="fetch only what is read (and prefetched)")
    p.add_argument(
        "--read-timeout",
        type=duration_arg,
        default=30.0,
        help="seconds (or 500ms, 1m) before a read fails with EIO",
    )
    p.add_argument(
        "--record", type=Path, metavar="FILE", help="on exit, write the paths of the files opened to FILE"
    )
    p.add_argument(
        "--allow-suid-dev",
        action="store_true",
        help="honour the image's setuid/setgid files and device nodes at MOUNTPOINT (default: nosuid,nodev); "
        "only for a trusted image: any local user who can reach MOUNTPOINT could become root through a "
        "setuid file or open host devices through a device node the image carries",
    )


async def run(args: argparse.Namespace) -> int:
    """The command: 0 after a clean unmount, 1 with one line on stderr when it cannot go on."""
    failpoints.load_from_environment()
    try:
        await _run(args)
    except KeyboardInterrupt:  # before the mount exists (the signals are ours once it does)
        print("lazysnap mount: interrupted", file=sys.stderr, flush=True)
        return 130
    except BaseException as e:
        reason = _reason(e)
        if reason is None:
            raise
        print(f"lazysnap mount: {reason}", file=sys.stderr, flush=True)
        return 1
    return 0


def _reason(e: BaseException) -> str | None:
    """The one-line reason of a MountError, also when trio wrapped it in exception groups."""
    if isinstance(e, MountError):
        return str(e)
    if isinstance(e, BaseExceptionGroup):
        reasons = [_reason(inner) for inner in e.exceptions]
        rest = [inner for inner, r in zip(e.exceptions, reasons, strict=True) if r is None]
        if all(isinstance(inner, trio.Cancelled) for inner in rest):
            return next((r for r in reasons if r is not None), None)
    return None


async def _run(args: argparse.Namespace) -> None:
    mountpoint = args.mountpoint.resolve()
    if not mountpoint.is_dir():
        raise MountError(f"{mountpoint} is not a directory: create it first")
    try:
        ref = Reference.parse(args.image)
        platform = Platform.parse(args.platform) if args.platform else None
    except ValueError as e:
        raise MountError(f"{e}") from None
    client = RegistryClient(
        hosts=HostsConfig(args.hosts_dir, plain_http=args.plain_http),
        credentials=CredentialStore(args.docker_config),
    )
    async with client:
        handles = await _open_layers(client, ref, platform)
        cache = ChunkCache(args.cache, args.cache_limit)
        try:
            await cache.open()
        except OSError as e:
            raise MountError(
                f"cannot use the chunk cache {args.cache}: {e}; choose another --cache"
            ) from None
        fetcher = Fetcher(
            cache, FetchOptions(read_timeout=args.read_timeout, background=not args.no_background)
        )
        top_first = handles[::-1]
        LoaderAhead(fetcher, lambda _handle: top_first)  # a program's libraries, from the whole image
        await serve(
            fetcher,
            handles,
            mountpoint,
            args.cache,
            record=args.record,
            allow_suid_dev=args.allow_suid_dev,
        )


async def _open_layers(
    client: RegistryClient, ref: Reference, platform: Platform | None
) -> list[LayerHandle]:
    """Every layer of the image, opened and verified; MountError naming the layer that is refused."""
    try:
        resolved = await client.resolve(ref, platform)
    except RegistryError as e:
        raise MountError(
            f"cannot resolve {ref}: {e}; check the reference, credentials and registry"
        ) from None
    handles = []
    indexed: dict[str, dict] | None = None  # the image's SOCI index, looked up at the first plain layer
    for i, desc in enumerate(resolved.layers):
        what = f"{ref} layer {i} ({desc['digest']})"
        source = RegistrySource(client, resolved.reference, desc["digest"], desc["size"])
        try:
            toc_digest = expected_toc_digest(desc.get("annotations"))
            if toc_digest is None and soci.is_plain_gzip(desc) and indexed is None:
                indexed = await soci.ztocs(client, resolved.reference, resolved.digest)
            if toc_digest is None and indexed and desc["digest"] in indexed:  # from its SOCI index
                _, blob = await soci.fetch_ztoc(client, resolved.reference, indexed[desc["digest"]], what)
                layer = await soci.open_layer(source, blob)
            else:
                layer = await open_layer(source, toc_digest)
        except NotLazy as e:
            raise MountError(
                f"{what} is not lazily loadable: {e.reason}; mount an image converted with "
                "`lazysnap convert`, or indexed with `lazysnap index`"
            ) from None
        except Unverified as e:
            raise MountError(
                f"{what} is refused, its content does not match its digest: {e}; do not use this image "
                "until it is converted and pushed again"
            ) from None
        except FormatError as e:
            raise MountError(f"{what} is refused, it is malformed: {e}; convert the image again") from None
        except RegistryError as e:
            raise MountError(f"{what}: the registry failed: {e}; check the registry and try again") from None
        handles.append(LayerHandle(layer, desc["digest"].replace(":", "-"), f"{ref} layer {i}", ref.host))
    return handles


async def serve(
    fetcher: Fetcher,
    handles: list[LayerHandle],
    mountpoint: Path,
    cache_dir: Path,
    *,
    record: Path | None = None,
    allow_suid_dev: bool = False,
) -> None:
    """Mount, serve until unmounted or signalled, clean up; then write the files opened to `record`.
    Raises MountError when serving stopped unexpectedly (after cleaning up all the same)."""
    fs = ServedFS(fetcher, record=record is not None)
    # beside the cache: the layers' FUSE mount is private to this process
    fuse_dir = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.layers-", dir=cache_dir.parent))
    os.chmod(fuse_dir, 0o700)
    names = [f"{i}" for i in range(len(handles))]
    for slot, (name, handle) in enumerate(zip(names, handles, strict=True), start=1):
        fs.add_layer(name, slot, handle)
    fuse = FuseMount(fs, fetcher, fuse_dir)
    try:
        fuse.mount()
    except MountFailed as e:
        os.rmdir(fuse_dir)
        raise MountError(str(e)) from None
    view_options = TRUSTED_VIEW if allow_suid_dev else SAFE_VIEW
    # Signals are ours until the very end: a second SIGTERM during the clean-up must not kill the
    # process half-way and leave the FUSE mount behind.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as receiver:
        try:
            await _serve_mounted(fuse, handles, names, mountpoint, receiver, view_options)
        except* ServingStopped:
            pass  # fuse.failure says why; cleaned up below
        finally:
            _tear_down(fuse, fuse_dir, mountpoint)
            if record is not None:
                write_record(record, [path for _layer, path in fs.recorded()])
    if fuse.failure is not None:
        raise MountError(
            f"{fuse.failure}; the mount at {mountpoint} was removed and its readers got errors "
            "(see the log above; run `lazysnap mount` again)"
        )


async def _serve_mounted(
    fuse: FuseMount,
    handles: list[LayerHandle],
    names: list[str],
    mountpoint: Path,
    receiver: AsyncIterator[int],
    view_options: str,
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(fuse.serve)
        for handle in handles:
            await _quietly(f"prefetch of {handle.name}", fuse.fetcher.prefetch(handle))
        lower = [str(fuse.mountpoint / n) for n in reversed(names)]  # top layer first
        await _mount_view(lower, mountpoint, view_options)
        print(f"mounted {len(handles)} layers at {mountpoint}", flush=True)
        for handle in handles:
            nursery.start_soon(_background, fuse, handle)
        await _until_unmounted_or_signalled(mountpoint, receiver)
        # what was read lately goes to the chunk cache; the view first, while the layers are still
        # served; then FUSE's loop
        with trio.CancelScope(shield=True):
            with trio.move_on_after(FLUSH_TIMEOUT):
                await fuse.fetcher.flush()
            await _unmount_view(mountpoint)
            await fuse.stop(UNMOUNT_TIMEOUT)
        nursery.cancel_scope.cancel()


async def _background(fuse: FuseMount, handle: LayerHandle) -> None:
    """The background fetch; then, for a layer served from a SOCI index, the final check of the blob
    and its zTOC (`fuse.soci.verify`): a layer that fails it is bad, its reads fail with EIO."""
    await _quietly(f"background fetch of {handle.name}", fuse.fetcher.background(handle))
    if isinstance(handle.layer, ZranLayer) and all(handle.cached):
        try:
            await soci.verify(handle.layer, handle.name)
        except (Unverified, FormatError, RegistryError) as e:
            handle.bad = f"{handle.name}: {e}; the layer is bad, its files fail with EIO"
            log.error("%s", handle.bad)


async def _quietly(what: str, work: Awaitable[object]) -> None:
    """Optional work (prefetch, background fetch): an error is a warning, reads fetch on demand."""
    try:
        await work
    except Exception as e:
        log.warning("%s stopped: %s: %s", what, type(e).__name__, e)


def _tear_down(fuse: FuseMount, fuse_dir: Path, mountpoint: Path) -> None:
    """Leave nothing mounted, whatever happened. When serving failed, nobody answers the FUSE mount:
    its connection is aborted first (FuseMount.release), so that readers and the unmounts below get an
    error, not a hang."""
    failed = fuse.failure is not None or not fuse.stopping
    fuse.release()
    if failed and host.is_mountpoint(mountpoint):
        host.umount(mountpoint, host.MNT_DETACH)
    try:
        os.rmdir(fuse_dir)
    except OSError as e:
        log.warning("cannot remove %s: %s", fuse_dir, e)


async def _unmount_view(mountpoint: Path) -> None:
    """Unmount the view; if it is busy or the kernel takes too long, detach it (lazy unmount)."""
    if not host.is_mountpoint(mountpoint):
        return
    err = errno.ETIMEDOUT
    with trio.move_on_after(UNMOUNT_TIMEOUT):
        err = await trio.to_thread.run_sync(host.umount, mountpoint, abandon_on_cancel=True)
    if err and host.is_mountpoint(mountpoint):
        log.warning("unmount of %s: %s: detaching it", mountpoint, os.strerror(err))
        err = host.umount(mountpoint, host.MNT_DETACH)
        if err:
            log.error("cannot detach %s: %s", mountpoint, os.strerror(err))


def write_record(file: Path, paths: list[str]) -> None:
    """Write paths (relative to the image root) as absolute paths, once each, one a line, atomically. A
    path that a line cannot hold as it is (line breaks, surrounding blanks, bytes that are not UTF-8)
    becomes a JSON line `{"path": ...}`, as `snapshotter.convert.read_prioritized` reads them."""
    lines = []
    for path in dict.fromkeys(paths):
        line = "/" + path
        if line.strip() != line or len(line.splitlines()) != 1 or not _utf8(line):
            line = json.dumps({"path": line})
        lines.append(line + "\n")
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, file)


def _utf8(text: str) -> bool:
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False


async def _mount_view(lower: list[str], mountpoint: Path, options: str) -> None:
    """`_mount_view_now` in a thread: mount(2) looks up the layers in the FUSE mount this very loop
    serves, so it must not block the loop."""
    await trio.to_thread.run_sync(_mount_view_now, lower, mountpoint, options)


def _mount_view_now(lower: list[str], mountpoint: Path, options: str) -> None:
    """The image's merged tree at `mountpoint`: overlayfs over the layers (top first), or a bind mount
    of the only layer; read-only, and nosuid,nodev unless `options` lifts them (mount(2), not mount(8))."""
    flags = host.MS_RDONLY | (0 if options == TRUSTED_VIEW else host.MS_NOSUID | host.MS_NODEV)
    try:
        if len(lower) > 1:
            host.mount("overlay", mountpoint, "overlay", flags, "lowerdir=" + ":".join(lower))
            return
        # overlayfs wants two lower dirs without an upper one: bind the single layer
        host.mount(lower[0], mountpoint, None, host.MS_BIND)
    except OSError as e:
        raise MountError(f"cannot mount the image at {mountpoint}: {e.strerror or e}") from None
    try:
        # A bind mount keeps the flags of its source until remounted; set exactly ours.
        host.mount("none", mountpoint, None, host.MS_REMOUNT | host.MS_BIND | flags)
    except OSError as e:
        host.umount(mountpoint, host.MNT_DETACH)
        raise MountError(f"remounting {mountpoint} {options} failed: {e.strerror or e}") from None


async def _until_unmounted_or_signalled(mountpoint: Path, signals: AsyncIterator[int]) -> None:
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                nursery.cancel_scope.cancel()

        async def watch_mount() -> None:
            while host.is_mountpoint(mountpoint):
                await trio.sleep(0.5)
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_signals)
        nursery.start_soon(watch_mount)
