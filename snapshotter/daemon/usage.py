"""Disk usage of a snapshot directory: bytes allocated (st_blocks * 512) and distinct inodes.

Counted as containerd counts it (continuity's DiskUsage): every inode below and including the root once,
hard links once. The walk can be bounded by an entry count and a deadline, for `Usage` of active
snapshots, which containerd's CRI plugin calls often; `Commit` walks without bounds and stores the result.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int
    complete: bool = True  # False: a bound was hit, the figures are lower bounds


def disk_usage(root: str, *, max_entries: int | None = None, timeout: float | None = None) -> Usage:
    """Usage of the tree at `root` (not following symlinks, not crossing into other filesystems)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    st = os.lstat(root)
    dev = st.st_dev
    size = st.st_blocks * 512
    inodes = 1
    linked: set[int] = set()  # inode numbers of multiply-linked non-directories already counted
    pending = [root] if stat.S_ISDIR(st.st_mode) else []
    while pending:
        path = pending.pop()
        try:
            entries = os.scandir(path)
        except FileNotFoundError:  # removed while walking
            continue
        with entries:
            for entry in entries:
                try:
                    est = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if est.st_dev != dev:
                    continue
                if stat.S_ISDIR(est.st_mode):
                    pending.append(entry.path)
                elif est.st_nlink > 1:
                    if est.st_ino in linked:
                        continue
                    linked.add(est.st_ino)
                size += est.st_blocks * 512
                inodes += 1
                if max_entries is not None and inodes >= max_entries:
                    return Usage(size, inodes, complete=False)
        if deadline is not None and time.monotonic() > deadline:
            return Usage(size, inodes, complete=False)
    return Usage(size, inodes)
