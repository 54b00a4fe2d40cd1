"""Start-up checks of `lazysnap serve` that a test host cannot stage for real: a kernel without
overlayfs, a host without /dev/fuse."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from snapshotter.daemon.main import check_kernel, lock_root
from snapshotter.errors import StartupError

WITH_OVERLAY = "nodev\tsysfs\nnodev\ttmpfs\n\text4\nnodev\toverlay\nnodev\tfuse\n"


def test_overlayfs_missing_is_fatal(tmp_path: Path) -> None:
    fs = tmp_path / "filesystems"
    fs.write_text(WITH_OVERLAY.replace("nodev\toverlay\n", ""))
    with pytest.raises(StartupError, match="modprobe overlay"):
        check_kernel(fs, tmp_path)


def test_fuse_missing_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fs = tmp_path / "filesystems"
    fs.write_text(WITH_OVERLAY)
    with caplog.at_level(logging.WARNING, logger="lazysnap"):
        check_kernel(fs, tmp_path / "no-fuse")
    assert "modprobe fuse" in caplog.text
    caplog.clear()
    check_kernel(fs, tmp_path)
    assert caplog.text == ""


def test_one_daemon_per_root(tmp_path: Path) -> None:
    fd = lock_root(tmp_path)
    try:
        with pytest.raises(StartupError, match=r"in use by another lazysnap \(pid \d+\)"):
            lock_root(tmp_path)
    finally:
        os.close(fd)
    os.close(lock_root(tmp_path))  # free again once released
