"""Prometheus exposition of the instance snapshot (service.snapshot), from a per-app registry.

The collector renders the same snapshot as ``/v1/cache/stats`` at scrape time, so the two always agree. Per-endpoint
latency (the one thing Stats does not hold) is observed by the request wrapper (service.observed) into lock-free
histograms exported here. This module knows nothing of the app: the composition root hands it a source.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from actors.stats import COUNTERS, Stats
from actors.stats import Histogram as StatsHistogram

BREAKER_STATES = ("closed", "open", "half_open")
HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST

# (snapshot, stats), or None while the app's resources do not exist yet
Source = Callable[[], "tuple[dict[str, Any], Stats] | None"]


_COUNTER_METRICS = {
    "misses": ("aframp_cache_misses", "Lookups that missed L1 and L2 and went to the origin"),
    "origin_loads": ("aframp_origin_loads", "Loads from the origin (Postgres or Horizon)"),
    "load_errors": ("aframp_origin_errors", "Origin loads that failed"),
    "stale_served": ("aframp_stale_served", "Answers served past their TTL because the origin failed"),
    "fills_rejected": ("aframp_fills_rejected", "Loaded values not installed (an invalidation overtook them)"),
    "invalidations_sent": ("aframp_invalidations_sent", "Keys and patterns this instance invalidated"),
    "invalidations_received": ("aframp_invalidations_received", "Keys and patterns received from peers"),
}


class StatsCollector(Collector):
    """Renders the snapshot and the Stats latency histograms at scrape time."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def describe(self) -> list[Any]:
        return []  # collected lazily; never at registration (the app's resources do not exist yet)

    def collect(self) -> Iterator[Any]:
        got = self.source()
        if got is None:
            return
        snap, stats = got
        hits = CounterMetricFamily(
            "aframp_cache_hits", "Lookups answered by a cache tier", labels=["data_type", "tier"]
        )
        for dt, row in snap["types"].items():
            hits.add_metric([dt, "l1"], row["l1_hits"])
            hits.add_metric([dt, "l2"], row["l2_hits"])
        yield hits
        for name in COUNTERS:
            if name in ("l1_hits", "l2_hits"):
                continue
            metric, doc = _COUNTER_METRICS.get(name, (f"aframp_cache_{name}", f"Stats counter {name}"))
            fam = CounterMetricFamily(metric, doc, labels=["data_type"])
            for dt, row in snap["types"].items():
                fam.add_metric([dt], row.get(name, 0))
            yield fam

        lat = HistogramMetricFamily(
            "aframp_cache_lookup_duration_seconds",
            "Latency of lookups below L1, by tier (l2 read, origin load, origin_error)",
            labels=["data_type", "tier"],
        )
        for (dt, tier), h in sorted(stats.latency.items()):
            lat.add_metric([dt.value, tier], h.cumulative(), h.total)
        yield lat

        l1 = snap["l1"]
        yield GaugeMetricFamily("aframp_l1_entries", "Entries in this instance's L1", value=l1["size"])
        yield GaugeMetricFamily("aframp_l1_max_entries", "L1 capacity (entries)", value=l1["max_entries"])
        yield GaugeMetricFamily(
            "aframp_l1_bytes", "Approximate L1 size in bytes (sampled estimate)", value=l1["approx_bytes"]
        )
        yield GaugeMetricFamily(
            "aframp_l1_serving",
            "1 while L1's trust lease is valid (entries served past the coherence bound after their fetch)",
            value=int(l1["serving"]),
        )

        r = snap["redis"]
        yield GaugeMetricFamily(
            "aframp_redis_pool_in_use_connections", "Redis connections in use", value=r["pool_in_use"]
        )
        yield GaugeMetricFamily(
            "aframp_redis_pool_idle_connections", "Connected idle Redis connections", value=r["pool_idle"]
        )
        yield GaugeMetricFamily("aframp_redis_pool_max_connections", "Redis pool size", value=r["pool_max"])
        state = snap["breaker"]["state"]
        br = GaugeMetricFamily(
            "aframp_redis_breaker_state", "Redis circuit breaker state (1 = current)", labels=["state"]
        )
        for s in BREAKER_STATES:
            br.add_metric([s], int(state == s or (state == "absent" and s == "closed")))
        yield br
        yield GaugeMetricFamily(
            "aframp_redis_breaker_present", "1 when a Redis circuit breaker exists", value=int(state != "absent")
        )

        sub = snap["subscriber"]
        yield GaugeMetricFamily(
            "aframp_invalidation_subscriber_up",
            "1 while subscribed to the invalidation channel",
            value=int(sub["subscribed"]),
        )
        yield CounterMetricFamily(
            "aframp_invalidation_subscriber_reconnects", "Subscriber reconnect attempts", value=sub["reconnects"]
        )
        yield CounterMetricFamily(
            "aframp_invalidation_subscriber_sessions",
            "Subscriber sessions started (each empties L1)",
            value=sub["sessions"],
        )
        yield CounterMetricFamily(
            "aframp_invalidation_seq_gaps", "Messages lost within a session (each empties L1)", value=sub["seq_gaps"]
        )
        yield CounterMetricFamily(
            "aframp_invalidation_messages_received", "Invalidation messages from peers", value=sub["received"]
        )
        yield CounterMetricFamily(
            "aframp_l1_lease_lapses", "Times L1's trust lease lapsed and was renewed", value=sub["lease_lapses"]
        )
        co = snap["coherence"]
        yield CounterMetricFamily("aframp_l1_epochs", "New L1 epochs (L1 emptied)", value=co["l1_epochs"])
        yield CounterMetricFamily(
            "aframp_redis_incarnation_changes", "Redis restarts/failovers detected", value=co["incarnation_changes"]
        )
        yield CounterMetricFamily(
            "aframp_outbox_applied",
            "Outbox rows applied for writers that never settled them",
            value=co["outbox_applied"],
        )


_STATUS_CLASS = {i: f"{i}xx" for i in range(6)}


class _HttpCollector:
    def __init__(self, http: dict[tuple[str, str, str], StatsHistogram]) -> None:
        self.http = http

    def collect(self) -> Iterator[Any]:
        fam = HistogramMetricFamily(
            "aframp_http_request_duration_seconds",
            "HTTP request latency by route template, method and status class",
            labels=["route", "method", "status_class"],
        )
        for labels, h in sorted(self.http.items()):
            fam.add_metric(list(labels), h.cumulative(), h.total)
        yield fam


class Metrics:
    """The per-app registry (never the global one: several apps may live in one process)."""

    def __init__(self, source: Source) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(source))
        # per-endpoint latency: lock-free histograms (one event loop writes them), exported by a collector
        self.http: dict[tuple[str, str, str], StatsHistogram] = {}
        self.registry.register(_HttpCollector(self.http))

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        labels = (route, method, _STATUS_CLASS[status // 100] if status < 600 else f"{status // 100}xx")
        h = self.http.get(labels)
        if h is None:
            h = self.http[labels] = StatsHistogram(HTTP_BUCKETS)
        h.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
