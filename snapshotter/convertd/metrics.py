"""convertd's Prometheus metrics (conversions, attempts, bytes, queue length, events, HTTP requests) in
their own registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from snapshotter.convertd.jobs import STATES


class Metrics:
    """Prometheus metrics in their own registry (several instances can live in one test process)."""

    OUTCOMES = ("converted", "retagged", "skipped", "failed")

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.conversions = Counter(
            "lazysnap_convertd_conversions",
            "Jobs that ended: converted (accelerated image pushed), retagged (an existing accelerated image "
            "pushed under another tag), skipped (nothing to convert), failed (after its retries)",
            ["outcome"],
            registry=r,
        )
        for outcome in self.OUTCOMES:
            self.conversions.labels(outcome)
        self.attempt_errors = Counter(
            "lazysnap_convertd_attempt_errors", "Conversion attempts that failed, retried or not", registry=r
        )
        self.duration = Histogram(
            "lazysnap_convertd_conversion_duration_seconds",
            "Wall time of successful conversions",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.bytes_in = Counter(
            "lazysnap_convertd_bytes_in", "Bytes of source layer blobs read by conversions", registry=r
        )
        self.bytes_out = Counter(
            "lazysnap_convertd_bytes_out",
            "Bytes of accelerated layer blobs written by conversions",
            registry=r,
        )
        self.queue_length = Gauge(
            "lazysnap_convertd_queue_length", "Jobs waiting to run (queued, including retries)", registry=r
        )
        self.jobs = Gauge(
            "lazysnap_convertd_jobs", "Jobs in the queue database, by state", ["state"], registry=r
        )
        self.events = Counter(
            "lazysnap_convertd_events",
            "Notification events received: accepted (queued), duplicate, ignored, malformed",
            ["result"],
            registry=r,
        )
        for result in ("accepted", "duplicate", "ignored", "malformed"):
            self.events.labels(result)
        self.requests = Counter(
            "lazysnap_convertd_http_requests",
            "HTTP requests answered, by path and status",
            ["path", "code"],
            registry=r,
        )

    def render(self, counts: dict[str, int]) -> bytes:
        for state in STATES:
            self.jobs.labels(state).set(counts.get(state, 0))
        self.queue_length.set(counts.get("queued", 0))
        return generate_latest(self.registry)
