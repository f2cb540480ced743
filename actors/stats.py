"""Per-data-type counters, shared by the actors and read by /v1/cache/stats and /metrics."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field, fields

from tiers.keys import DataType

# upper bounds, seconds, of the latency histogram buckets (Prometheus-style, cumulative on export)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """A lock-free latency histogram (one event loop writes it); exported with cumulative buckets."""

    __slots__ = ("bounds", "buckets", "count", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # last: +Inf
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.buckets[bisect_left(self.bounds, seconds)] += 1  # first bound >= seconds; past the last: +Inf

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.buckets, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile (None when empty)."""
        if not self.count:
            return None
        rank, seen = q * self.count, 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= rank:
                return self.bounds[i] if i < len(self.bounds) else float("inf")
        return float("inf")


@dataclass(slots=True)
class Row:
    """One data type's counters: plain integer attributes, so the hot path's ``row.l1_hits += 1`` is cheap."""

    l1_hits: int = 0
    l2_hits: int = 0
    misses: int = 0
    origin_loads: int = 0
    load_errors: int = 0
    stale_served: int = 0
    fills_rejected: int = 0
    refreshes: int = 0
    rereads: int = 0
    invalidations_sent: int = 0
    invalidations_received: int = 0


COUNTERS = tuple(f.name for f in fields(Row))


@dataclass
class Stats:
    rows: dict[DataType, Row] = field(default_factory=lambda: {dt: Row() for dt in DataType})
    # (data type, tier) -> latency of lookups answered by that tier ("l1", "l2", "origin", "stale")
    latency: dict[tuple[DataType, str], Histogram] = field(default_factory=dict)

    def observe(self, dt: DataType, tier: str, seconds: float) -> None:
        h = self.latency.get((dt, tier))
        if h is None:
            h = self.latency[(dt, tier)] = Histogram()
        h.observe(seconds)

    def inc(self, dt: DataType, name: str, n: int = 1) -> None:
        setattr(self.rows[dt], name, self.get(dt, name) + n)

    def get(self, dt: DataType, name: str) -> int:
        value = getattr(self.rows[dt], name)
        if not isinstance(value, int):
            raise AttributeError(f"{name!r} is not a counter")
        return value

    def by_type(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for dt in DataType:
            row = {name: self.get(dt, name) for name in COUNTERS}
            if any(row.values()) or dt in (
                DataType.EXCHANGE_RATE,
                DataType.FEE_STRUCTURE,
                DataType.WALLET_BALANCE,
                DataType.TRUSTLINE,
            ):
                out[dt.value] = row
        return out
