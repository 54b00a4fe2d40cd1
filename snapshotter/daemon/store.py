"""The snapshot metadata store: one SQLite database (`<root>/metadata.db`), the source of truth.

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`)::

    snapshots(id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused; names snapshots/<id>/
              key TEXT UNIQUE,                        -- containerd's key or committed name
              kind INTEGER,                           -- 1 view, 2 active, 3 committed (the proto enum)
              parent_id INTEGER REFERENCES snapshots(id) ON DELETE RESTRICT,
              created_ns, updated_ns INTEGER,         -- Unix nanoseconds
              size, inodes INTEGER,                   -- usage, stored at Commit
              backend TEXT DEFAULT 'local')           -- 'local': snapshots/<id>/fs; room for remote layers
    labels(snapshot_id REFERENCES snapshots(id) ON DELETE CASCADE, name, value, PRIMARY KEY(...))

Parents are linked by id, so committing (which renames the key) keeps every child's link intact.
Later kinds of snapshot (a layer served by the FUSE mount) add their own table keyed by snapshot id,
and a `backend` value, without touching these.

Concurrency: reads use one connection per thread (WAL lets them run beside a writer); writes go
through :meth:`Store.write`, which serializes writers with a lock and holds an ``IMMEDIATE`` transaction,
committed when the block ends and rolled back if it raises. ``synchronous=FULL``: a write transaction
that returned is on disk.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from snapshotter.errors import StartupError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    key         TEXT    NOT NULL UNIQUE,
    kind        INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
    parent_id   INTEGER REFERENCES snapshots(id) ON DELETE RESTRICT,
    created_ns  INTEGER NOT NULL,
    updated_ns  INTEGER NOT NULL,
    size        INTEGER NOT NULL DEFAULT 0,
    inodes      INTEGER NOT NULL DEFAULT 0,
    backend     TEXT    NOT NULL DEFAULT 'local'
);
CREATE INDEX IF NOT EXISTS snapshots_by_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    name        TEXT    NOT NULL,
    value       TEXT    NOT NULL,
    PRIMARY KEY (snapshot_id, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS labels_by_name_value ON labels(name, value);
"""

_SELECT = """
SELECT s.id, s.key, s.kind, s.parent_id, COALESCE(p.key, ''), s.created_ns, s.updated_ns,
       s.size, s.inodes, s.backend,
       (SELECT json_group_object(l.name, l.value) FROM labels l WHERE l.snapshot_id = s.id)
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
"""

_SELECT_WITHOUT_LABELS = """
SELECT s.id, s.key, s.kind, s.parent_id, COALESCE(p.key, ''), s.created_ns, s.updated_ns,
       s.size, s.inodes, s.backend, NULL
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
"""

_BY_LABEL = " WHERE s.id IN (SELECT snapshot_id FROM labels WHERE name = ? AND value = ?)"

_CHAIN = """
WITH RECURSIVE chain(id, parent_id, backend, depth) AS (
    SELECT id, parent_id, backend, 0 FROM snapshots WHERE id = ?
    UNION ALL
    SELECT s.id, s.parent_id, s.backend, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.parent_id
)
SELECT id, backend FROM chain ORDER BY depth
"""


class Kind(IntEnum):
    """Snapshot kinds, numbered as containerd's `Kind` enum on the wire."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def label(self) -> str:
        """The name containerd's filters use: "view", "active", "committed"."""
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Record:
    """One snapshot as stored (what Stat, List and Update report). `parent` is the parent's key
    ("" without one)."""

    id: int
    key: str
    kind: Kind
    parent_id: int | None
    parent: str
    created_ns: int
    updated_ns: int
    size: int = 0
    inodes: int = 0
    backend: str = "local"
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Layer:
    """One snapshot of a parent chain, for building mounts: its id and where its files live."""

    id: int
    backend: str


def _record(row: tuple, labels: dict[str, str] | None = None) -> Record:
    return Record(
        id=row[0],
        key=row[1],
        kind=Kind(row[2]),
        parent_id=row[3],
        parent=row[4],
        created_ns=row[5],
        updated_ns=row[6],
        size=row[7],
        inodes=row[8],
        backend=row[9],
        labels=labels if labels is not None else json.loads(row[10]) if row[10] else {},
    )


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
    )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


class Store:
    """The metadata database. Thread-safe; see the module docstring for the locking rules."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._writer = _connect(path)
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise StartupError(
                f"cannot open the snapshot database {path}: {e}; if it is damaged, restore it from a "
                "backup or move the whole state root aside (containerd will pull the images again)"
            ) from e
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False

    def _migrate(self) -> None:
        conn = self._writer
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StartupError(
                f"{self.path} has schema version {version}, newer than this lazysnap understands "
                f"({SCHEMA_VERSION}): run the lazysnap version that wrote it"
            )
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StartupError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # --- reads ----------------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise RuntimeError("the snapshot store is closed")
            conn = _connect(self.path)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query inside sees the same committed state."""
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def get(self, key: str) -> Record | None:
        row = self._reader().execute(_SELECT + " WHERE s.key = ?", (key,)).fetchone()
        return _record(row) if row else None

    def get_with_chain(self, key: str) -> tuple[Record, list[Layer]] | None:
        """A snapshot and its parents, nearest first, read consistently."""
        with self._read() as conn:
            row = conn.execute(_SELECT + " WHERE s.key = ?", (key,)).fetchone()
            if row is None:
                return None
            rec = _record(row)
            chain = _chain(conn, rec.parent_id)
        return rec, chain

    def list(self, candidates: Iterable[tuple[str, str, str]] | None = None) -> list[Record]:
        """Every snapshot, or those matching any candidate: ("name", "", key) or ("label", k, v)."""
        with self._read() as conn:
            if candidates is None:  # two plain scans beat a labels subquery per row
                labels: dict[int, dict[str, str]] = {}
                for sid, name, value in conn.execute("SELECT snapshot_id, name, value FROM labels"):
                    labels.setdefault(sid, {})[name] = value
                return [_record(r, labels.get(r[0], {})) for r in conn.execute(_SELECT_WITHOUT_LABELS)]
            seen: dict[int, Record] = {}
            for what, name, value in candidates:
                if what == "name":
                    rows = conn.execute(_SELECT + " WHERE s.key = ?", (value,))
                else:
                    rows = conn.execute(_SELECT + _BY_LABEL, (name, value))
                for r in rows:
                    seen.setdefault(r[0], _record(r))
            return list(seen.values())

    def ids(self) -> set[int]:
        return {r[0] for r in self._reader().execute("SELECT id FROM snapshots")}

    def local_ids(self) -> set[int]:
        """Ids of snapshots with a directory under snapshots/ (not served from the FUSE mount)."""
        return {r[0] for r in self._reader().execute("SELECT id FROM snapshots WHERE backend = 'local'")}

    def backends(self) -> dict[str, int]:
        """Each non-local backend ("remote:<layer>") and how many snapshots use it."""
        rows = self._reader().execute(
            "SELECT backend, count(*) FROM snapshots WHERE backend != 'local' GROUP BY backend"
        )
        return {r[0]: r[1] for r in rows}

    def count(self) -> int:
        return self._reader().execute("SELECT count(*) FROM snapshots").fetchone()[0]

    # --- writes ---------------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Tx]:
        """One write transaction; writers run one at a time. Commits at the end of the block."""
        with self._write_lock:
            if self._closed:
                raise RuntimeError("the snapshot store is closed")
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close every connection; idempotent. Waits for a running write transaction."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            self._writer.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()


def _chain(conn: sqlite3.Connection, first: int | None) -> list[Layer]:
    if first is None:
        return []
    return [Layer(i, b) for i, b in conn.execute(_CHAIN, (first,))]


class Tx:
    """Operations inside one write transaction (see :meth:`Store.write`)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def get(self, key: str) -> Record | None:
        row = self.conn.execute(_SELECT + " WHERE s.key = ?", (key,)).fetchone()
        return _record(row) if row else None

    def chain(self, first: int | None) -> list[Layer]:
        return _chain(self.conn, first)

    def children(self, snapshot_id: int) -> list[str]:
        return [
            r[0] for r in self.conn.execute("SELECT key FROM snapshots WHERE parent_id = ?", (snapshot_id,))
        ]

    def ids(self) -> set[int]:
        return {r[0] for r in self.conn.execute("SELECT id FROM snapshots")}

    def insert(
        self,
        kind: Kind,
        key: str,
        parent: Record | None,
        labels: Mapping[str, str],
        now_ns: int,
        backend: str = "local",
    ) -> Record:
        cur = self.conn.execute(
            "INSERT INTO snapshots (key, kind, parent_id, created_ns, updated_ns, backend) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (key, int(kind), parent.id if parent else None, now_ns, now_ns, backend),
        )
        snapshot_id = cur.lastrowid
        assert snapshot_id is not None
        self._put_labels(snapshot_id, labels)
        return Record(
            id=snapshot_id,
            key=key,
            kind=kind,
            parent_id=parent.id if parent else None,
            parent=parent.key if parent else "",
            created_ns=now_ns,
            updated_ns=now_ns,
            backend=backend,
            labels=dict(labels),
        )

    def commit_active(
        self, rec: Record, name: str, labels: Mapping[str, str], size: int, inodes: int, now_ns: int
    ) -> Record:
        """Turn an active snapshot into a committed one named `name`; same id, same directory."""
        self.conn.execute(
            "UPDATE snapshots SET key = ?, kind = ?, created_ns = ?, updated_ns = ?, size = ?, inodes = ? "
            "WHERE id = ?",
            (name, int(Kind.COMMITTED), now_ns, now_ns, size, inodes, rec.id),
        )
        self.conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (rec.id,))
        self._put_labels(rec.id, labels)
        updated = self.get(name)
        assert updated is not None
        return updated

    def set_labels(self, rec: Record, labels: Mapping[str, str], now_ns: int) -> Record:
        self.conn.execute("UPDATE snapshots SET updated_ns = ? WHERE id = ?", (now_ns, rec.id))
        self.conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (rec.id,))
        self._put_labels(rec.id, labels)
        updated = self.get(rec.key)
        assert updated is not None
        return updated

    def delete(self, rec: Record) -> None:
        self.conn.execute("DELETE FROM snapshots WHERE id = ?", (rec.id,))

    def _put_labels(self, snapshot_id: int, labels: Mapping[str, str]) -> None:
        if labels:
            self.conn.executemany(
                "INSERT INTO labels (snapshot_id, name, value) VALUES (?, ?, ?)",
                [(snapshot_id, k, v) for k, v in labels.items()],
            )
