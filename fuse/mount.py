"""The FUSE mount, assembled in one place for `lazysnap serve` and `lazysnap mount`: `FuseMount` (pyfuse3
start and stop, adopting a connection an earlier process kept alive, stale mounts, read-ahead, aborting
a dead connection), and the mount table parsed from /proc/self/mountinfo (mount(2) and umount2(2) are
`fuse.syscalls`'s). fuse/ imports nothing from snapshotter/, so `snapshotter.host` builds on these
rather than repeating them."""

from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from . import connection
from .connection import Connection
from .fetch import Fetcher
from .fs import MOUNT_OPTIONS
from .syscalls import MNT_DETACH, umount

log = logging.getLogger("lazysnap.mount")
MOUNTINFO = "/proc/self/mountinfo"
FUSE_CONNECTIONS = "/sys/fs/fuse/connections"  # fusectl: one directory per connection, named by device
_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    device: str  # "major:minor"
    mountpoint: str  # octal escapes of mountinfo decoded
    fstype: str


def mount_table() -> list[MountEntry]:
    """The mounts of this mount namespace, in mountinfo order. Read from mountinfo, never stat(): a stat
    of a FUSE mount that nobody answers (or that this very process serves) would hang."""
    with open(MOUNTINFO, "rb") as f:
        lines = f.read().splitlines()
    entries = []
    for line in lines:
        fields = line.split(b" ")
        dash = fields.index(b"-") if b"-" in fields else len(fields) - 1
        point = _ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), fields[4])
        fstype = fields[dash + 1].decode(errors="replace") if dash + 1 < len(fields) else ""
        entries.append(MountEntry(fields[2].decode(), os.fsdecode(point), fstype))
    return entries


def mount_points() -> list[str]:
    return [e.mountpoint for e in mount_table()]


def is_mountpoint(path: Path | str) -> bool:
    return str(path) in mount_points()


def mount_device(mountpoint: Path | str) -> str | None:
    """The "major:minor" device of the mount at `mountpoint`, or None when nothing is mounted there."""
    return next((e.device for e in mount_table() if e.mountpoint == str(mountpoint)), None)


def abort_connection(device: str) -> bool:
    """Abort the FUSE connection of `device` ("major:minor", from mount_device): every request waiting
    for an answer and every later one fails (ECONNABORTED/ENOTCONN) instead of hanging. False when the
    fusectl filesystem is not mounted or the connection is gone."""
    major, _, minor = device.partition(":")
    try:
        with open(f"{FUSE_CONNECTIONS}/{int(major) << 20 | int(minor)}/abort", "w") as f:
            f.write("1")
        return True
    except (OSError, ValueError):
        return False


def raise_read_ahead(mountpoint: Path | str, kb: int = 1024) -> bool:
    """Let the kernel read ahead `kb` on the mount (1 MiB requests instead of 128 KiB: +41% measured
    for sequential first reads, shared/reference/pyfuse3-facts.md). False when it cannot be set."""
    dev = mount_device(mountpoint)
    if dev is None:
        log.warning("cannot raise read-ahead: %s is not mounted", mountpoint)
        return False
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
        return True
    except OSError as e:
        log.warning("cannot raise read-ahead on %s (%s): %s", mountpoint, path, e)
        return False


def innermost(e: BaseException) -> BaseException:
    """The error inside exception groups of one member each (trio wraps a task's error in them)."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


class MountFailed(RuntimeError):
    """The FUSE mount cannot be made; the message says where, why and what to do."""


class ServingStopped(RuntimeError):
    """The fetcher or the FUSE server stopped unexpectedly; the FUSE connection has been aborted."""


class FuseMount:
    """The one pyfuse3 mount of this process (pyfuse3 allows one), serving `fs` with its fetcher: the data
    path's start and stop for both `lazysnap serve` and `lazysnap mount`.

    `mount()` detaches a stale mount a dead process left at the mountpoint, mounts FUSE (our own
    /dev/fuse descriptor, `fuse.connection`) and raises the read-ahead; `adopt(conn)` serves instead a
    live connection an earlier process mounted (kept by a descriptor holder), asking the kernel to resend
    what that process left unanswered. `serve()` runs the fetcher and pyfuse3's loop; both are essential:
    if either ends while not stopping (a bug), nobody would answer the kernel and every reader would hang,
    so the connection is aborted at once (readers get ENOTCONN/ECONNABORTED), `on_failure` is told why,
    the mount is detached and ServingStopped is raised. `stop()` ends pyfuse3's loop, waits up to `grace`
    for the handlers in flight, closes the session and unmounts; `stop(keep=True)` leaves mount and
    connection to the holder and the next process (readers wait, requests unanswered are resent)."""

    def __init__(self, fs: pyfuse3.Operations, fetcher: Fetcher, mountpoint: Path, on_failure=None):
        self.fs, self.fetcher, self.mountpoint = fs, fetcher, Path(mountpoint)
        self.on_failure = on_failure
        self.failure: str | None = None  # why serving stopped unexpectedly
        self.stopping = False
        self.keep = False  # stop() leaves the connection alive (a holder has a copy)
        self.mounted = False
        self.device: str | None = None
        self.connection: Connection | None = None
        self._done = trio.Event()

    def mount(self) -> Connection:
        if is_mountpoint(self.mountpoint):
            log.warning("detaching the FUSE mount a previous lazysnap left at %s", self.mountpoint)
            err = umount(self.mountpoint, MNT_DETACH)
            if err:
                raise MountFailed(f"cannot detach the stale mount at {self.mountpoint}: {os.strerror(err)}")
        self.mountpoint.mkdir(mode=0o700, exist_ok=True)
        try:
            conn = connection.mount(self.mountpoint, MOUNT_OPTIONS)
        except OSError as e:
            hint = "run as root" if e.errno == errno.EPERM else "is /dev/fuse there (modprobe fuse)?"
            raise MountFailed(f"cannot mount FUSE at {self.mountpoint}: {e.strerror}; {hint}") from None
        try:
            self._start_session(conn, adopting=False)
        except MountFailed:
            umount(self.mountpoint, MNT_DETACH)
            conn.close()
            raise
        raise_read_ahead(self.mountpoint)
        return conn

    def adopt(self, conn: Connection) -> None:
        """Serve the live connection `conn` (the kernel's mount at our mountpoint, kept by a holder)."""
        self._start_session(conn, adopting=True)

    def _start_session(self, conn: Connection, *, adopting: bool) -> None:
        feeder = connection.Feeder(conn, adopting=adopting)
        self.fs.on_init = feeder.switch
        try:
            pyfuse3.init(self.fs, feeder.path, [])
        except RuntimeError as e:
            raise MountFailed(f"cannot serve the FUSE mount at {self.mountpoint}: {e}") from None
        self.connection = conn
        self.mounted = True
        self.device = mount_device(self.mountpoint)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._essential, "the fetcher", self.fetcher.run)
            await nursery.start(self._essential, "the FUSE server", self._main)
            task_status.started()

    async def stop(self, grace: float, *, keep: bool = False) -> None:
        self.stopping = True
        self.keep = keep
        if not self.mounted:
            return
        pyfuse3.terminate()
        # the session is freed only once pyfuse3.main has returned (a handler still running would answer
        # through a freed session), or after `grace`: then requests still waiting get ECONNABORTED
        with trio.move_on_after(grace):
            await self._done.wait()
        self.release()

    def release(self) -> None:
        """Close the session and, unless kept, unmount (closing the last /dev/fuse descriptor aborts the
        connection); idempotent."""
        if not self.mounted:
            return
        self.mounted = False
        failed = self.failure is not None or not self.stopping
        if failed and self.device is not None:
            abort_connection(self.device)  # waiting readers get an error, and the unmounts cannot hang
        if self.keep and not failed:
            # The session stays open until the process exits (a handler still running may yet answer;
            # what is left unanswered is resent to the next daemon): nothing may free it under them.
            log.info("left the FUSE mount %s to the next lazysnap (readers wait for it)", self.mountpoint)
            return
        pyfuse3.close(unmount=False)  # libfuse never mounted it: the unmount is ours
        if self.connection is not None:
            self.connection.close()
        if umount(self.mountpoint) not in (0, errno.EINVAL, errno.ENOENT):  # busy: detach it
            if umount(self.mountpoint, MNT_DETACH) == 0 and self.failure is not None:
                log.error("detached %s: readers of its layers get I/O errors", self.mountpoint)

    async def _main(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await pyfuse3.main()
        finally:
            self._done.set()
            # pyfuse3.main has returned, so none of its request handlers is left: the session can go
            if self.failure is not None or not self.stopping:
                self.release()

    async def _essential(self, what: str, fn, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await fn(task_status=task_status)
        except Exception as e:
            if self.stopping:
                raise
            cause = innermost(e)
            self._fail(f"{what} stopped unexpectedly: {type(cause).__name__}: {cause}")
            raise ServingStopped(self.failure) from e
        if not self.stopping:
            self._fail(f"{what} stopped unexpectedly")
            raise ServingStopped(self.failure)

    def _fail(self, reason: str) -> None:
        log.error("%s: aborting the FUSE mount %s", reason, self.mountpoint)
        self.failure = self.failure or reason
        if self.on_failure is not None:
            self.on_failure(self.failure)
        if self.mounted and self.device is not None:
            abort_connection(self.device)  # when fusectl is mounted; closing /dev/fuse does it anyway
