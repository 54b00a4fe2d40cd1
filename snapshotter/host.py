"""The host calls of the control plane, in one place: mount(2) and umount2(2), the mount table,
PR_SET_PDEATHSIG (systemd's protocols are `snapshotter.sdnotify`'s). libc, mount(2) and umount2(2) are
`fuse.syscalls`'s and mountinfo parsing `fuse.mount`'s (the data path cannot import this package),
re-exported here so the rest of snapshotter/ asks only this module."""

from __future__ import annotations

import logging
from pathlib import Path

from fuse.mount import is_mountpoint, mount_points
from fuse.syscalls import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    libc,
    mount,
    umount,
)

__all__ = [
    "MNT_DETACH",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "is_mountpoint",
    "mount",
    "mount_points",
    "mounts_under",
    "set_death_signal",
    "umount",
]

log = logging.getLogger("lazysnap.host")
PR_SET_PDEATHSIG = 1


def mounts_under(path: Path | str) -> list[str]:
    """Mount points at or below `path`."""
    top = str(path)
    return [p for p in mount_points() if p == top or p.startswith(top + "/")]


def set_death_signal(signum: int) -> None:
    """The kernel sends this process `signum` when the thread that forked it exits (prctl(2))."""
    libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
