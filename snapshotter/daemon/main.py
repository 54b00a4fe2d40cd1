"""`lazysnap serve`: checks the host, opens the state root, serves gRPC on a unix socket until SIGINT or
SIGTERM, then stops gracefully (no new RPCs, in-flight ones finish, exit 0).

Start-up fails with a message saying what to fix when overlayfs is missing or refuses the state root's
filesystem as upper layer, the state root is not a writable directory (or is a non-empty directory that
is not a lazysnap root), another lazysnap uses the root, or the socket belongs to a live server; a stale
socket file (nobody listening) is replaced. A missing /dev/fuse is only a warning until lazy layers
arrive. Orphaned snapshot directories left by a crash are removed before the socket opens.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import logging
import os
import signal
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from fuse.layers import SLOTS_FILE
from snapshotter import __version__, failpoints, host, logs, sdnotify
from snapshotter.daemon import handover
from snapshotter.daemon.config import DEFAULT_CONFIG, Config, load
from snapshotter.daemon.layout import remove_tree
from snapshotter.daemon.lazy import LazyRuntime, RemoteBridge, ServingStopped
from snapshotter.daemon.snapshots import RemoteLayerSource, Snapshotter
from snapshotter.errors import ConfigError, StartupError

if TYPE_CHECKING:
    from snapshotter.daemon.cri import CriProxy
    from snapshotter.daemon.unixgrpc import UnixServer

log = logging.getLogger("lazysnap.daemon")

WORKERS = 16  # gRPC handler threads: containerd unpacks several layers at once, CRI polls Stat/Usage
SHUTDOWN_GRACE = 8.0  # seconds in-flight RPCs get to finish after SIGTERM


def check_kernel(filesystems: Path = Path("/proc/filesystems"), fuse: Path = Path("/dev/fuse")) -> None:
    try:
        names = {line.split()[-1] for line in filesystems.read_text().splitlines() if line.strip()}
    except OSError as e:
        raise StartupError(f"cannot read {filesystems} to check for overlayfs: {e.strerror}") from None
    if "overlay" not in names:
        raise StartupError(
            f"overlayfs is not available: 'overlay' is missing from {filesystems}; "
            "load it with `modprobe overlay` (lazysnap mounts every snapshot with it)"
        )
    if not fuse.exists():
        log.warning(
            "%s is missing: lazily loaded layers will need FUSE (`modprobe fuse`); "
            "ordinary snapshots work without it",
            fuse,
        )


#: What a state root may hold before lazysnap first uses it (a dedicated filesystem's lost+found).
OWN_ENTRIES = {
    "lost+found",
    "metadata.db",
    "metadata.db-wal",
    "metadata.db-shm",
    "snapshots",
    "lock",
    SLOTS_FILE,
    handover.SESSION_FILE,
}
OVERLAY_CHECK_PREFIX = ".overlay-check-"


def prepare_root(root: Path) -> None:
    """Create the state root (0700) or check an existing one; fail if it cannot be written."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise StartupError(f"state root {root} is not a directory; choose another --root") from None
    except OSError as e:
        raise StartupError(f"cannot create state root {root}: {e.strerror}; choose another --root") from None
    if not root.is_dir():
        raise StartupError(f"state root {root} is not a directory; choose another --root")
    foreign = sorted(set(os.listdir(root)) - OWN_ENTRIES)
    if foreign and not (root / "metadata.db").exists():
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise StartupError(
            f"state root {root} is not empty ({shown}) and holds no lazysnap state; "
            "choose a new or empty directory (lazysnap makes it private, mode 0700)"
        )
    try:
        fd, probe = tempfile.mkstemp(dir=root, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StartupError(
            f"state root {root} is not writable ({e.strerror}); fix its permissions or mount, "
            "or choose another --root"
        ) from None
    mode = stat.S_IMODE(root.stat().st_mode)
    if mode != 0o700:
        log.info("setting state root %s to mode 0700 (was %04o)", root, mode)
        os.chmod(root, 0o700)


def check_overlay_on(root: Path, index_off: bool) -> None:
    """Mount a tiny overlay with its upper dir in the state root, as containerd's overlayfs snapshotter
    checks at start: a root on a filesystem overlayfs rejects as upper layer fails here, clearly, and
    not later in every container start. Skipped (with a warning) when not running as root."""
    for stale in root.glob(OVERLAY_CHECK_PREFIX + "*"):  # left by a crash during this check
        host.umount(stale / "merged", host.MNT_DETACH)
        remove_tree(stale)
    if os.geteuid() != 0:
        log.warning(
            "not running as root: skipping the overlayfs check of %s; containerd mounts as root", root
        )
        return
    with tempfile.TemporaryDirectory(prefix=OVERLAY_CHECK_PREFIX, dir=root) as tmp:
        d = Path(tmp)
        for name in ("lower", "upper", "work", "merged"):
            (d / name).mkdir()
        options = f"lowerdir={d}/lower,upperdir={d}/upper,workdir={d}/work"
        if index_off:
            options = "index=off," + options
        try:
            host.mount("overlay", d / "merged", "overlay", 0, options)
        except OSError as e:
            raise StartupError(
                f"overlayfs cannot use state root {root} for its upper directories ({os.strerror(e.errno)}); "
                "put the root on ext4, xfs (ftype=1) or btrfs, not on overlayfs, tmpfs without xattrs "
                "or a network filesystem"
            ) from None
        host.umount(d / "merged")


def lock_root(root: Path) -> int:
    """Hold an exclusive lock on ``<root>/lock`` for the life of the process (one daemon per root)."""
    path = root / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StartupError(
            f"state root {root} is in use by another lazysnap (pid {holder}); "
            "stop it or choose another --root"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.root = Path(config.root)
        self.address = Path(config.address)
        self.snapshotter: Snapshotter | None = None
        self.server: UnixServer | None = None
        self._lock_fd: int | None = None
        self.stopping = threading.Event()
        self.cri: CriProxy | None = None  # the CRI image service proxy, when cri_address is set

    def start(self) -> None:
        """Everything before listening, then listening (tests and tools without the lazy path)."""
        self.prepare()
        self.listen()

    def prepare(self, remote: RemoteLayerSource | None = None) -> None:
        """Checks, state root, store, orphans: everything before the socket opens."""
        check_kernel()
        prepare_root(self.root)
        self._lock_fd = lock_root(self.root)
        self.snapshotter = Snapshotter(self.root, remote=remote)
        check_overlay_on(self.root, self.snapshotter.index_off)
        removed = self.snapshotter.cleanup()
        if removed:
            log.info(
                "removed %d orphaned snapshot directories left by an interrupted run",
                len(removed),
                extra={"fields": {"dirs": ",".join(p.name for p in removed)}},
            )
        missing = self.snapshotter.check()
        if missing:
            log.warning(
                "%d snapshots have no directory (removed by hand?): %s; containerd will fail to mount them",
                len(missing),
                ",".join(map(str, missing)),
            )

    def listen(self) -> None:
        """Open the socket (0600) and serve."""
        assert self.snapshotter is not None
        from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
        from snapshotter.daemon.service import SnapshotsService
        from snapshotter.daemon.unixgrpc import UnixServer

        service = SnapshotsService(self.snapshotter)
        self.server = UnixServer(
            self.address,
            workers=WORKERS,
            thread_prefix="rpc",
            register=lambda server: snapshots_pb2_grpc.add_SnapshotsServicer_to_server(service, server),
        )
        log.info(
            "serving",
            extra={
                "fields": {
                    "version": __version__,
                    "address": str(self.address),
                    "root": str(self.root),
                    "snapshots": self.snapshotter.store.count(),
                    "index_off": self.snapshotter.index_off,
                    "pid": os.getpid(),
                }
            },
        )

    def stop(self) -> None:
        """Stop accepting RPCs, let in-flight ones finish (up to SHUTDOWN_GRACE), release everything."""
        if self.server is not None:
            self.server.stop(SHUTDOWN_GRACE)
        if self.snapshotter is not None:
            self.snapshotter.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.server is not None:
            log.info("stopped")


def serve(config: Config) -> int:
    """Run the daemon until SIGINT/SIGTERM; 0 after a clean stop, 1 if it could not start."""
    logs.setup(config.log_level, config.log_format)
    os.umask(0o077)  # the database and anything else lazysnap writes is for root alone
    failpoints.load_from_environment()
    return trio.run(_serve, config)


async def _serve(config: Config) -> int:
    """One trio loop: the FUSE mount and its layers live on it; gRPC handlers run in their threads and
    call into it. Remote layers are restored before the socket opens, so containerd never sees a
    snapshot whose files are not served. If the data path dies (`ServingStopped`: its FUSE connection is
    already aborted, so readers get errors rather than hang), the rest is released and the daemon exits
    1 with one line; systemd restarts it and the restart restores every layer."""
    daemon = Daemon(config)
    runtime: list[LazyRuntime] = []  # the lazy data path, once started
    try:
        return await _run(config, daemon, runtime)
    except* ServingStopped as group:
        reason = group.exceptions[0]
    print(f"lazysnap serve: the data path stopped: {reason}", file=sys.stderr)
    log.error("the data path stopped: %s; exiting", reason)
    await _shutdown(daemon, runtime[0] if runtime else None)
    return 1


async def _run(config: Config, daemon: Daemon, runtime: list[LazyRuntime]) -> int:
    lazy: LazyRuntime | None = None
    keep = False  # leave the mount to the next daemon
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            try:
                lazy = LazyRuntime(config)
                runtime.append(lazy)
                old = handover.predecessor()
                if old is not None:  # an upgrade: ready; the old daemon stops, then we take over
                    _services()
                    await handover.replace(old)
                daemon.prepare(RemoteBridge(lazy.layers, trio.lowlevel.current_trio_token()))
                assert daemon.snapshotter is not None
                await lazy.start(nursery, daemon.snapshotter.remote_layers(), old)
                cri, metrics, status = await trio.to_thread.run_sync(_services)
                daemon.listen()
                if config.metrics_address:
                    metrics.serve(config.metrics_address, daemon.snapshotter, lazy)
                await nursery.start(
                    status.serve_status,
                    status.socket_path(config.root),
                    functools.partial(status.status_document, lazy, daemon.snapshotter),
                )
                if config.cri_address:
                    daemon.cri = cri.start(config, lazy.client.credentials.pulled)
                sdnotify.notify({"READY": "1"})
            except (StartupError, OSError) as e:
                print(f"lazysnap serve: cannot start: {e}", file=sys.stderr)
                # A mount taken over, or kept by a holder, stays for the next start: containers on it
                # must not pay for this start's failure
                await _shutdown(daemon, lazy, keep=lazy is not None and (lazy.adopted or lazy.kept))
                nursery.cancel_scope.cancel()
                return 1
            async for signum in signals:
                if signum == signal.SIGHUP:  # upgrade: hand the mount to a new copy of the daemon
                    conn = lazy.mount.connection
                    if conn is None or await handover.start_successor(conn) is None:
                        continue
                # SIGTERM (systemd's stop and restart) leaves the mount to the next daemon when a
                # holder keeps it; SIGINT (Ctrl-C, `lazysnap supervise` stopping) unmounts
                keep = signum == signal.SIGHUP or (signum == signal.SIGTERM and lazy.kept)
                log.info("%s received: stopping", signal.Signals(signum).name)
                break
            if signum != signal.SIGHUP:  # after a hand-over the successor is the main process:
                sdnotify.notify({"STOPPING": "1"})  # systemd would stop the unit, successor included

            async def report_more() -> None:
                async for again in signals:
                    log.info("%s received again: already stopping", signal.Signals(again).name)

            nursery.start_soon(report_more)
            await _shutdown(daemon, lazy, keep=keep)
            if keep:
                # Readers wait until the next daemon serves; it starts serving when this process is
                # gone. Everything is saved (store closed, cache flushed, lock released): go now
                # rather than after tens of milliseconds of interpreter teardown.
                logging.shutdown()
                os._exit(0)
            nursery.cancel_scope.cancel()
    return 0


def _services():
    """The modules of gRPC, HTTP and metrics, imported only once the FUSE mount is served, and off the
    trio loop: they are most of the start-up time, which readers wait for when a daemon restarts."""
    import snapshotter.api.containerd.services.snapshots.v1.snapshots_pb2_grpc  # noqa: F401 (listen)
    import snapshotter.daemon.service  # noqa: F401 (listen)
    from snapshotter.daemon import cri, metrics, status

    return cri, metrics, status


async def _shutdown(daemon: Daemon, lazy: LazyRuntime | None, *, keep: bool = False) -> None:
    """gRPC first (in-flight RPCs may still need the loop), then the FUSE mount (left to the next
    daemon when `keep`)."""
    with trio.CancelScope(shield=True):
        if daemon.cri is not None:  # kubelet's door first: no new pulls
            await trio.to_thread.run_sync(daemon.cri.stop)
        await trio.to_thread.run_sync(daemon.stop)
        if lazy is not None:
            await lazy.stop(keep=keep)


def add_arguments(serve: argparse.ArgumentParser) -> None:
    """The arguments of `lazysnap serve`."""
    serve.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file (default /etc/lazysnap/config.toml when it exists)",
    )
    serve.add_argument("--root", metavar="DIR", help="state root (default /var/lib/lazysnap)")
    serve.add_argument("--address", metavar="SOCKET", help="socket (default /run/lazysnap/lazysnap.sock)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")


def run(args: argparse.Namespace) -> int:
    """`lazysnap serve`: 2 for a bad configuration, else what `serve` returns."""
    try:
        if args.config:
            config = load(args.config)
        else:
            config = load(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else Config()
        config = config.with_overrides(root=args.root, address=args.address, log_level=args.log_level)
    except ConfigError as e:
        print(f"lazysnap serve: {e}", file=sys.stderr)
        return 2
    return serve(config)
