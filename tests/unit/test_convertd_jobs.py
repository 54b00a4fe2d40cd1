"""convertd's persistent queue (convertd.jobs): dedup by digest, tags and their ordering, one job per
tag at a time, retry and backoff bookkeeping, and what a restart finds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from snapshotter.convertd.jobs import Job, JobStore, Push, QueueError, RetryPolicy

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
OPTIONS = {
    "format": "estargz",
    "chunk_size": 4 << 20,
    "level": None,
    "all_platforms": False,
    "platform": None,
}
POLICY = RetryPolicy(attempts=3, backoff=10, max_backoff=15, multiplier=2)


def push(digest: str = A, tag: str = "v1", at: int = 1, repository: str = "team/app") -> Push:
    return Push(
        "reg:5000", repository, digest, "application/vnd.oci.image.manifest.v1+json", tag, at, OPTIONS
    )


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs.db")


def claim(store: JobStore, now: float = 100, busy: set | None = None) -> Job:
    job = store.claim(now, busy or set())
    assert job is not None
    return job


def convert(store: JobStore, job: Job, result: str = "sha256:" + "c" * 64, now: float = 100) -> str:
    """What a successful run records: the result, each pending tag done, then finish."""
    if job.result_digest is None:
        store.set_result(
            job.id, result, "application/vnd.oci.image.manifest.v1+json", bytes_in=10, bytes_out=12
        )
    for tag in job.pending_tags:
        store.tag_done(job.id, tag)
    return store.finish(job.id, now)


def tags(store: JobStore, digest: str = A) -> dict[str, str]:
    job = store.find("reg:5000", "team/app", digest)
    assert job is not None
    return {t.tag: t.state for t in job.tags}


def test_a_push_is_queued_claimed_once_and_done(store: JobStore) -> None:
    assert store.enqueue([push()], now=100) == ["accepted"]
    assert store.counts() == {"queued": 1, "running": 0, "done": 0, "failed": 0, "skipped": 0}
    job = claim(store)
    assert (job.state, job.attempts, job.options, [t.tag for t in job.pending_tags]) == (
        "running",
        1,
        OPTIONS,
        ["v1"],
    )
    assert store.claim(100) is None  # running: not claimed twice
    assert convert(store, job) == "done"
    done = store.get(job.id)
    assert done is not None and done.state == "done" and done.bytes_in == 10 and done.result_digest
    assert store.next_due() is None


def test_repeated_and_late_events_convert_once(store: JobStore) -> None:
    assert store.enqueue([push(at=5), push(at=5), push(at=3)], now=100) == [
        "accepted",
        "duplicate",
        "duplicate",
    ]
    convert(store, claim(store))
    # the same content pushed again under the same tag: nothing to do
    assert store.enqueue([push(at=6)], now=101) == ["duplicate"]
    assert store.claim(101) is None
    # under another tag: only re-tagged (the job keeps its result)
    assert store.enqueue([push(tag="latest", at=7)], now=102) == ["accepted"]
    job = claim(store, 102)
    assert job.result_digest and [t.tag for t in job.pending_tags] == ["latest"] and job.attempts == 1
    assert convert(store, job, now=102) == "done"
    assert tags(store) == {"v1": "done", "latest": "done"}


def test_a_tag_moved_back_to_an_older_digest_is_re_tagged(store: JobStore) -> None:
    store.enqueue([push(A, at=1)], now=100)
    convert(store, claim(store))
    store.enqueue([push(B, at=2)], now=100)
    convert(store, claim(store))
    assert store.enqueue([push(A, at=3)], now=100) == ["accepted"]  # v1 = A again: newer than B's push
    job = claim(store)
    assert job.digest == A and [t.tag for t in job.pending_tags] == ["v1"]


def test_a_tag_pushed_again_with_other_content_supersedes_the_older_job(store: JobStore) -> None:
    store.enqueue([push(A, at=1), push(B, at=2)], now=100)
    job = claim(store)
    assert job.digest == B  # A's only tag now points to B: A is not converted at all
    a = store.find("reg:5000", "team/app", A)
    assert a is not None and a.state == "skipped" and "superseded" in a.reason
    assert tags(store, A) == {"v1": "superseded"}
    # delivered out of order: the older push arrives after the newer one was converted
    convert(store, job)
    store.enqueue([push(A, tag="rc", at=5), push(B, tag="rc", at=6)], now=100)
    assert claim(store).digest == B
    assert tags(store, A)["rc"] == "superseded"


def test_one_job_per_tag_at_a_time(store: JobStore) -> None:
    store.enqueue([push(A, at=1)], now=100)
    running = claim(store)
    store.enqueue([push(B, at=2)], now=100)  # v1 moves on while A is converting
    busy = {("reg:5000", "team/app", "v1")}
    assert store.claim(100, busy) is None  # B waits: A's result must not land after B's
    convert(store, running)
    assert claim(store).digest == B


def test_a_tag_arriving_during_a_run_is_handled_after_it(store: JobStore) -> None:
    store.enqueue([push(at=1)], now=100)
    job = claim(store)
    assert store.enqueue([push(tag="latest", at=2)], now=100) == ["accepted"]
    assert store.get(job.id).state == "running"  # type: ignore[union-attr]
    assert convert(store, job) == "queued"  # the run knew only v1
    again = claim(store)
    assert [t.tag for t in again.pending_tags] == ["latest"] and again.attempts == 1


def test_retries_back_off_then_fail_with_the_reason(store: JobStore) -> None:
    store.enqueue([push()], now=0)
    job = claim(store, 0)
    assert store.fail(job.id, "registry unavailable", 0, POLICY) == "queued"
    queued = store.get(job.id)
    assert queued is not None and queued.next_at == 10 and queued.attempts == 1
    assert queued.reason == "attempt 1 of 3 failed, retrying: registry unavailable"
    assert queued.as_json()["next_attempt"] is not None
    assert store.claim(9.9) is None and store.next_due() == 10
    assert claim(store, 10).attempts == 2
    assert store.fail(job.id, "registry unavailable", 10, POLICY) == "queued"
    assert store.next_due() == 10 + 15  # 20, capped at max_backoff
    assert claim(store, 25).attempts == 3
    assert store.fail(job.id, "registry unavailable", 25, POLICY) == "failed"
    failed = store.get(job.id)
    assert failed is not None and (failed.state, failed.reason) == ("failed", "registry unavailable")
    assert store.claim(10_000) is None and store.list(state="failed")[0].id == job.id
    # a newer push of the image tries again, from the first attempt
    assert store.enqueue([push(at=9)], now=30) == ["accepted"]
    assert claim(store, 30).attempts == 1


def test_permanent_errors_are_not_retried(store: JobStore) -> None:
    store.enqueue([push()], now=0)
    job = claim(store, 0)
    assert store.fail(job.id, "the manifest is malformed", 0, POLICY, permanent=True) == "failed"
    assert store.get(job.id).attempts == 1  # type: ignore[union-attr]


def test_backoff_policy() -> None:
    policy = RetryPolicy(attempts=10, backoff=1.5, max_backoff=20, multiplier=3)
    assert [policy.delay(n) for n in range(1, 6)] == [1.5, 4.5, 13.5, 20, 20]
    assert RetryPolicy().delay(10_000) == RetryPolicy().max_backoff  # no overflow


def test_skipped_jobs_keep_the_reason_and_their_tags(store: JobStore) -> None:
    store.enqueue([push(), push(tag="latest", at=2)], now=0)
    job = claim(store, 0)
    store.skip(job.id, "not a container image", 1)
    assert store.get(job.id).reason == "not a container image"  # type: ignore[union-attr]
    assert tags(store) == {"v1": "skipped", "latest": "skipped"}
    assert store.enqueue([push(tag="latest", at=2)], now=2) == ["duplicate"]


def test_a_restart_finds_every_accepted_job(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    first = JobStore(path)
    first.enqueue([push(A), push(B, tag="v2")], now=0)
    interrupted = claim(first, 0)
    first.close()  # as after SIGKILL: the row still says running

    second = JobStore(path)
    assert second.recover(50, POLICY) == 1
    job = second.get(interrupted.id)
    assert job is not None and (job.state, job.attempts) == ("queued", 1)
    assert "interrupted" in job.reason
    claimed = {claim(second, 50).id: None, claim(second, 50).id: None}
    assert sorted(claimed) == [1, 2] and store_attempts(second, interrupted.id) == 2
    second.close()


def store_attempts(store: JobStore, job_id: int) -> int:
    job = store.get(job_id)
    assert job is not None
    return job.attempts


def test_a_job_that_keeps_crashing_the_daemon_ends_as_failed(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    store.enqueue([push()], now=0)
    job = claim(store, 0)
    assert store.recover(1, RetryPolicy(attempts=1)) == 1
    failed = store.get(job.id)
    assert (
        failed is not None and failed.state == "failed" and "stopped during attempt 1 of 1" in failed.reason
    )


def test_a_clean_stop_gives_the_attempt_back(store: JobStore) -> None:
    store.enqueue([push()], now=0)
    job = claim(store, 0)
    store.release(job.id, 5)
    released = store.get(job.id)
    assert released is not None and (released.state, released.attempts, released.next_at) == ("queued", 0, 5)


def test_a_deleted_result_is_converted_again(store: JobStore) -> None:
    store.enqueue([push()], now=0)
    job = claim(store, 0)
    convert(store, job)
    store.clear_result(job.id)
    assert store.get(job.id).result_digest is None  # type: ignore[union-attr]


def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    JobStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(QueueError, match="schema version 99"):
        JobStore(path)


def test_listing(store: JobStore) -> None:
    store.enqueue([push(A), push(B, tag="v2", repository="team/other")], now=0)
    claim(store, 0)
    listed = store.list()
    assert len(listed) == 2 and store.list(limit=1)[0].id == listed[0].id
    assert [j.state for j in store.list(state="queued")] == ["queued"]
    assert [j.state for j in store.list(state="running")] == ["running"]
    shown = listed[0].as_json()
    assert set(shown) >= {"state", "reason", "attempts", "tags", "digest", "repository", "registry"}
