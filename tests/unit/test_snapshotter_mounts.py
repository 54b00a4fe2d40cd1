"""Mounts as containerd's overlayfs snapshotter computes them, and the disk usage walk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from snapshotter.daemon.overlay import Mount, snapshot_mounts, supports_index_off
from snapshotter.daemon.store import Kind
from snapshotter.daemon.usage import disk_usage

FS, WORK = "/r/snapshots/9/fs", "/r/snapshots/9/work"
P1, P2, P3 = "/r/snapshots/8/fs", "/r/snapshots/5/fs", "/r/snapshots/1/fs"


@pytest.mark.parametrize(
    ("kind", "parents", "index_off", "expected"),
    [
        (Kind.ACTIVE, [], True, Mount("bind", FS, ("rw", "rbind"))),
        (Kind.VIEW, [], True, Mount("bind", FS, ("ro", "rbind"))),
        (Kind.VIEW, [P1], True, Mount("bind", P1, ("ro", "rbind"))),
        (
            Kind.ACTIVE,
            [P1],
            True,
            Mount("overlay", "overlay", ("index=off", f"workdir={WORK}", f"upperdir={FS}", f"lowerdir={P1}")),
        ),
        (
            Kind.ACTIVE,
            [P1, P2, P3],
            False,
            Mount("overlay", "overlay", (f"workdir={WORK}", f"upperdir={FS}", f"lowerdir={P1}:{P2}:{P3}")),
        ),
        (Kind.VIEW, [P1, P2], True, Mount("overlay", "overlay", ("index=off", f"lowerdir={P1}:{P2}"))),
        (Kind.VIEW, [P1, P2, P3], False, Mount("overlay", "overlay", (f"lowerdir={P1}:{P2}:{P3}",))),
    ],
)
def test_mounts_table(kind: Kind, parents: list[str], index_off: bool, expected: Mount) -> None:
    assert snapshot_mounts(kind, FS, WORK, parents, index_off=index_off) == [expected]


def test_committed_snapshots_have_no_mounts() -> None:
    with pytest.raises(ValueError):
        snapshot_mounts(Kind.COMMITTED, FS, WORK, [], index_off=True)


def test_long_chains_keep_absolute_paths() -> None:
    parents = [f"/var/lib/lazysnap/snapshots/{i}/fs" for i in range(200, 72, -1)]
    (m,) = snapshot_mounts(Kind.VIEW, FS, WORK, parents, index_off=True)
    assert m.options[-1] == "lowerdir=" + ":".join(parents)  # containerd compacts when mounting


def test_index_off_follows_the_module_parameter(tmp_path: Path) -> None:
    assert not supports_index_off(str(tmp_path / "index"))
    (tmp_path / "index").write_text("N\n")
    assert supports_index_off(str(tmp_path / "index"))


def test_disk_usage_counts_inodes_once_and_allocated_bytes(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    (root / "d" / "e").mkdir(parents=True)
    (root / "big").write_bytes(os.urandom(100_000))
    os.link(root / "big", root / "d" / "hardlink")
    (root / "d" / "small").write_bytes(b"x")
    os.symlink("big", root / "link")
    (root / "sparse").touch()
    os.truncate(root / "sparse", 1 << 30)  # a 1 GiB hole allocates nothing
    u = disk_usage(str(root))
    assert u.complete
    assert u.inodes == 7  # root, d, d/e, big (twice linked), d/small, link, sparse
    blocks = sum(
        os.lstat(p).st_blocks for p in [root, root / "d", root / "d/e", root / "big", root / "d/small"]
    )
    blocks += os.lstat(root / "link").st_blocks + os.lstat(root / "sparse").st_blocks
    assert u.size == blocks * 512
    assert 100_000 <= u.size < 1 << 20


def test_disk_usage_bounded_walk(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"f{i}").touch()
    u = disk_usage(str(tmp_path), max_entries=10)
    assert not u.complete and u.inodes == 10
    assert disk_usage(str(tmp_path)).inodes == 51
