"""Per-data-type counters, shared by the actors and read by /v1/cache/stats and /metrics."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tiers.keys import DataType

COUNTERS = (
    "l1_hits",
    "l2_hits",
    "misses",
    "origin_loads",
    "load_errors",
    "stale_served",
    "fills_rejected",
    "refreshes",
    "invalidations_sent",
    "invalidations_received",
)


# upper bounds, seconds, of the latency histogram buckets (Prometheus-style, cumulative on export)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))  # last: +Inf
    count: int = 0
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
                return
        self.buckets[-1] += 1

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile (None when empty)."""
        if not self.count:
            return None
        rank, seen = q * self.count, 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= rank:
                return LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else float("inf")
        return float("inf")


@dataclass
class Stats:
    counts: Counter[tuple[DataType, str]] = field(default_factory=Counter)
    # (data type, tier) -> latency of lookups answered by that tier ("l1", "l2", "origin", "stale")
    latency: dict[tuple[DataType, str], Histogram] = field(default_factory=dict)

    def observe(self, dt: DataType, tier: str, seconds: float) -> None:
        h = self.latency.get((dt, tier))
        if h is None:
            h = self.latency[(dt, tier)] = Histogram()
        h.observe(seconds)

    def inc(self, dt: DataType, name: str, n: int = 1) -> None:
        self.counts[(dt, name)] += n

    def get(self, dt: DataType, name: str) -> int:
        return self.counts[(dt, name)]

    def by_type(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for dt in DataType:
            row = {name: self.counts[(dt, name)] for name in COUNTERS}
            if any(row.values()) or dt in (
                DataType.EXCHANGE_RATE,
                DataType.FEE_STRUCTURE,
                DataType.WALLET_BALANCE,
                DataType.TRUSTLINE,
            ):
                out[dt.value] = row
        return out
