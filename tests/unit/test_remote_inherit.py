"""Implicit directories of a lazy layer take their attributes from the layers below as overlayfs merges
them, and never through a symlink: a lower layer's `x -> /host/dir` must not give the served `x/inner`
the host directory's mode, owner and mtime (issue 12, item 7)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fuse.formats import build_index
from fuse.formats.index import GZIP
from fuse.layers import _inherit

HOST_MODE, HOST_UID, HOST_GID, HOST_MTIME = 0o701, 4242, 4343, 1_234_567_890_000_000_000


def index(*entries: dict):
    return build_index({"version": 1, "entries": list(entries)}, data_end=10_000, storage=GZIP, what="test")


def reg(name: str) -> dict:
    return {"name": name, "type": "reg", "size": 0, "mode": 0o644}


def served(ix, path: str) -> tuple[int, int, int, int]:
    st = ix.stat(ix.find(path))
    return st.mode, st.uid, st.gid, st.mtime_ns


@pytest.fixture
def host_dir(tmp_path: Path) -> Path:
    """A host directory with a distinctive `inner` subdirectory that no layer may ever show."""
    host = tmp_path / "host"
    (host / "inner").mkdir(parents=True)
    os.chmod(host / "inner", HOST_MODE)
    os.chown(host / "inner", HOST_UID, HOST_GID)
    os.utime(host / "inner", ns=(HOST_MTIME, HOST_MTIME))
    return host


def make_dir(path: Path, mode: int, uid: int, gid: int, mtime_ns: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    os.chown(path, uid, gid)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_symlink_on_disk_below_is_not_followed_to_the_host(tmp_path: Path, host_dir: Path) -> None:
    lower = tmp_path / "lower"  # a local snapshot's fs dir: layer 1 has x -> /host/dir
    lower.mkdir()
    (lower / "x").symlink_to(host_dir)
    make_dir(lower / "y", 0o750, 7, 8, 1_600_000_000_000_000_000)  # an ordinary directory below
    ix = index(reg("x/inner/k"), reg("y/z/k"), reg("y/k"))
    inherited = _inherit(ix, [str(lower)])
    # x is a symlink below: this layer's x/ replaces it and nothing below x/ shows through
    assert served(ix, "x/inner") == (0o755, 0, 0, 0)
    assert served(ix, "x") == (0o755, 0, 0, 0)
    assert "x/inner" not in inherited
    # an ordinary directory below is still inherited
    assert served(ix, "y") == (0o750, 7, 8, 1_600_000_000_000_000_000)
    assert served(ix, "y/z") == (0o755, 0, 0, 0)  # nothing below


def test_lazy_layer_below_is_read_from_its_index(tmp_path: Path, host_dir: Path) -> None:
    """A lazy layer below is resolved in its TOC index, not through a path (where its FUSE directory
    would show the symlink `x` and the kernel would follow it to the host)."""
    fuse_dir = tmp_path / "mnt" / "sha256-lower"  # what the FUSE mount shows for the layer below
    fuse_dir.mkdir(parents=True)
    (fuse_dir / "x").symlink_to(host_dir)
    below = index(
        {"name": "x", "type": "symlink", "linkName": str(host_dir)},
        {"name": "y/", "type": "dir", "mode": 0o750, "uid": 7, "gid": 8},
    )
    ix = index(reg("x/inner/k"), reg("y/k"))
    _inherit(ix, [str(fuse_dir)], {str(fuse_dir): below}, str(tmp_path / "mnt"))
    assert served(ix, "x/inner") == (0o755, 0, 0, 0)
    assert served(ix, "y")[:3] == (0o750, 7, 8)


def test_overlay_semantics_of_the_layers_below(tmp_path: Path) -> None:
    """Nearest layer first; an opaque directory or a whiteout hides what the farther layers have."""
    near, far = tmp_path / "near", tmp_path / "far"
    make_dir(far / "a" / "b", 0o711, 1, 1, 1)
    make_dir(far / "c" / "d", 0o711, 2, 2, 2)
    make_dir(far / "e", 0o700, 3, 3, 3)
    make_dir(near / "a", 0o755, 0, 0, 4)
    os.setxattr(near / "a", "trusted.overlay.opaque", b"y")  # a/ is opaque in the near layer
    make_dir(near / "c", 0o755, 0, 0, 5)
    os.mknod(near / "c" / "d", 0o600 | 0o020000, os.makedev(0, 0))  # whiteout of c/d
    make_dir(near / "e", 0o770, 9, 9, 6)
    ix = index(reg("a/b/k"), reg("c/d/k"), reg("e/k"))
    _inherit(ix, [str(near), str(far)])
    assert served(ix, "a/b") == (0o755, 0, 0, 0)  # hidden by the opaque a/
    assert served(ix, "c/d") == (0o755, 0, 0, 0)  # whited out
    assert served(ix, "e") == (0o770, 9, 9, 6)  # the nearest layer's directory
