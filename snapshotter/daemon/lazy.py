"""The daemon's lazy data path: chunk cache, fetcher, registry client, one FUSE mount at <root>/mnt and
the remote layers it serves. Started on the trio loop before the daemon answers containerd (remote
layers of existing snapshots are restored from local state first), stopped after it has stopped.

The mount itself is `fuse.mount.FuseMount` (shared with `lazysnap mount`): if the fetcher or the FUSE
server stops on its own (a bug), the FUSE connection is aborted at once (readers get
ENOTCONN/ECONNABORTED), the mount is detached, new lazy pulls fall back to full pulls, and
`ServingStopped` ends the daemon (systemd restarts it; the restart restores every layer).
Test hook: `LAZYSNAP_FAILPOINTS=fuse.read=error` makes a read's handler fail the way a bug would, which
stops the FUSE server (`ServedFS`, also used by `lazysnap mount`)."""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from fuse.cache import ChunkCache
from fuse.fetch import Fetcher, FetchOptions
from fuse.fs import LazyFS
from fuse.layers import Fallback, LayerRequest, RemoteLayers
from fuse.mount import FuseMount, MountFailed, ServingStopped
from fuse.registry import CredentialStore, HostsConfig, Options, RegistryClient
from fuse.registry.credentials import PullCredentials
from snapshotter import failpoints
from snapshotter.daemon import handover
from snapshotter.daemon.config import Config
from snapshotter.errors import StartupError

__all__ = ["LazyRuntime", "RemoteBridge", "ServedFS", "ServingStopped"]

log = logging.getLogger("lazysnap.lazy")
STOP_GRACE = 5.0  # seconds requests in flight may take to finish when the daemon stops
KEEP_GRACE = 0.02  # the same when the next daemon takes the mount over (it gets the rest resent)
FLUSH_GRACE = 3.0  # seconds a stop spends writing chunks still waiting for the disk cache


class ServedFS(LazyFS):
    """LazyFS with the `fuse.read` failpoint (a dict check per read when no failpoint is set)."""

    async def read(self, fh, off, size):
        failpoints.hit("fuse.read")
        return await super().read(fh, off, size)


class LazyRuntime:
    def __init__(self, config: Config):
        self.config = config
        self.root = Path(config.root)
        self.mountpoint = self.root / "mnt"
        self.client = RegistryClient(
            hosts=HostsConfig(Path(config.hosts_dir) if config.hosts_dir else None),
            credentials=CredentialStore(
                Path(config.docker_config) if config.docker_config else None,
                # credentials of kubelet's pulls, kept by the CRI proxy (snapshotter.daemon.cri)
                pulled=PullCredentials(config.cri_credentials_ttl) if config.cri_address else None,
            ),
            options=Options(max_connections=max(config.fetch_concurrency, 1)),
        )
        self.cache = ChunkCache(config.cache_path, config.size("cache_limit"), fsync=False)
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
        self.fs = ServedFS(self.fetcher)
        self.layers = RemoteLayers(
            self.root,
            self.mountpoint,
            self.fs,
            self.fetcher,
            self.client,
            open_timeout=config.open_timeout,
            background=config.background,
            prefetch_program=config.prefetch_program,
        )
        self.mount = FuseMount(self.fs, self.fetcher, self.mountpoint, on_failure=self._failed)
        self.adopted = False  # this process took over the previous daemon's live mount
        self.kept = False  # a descriptor holder keeps the mount alive when this process ends
        self.lost: str | None = None  # why the previous daemon's live mount could not be taken over
        self.resend = True  # the kernel resends what a dead daemon left unanswered (fuse.connection)

    @property
    def failure(self) -> str | None:
        """Why the fetcher or the FUSE server stopped unexpectedly, if they did."""
        return self.mount.failure

    async def start(
        self, nursery: trio.Nursery, remote_refs: dict[str, int], old: handover.Predecessor | None = None
    ) -> None:
        """Mount FUSE, or take over the live mount the previous daemon kept (`handover`; `old` when
        upgrading), restore the layers existing snapshots use (name -> users), start fetching. A
        taken-over mount is served before its layers are restored: requests wait for their layer."""
        await self.cache.open()
        conn, self.lost = handover.take(self.root, self.mountpoint, old)
        try:
            if conn is not None:
                self.mount.adopt(conn)
                self.adopted = True
                self.kept = handover.held()
            else:
                conn = self.mount.mount()
                self.kept = handover.keep(self.root, conn, self.mount.device)
        except MountFailed as e:
            raise StartupError(str(e)) from None
        self.resend = conn.resend_supported
        if self.kept and not self.resend:
            log.error(
                "this kernel lacks FUSE_NOTIFY_RESEND (Linux 6.9 or later): a read the daemon has taken "
                "when it is killed stays blocked after the restart (planned stops wait for their reads)"
            )
        await nursery.start(self.mount.serve)
        await nursery.start(self.layers.run)
        failed = await self.layers.restore(remote_refs)
        if failed:
            log.error(
                "%d remote layers could not be restored (their stored TOC is missing or damaged): %s; "
                "containers on them fail until the images are pulled again",
                len(failed),
                ", ".join(failed),
            )

    async def stop(self, *, keep: bool = False) -> None:
        """Stop serving. With `keep` (a holder or a successor has the connection) the mount is left to
        the next daemon: requests in flight get `KEEP_GRACE`, what is left unanswered is resent to it.
        Otherwise in-flight requests get `STOP_GRACE` and the mount goes, holder or not."""
        with trio.move_on_after(FLUSH_GRACE):  # while still serving: chunks read lately reach the disk
            await self.fetcher.flush()
        if keep:  # the registry client stays open: handlers still running must not fail for it
            await self.cache.flush()
            # without FUSE_NOTIFY_RESEND nothing left unanswered would ever be answered: let it finish
            await self.mount.stop(KEEP_GRACE if self.resend else STOP_GRACE, keep=True)
            return
        if self.kept:
            handover.forget()
        if self.mount.mounted:
            await self.cache.flush()
            await self.client.aclose()  # fetches in flight fail now: their readers get EIO at once
        await self.mount.stop(STOP_GRACE)

    def _failed(self, reason: str) -> None:
        """The data path is dead: refuse new lazy pulls (they fall back to full pulls) until a restart."""
        self.layers.stopped = reason


class RemoteBridge:
    """What the snapshotter (gRPC threads) calls: each call runs on the trio loop."""

    def __init__(self, layers: RemoteLayers, token: trio.lowlevel.TrioToken):
        self.layers, self.token = layers, token

    def acquire(self, req: LayerRequest, lower: list[str]) -> str | None:
        """The layer's name once mounted, or None: pull it in full (the reason is logged and counted)."""
        try:
            return trio.from_thread.run(self.layers.acquire, req, lower, trio_token=self.token)
        except Fallback:
            return None

    def release(self, name: str) -> None:
        trio.from_thread.run_sync(self.layers.release, name, trio_token=self.token)

    def path(self, name: str) -> str:
        return self.layers.path(name)
