"""The snapshotter: containerd's snapshot operations over the store (store.py) and the state root
(layout.py), with the semantics of containerd's overlayfs snapshotter and its test suite.

Crash safety, step by step (``failpoints`` mark the steps; tests crash the process at each):

- Prepare/View: in one write transaction, insert the record, create ``snapshots/<id>/{fs,work}`` and
  fsync them, then commit. A crash before the commit leaves a directory without a record: an orphan.
- Commit: the usage walk happens before, the rename of the key and the usage in one transaction.
- Remove: the record is deleted in one transaction; the directory is removed after the commit. A crash
  in between leaves an orphan.
- Cleanup (also run at every start): orphans are renamed aside under the write lock, so no operation
  can hand their name out meanwhile, and deleted afterwards.

So a committed snapshot is never lost, a record never points to a missing directory, and whatever a crash
leaves behind is an orphan that the next start or `Cleanup` removes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from fuse.layers import LayerRequest
from snapshotter import failpoints
from snapshotter.daemon.filters import FilterSet
from snapshotter.daemon.labels import layer_request
from snapshotter.daemon.layout import TRASH_PREFIX, Layout, remove_tree
from snapshotter.daemon.overlay import Mount, snapshot_mounts, supports_index_off
from snapshotter.daemon.store import Kind, Layer, Record, Store
from snapshotter.daemon.usage import Usage, disk_usage
from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger("lazysnap.snapshots")
REMOTE = "remote:"  # backend of a snapshot served from a layer in the FUSE mount: "remote:<layer name>"

#: containerd's limit on one label (labels.Validate): key and value together.
MAX_LABEL_BYTES = 4096
#: Bounds on the walk of an active snapshot's upper dir for `Usage`.
USAGE_MAX_ENTRIES = 500_000
USAGE_TIMEOUT = 5.0


def checked_labels(labels: Mapping[str, str], what: str) -> dict[str, str]:
    """Labels as containerd stores them: empty values dropped; a key and value over 4096 bytes
    together are refused (InvalidArgument), as containerd refuses them."""
    out = {}
    for k, v in labels.items():
        n = len(k.encode()) + len(v.encode())
        if n > MAX_LABEL_BYTES:
            shown = k if len(k) <= 64 else k[:64] + "..."
            raise InvalidArgument(
                f"{what}: label {shown!r} is {n} bytes (key and value), over containerd's limit of "
                f"{MAX_LABEL_BYTES} bytes; shorten it"
            )
        if v != "":
            out[k] = v
    return out


def _adaptor(rec: Record):
    def field(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            return rec.kind.label, True
        if head == "name":
            return rec.key, True
        if head == "parent":
            return rec.parent, True
        if head == "labels":
            if not rec.labels:
                return "", False
            key = ".".join(path[1:])
            return (rec.labels[key], True) if key in rec.labels else ("", False)
        return "", False

    return field


def _candidates(filters: FilterSet) -> list[tuple[str, str, str]] | None:
    """Index lookups that find every snapshot the filters can match, or None for a full scan: each
    filter must have an equality on the name or on a label."""
    if filters.matches_all:
        return None
    out = []
    for f in filters.filters:
        best = None
        for path, value in f.equalities():
            if path == ("name",):
                best = ("name", "", value)
                break
            if len(path) >= 2 and path[0] == "labels" and best is None:
                best = ("label", ".".join(path[1:]), value)
        if best is None:
            return None
        out.append(best)
    return out


class RemoteLayerSource(Protocol):
    """Where remote snapshots' layers come from (the daemon's lazy data path, `lazy.RemoteBridge`):
    called from gRPC threads."""

    def acquire(self, req: LayerRequest, lower: list[str]) -> str | None:
        """The layer's name once mounted, or None: pull it in full instead."""

    def release(self, name: str) -> None: ...

    def path(self, name: str) -> str:
        """The layer's directory (an overlayfs lower dir)."""


class Snapshotter:
    """All snapshot operations; safe to call from many threads at once. With `remote` None, lazy pulls
    are off: every Prepare is an ordinary one."""

    def __init__(self, root: Path, *, index_off: bool | None = None, remote: RemoteLayerSource | None = None):
        self.layout = Layout(root)
        self.layout.ensure()
        self.store = Store(self.layout.db)
        self.index_off = supports_index_off() if index_off is None else index_off
        self.remote = remote

    def close(self) -> None:
        """Close the store; idempotent."""
        self.store.close()

    # --- helpers ------------------------------------------------------------------------------

    def _paths(self, chain: Sequence[Layer]) -> list[str]:
        return [self._path(layer) for layer in chain]

    def _path(self, layer: Layer) -> str:
        """Where a snapshot's files are: its fs dir, or its layer's directory in the FUSE mount."""
        if layer.backend.startswith(REMOTE):
            if self.remote is None:
                raise FailedPrecondition(f"snapshot {layer.id} is a remote layer but lazy loading is off")
            return self.remote.path(layer.backend.removeprefix(REMOTE))
        return str(self.layout.fs(layer.id))

    def _mounts(self, rec: Record, chain: Sequence[Layer]) -> list[Mount]:
        return snapshot_mounts(
            rec.kind,
            str(self.layout.fs(rec.id)),
            str(self.layout.work(rec.id)),
            self._paths(chain),
            index_off=self.index_off,
        )

    def _get(self, key: str, what: str) -> Record:
        rec = self.store.get(key)
        if rec is None:
            raise NotFound(f"{what}: snapshot {key!r} does not exist")
        return rec

    # --- operations ---------------------------------------------------------------------------

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        labels = labels or {}
        req = layer_request(dict(labels)) if self.remote is not None else None
        if req is not None:
            self._claim_remote(key, parent, labels, req)  # AlreadyExists when claimed
        return self._create(Kind.ACTIVE, key, parent, labels)

    def _claim_remote(self, key: str, parent: str, labels: Mapping[str, str], req: LayerRequest) -> None:
        """A lazy pull: mount the layer, record the committed target snapshot, answer AlreadyExists (so
        containerd does not download it). Returns only when the layer is not lazily loadable: then the
        Prepare goes on as for a full pull."""
        what = f"cannot prepare {key!r}"
        exists = AlreadyExists(f"target snapshot {req.target!r}: already exists")
        if self.store.get(req.target) is not None:
            raise exists
        labels = checked_labels(labels, what)
        assert self.remote is not None
        lower: list[str] = []
        if parent:
            found = self.store.get_with_chain(parent)
            if found is None:
                raise NotFound(f"{what}: parent snapshot {parent!r} does not exist")
            parent_rec, chain = found
            lower = self._paths([Layer(parent_rec.id, parent_rec.backend), *chain])
        name = self.remote.acquire(req, lower)
        if name is None:
            return
        try:
            with self.store.write() as tx:
                parent_rec = tx.get(parent) if parent else None
                if parent and (parent_rec is None or parent_rec.kind != Kind.COMMITTED):
                    raise NotFound(f"{what}: parent snapshot {parent!r} does not exist or is not committed")
                if tx.get(req.target) is not None:  # claimed by a concurrent Prepare meanwhile
                    raise exists
                tx.insert(
                    Kind.COMMITTED, req.target, parent_rec, labels, time.time_ns(), backend=REMOTE + name
                )
        except BaseException:
            self.remote.release(name)
            raise
        log.info(
            "lazy layer claimed", extra={"fields": {"target": req.target, "layer": name, "ref": str(req.ref)}}
        )
        raise exists

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels or {})

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        verb = "prepare" if kind == Kind.ACTIVE else "view"
        what = f"cannot {verb} {key!r}"
        if not key:
            raise InvalidArgument(f"cannot {verb} a snapshot: the key is empty")
        labels = checked_labels(labels, what)
        created_dir = None
        try:
            with self.store.write() as tx:
                parent_rec = None
                if parent:
                    parent_rec = tx.get(parent)
                    if parent_rec is None:
                        raise NotFound(f"{what}: parent snapshot {parent!r} does not exist")
                    if parent_rec.kind != Kind.COMMITTED:
                        raise InvalidArgument(
                            f"{what}: parent {parent!r} is {parent_rec.kind.label}, not committed; "
                            "commit it first"
                        )
                if tx.get(key) is not None:
                    raise AlreadyExists(f"{what}: snapshot {key!r} already exists")
                rec = tx.insert(kind, key, parent_rec, labels, time.time_ns())
                failpoints.hit("create.after-insert")
                created_dir = self.layout.dir(rec.id)
                self.layout.create(
                    rec.id,
                    with_work=kind == Kind.ACTIVE,
                    owner_of=Path(self._path(Layer(parent_rec.id, parent_rec.backend)))
                    if parent_rec
                    else None,
                )
                failpoints.hit("create.before-commit")
                chain = tx.chain(rec.parent_id)
        except BaseException:
            if created_dir is not None:
                self.layout.discard(created_dir)
            raise
        failpoints.hit("create.after-commit")
        return self._mounts(rec, chain)

    def mounts(self, key: str) -> list[Mount]:
        found = self.store.get_with_chain(key)
        if found is None:
            raise NotFound(f"cannot get mounts of {key!r}: snapshot does not exist")
        rec, chain = found
        if rec.kind == Kind.COMMITTED:
            raise FailedPrecondition(
                f"cannot get mounts of {key!r}: it is committed; only active and view snapshots are "
                "mounted (prepare or view a child of it)"
            )
        return self._mounts(rec, chain)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        what = f"cannot commit {key!r} as {name!r}"
        if not name:
            raise InvalidArgument(f"cannot commit {key!r}: the name is empty")
        labels = checked_labels(labels or {}, what)
        rec = self._get(key, what)
        # The walk happens outside the write lock: containerd does not write to an active snapshot
        # while committing it, and other operations need not wait for it.
        usage = None
        if rec.kind == Kind.ACTIVE:
            try:
                usage = disk_usage(str(self.layout.fs(rec.id)))
            except FileNotFoundError:  # removed meanwhile: the transaction below says NotFound
                pass
        failpoints.hit("commit.after-usage")
        with self.store.write() as tx:
            current = tx.get(key)
            if current is None:
                raise NotFound(f"{what}: snapshot {key!r} does not exist")
            if tx.get(name) is not None:
                raise AlreadyExists(f"{what}: a snapshot named {name!r} already exists")
            if current.kind != Kind.ACTIVE:
                raise FailedPrecondition(
                    f"{what}: it is {current.kind.label}; only active snapshots can be committed"
                )
            if usage is None or current.id != rec.id:  # removed and prepared again meanwhile
                usage = disk_usage(str(self.layout.fs(current.id)))
            tx.commit_active(current, name, labels, usage.size, usage.inodes, time.time_ns())
            failpoints.hit("commit.before-commit")

    def remove(self, key: str) -> None:
        what = f"cannot remove snapshot {key!r}"
        with self.store.write() as tx:
            rec = tx.get(key)
            if rec is None:
                raise NotFound(f"{what}: it does not exist")
            children = tx.children(rec.id)
            if children:
                shown = ", ".join(repr(c) for c in children[:3]) + (" ..." if len(children) > 3 else "")
                raise FailedPrecondition(
                    f"{what}: it is the parent of {len(children)} snapshot(s) ({shown}); "
                    "remove its children first"
                )
            tx.delete(rec)
            failpoints.hit("remove.before-commit")
        failpoints.hit("remove.after-commit")
        if rec.backend.startswith(REMOTE):
            if self.remote is not None:
                self.remote.release(rec.backend.removeprefix(REMOTE))
            return
        self.layout.discard(self.layout.dir(rec.id))

    def stat(self, key: str) -> Record:
        return self._get(key, "cannot stat")

    def update(self, name: str, labels: Mapping[str, str], paths: Sequence[str]) -> Record:
        what = f"cannot update snapshot {name!r}"
        if not name:
            raise InvalidArgument("cannot update a snapshot: info.name is empty")
        with self.store.write() as tx:
            rec = tx.get(name)
            if rec is None:
                raise NotFound(f"{what}: it does not exist")
            if paths:
                new = dict(rec.labels)
                for path in paths:
                    if path.startswith("labels."):
                        k = path.removeprefix("labels.")
                        new[k] = labels.get(k, "")
                    elif path == "labels":
                        new = dict(labels)
                    else:
                        raise InvalidArgument(
                            f'{what}: field {path!r} cannot be updated; only "labels" and '
                            '"labels.<key>" are mutable'
                        )
            else:
                new = dict(labels)
            updated = tx.set_labels(rec, checked_labels(new, what), time.time_ns())
        return updated

    def list(self, filters: FilterSet) -> Iterator[Record]:
        records = self.store.list(_candidates(filters))
        if filters.matches_all:
            yield from records
            return
        for rec in records:
            if filters.match(_adaptor(rec)):
                yield rec

    def usage(self, key: str) -> Usage:
        rec = self._get(key, "cannot compute usage")
        if rec.kind != Kind.ACTIVE:
            return Usage(rec.size, rec.inodes)
        fs = str(self.layout.fs(rec.id))
        usage = disk_usage(fs, max_entries=USAGE_MAX_ENTRIES, timeout=USAGE_TIMEOUT)
        if not usage.complete:
            log.warning(
                "usage of active snapshot %r is a lower bound: its upper dir %s has more than %d "
                "entries or took over %.0fs to walk",
                key,
                fs,
                USAGE_MAX_ENTRIES,
                USAGE_TIMEOUT,
            )
        return usage

    def cleanup(self) -> list[Path]:
        """Remove directories that belong to no snapshot (left by crashes); returns them."""
        with self.store.write() as tx:
            orphans = self.layout.orphans(tx.ids())
            # Renamed under the write lock: no Prepare can hand out an orphan's id meanwhile.
            moved = [p if p.name.startswith(TRASH_PREFIX) else self.layout.move_aside(p) for p in orphans]
        for path in moved:
            if path is not None:
                remove_tree(path)
        return orphans

    def check(self) -> list[int]:
        """Ids of records whose directory is missing (reported at start; should never happen)."""
        return self.layout.missing(self.store.local_ids())

    def remote_layers(self) -> dict[str, int]:
        """The remote layers snapshots use (name -> number of snapshots), to restore at start."""
        return {b.removeprefix(REMOTE): n for b, n in self.store.backends().items() if b.startswith(REMOTE)}
