"""The system calls lazysnap makes through libc, in one place: the process's one handle on libc,
mount(2) and umount2(2) with their flags. The data path uses them (the FUSE mount, `fuse.connection`);
`snapshotter.host` re-exports them for the control plane."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
MNT_DETACH = 2


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


def umount(path: Path | str, flags: int = 0) -> int:
    """umount2(2) itself, not umount(8) (which stats the target: a hang on a FUSE mount nobody serves);
    0 or the errno."""
    if libc.umount2(os.fsencode(path), flags) == 0:
        return 0
    return ctypes.get_errno()
