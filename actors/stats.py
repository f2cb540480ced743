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
    "invalidations_sent",
    "invalidations_received",
)


@dataclass
class Stats:
    counts: Counter[tuple[DataType, str]] = field(default_factory=Counter)

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
