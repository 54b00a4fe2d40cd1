"""The persistent job queue of `lazysnap convertd`: SQLite in WAL mode, one row per image to convert.

A **job** is one manifest (or index) digest in one repository of one registry: the dedup key is
``(registry, repository, digest)``, so repeated push events for the same content convert it once. Each
job has the **tags** it was pushed under, each with the registry's event timestamp (``pushed_at``, in
nanoseconds): the first pending tag is the one the conversion pushes ``<tag><suffix>`` for; further tags
of an already converted digest are only re-tagged (the accelerated manifest is PUT under another tag).

Job states: ``queued`` (waiting, possibly for a retry at ``next_at``), ``running``, ``done``, ``failed``
(retries exhausted or a permanent error; ``reason`` says why), ``skipped`` (nothing to convert: already
accelerated, not an image, deleted, superseded). Tag states: ``pending``, ``done``, ``superseded`` (a newer
push moved the tag to another digest before this one was converted), ``skipped``.

Ordering of tags: the registry does not promise to deliver events in order, and re-sends an event whose
delivery failed. A push is applied only when its timestamp is newer than what the queue knows for that
job and tag, and a job's tag is dropped as superseded when another job holds the same tag with a newer
push. Together with the worker running at most one job per tag at a time, ``<tag><suffix>`` ends up
converted from the newest content pushed as ``<tag>``.

Crash safety: every change is one transaction (``BEGIN IMMEDIATE``), committed with
``synchronous=FULL``; an event is answered 200 only after its transaction committed. Jobs found
``running`` at start were interrupted by a crash and are queued again (the attempt counts, so an image
that crashes the daemon every time ends as failed).

All methods are synchronous and take ``now`` (unix seconds) from the caller; convertd calls them from one
worker thread at a time (the connection is shared, not used concurrently).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATES = ("queued", "running", "done", "failed", "skipped")
TAG_STATES = ("pending", "done", "superseded", "skipped")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    options TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    result_digest TEXT,
    result_media_type TEXT,
    bytes_in INTEGER NOT NULL DEFAULT 0,
    bytes_out INTEGER NOT NULL DEFAULT 0,
    seconds REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (registry, repository, digest)
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, next_at);
CREATE TABLE IF NOT EXISTS tags (
    job_id INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    pushed_at INTEGER NOT NULL,
    state TEXT NOT NULL,
    event_id TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, tag)
);
CREATE INDEX IF NOT EXISTS tags_by_name ON tags (tag);
"""


class QueueError(RuntimeError):
    """The queue database cannot be opened or used; the message says which file and what to do."""


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` in all; the wait before attempt n+1 is backoff * multiplier**(n-1), at most max_backoff."""

    attempts: int = 5
    backoff: float = 10.0
    max_backoff: float = 600.0
    multiplier: float = 2.0

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after the `failed_attempts`-th failed attempt (1-based)."""
        exponent = max(0, failed_attempts - 1)
        try:
            value = self.backoff * self.multiplier**exponent
        except OverflowError:
            value = self.max_backoff
        return min(self.max_backoff, value)


@dataclass(frozen=True)
class Push:
    """One accepted push event: a tagged manifest or index to convert with `options`."""

    registry: str
    repository: str
    digest: str
    media_type: str
    tag: str
    pushed_at: int  # event timestamp, nanoseconds since the epoch
    options: dict[str, Any]
    event_id: str = ""


@dataclass(frozen=True)
class Tag:
    tag: str
    pushed_at: int
    state: str


@dataclass
class Job:
    id: int
    registry: str
    repository: str
    digest: str
    media_type: str
    options: dict[str, Any]
    state: str
    attempts: int
    next_at: float
    reason: str
    result_digest: str | None
    result_media_type: str | None
    bytes_in: int
    bytes_out: int
    seconds: float
    created: float
    updated: float
    tags: list[Tag] = field(default_factory=list)

    @property
    def pending_tags(self) -> list[Tag]:
        return [t for t in self.tags if t.state == "pending"]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "registry": self.registry,
            "repository": self.repository,
            "digest": self.digest,
            "media_type": self.media_type,
            "state": self.state,
            "attempts": self.attempts,
            "reason": self.reason,
            "next_attempt": _iso(self.next_at) if self.state == "queued" else None,
            "result_digest": self.result_digest,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 3),
            "created": _iso(self.created),
            "updated": _iso(self.updated),
            "options": self.options,
            "tags": [{"tag": t.tag, "state": t.state} for t in self.tags],
        }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class JobStore:
    """The queue database at `path` (created with its schema when missing)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
            self._db.row_factory = sqlite3.Row
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise QueueError(
                    f"{path}: SQLite refused WAL mode ({mode}); put the state dir on a local disk"
                )
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise QueueError(
                    f"{path}: the job database has schema version {version}, newer than this convertd "
                    f"({SCHEMA_VERSION}); run a newer lazysnap or move the state dir away"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise QueueError(f"cannot open the job database {path}: {e}") from e

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- accepting events ---------------------------------------------------------------------------

    def enqueue(self, pushes: Sequence[Push], now: float) -> list[str]:
        """Record push events in one transaction. For each: "accepted" (new work: a new job, a new tag,
        or a failed/skipped job re-armed by a newer push) or "duplicate" (nothing new)."""
        outcomes = []
        with self._transaction() as db:
            for push in pushes:
                outcomes.append(self._enqueue_one(db, push, now))
        return outcomes

    def _enqueue_one(self, db: sqlite3.Connection, p: Push, now: float) -> str:
        row = db.execute(
            "SELECT id, state FROM jobs WHERE registry=? AND repository=? AND digest=?",
            (p.registry, p.repository, p.digest),
        ).fetchone()
        if row is None:
            cur = db.execute(
                "INSERT INTO jobs (registry, repository, digest, media_type, options, state, next_at, "
                "created, updated) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
                (p.registry, p.repository, p.digest, p.media_type, json.dumps(p.options), now, now, now),
            )
            db.execute(
                "INSERT INTO tags (job_id, tag, pushed_at, state, event_id) VALUES (?, ?, ?, 'pending', ?)",
                (cur.lastrowid, p.tag, p.pushed_at, p.event_id),
            )
            return "accepted"
        job_id, state = row["id"], row["state"]
        tag = db.execute(
            "SELECT pushed_at, state FROM tags WHERE job_id=? AND tag=?", (job_id, p.tag)
        ).fetchone()
        if tag is not None and tag["pushed_at"] >= p.pushed_at:
            return "duplicate"  # a re-sent event, or an older one delivered late
        in_hand = tag is not None and (
            tag["state"] == "done" or (tag["state"] == "pending" and state in ("queued", "running"))
        )  # converted, or about to be; a failed or skipped job is re-armed by a newer push below
        if in_hand and not self._newer_elsewhere(
            db, job_id, p.registry, p.repository, p.tag, tag["pushed_at"]
        ):
            # the same content pushed again under the same tag, and nothing else in between
            db.execute("UPDATE tags SET pushed_at=? WHERE job_id=? AND tag=?", (p.pushed_at, job_id, p.tag))
            return "duplicate"
        db.execute(
            "INSERT INTO tags (job_id, tag, pushed_at, state, event_id) VALUES (?, ?, ?, 'pending', ?) "
            "ON CONFLICT (job_id, tag) DO UPDATE SET pushed_at=excluded.pushed_at, state='pending', "
            "event_id=excluded.event_id",
            (job_id, p.tag, p.pushed_at, p.event_id),
        )
        if state in ("done", "failed", "skipped"):
            db.execute(
                "UPDATE jobs SET state='queued', attempts=0, reason='', next_at=?, updated=? WHERE id=?",
                (now, now, job_id),
            )
        return "accepted"

    @staticmethod
    def _newer_elsewhere(
        db: sqlite3.Connection, job_id: int, registry: str, repository: str, tag: str, pushed_at: int
    ) -> bool:
        """Whether another job of the repository holds `tag` from a push newer than `pushed_at`."""
        return (
            db.execute(
                "SELECT 1 FROM tags t JOIN jobs j ON j.id = t.job_id WHERE t.tag=? AND t.job_id<>? "
                "AND j.registry=? AND j.repository=? AND t.pushed_at>? LIMIT 1",
                (tag, job_id, registry, repository, pushed_at),
            ).fetchone()
            is not None
        )

    # --- the worker's side --------------------------------------------------------------------------

    def recover(self, now: float, policy: RetryPolicy) -> int:
        """At start: jobs left `running` by a crash are queued again (or failed when out of attempts).
        Returns how many were found."""
        with self._transaction() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE state='running'").fetchall()
            for row in rows:
                if row["attempts"] >= policy.attempts:
                    db.execute(
                        "UPDATE jobs SET state='failed', reason=?, updated=? WHERE id=?",
                        (
                            f"convertd stopped during attempt {row['attempts']} of {policy.attempts} "
                            "(crashed or killed); push the image again to retry",
                            now,
                            row["id"],
                        ),
                    )
                else:
                    db.execute(
                        "UPDATE jobs SET state='queued', next_at=?, reason=?, updated=? WHERE id=?",
                        (now, "interrupted: convertd stopped during the conversion", now, row["id"]),
                    )
        return len(rows)

    def claim(self, now: float, busy: set[tuple[str, str, str]] | frozenset = frozenset()) -> Job | None:
        """Take the next due job whose pending tags are not `busy` ((registry, repository, tag) being
        worked on), mark it running and count the attempt. Tags superseded by newer pushes of other
        digests are dropped on the way; a job left with none ends as done (or skipped)."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE state='queued' AND next_at<=? ORDER BY next_at, id", (now,)
            ).fetchall()
            for row in rows:
                job = self._job(db, row)
                for t in job.pending_tags:
                    if self._newer_elsewhere(db, job.id, job.registry, job.repository, t.tag, t.pushed_at):
                        db.execute(
                            "UPDATE tags SET state='superseded' WHERE job_id=? AND tag=?", (job.id, t.tag)
                        )
                job.tags = self._tags(db, job.id)
                if not job.pending_tags:
                    if job.result_digest:
                        db.execute("UPDATE jobs SET state='done', updated=? WHERE id=?", (now, job.id))
                    else:
                        db.execute(
                            "UPDATE jobs SET state='skipped', reason=?, updated=? WHERE id=?",
                            ("superseded: every tag was pushed again with other content", now, job.id),
                        )
                    continue
                if any((job.registry, job.repository, t.tag) in busy for t in job.pending_tags):
                    continue
                db.execute(
                    "UPDATE jobs SET state='running', attempts=attempts+1, updated=? WHERE id=?",
                    (now, job.id),
                )
                job.state, job.attempts, job.updated = "running", job.attempts + 1, now
                return job
        return None

    def next_due(self) -> float | None:
        """When the earliest queued job is due (unix seconds), or None when nothing is queued."""
        row = self._db.execute("SELECT MIN(next_at) FROM jobs WHERE state='queued'").fetchone()
        return row[0]

    def set_result(self, job_id: int, result_digest: str, media_type: str, **stats: float) -> None:
        """Record the converted image (before its other tags are re-tagged), so a crash after this does
        not convert again. `stats`: bytes_in, bytes_out, seconds."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET result_digest=?, result_media_type=?, bytes_in=?, bytes_out=?, seconds=? "
                "WHERE id=?",
                (
                    result_digest,
                    media_type,
                    int(stats.get("bytes_in", 0)),
                    int(stats.get("bytes_out", 0)),
                    float(stats.get("seconds", 0.0)),
                    job_id,
                ),
            )

    def clear_result(self, job_id: int) -> None:
        """Forget the converted image (it was deleted from the registry): the next run converts again."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET result_digest=NULL, result_media_type=NULL WHERE id=?", (job_id,))

    def tag_done(self, job_id: int, tag: Tag) -> None:
        """`tag`'s accelerated tag is pushed; unless a newer push of the same tag arrived meanwhile."""
        with self._transaction() as db:
            db.execute(
                "UPDATE tags SET state='done' WHERE job_id=? AND tag=? AND pushed_at=? AND state='pending'",
                (job_id, tag.tag, tag.pushed_at),
            )

    def finish(self, job_id: int, now: float) -> str:
        """The run succeeded: done, or queued again when tags arrived during it. Returns the state."""
        with self._transaction() as db:
            pending = db.execute(
                "SELECT 1 FROM tags WHERE job_id=? AND state='pending' LIMIT 1", (job_id,)
            ).fetchone()
            state = "queued" if pending else "done"
            db.execute(
                "UPDATE jobs SET state=?, attempts=CASE WHEN ?='queued' THEN 0 ELSE attempts END, reason='', "
                "next_at=?, updated=? WHERE id=?",
                (state, state, now, now, job_id),
            )
        return state

    def skip(self, job_id: int, reason: str, now: float) -> None:
        """Nothing to convert (already accelerated, not an image, deleted): final, with the reason."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state='skipped', reason=?, updated=? WHERE id=?", (reason, now, job_id)
            )
            db.execute("UPDATE tags SET state='skipped' WHERE job_id=? AND state='pending'", (job_id,))

    def fail(
        self, job_id: int, reason: str, now: float, policy: RetryPolicy, *, permanent: bool = False
    ) -> str:
        """An attempt failed: queued for a retry after the policy's backoff, or failed when the attempts
        are used up (or the error is permanent). Returns the new state."""
        with self._transaction() as db:
            row = db.execute("SELECT attempts FROM jobs WHERE id=?", (job_id,)).fetchone()
            attempts = row["attempts"]
            if permanent or attempts >= policy.attempts:
                db.execute(
                    "UPDATE jobs SET state='failed', reason=?, updated=? WHERE id=?", (reason, now, job_id)
                )
                return "failed"
            db.execute(
                "UPDATE jobs SET state='queued', reason=?, next_at=?, updated=? WHERE id=?",
                (
                    f"attempt {attempts} of {policy.attempts} failed, retrying: {reason}",
                    now + policy.delay(attempts),
                    now,
                    job_id,
                ),
            )
            return "queued"

    def release(self, job_id: int, now: float) -> None:
        """Give a running job back (convertd is stopping): queued, the interrupted attempt not counted."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state='queued', attempts=MAX(0, attempts-1), next_at=?, updated=? "
                "WHERE id=? AND state='running'",
                (now, now, job_id),
            )

    # --- reading ------------------------------------------------------------------------------------

    def get(self, job_id: int) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return self._job(self._db, row) if row else None

    def find(self, registry: str, repository: str, digest: str) -> Job | None:
        row = self._db.execute(
            "SELECT * FROM jobs WHERE registry=? AND repository=? AND digest=?",
            (registry, repository, digest),
        ).fetchone()
        return self._job(self._db, row) if row else None

    def list(self, *, state: str | None = None, limit: int = 100) -> list[Job]:
        """Jobs, most recently updated first."""
        if state is None:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY updated DESC, id DESC LIMIT ?", (limit,))
        else:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE state=? ORDER BY updated DESC, id DESC LIMIT ?", (state, limit)
            )
        return [self._job(self._db, row) for row in rows.fetchall()]

    def counts(self) -> dict[str, int]:
        """Jobs per state (every state present, zero included)."""
        out = dict.fromkeys(STATES, 0)
        for row in self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            out[row[0]] = row[1]
        return out

    def ping(self) -> None:
        self._db.execute("SELECT 1").fetchone()

    def _job(self, db: sqlite3.Connection, row: sqlite3.Row) -> Job:
        values = {k: row[k] for k in row.keys()}
        values["options"] = json.loads(values["options"])
        return Job(**values, tags=self._tags(db, row["id"]))

    @staticmethod
    def _tags(db: sqlite3.Connection, job_id: int) -> list[Tag]:
        rows = db.execute(
            "SELECT tag, pushed_at, state FROM tags WHERE job_id=? ORDER BY pushed_at, tag", (job_id,)
        ).fetchall()
        return [Tag(r["tag"], r["pushed_at"], r["state"]) for r in rows]
