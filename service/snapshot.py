"""The one snapshot of an instance's state: ``/v1/cache/stats`` answers it, ``/metrics`` renders it.

It reads Stats, L1, the Redis pool, the breaker and the coherence engine (subscriber, lease, epochs).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from actors.stats import Histogram as StatsHistogram
from service import appkeys as K
from tiers.coherence.redis_store import RedisStore

L1_SAMPLE = 256  # entries read to estimate L1 bytes (bounded scrape cost)
ENTRY_OVERHEAD = 232  # bytes per L1 entry besides key and body: Entry object, cache links, dict slot (approx.)


def _merge(histograms: list[StatsHistogram]) -> StatsHistogram:
    out = StatsHistogram()
    for h in histograms:
        out.count += h.count
        out.total += h.total
        out.buckets = [a + b for a, b in zip(out.buckets, h.buckets, strict=True)]
    return out


def _percentiles(h: StatsHistogram) -> dict[str, int | float | None]:
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
    types: dict[str, dict[str, object]] = {}
    for dt, counts in stats.by_type().items():
        hits = counts["l1_hits"] + counts["l2_hits"]
        lookups = hits + counts["misses"]
        types[dt] = {
            **counts,
            "hit_ratio": round(hits / lookups, 6) if lookups else None,
            "latency_seconds": {
                tier: _percentiles(h) for (t, tier), h in sorted(stats.latency.items()) if t.value == dt
            },
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
