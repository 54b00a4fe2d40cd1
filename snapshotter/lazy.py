"""The daemon's lazy data path: chunk cache, fetcher, registry client, one FUSE mount at <root>/mnt and
the remote layers it serves. Started on the trio loop before the daemon answers containerd (remote
layers of existing snapshots are restored from local state first), stopped after it has stopped.

The fetcher and the FUSE server are essential: if either stops on its own (a bug), nobody would answer
the kernel and every reader in every container would hang. Instead the FUSE connection is aborted at
once (readers get ENOTCONN/ECONNABORTED), the mount is detached, new lazy pulls fall back to full
pulls, and `ServingStopped` ends the daemon (systemd restarts it; the restart restores every layer).
Test hook: `LAZYSNAP_FAILPOINTS=fuse.read=error` makes a read's handler fail the way a bug would, which
stops the FUSE server (`ServedFS`, also used by `lazysnap mount`)."""

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
from fuse.fs import MOUNT_OPTIONS, LazyFS, abort_connection, mount_device, raise_read_ahead
from fuse.registry import CredentialStore, HostsConfig, Options, RegistryClient

from . import failpoints
from .config import Config
from .errors import StartupError
from .remote import Fallback, RemoteLayers, RemoteRequest

log = logging.getLogger("lazysnap.lazy")
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
MNT_DETACH = 2
STOP_GRACE = 5.0  # seconds requests in flight may take to finish when the daemon stops


def umount(path: Path | str, flags: int = 0) -> int:
    """umount2(2) itself, not umount(8) (which stats the target: a hang on a FUSE mount nobody serves);
    0 or the errno."""
    if _libc.umount2(os.fsencode(path), flags) == 0:
        return 0
    return ctypes.get_errno()


def innermost(e: BaseException) -> BaseException:
    """The error inside exception groups of one member each (trio wraps a task's error in them)."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


class ServedFS(LazyFS):
    """LazyFS with the `fuse.read` failpoint (a dict check per read when no failpoint is set)."""

    async def read(self, fh, off, size):
        failpoints.hit("fuse.read")
        return await super().read(fh, off, size)


class ServingStopped(RuntimeError):
    """The fetcher or the FUSE server stopped unexpectedly; the FUSE mount has been aborted."""


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
        )
        self._mounted = False
        self._stopping = False
        self._device: str | None = None
        self.failure: str | None = None  # why the fetcher or the FUSE server stopped unexpectedly
        self._fuse_done = trio.Event()

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
        self._device = mount_device(str(self.mountpoint))
        raise_read_ahead(str(self.mountpoint))
        await nursery.start(self._essential, "the fetcher", self.fetcher.run)
        await nursery.start(self._essential, "the FUSE server", self._serve_fuse)
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
        self._stopping = True
        if not self._mounted:
            return
        await self.cache.flush()
        await self.client.aclose()
        pyfuse3.terminate()
        # the session is freed only once pyfuse3.main has returned (a handler still running would answer
        # through a freed session), or after STOP_GRACE: then requests still waiting get ECONNABORTED
        with trio.move_on_after(STOP_GRACE):
            await self._fuse_done.wait()
        self._release_mount()

    async def _essential(self, what: str, fn, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the fetcher or the FUSE server; if it ends while the daemon is not stopping, fail."""
        try:
            await fn(task_status=task_status)
        except Exception as e:
            if self._stopping:
                raise
            cause = innermost(e)
            self._fail(f"{what} stopped unexpectedly: {type(cause).__name__}: {cause}")
            raise ServingStopped(self.failure) from e
        if not self._stopping:
            self._fail(f"{what} stopped unexpectedly")
            raise ServingStopped(self.failure)

    async def _serve_fuse(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await pyfuse3.main()
        finally:
            self._fuse_done.set()
            # pyfuse3.main has returned, so none of its request handlers is left: the session can go
            if self.failure is not None or (not self._stopping and self._mounted):
                self._release_mount()

    def _fail(self, reason: str) -> None:
        """The data path is dead: abort the FUSE connection so that readers get an error instead of a
        hang, and refuse new lazy pulls (they fall back to full pulls) until the daemon restarts."""
        log.error("%s: aborting the FUSE mount %s", reason, self.mountpoint)
        self.failure = reason
        self.layers.stopped = reason
        if self._mounted and self._device is not None:
            abort_connection(self._device)  # when fusectl is mounted; closing /dev/fuse does it anyway

    def _release_mount(self) -> None:
        """Close the session (closing /dev/fuse aborts the connection) and detach the mount."""
        if not self._mounted:
            return
        self._mounted = False
        pyfuse3.close(unmount=True)
        if self.failure is not None and umount(self.mountpoint, MNT_DETACH) == 0:
            # libfuse skips the unmount of a connection aborted through fusectl
            log.error(
                "detached %s: containers on lazy layers get I/O errors until restarted", self.mountpoint
            )

    def _clear_stale_mount(self) -> None:
        """A FUSE mount left by a daemon that died ("transport endpoint is not connected")."""
        with open("/proc/self/mountinfo") as f:
            mounted = any(line.split()[4] == str(self.mountpoint) for line in f)
        if mounted:
            log.warning("detaching the FUSE mount a previous lazysnap left at %s", self.mountpoint)
            err = umount(self.mountpoint, MNT_DETACH)
            if err:
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
