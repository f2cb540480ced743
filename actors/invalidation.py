"""The one place that decides how an invalidation travels: Redis first, then this instance's L1 (through the
owning actors, so a racing fill is voided), then every other instance through the bus.

Order matters: Redis is cleared before L1, so a local load that starts after the L1 drop cannot re-read the old
value from Redis; the bus message goes out after Redis is cleared, so a peer that drops its L1 can only reload
the new value.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from actors.cache_actor import CacheActor, Install, Invalidate, Outcome
from actors.stats import Stats
from tiers import codec
from tiers.errors import CacheUnavailable
from tiers.keys import CacheKey, group_for_pattern, namespace_of
from tiers.l1 import L1
from tiers.l2 import RedisCache

log = logging.getLogger(__name__)


class Publisher(Protocol):
    channel: str

    def message(self, keys: Sequence[str], patterns: Sequence[str], **extra: Any) -> bytes: ...
    async def publish(self, keys: Sequence[str], patterns: Sequence[str], **extra: Any) -> None: ...


class Invalidator:
    def __init__(self, l2: RedisCache | None, stats: Stats) -> None:
        self.l2 = l2
        self.stats = stats
        self.actors: list[CacheActor] = []
        self.bus: Publisher | None = None  # set by the composition root once the bus exists
        self.pending: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
        self.on_pending: Callable[[bool], None] | None = None  # told whether anything is pending
        self._pending_added = asyncio.Event()
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
            # Redis is cleared and the bus message published in one script (one round trip, in that order)
            bus = self.bus
            publish = (bus.channel, bus.message(keys, patterns, **self.trace_fields())) if bus is not None else None
            try:
                deleted = await self.l2.invalidate(keys, groups, scans, publish)
            except CacheUnavailable as err:
                failure = err
        await self.apply_local(keys, patterns)
        for name in (*keys, *patterns):
            ns = namespace_of(name)
            if ns is not None:
                self.stats.inc(ns.data_type, "invalidations_sent")
        if failure is not None:
            log.warning(
                "invalidation deferred until Redis returns: %s", failure, extra={"event": "invalidation_deferred"}
            )
            self._defer(keys, patterns)
            return Outcome(deleted, False)
        return Outcome(deleted, True)

    async def replace(self, key: CacheKey, body: bytes) -> Outcome:
        """Make ``body`` the value of ``key`` everywhere (a fact this instance was just told, e.g. trustline-created).

        Same order as an invalidation: Redis first (a plain SET of the packed value, the key's lease deleted so a
        racing fleet load cannot fill over it), then this instance's L1 through the owning actor (``Install``, which
        also voids a racing local load), then the key is published as an invalidation so every peer drops its
        copy (e.g. a cached negative) and reloads the new value from Redis. If Redis or the bus cannot be reached,
        the key is queued like any deferred invalidation: the replay deletes it everywhere, which is safe.
        """
        rendered = key.render()
        owner = next((a for a in self.actors if a.owns(rendered)), None)
        if owner is None:
            raise ValueError(f"no actor owns {rendered}")
        dt = key.data_type
        failure: CacheUnavailable | None = None
        if self.l2 is not None:
            now = time.time()
            ttl = owner.policy.ttl_for(dt, False)
            px = int((ttl + owner.policy.max_stale.get(dt, 0)) * 1000)
            try:
                await self.l2.put(rendered, codec.pack(body, int((now + ttl) * 1000), int(now * 1000)), px)
            except CacheUnavailable as err:
                failure = err
        if owner.running:
            await owner.ask(Install(key, body))
        self.stats.inc(dt, "invalidations_sent")
        if self.bus is not None and failure is None:
            try:
                await self.bus.publish([rendered], [])
            except CacheUnavailable as err:
                failure = err
        if failure is not None:
            log.warning("replacement of %s deferred until Redis returns: %s", rendered, failure)
            self._defer((rendered,), ())
            return Outcome(0, False)
        return Outcome(0, True)

    def _defer(self, keys: tuple[str, ...], patterns: tuple[str, ...]) -> None:
        self.pending.append((keys, patterns))
        self._pending_added.set()
        if self.on_pending is not None:
            self.on_pending(True)

    async def run_replayer(self, retry: float = 0.5) -> None:
        """Background task (owned by the composition root): replay deferred invalidations until none is left."""
        while True:
            await self._pending_added.wait()
            self._pending_added.clear()
            while not await self.replay_pending():  # noqa: ASYNC110 - Redis away: periodic retry, no event to await
                await asyncio.sleep(retry)

    async def replay_pending(self) -> bool:
        """Re-send deferred invalidations; True when none is left."""
        while self.pending:
            keys, patterns = self.pending[0]
            groups = [g for g in (group_for_pattern(p) for p in patterns) if g is not None]
            scans = [p for p in patterns if group_for_pattern(p) is None]
            bus = self.bus
            try:
                if self.l2 is not None:
                    publish = (bus.channel, bus.message(keys, patterns)) if bus is not None else None
                    await self.l2.invalidate(keys, groups, scans, publish)
                elif bus is not None:
                    await bus.publish(keys, patterns)
            except CacheUnavailable:
                return False
            self.pending.pop(0)
            if not self.pending and self.on_pending is not None:
                self.on_pending(False)
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


class L1Trust:
    """Decides what this instance's L1 may serve, from the two signals that make it trustworthy.

    * subscribed to the invalidation bus, no invalidation of ours waiting to be replayed: normal (entries live
      up to ``l1.max_ttl``);
    * not subscribed, Redis reachable: off (reads go to Redis, which every writer clears first);
    * not subscribed, Redis down (breaker open): degraded (entries live up to ``l1.degraded_ttl``, so origin
      load stays bounded and staleness is bounded by that cap);
    * no Redis configured: normal (one instance; its own writes invalidate its L1 synchronously).

    Every change clears L1 and starts a new epoch, so a load that straddled the change never fills it.
    """

    def __init__(self, l1: L1, *, degraded_ttl: float, has_redis: bool) -> None:
        self.l1 = l1
        self.degraded_ttl = degraded_ttl
        self.has_redis = has_redis
        self.subscribed = False
        self.redis_ok = True
        self.pending = False
        self.changes = 0
        self._apply(force=True)

    def mode(self) -> str:
        if not self.has_redis or (self.subscribed and not self.pending):
            return "normal"
        return "off" if self.redis_ok else "degraded"

    def update(
        self,
        *,
        subscribed: bool | None = None,
        redis_ok: bool | None = None,
        pending: bool | None = None,
        force: bool = False,
    ) -> None:
        if subscribed is not None:
            self.subscribed = subscribed
        if pending is not None:
            self.pending = pending
        if redis_ok is not None:
            self.redis_ok = redis_ok
        self._apply(force)

    def _apply(self, force: bool = False) -> None:
        mode = self.mode()
        if force or mode != self.l1.mode:
            self.changes += 1
            log.info(
                "L1 trust: %s (subscribed=%s, redis=%s, pending=%s)", mode, self.subscribed, self.redis_ok, self.pending
            )
            self.l1.set_mode(mode, self.degraded_ttl)
