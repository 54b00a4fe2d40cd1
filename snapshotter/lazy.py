"""The daemon's lazy data path: chunk cache, fetcher, registry client, one FUSE mount at <root>/mnt and
the remote layers it serves. Started on the trio loop before the daemon answers containerd (remote
layers of existing snapshots are restored from local state first), stopped after it has stopped."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from pathlib import Path

import pyfuse3
import trio

from fuse.cache import ChunkCache
from fuse.fetch import Fetcher, FetchOptions
from fuse.fs import MOUNT_OPTIONS, LazyFS, raise_read_ahead
from fuse.registry import CredentialStore, HostsConfig, Options, RegistryClient

from .config import Config
from .errors import StartupError
from .remote import Fallback, RemoteLayers, RemoteRequest

log = logging.getLogger("lazysnap.lazy")
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
MNT_DETACH = 2


class LazyRuntime:
    def __init__(self, config: Config):
        self.config = config
        self.root = Path(config.root)
        self.mountpoint = self.root / "mnt"
        self.client = RegistryClient(
            hosts=HostsConfig(Path(config.hosts_dir) if config.hosts_dir else None),
            credentials=CredentialStore(Path(config.docker_config) if config.docker_config else None),
            options=Options(max_connections=max(config.fetch_concurrency, 1)),
        )
        self.cache = ChunkCache(config.cache_path, config.size("cache_limit"))
        self.fetcher = Fetcher(
            self.cache,
            FetchOptions(
                merge_cap=config.size("merge_cap"),
                read_timeout=config.read_timeout,
                per_host=config.fetch_concurrency,
                prefetch=config.prefetch,
                background=config.background,
                background_rate=float(config.size("background_rate")),
                read_ahead=config.size("read_ahead"),
            ),
        )
        self.fs = LazyFS(self.fetcher)
        self.layers = RemoteLayers(
            self.root,
            self.mountpoint,
            self.fs,
            self.fetcher,
            self.client,
            open_timeout=config.open_timeout,
            background=config.background,
        )
        self._mounted = False

    async def start(self, nursery: trio.Nursery, remote_refs: dict[str, int]) -> None:
        """Mount FUSE, restore the layers existing snapshots use (name -> users), start fetching."""
        await self.cache.open()
        self._clear_stale_mount()
        self.mountpoint.mkdir(mode=0o700, exist_ok=True)
        try:
            pyfuse3.init(self.fs, str(self.mountpoint), list(MOUNT_OPTIONS))
        except RuntimeError as e:
            raise StartupError(
                f"cannot mount FUSE at {self.mountpoint}: {e}; is /dev/fuse there (modprobe fuse)?"
            ) from None
        self._mounted = True
        raise_read_ahead(str(self.mountpoint))
        await nursery.start(self.fetcher.run)
        nursery.start_soon(pyfuse3.main)
        await nursery.start(self.layers.run)
        failed = await self.layers.restore(remote_refs)
        if failed:
            log.error(
                "%d remote layers could not be restored (their stored TOC is missing or damaged): %s; "
                "containers on them fail until the images are pulled again",
                len(failed),
                ", ".join(failed),
            )

    async def stop(self) -> None:
        if not self._mounted:
            return
        await self.cache.flush()
        await self.client.aclose()
        pyfuse3.terminate()
        pyfuse3.close(unmount=True)
        self._mounted = False

    def _clear_stale_mount(self) -> None:
        """A FUSE mount left by a daemon that died ("transport endpoint is not connected")."""
        with open("/proc/self/mountinfo") as f:
            mounted = any(line.split()[4] == str(self.mountpoint) for line in f)
        if mounted:
            log.warning("detaching the FUSE mount a previous lazysnap left at %s", self.mountpoint)
            if _libc.umount2(os.fsencode(self.mountpoint), MNT_DETACH) != 0:
                err = ctypes.get_errno()
                raise StartupError(f"cannot detach the stale mount at {self.mountpoint}: {os.strerror(err)}")


class RemoteBridge:
    """What the snapshotter (gRPC threads) calls: each call runs on the trio loop."""

    def __init__(self, layers: RemoteLayers, token: trio.lowlevel.TrioToken):
        self.layers, self.token = layers, token

    def acquire(self, req: RemoteRequest, lower: list[str]) -> str | None:
        """The layer's name once mounted, or None: pull it in full (the reason is logged and counted)."""
        try:
            return trio.from_thread.run(self.layers.acquire, req, lower, trio_token=self.token)
        except Fallback:
            return None

    def release(self, name: str) -> None:
        trio.from_thread.run_sync(self.layers.release, name, trio_token=self.token)

    def path(self, name: str) -> str:
        return self.layers.path(name)
