"""The one place that decides how an invalidation travels: Redis first, then this instance's L1 (through the
owning actors, so a racing fill is voided), then every other instance through the bus.

Order matters: Redis is cleared before L1, so a local load that starts after the L1 drop cannot re-read the old
value from Redis; the bus message goes out after Redis is cleared, so a peer that drops its L1 can only reload
the new value.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from actors.cache_actor import CacheActor, Invalidate, Outcome
from actors.stats import Stats
from tiers.errors import CacheUnavailable
from tiers.keys import group_for_pattern, namespace_of
from tiers.l2 import RedisCache

log = logging.getLogger(__name__)


class Publisher(Protocol):
    async def publish(self, keys: Sequence[str], patterns: Sequence[str], **extra: Any) -> None: ...


class Invalidator:
    def __init__(self, l2: RedisCache | None, stats: Stats) -> None:
        self.l2 = l2
        self.stats = stats
        self.actors: list[CacheActor] = []
        self.bus: Publisher | None = None  # set by the composition root once the bus exists
        self.pending: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
        # extra bus-message fields, e.g. {"trace": {"traceparent": ...}} (set by the composition root)
        self.trace_fields: Callable[[], dict[str, Any]] = dict

    def register(self, actor: CacheActor) -> None:
        self.actors.append(actor)

    async def invalidate(self, keys: Sequence[str] = (), patterns: Sequence[str] = ()) -> Outcome:
        """Invalidate in Redis, in this instance's L1 and on every peer.

        This instance's L1 is dropped in every case. If Redis or the bus cannot be reached the invalidation is
        kept in ``pending`` and replayed by ``replay_pending`` (the bus calls it when Redis is back).
        """
        keys, patterns = tuple(keys), tuple(patterns)
        deleted = 0
        failure: CacheUnavailable | None = None
        if self.l2 is not None:
            groups = [g for g in (group_for_pattern(p) for p in patterns) if g is not None]
            scans = [p for p in patterns if group_for_pattern(p) is None]
            try:
                deleted = await self.l2.invalidate(keys, groups, scans)
            except CacheUnavailable as err:
                failure = err
        await self.apply_local(keys, patterns)
        for k in keys:
            ns = namespace_of(k)
            if ns is not None:
                self.stats.inc(ns.data_type, "invalidations_sent")
        for p in patterns:
            ns = namespace_of(p)
            if ns is not None:
                self.stats.inc(ns.data_type, "invalidations_sent")
        if self.bus is not None and failure is None:
            try:
                await self.bus.publish(keys, patterns, **self.trace_fields())
            except CacheUnavailable as err:
                failure = err
        if failure is not None:
            log.warning(
                "invalidation deferred until Redis returns: %s", failure, extra={"event": "invalidation_deferred"}
            )
            self.pending.append((keys, patterns))
            return Outcome(deleted, False)
        return Outcome(deleted, True)

    async def replay_pending(self) -> bool:
        """Re-send deferred invalidations; True when none is left."""
        while self.pending:
            keys, patterns = self.pending[0]
            groups = [g for g in (group_for_pattern(p) for p in patterns) if g is not None]
            scans = [p for p in patterns if group_for_pattern(p) is None]
            try:
                if self.l2 is not None:
                    await self.l2.invalidate(keys, groups, scans)
                if self.bus is not None:
                    await self.bus.publish(keys, patterns)
            except CacheUnavailable:
                return False
            self.pending.pop(0)
        return True

    async def apply_local(self, keys: Sequence[str], patterns: Sequence[str]) -> int:
        """Drop keys/patterns from this instance's L1 and void racing loads, through each owning actor."""
        asks = []
        for actor in self.actors:
            mine = tuple(k for k in keys if actor.owns(k))
            pats = tuple(p for p in patterns if actor.owns(p))
            if (mine or pats) and actor.running:
                asks.append(actor.ask(Invalidate(mine, pats)))
        results = await asyncio.gather(*asks)
        return sum(results)
