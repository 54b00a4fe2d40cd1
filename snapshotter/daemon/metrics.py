"""Prometheus metrics of the daemon on a loopback address: `/metrics` in the text exposition format.

Collected on each scrape from the live objects (no bookkeeping on the read path): remote layers mounted
and each one's fetched fraction, bytes fetched by kind, chunk cache hits and misses (and the cache's own
usage), the fetch latency histogram, full-pull fallbacks by reason, and RPC counts and time by method.
With the CRI proxy on: its calls by method and code, the pulls that brought credentials, and how many
repositories' credentials are kept (never the credentials themselves).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prometheus_client import Counter, start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from fuse.fetch import LATENCY_BUCKETS
from snapshotter.daemon import service

if TYPE_CHECKING:
    from snapshotter.daemon.lazy import LazyRuntime
    from snapshotter.daemon.snapshots import Snapshotter

log = logging.getLogger("lazysnap.metrics")

# Counted by the CRI proxy (snapshotter.daemon.cri) as calls finish.
CRI_CALLS = Counter(
    "lazysnap_cri_calls",
    "CRI image service calls forwarded, by method and code",
    ["method", "code"],
    registry=None,
)
CRI_PULLS_WITH_CREDENTIALS = Counter(
    "lazysnap_cri_pulls_with_credentials", "PullImage calls whose credentials were kept", registry=None
)


class Collector:
    def __init__(self, snapshotter: Snapshotter, lazy: LazyRuntime):
        self.snapshotter, self.lazy = snapshotter, lazy

    def collect(self):
        layers = self.lazy.layers.stats()
        yield GaugeMetricFamily("lazysnap_remote_layers", "Remote layers mounted", value=len(layers))
        fetched = GaugeMetricFamily(
            "lazysnap_layer_fetched_ratio", "Fraction of a layer's chunks in the cache", labels=["layer"]
        )
        for layer in layers:
            fetched.add_metric([layer["name"]], layer["fetched"])
        yield fetched
        c = self.lazy.fetcher.counters
        by_kind = CounterMetricFamily(
            "lazysnap_fetched_bytes", "Bytes fetched from registries", labels=["kind"]
        )
        for kind, value in (
            ("on_demand", c.bytes_on_demand),
            ("prefetch", c.bytes_prefetch),
            ("background", c.bytes_background),
        ):
            by_kind.add_metric([kind], value)
        yield by_kind
        yield CounterMetricFamily(
            "lazysnap_chunk_cache_hits", "Chunk reads served locally", value=c.cache_hits
        )
        yield CounterMetricFamily(
            "lazysnap_chunk_cache_misses", "Chunk reads that needed a fetch", value=c.cache_misses
        )
        total = c.cache_hits + c.cache_misses
        yield GaugeMetricFamily(
            "lazysnap_chunk_cache_hit_ratio",
            "Hits / (hits + misses)",
            value=c.cache_hits / total if total else 0.0,
        )
        stats = self.lazy.cache.stats()
        yield GaugeMetricFamily(
            "lazysnap_chunk_cache_bytes", "Bytes in the chunk cache", value=stats.bytes_used
        )
        yield GaugeMetricFamily(
            "lazysnap_chunk_cache_limit_bytes",
            "The cache's size limit in force (lowered while its filesystem is full)",
            value=stats.effective_limit,
        )
        for name, help_text, value in (
            ("lazysnap_read_timeouts", "Reads failed with EIO after read_timeout", c.timeouts),
            ("lazysnap_fetch_errors", "Registry fetches that failed", c.errors),
            ("lazysnap_bad_chunks", "Chunks that did not decompress or verify (never served)", c.bad_chunks),
            (
                "lazysnap_chunk_cache_write_errors",
                "Chunks the cache could not store (served from memory and the network)",
                c.cache_write_errors,
            ),
            (
                "lazysnap_chunk_cache_read_errors",
                "Cache reads that failed (refetched)",
                c.cache_read_errors,
            ),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        cumulative, buckets = 0, []
        for bound, n in zip(LATENCY_BUCKETS, c.latency, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
        yield HistogramMetricFamily(
            "lazysnap_fetch_seconds", "Registry fetch latency", buckets=buckets, sum_value=c.latency_sum
        )
        fallbacks = CounterMetricFamily(
            "lazysnap_fallbacks", "Layers pulled in full instead of lazily", labels=["reason"]
        )
        for reason, n in sorted(self.lazy.layers.fallbacks.items()):
            fallbacks.add_metric([reason], n)
        yield fallbacks
        yield from service.RPC_CALLS.collect()
        yield from service.RPC_SECONDS.collect()
        yield CounterMetricFamily(
            "lazysnap_fuse_connections_lost",
            "Previous daemon's FUSE connections found dead at start: containers on them lost their files",
            value=int(self.lazy.lost is not None),
        )
        yield GaugeMetricFamily(
            "lazysnap_fuse_adopted",
            "1 when this daemon took over a live FUSE mount from the previous one (restart, crash, upgrade)",
            value=int(self.lazy.adopted),
        )
        pulled = self.lazy.client.credentials.pulled
        if pulled is not None:  # the CRI proxy is on
            yield from CRI_CALLS.collect()
            yield from CRI_PULLS_WITH_CREDENTIALS.collect()
            yield GaugeMetricFamily(
                "lazysnap_cri_credentials_kept",
                "Repositories whose pull credentials are kept in memory",
                value=len(pulled),
            )


def serve(address: str, snapshotter: Snapshotter, lazy: LazyRuntime) -> None:
    """Serve /metrics on host:port (in a thread of its own)."""
    host, _, port = address.rpartition(":")
    REGISTRY.register(Collector(snapshotter, lazy))
    start_http_server(int(port), addr=host.strip("[]"))
    log.info("metrics on http://%s/metrics", address)
