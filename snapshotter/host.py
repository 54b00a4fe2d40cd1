"""The host calls of the control plane, in one place: mount(2) and umount2(2), the mount table,
PR_SET_PDEATHSIG (systemd's protocols are `snapshotter.sdnotify`'s). libc and mountinfo parsing are
`fuse.mount`'s (the data path cannot import this package), re-exported here so the rest of snapshotter/
asks only this module."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from fuse.mount import MNT_DETACH, is_mountpoint, libc, mount_points, umount

__all__ = [
    "MNT_DETACH",
    "is_mountpoint",
    "mount",
    "mount_points",
    "mounts_under",
    "set_death_signal",
    "umount",
]

log = logging.getLogger("lazysnap.host")
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
PR_SET_PDEATHSIG = 1


def mount(
    source: str, target: Path | str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    """mount(2); OSError naming what was mounted where, and why not."""
    result = libc.mount(
        os.fsencode(source),
        os.fsencode(target),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or source} on {target}: {os.strerror(err)}")


def mounts_under(path: Path | str) -> list[str]:
    """Mount points at or below `path`."""
    top = str(path)
    return [p for p in mount_points() if p == top or p.startswith(top + "/")]


def set_death_signal(signum: int) -> None:
    """The kernel sends this process `signum` when the thread that forked it exits (prctl(2))."""
    libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
