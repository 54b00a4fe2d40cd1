"""The state root on disk and the directory steps of every snapshot operation.

    <root>/metadata.db          the store (see store.py)
    <root>/lock                 flock'ed by the running daemon: one daemon per root
    <root>/snapshots/<id>/fs    a snapshot's files (the overlay upper dir of an active snapshot)
    <root>/snapshots/<id>/work  overlayfs's work dir (active snapshots only)
    <root>/snapshots/trash-*    directories being removed

Snapshot keys never appear in paths (they hold namespaces, slashes and spaces): only numeric ids do.
A directory is created and made durable (fsync) before its record is committed, and removed only after
its record is gone. Anything under ``snapshots/`` whose name is not the id of a record is therefore an
orphan of an interrupted operation, and :meth:`Layout.orphans` finds it for removal.
"""

from __future__ import annotations

import logging
import os
import stat
import uuid
from pathlib import Path

log = logging.getLogger("lazysnap.layout")

TRASH_PREFIX = "trash-"


class Layout:
    def __init__(self, root: Path):
        self.root = root
        self.snapshots = root / "snapshots"
        self.db = root / "metadata.db"

    def ensure(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.snapshots.mkdir(mode=0o700, exist_ok=True)

    def dir(self, snapshot_id: int) -> Path:
        return self.snapshots / str(snapshot_id)

    def fs(self, snapshot_id: int) -> Path:
        return self.snapshots / str(snapshot_id) / "fs"

    def work(self, snapshot_id: int) -> Path:
        return self.snapshots / str(snapshot_id) / "work"

    def create(self, snapshot_id: int, *, with_work: bool, owner_of: Path | None) -> None:
        """Make ``snapshots/<id>/fs`` (0755, owned like `owner_of`, the parent's fs) and, for an
        active snapshot, ``work`` (0711); durable when this returns. A directory already there is an
        orphan left by a crash (ids of rolled-back records are handed out again) and is replaced."""
        path = self.dir(snapshot_id)
        if os.path.lexists(path):
            log.warning("replacing orphaned directory %s left by an interrupted operation", path)
            self.discard(path)
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # exact modes whatever the umask
        os.mkdir(path / "fs", 0o755)
        os.chmod(path / "fs", 0o755)
        if with_work:
            os.mkdir(path / "work", 0o711)
            os.chmod(path / "work", 0o711)
        if owner_of is not None:
            st = os.stat(owner_of)
            os.lchown(path / "fs", st.st_uid, st.st_gid)
        _fsync_dir(path)
        _fsync_dir(self.snapshots)

    def move_aside(self, path: Path) -> Path | None:
        """Rename a directory to a fresh ``trash-`` name (atomic: its id is free at once, and a crash
        leaves an orphan). Returns the new path, or None if `path` does not exist."""
        trash = self.snapshots / f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot move %s aside for removal: %s", path, e)
            return path
        return trash

    def discard(self, path: Path) -> None:
        """Remove a snapshot directory: move it aside, then delete it. Failures are logged, not
        raised: Cleanup or the next start retries."""
        if path.name.startswith(TRASH_PREFIX):
            remove_tree(path)
            return
        trash = self.move_aside(path)
        if trash is not None:
            remove_tree(trash)

    def orphans(self, ids: set[int]) -> list[Path]:
        """Entries of ``snapshots/`` that belong to no record."""
        found = []
        with os.scandir(self.snapshots) as entries:
            for entry in entries:
                if not (entry.name.isdigit() and int(entry.name) in ids):
                    found.append(Path(entry.path))
        return sorted(found)

    def missing(self, ids: set[int]) -> list[int]:
        """Ids of records whose directory is gone (should never happen; reported at start)."""
        return sorted(i for i in ids if not self.fs(i).is_dir())


def remove_tree(top: Path) -> bool:
    """Delete a directory tree without following symlinks or descending into another filesystem
    (a mount left inside is skipped and reported). True if everything is gone."""
    try:
        top_st = os.lstat(top)
    except FileNotFoundError:
        return True
    if not stat.S_ISDIR(top_st.st_mode):
        os.unlink(top)
        return True
    complete = True
    stack: list[tuple[str, bool]] = [(os.fspath(top), False)]
    while stack:
        path, visited = stack.pop()
        if visited:
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                complete = False
                log.warning("cannot remove %s: %s", path, e)
            continue
        stack.append((path, True))
        try:
            entries = list(os.scandir(path))
        except FileNotFoundError:
            continue
        except OSError as e:
            complete = False
            log.warning("cannot list %s for removal: %s", path, e)
            continue
        for entry in entries:
            try:
                est = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(est.st_mode):
                    if est.st_dev != top_st.st_dev:
                        complete = False
                        log.warning("not removing %s: another filesystem is mounted there", entry.path)
                        continue
                    stack.append((entry.path, False))
                else:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                complete = False
                log.warning("cannot remove %s: %s", entry.path, e)
    return complete


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
