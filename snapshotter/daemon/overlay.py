"""The mounts a snapshot is used through, exactly as containerd's overlayfs snapshotter returns them.

| snapshot                         | mounts                                                            |
|----------------------------------|-------------------------------------------------------------------|
| active or view, no parent        | ``bind`` of its own fs dir, options ``rw``/``ro`` and ``rbind``    |
| view with one parent             | ``bind`` of the parent's fs dir, ``ro``, ``rbind``                 |
| active with parents              | ``overlay``: ``index=off`` (if the kernel has it), ``workdir=``,   |
|                                  | ``upperdir=``, ``lowerdir=`` nearest parent first                  |
| view with two or more parents    | ``overlay`` with only ``lowerdir=`` (read-only by construction)    |

Paths are absolute and never shortened: containerd compacts an over-long ``lowerdir`` itself when it
mounts (chdir to the common parent and relative paths).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from snapshotter.daemon.store import Kind

OVERLAY_INDEX_PARAMETER = "/sys/module/overlay/parameters/index"


@dataclass(frozen=True)
class Mount:
    """One entry of containerd's `[]mount.Mount` (the target is chosen by whoever mounts it)."""

    type: str
    source: str
    options: tuple[str, ...]


def supports_index_off(parameter: str = OVERLAY_INDEX_PARAMETER) -> bool:
    """Whether overlayfs knows the `index` option, as containerd decides it (the module parameter)."""
    return os.path.exists(parameter)


def snapshot_mounts(
    kind: Kind, fs: str, work: str, parents: Sequence[str], *, index_off: bool
) -> list[Mount]:
    """The mounts of a snapshot whose own directories are `fs`/`work`, over `parents` (the fs dirs
    of its parent chain, nearest first)."""
    if kind == Kind.COMMITTED:
        raise ValueError("committed snapshots are not mounted directly")
    if not parents:
        return [Mount("bind", fs, ("ro" if kind == Kind.VIEW else "rw", "rbind"))]
    if kind == Kind.VIEW and len(parents) == 1:
        return [Mount("bind", parents[0], ("ro", "rbind"))]
    options = ["index=off"] if index_off else []
    if kind == Kind.ACTIVE:
        options += [f"workdir={work}", f"upperdir={fs}"]
    options.append("lowerdir=" + ":".join(parents))
    return [Mount("overlay", "overlay", tuple(options))]
