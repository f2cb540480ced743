"""One source for /v1/cache/stats and /metrics: ``snapshot(app)`` reads Stats, L1, the Redis pool, the breaker and
the subscriber; the Prometheus collector renders the same snapshot at scrape time, from a per-app registry.

Per-endpoint latency is the one thing Stats does not hold: ``observe_middleware`` times every request into a
prometheus Histogram (route template, method, status class), and runs the tracing middleware when tracing is on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from random import random
from typing import Any

from aiohttp import web
from opentelemetry import context as otel_context
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from actors.stats import COUNTERS
from actors.stats import Histogram as StatsHistogram
from service import appkeys as K
from service.problems import answer_failure, guarded
from tiers.coherence.redis_store import RedisStore

L1_SAMPLE = 256  # entries read to estimate L1 bytes (bounded scrape cost)
ENTRY_OVERHEAD = 232  # bytes per L1 entry besides key and body: Entry object, cache links, dict slot (approx.)
BREAKER_STATES = ("closed", "open", "half_open")
HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


# ---------------------------------------------------------------- the snapshot


def _merge(histograms: list[StatsHistogram]) -> StatsHistogram:
    out = StatsHistogram()
    for h in histograms:
        out.count += h.count
        out.total += h.total
        out.buckets = [a + b for a, b in zip(out.buckets, h.buckets, strict=True)]
    return out


def _percentiles(h: StatsHistogram) -> dict[str, Any]:
    return {"count": h.count, "p50": h.quantile(0.5), "p99": h.quantile(0.99)}


def breaker_state(app: web.Application) -> str:
    """The Redis circuit breaker's state ("absent" when the instance runs without Redis)."""
    handles = app.get(K.REDIS)
    breaker = handles.breaker if handles is not None else None
    return breaker.state.value if breaker is not None else "absent"


def l1_bytes(app: web.Application) -> int:
    """Approximate L1 bytes: mean (key + body + overhead) of up to L1_SAMPLE entries, times the entry count."""
    l1 = app[K.L1_CACHE]
    n = len(l1)
    if not n:
        return 0
    total = seen = 0
    for key, entry in l1.items_sample(L1_SAMPLE):
        total += len(key) + len(entry.body) + ENTRY_OVERHEAD
        seen += 1
    return round(total / seen * n) if seen else 0


def snapshot(app: web.Application) -> dict[str, Any]:
    stats = app[K.STATS]
    types = stats.by_type()
    for dt, row in types.items():
        hits = row["l1_hits"] + row["l2_hits"]
        lookups = hits + row["misses"]
        row["hit_ratio"] = round(hits / lookups, 6) if lookups else None
        row["latency_seconds"] = {
            tier: _percentiles(h) for (t, tier), h in sorted(stats.latency.items()) if t.value == dt
        }
    tiers: dict[str, list[StatsHistogram]] = {}
    for (_dt, tier), h in stats.latency.items():
        tiers.setdefault(tier, []).append(h)
    l1 = app[K.L1_CACHE]
    redis = app[K.REDIS]
    pool = redis.pool
    co = app[K.COHERENCE]
    bus = co.store is not None
    return {
        "instance": app[K.SETTINGS].server.instance_id,
        "types": types,
        "latency_seconds": {tier: _percentiles(_merge(hs)) for tier, hs in sorted(tiers.items())},
        "l1": {
            "size": len(l1),
            "max_entries": l1.max_entries,
            "serving": l1.serving,
            "approx_bytes": l1_bytes(app),
        },
        "redis": {
            "enabled": redis.cache is not None,
            "pool_in_use": pool.in_use if pool else 0,
            "pool_idle": pool.idle if pool else 0,
            "pool_max": pool.max_connections if pool else 0,
        },
        "breaker": {"state": breaker_state(app)},
        "subscriber": {
            "enabled": bus,
            "subscribed": co.subscribed,
            "sessions": co.sessions,
            "seq_gaps": co.seq_gaps,
            "reconnects": co.reconnects,
            "received": co.received,
            "echoes_skipped": co.echoes_skipped,
            "lease_lapses": co.lease_lapses,
        },
        "coherence": {
            "bound_seconds": co.config.bound,
            "l1_epochs": l1.epochs,
            "incarnation_changes": co.store.guard.changes if isinstance(co.store, RedisStore) else 0,
            "outbox_applied": co.outbox_applied,
        },
    }


# ---------------------------------------------------------------- Prometheus

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
    """Renders ``snapshot(app)`` and the Stats latency histograms at scrape time."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    def describe(self) -> list[Any]:
        return []  # collected lazily; never at registration (the app's resources do not exist yet)

    def collect(self) -> Iterator[Any]:
        app = self.app
        if K.STATS not in app or K.L1_CACHE not in app:
            return
        snap = snapshot(app)
        stats = app[K.STATS]
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

    def __init__(self, app: web.Application) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(app))
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


def observed(handler: Any, route: str) -> Any:
    """Wrap one route's handler: traces (when on), its latency histogram, and every failure turned into a
    problem document (service.problems.guarded). A wrapper per route instead of an app middleware: aiohttp runs
    every middleware layer (and one of its own) on every request, a quarter of the hot path's time."""

    async def endpoint(request: web.Request) -> web.StreamResponse:
        app = request.app
        t0 = time.perf_counter()
        status = 500
        try:
            telemetry = app[K.TELEMETRY]
            if telemetry.server_middleware is not None and (
                telemetry.head_ratio is None or "traceparent" in request.headers or random() < telemetry.head_ratio
            ):  # a traced request: the maintained aiohttp instrumentation
                with telemetry.active():
                    resp = await telemetry.server_middleware(request, partial(guarded, handler=handler))
            elif telemetry.server_middleware is not None:  # sampled out at the edge: no instrumentation at all
                token = otel_context.attach(telemetry.unsampled())
                try:
                    resp = await guarded(request, handler)
                finally:
                    otel_context.detach(token)
            else:
                try:
                    resp = await handler(request)
                except Exception as exc:  # one coroutine layer less than calling guarded()
                    resp = answer_failure(request, exc)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            app[K.METRICS].observe_http(route, request.method, status, time.perf_counter() - t0)

    endpoint.__name__ = getattr(handler, "__name__", "endpoint")
    endpoint.__doc__ = getattr(handler, "__doc__", None)
    return endpoint


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[K.METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
