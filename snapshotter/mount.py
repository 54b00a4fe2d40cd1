"""`lazysnap mount IMAGE MOUNTPOINT`: an accelerated image's merged root filesystem, read-only, without
containerd. The same data path as the daemon: one FUSE mount (a private directory) with one
subdirectory per layer, and an overlayfs at MOUNTPOINT whose lower directories are those layers
(whiteouts and opaque directories applied by the kernel, as for a container). It stays in the
foreground until MOUNTPOINT is unmounted or the process is interrupted, then cleans up.

With `--record FILE` it writes, when it exits, the files opened through the mount (one absolute path a
line, in first-open order; the list `lazysnap convert --prioritize-from` reads)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pyfuse3
import trio

from fuse.cache import ChunkCache
from fuse.fetch import Fetcher, FetchOptions, LayerHandle
from fuse.formats import NotLazy, RegistrySource, open_layer
from fuse.formats.annotations import expected_toc_digest
from fuse.fs import MOUNT_OPTIONS, LazyFS, raise_read_ahead
from fuse.registry import CredentialStore, HostsConfig, Platform, Reference, RegistryClient

log = logging.getLogger("lazysnap.mount")
DEFAULT_CACHE = Path("/var/lib/lazysnap/cache")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="accelerated image reference, e.g. registry.example/app:v1_accelerated")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--platform", help="os/arch[/variant] (default: this host's)")
    p.add_argument("--plain-http", action="store_true", help="talk HTTP to registries without hosts.toml")
    p.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"chunk cache directory ({DEFAULT_CACHE})"
    )
    p.add_argument("--cache-limit", type=int, default=10 << 30, help="chunk cache size limit in bytes")
    p.add_argument("--hosts-dir", type=Path, help="containerd hosts configuration (certs.d layout)")
    p.add_argument("--docker-config", type=Path, help="docker config.json with credentials")
    p.add_argument("--no-background", action="store_true", help="fetch only what is read (and prefetched)")
    p.add_argument("--read-timeout", type=float, default=30.0, help="seconds before a read fails with EIO")
    p.add_argument(
        "--record", type=Path, metavar="FILE", help="on exit, write the paths of the files opened to FILE"
    )


async def run(args: argparse.Namespace) -> int:
    mountpoint = args.mountpoint.resolve()
    if not mountpoint.is_dir():
        raise SystemExit(f"lazysnap mount: {mountpoint} is not a directory")
    client = RegistryClient(
        hosts=HostsConfig(args.hosts_dir, plain_http=args.plain_http),
        credentials=CredentialStore(args.docker_config),
    )
    async with client:
        ref = Reference.parse(args.image)
        resolved = await client.resolve(ref, Platform.parse(args.platform) if args.platform else None)
        handles = []
        for i, desc in enumerate(resolved.layers):
            source = RegistrySource(client, resolved.reference, desc["digest"], desc["size"])
            try:
                layer = await open_layer(source, expected_toc_digest(desc.get("annotations")))
            except NotLazy as e:
                raise SystemExit(
                    f"lazysnap mount: layer {i} ({desc['digest']}) is not lazily loadable: {e.reason}"
                ) from None
            handles.append(LayerHandle(layer, desc["digest"].replace(":", "-"), f"{ref} layer {i}", ref.host))
        cache = ChunkCache(args.cache, args.cache_limit)
        await cache.open()
        fetcher = Fetcher(
            cache, FetchOptions(read_timeout=args.read_timeout, background=not args.no_background)
        )
        await serve(fetcher, handles, mountpoint, args.cache, record=args.record)
    return 0


async def serve(
    fetcher: Fetcher,
    handles: list[LayerHandle],
    mountpoint: Path,
    cache_dir: Path,
    *,
    record: Path | None = None,
) -> None:
    """Mount, serve until unmounted or signalled, clean up; then write the files opened to `record`."""
    fs = LazyFS(fetcher, record=record is not None)
    # beside the cache: the layers' FUSE mount is private to this process
    fuse_dir = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.layers-", dir=cache_dir.parent))
    os.chmod(fuse_dir, 0o700)
    names = [f"{i}" for i in range(len(handles))]
    for slot, (name, handle) in enumerate(zip(names, handles, strict=True), start=1):
        fs.add_layer(name, slot, handle)
    pyfuse3.init(fs, str(fuse_dir), list(MOUNT_OPTIONS))
    raise_read_ahead(str(fuse_dir))
    # Signals are ours until the very end: a second SIGTERM during the clean-up must not kill the
    # process half-way and leave the FUSE mount behind.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as receiver:
        await _serve_mounted(fs, fetcher, handles, names, fuse_dir, mountpoint, receiver, record)


async def _serve_mounted(
    fs: LazyFS,
    fetcher: Fetcher,
    handles: list[LayerHandle],
    names: list[str],
    fuse_dir: Path,
    mountpoint: Path,
    receiver: AsyncIterator[int],
    record: Path | None,
) -> None:
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.run)
            nursery.start_soon(pyfuse3.main)
            for handle in handles:
                await fetcher.prefetch(handle)
            lower = [str(fuse_dir / n) for n in reversed(names)]  # top layer first
            await _mount_overlay(lower, mountpoint)
            try:
                print(f"mounted {len(handles)} layers at {mountpoint}", flush=True)
                for handle in handles:
                    nursery.start_soon(fetcher.background, handle)
                await _until_unmounted_or_signalled(mountpoint, receiver)
            finally:
                # the overlay first, while the layers are still served; then FUSE's loop
                with trio.CancelScope(shield=True):
                    if _is_mountpoint(mountpoint):
                        proc = await trio.run_process(
                            ["umount", str(mountpoint)], check=False, capture_stderr=True
                        )
                        if proc.returncode:
                            log.warning("umount %s: %s", mountpoint, proc.stderr.decode().strip())
                pyfuse3.terminate()  # pyfuse3.main returns; cancelling it is not enough
                nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
        os.rmdir(fuse_dir)
        if record is not None:
            write_record(record, [path for _layer, path in fs.recorded()])


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


async def _mount_overlay(lower: list[str], mountpoint: Path) -> None:
    if len(lower) == 1:  # overlayfs wants two lower dirs without an upper one: bind the single layer
        argv = ["mount", "--bind", "-o", "ro", lower[0], str(mountpoint)]
    else:
        argv = ["mount", "-t", "overlay", "overlay", "-o", "ro,lowerdir=" + ":".join(lower), str(mountpoint)]
    proc = await trio.run_process(argv, capture_stderr=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"lazysnap mount: {' '.join(argv[:4])} failed: {proc.stderr.decode().strip()}")
    if len(lower) == 1:
        await trio.run_process(["mount", "-o", "remount,bind,ro", str(mountpoint)], check=False)


async def _until_unmounted_or_signalled(mountpoint: Path, signals: AsyncIterator[int]) -> None:
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                nursery.cancel_scope.cancel()

        async def watch_mount() -> None:
            while _is_mountpoint(mountpoint):
                await trio.sleep(0.5)
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_signals)
        nursery.start_soon(watch_mount)


def _is_mountpoint(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)
