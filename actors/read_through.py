"""The read-through algorithm of one domain, as a plain object (no mailbox, no tasks): the actor drives it.

After an L1 miss, :meth:`ReadThrough.first` makes the one Redis round trip of the read: a fresh value (installed in
L1 through the reader's ticket and answered), or the lease, or who holds it, or "fenced" (tiers.coherence). The
actor then runs :meth:`ReadThrough.load` once per key: wait (bounded) for a peer's fill, or load from the origin and
fill; stale-if-error when the origin fails.

A value reaches L1 only through the ticket taken before its fetch, and only when Redis accepted it (or Redis could
not be asked at all): a fill refused for a newer generation or a fence means the value is already superseded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Tracer

from actors.messages import Answer, Lookup, Source, Start
from actors.stats import Stats
from actors.tracing import A_OUTCOME, key_attributes
from tiers import codec, keys
from tiers.coherence import Acquired, Coherence, Status
from tiers.errors import CacheUnavailable, OriginError
from tiers.keys import CacheKey, DataType
from tiers.l1 import L1, Entry, Ticket


@dataclass(frozen=True, slots=True)
class Policy:
    ttl: Mapping[DataType, float]
    negative_ttl: Mapping[DataType, float]
    max_stale: Mapping[DataType, float]
    lease_ttl: float = 5.0  # a fleet lease outlives any origin call
    lease_wait: float = 1.0  # how long a peer waits for the lease holder's fill before loading itself
    refresh_ahead: float = 0.03  # a hit in the last 3 % of a value's TTL refreshes it in the background

    def ttl_for(self, dt: DataType, negative: bool) -> float:
        if negative:
            return self.negative_ttl.get(dt, min(5.0, self.ttl[dt]))
        return self.ttl[dt]

    def px(self, dt: DataType, short: bool) -> int:
        """How long Redis keeps a value (ms): its TTL, plus max-stale for a real (not short) answer."""
        return int((self.ttl_for(dt, short) + (0 if short else self.max_stale.get(dt, 0))) * 1000)

    def gen_px(self, key: CacheKey, short: bool) -> int:
        """How long a source's generation lives once a fill creates it: as long as the longest value that may be
        guarded by it (its own, or one derived from it: a conversion, a trustline). Of a short answer (a 404), as
        long as short answers live: a read of an unknown key leaves nothing behind its answer."""
        types = [key.data_type, *(ns.data_type for ns in keys.DERIVED_FROM.get(key.namespace, ()))]
        return max(self.px(dt, short) for dt in types)


def fleet_wait_delays(total: float) -> Iterable[float]:
    """Back-off delays (seconds) for a waiter polling another instance's fill, summing to about ``total``."""
    spent, delay = 0.0, 0.002
    while spent < total:
        d = min(delay, total - spent)
        yield d
        spent += d
        delay = min(delay * 1.5, 0.025)


class _NoSpan:
    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_attribute(self, key: str, value: object) -> None:
        pass


_NO_SPAN = _NoSpan()

Origin = Callable[[CacheKey], Awaitable[bytes | Answer | None]]


class ReadThrough:
    def __init__(
        self,
        *,
        l1: L1,
        coherence: Coherence,
        policy: Policy,
        stats: Stats,
        origin: Origin,
        tracer: Tracer | None = None,
    ) -> None:
        self.l1 = l1
        self.coherence = coherence
        self.policy = policy
        self.stats = stats
        self.origin = origin
        self.tracer = tracer

    # ------------------------------------------------------------ the first step of a miss
    def ticket(self, key: CacheKey) -> Ticket:
        return self.l1.ticket(key.rendered, tuple(d.rendered for d in keys.deps_of(key)))

    def sources(self, key: CacheKey) -> tuple[str, ...]:
        return self.coherence.sources(key, keys.deps_of(key))

    async def acquire(self, key: CacheKey, token: str, *, refresh: bool = False) -> Acquired | None:
        """One Redis round trip; None when Redis cannot be asked (none configured, breaker open, an error)."""
        if self.coherence.store is None:
            return None
        dt = key.data_type
        t0 = time.perf_counter()
        try:
            with self._span("cache.l2", key, "l2") as span:
                acq = await self.coherence.acquire(key, self.sources(key), token, refresh=refresh)
                span.set_attribute(A_OUTCOME, "hit" if acq.status is Status.HIT else "miss")
        except CacheUnavailable:
            return None
        finally:
            self.stats.observe(dt, "l2", time.perf_counter() - t0)
        return acq

    async def first(self, key: CacheKey, ticket: Ticket, token: str) -> Lookup | Acquired | None:
        acq = await self.acquire(key, token)
        if acq is not None and acq.status is Status.HIT and acq.stored is not None:
            return self._hit(key, ticket, acq.stored)
        return acq

    # ------------------------------------------------------------ a load (one per key in this process)
    async def load(self, key: CacheKey, start: Start, offered: Callable[[], Start | None]) -> Lookup:
        acq, token = start.acquired, start.token
        if acq is not None and acq.status is Status.TAKEN:
            acq, token = await self._wait(key, token, acq, offered)
        if acq is not None and acq.status is Status.HIT and acq.stored is not None:
            return self._hit(key, start.ticket, acq.stored)
        return await self._from_origin(key, start.ticket, token, acq)

    async def refresh(self, key: CacheKey, token: str) -> bool:
        """Reload a hot key before it expires, if this instance wins its lease; True if it loaded."""
        ticket = self.ticket(key)
        acq = await self.acquire(key, token, refresh=True)
        if acq is None or acq.status is not Status.LEASE:
            return False
        self.stats.inc(key.data_type, "refreshes")
        await self._from_origin(key, ticket, token, acq)
        return True

    async def _wait(
        self, key: CacheKey, token: str, acq: Acquired, offered: Callable[[], Start | None]
    ) -> tuple[Acquired | None, str]:
        """Another instance holds the lease: poll (bounded) for its fill; a local reader may hand us its lease
        (with its token: the lease is the offerer's, and the fill and release must name it)."""
        for delay in fleet_wait_delays(self.policy.lease_wait):
            await asyncio.sleep(delay)  # polling a peer's fill, with a deadline
            given = offered()
            if given is not None:
                return given.acquired, given.token
            nxt = await self.acquire(key, token)
            if nxt is None or nxt.status is not Status.TAKEN:
                return nxt, token
            acq = nxt
        return acq, token  # still taken: load ourselves (the fill's generation check still guards it)

    async def _from_origin(self, key: CacheKey, ticket: Ticket, token: str, acq: Acquired | None) -> Lookup:
        dt = key.data_type
        self.stats.inc(dt, "misses")
        self.stats.inc(dt, "origin_loads")
        loaded_at = time.time()
        t0 = time.perf_counter()
        try:
            with self._span("cache.origin", key, "origin") as span:
                answer = await self.origin(key)
                span.set_attribute(A_OUTCOME, "miss")
            self.stats.observe(dt, "origin", time.perf_counter() - t0)
        except OriginError:
            self.stats.observe(dt, "origin_error", time.perf_counter() - t0)
            self.stats.inc(dt, "load_errors")
            if acq is not None and acq.status is Status.LEASE:
                await self.coherence.release(key, token)  # peers waiting on this lease load (or fail) now
            served = self._stale(key, acq.stored if acq is not None else None, loaded_at)
            if served is not None:
                return served
            raise
        if answer is None:
            body, short, source = codec.NEGATIVE, True, None
        elif isinstance(answer, Answer):
            body, short, source = answer.body, answer.short or answer.body == codec.NEGATIVE, answer.source
        else:
            body, short, source = answer, answer == codec.NEGATIVE, None
        if source is not None and source.source is Source.STALE:
            # derived from a value served past its TTL: stale itself, never cached
            self.stats.inc(dt, "stale_served")
            if acq is not None and acq.status is Status.LEASE:
                await self.coherence.release(key, token)
            return Lookup(body, Source.STALE, source.loaded_at, vouched=False)
        # the generations the fill must present: a derived value's are those of the source value it was computed
        # from; a source value's are those its load saw in Redis
        if source is not None:
            gens, incarnation = source.gens, source.incarnation
        elif acq is not None:
            gens, incarnation = acq.gens, acq.incarnation
        else:
            gens, incarnation = "", ""
        ttl = self.policy.ttl_for(dt, short)
        refused = False
        stored: str | None = None
        if acq is not None and acq.status in (Status.LEASE, Status.TAKEN) and incarnation == acq.incarnation:
            try:
                with self._span("cache.fill", key, "l2"):
                    stored = await self.coherence.fill(
                        key,
                        self.sources(key),
                        acq,
                        gens,
                        token,
                        body,
                        fresh_until=loaded_at + ttl,
                        loaded_at=loaded_at,
                        short=short,
                        px=self.policy.px(dt, short),
                        gen_px=self.policy.gen_px(key, short),
                    )
                refused = stored is None
            except CacheUnavailable:
                pass  # Redis went away: this instance's own copy is still a fresh origin value
        elif acq is not None:
            refused = True  # fenced (a write is in progress), or derived from another incarnation's value
            if acq.status is Status.LEASE:
                await self.coherence.release(key, token)
        # The answer carries generations only when they are the ones Redis stored with this very value: a value
        # read during a write's fence (maybe from before its commit), or one Redis refused, must never vouch for
        # anything derived from it.
        if source is None:
            gens = stored or ""
        from_unvouched = source is not None and not source.vouched
        # Redis accepted it (or there is no Redis), and it was not computed from a value nothing vouches for
        vouched = (stored is not None or self.coherence.store is None) and not from_unvouched
        if refused:
            self.stats.inc(dt, "fills_rejected")
        else:
            # Redis could not be asked (breaker open, an error): nothing tells whether a write was fenced when the
            # origin was read — its message may have come before this load's ticket — so this copy lives in L1 no
            # longer than L1's bound after the fetch began, whatever the bus' lease says (tiers.coherence, rule 4)
            life = ttl
            if acq is None and self.coherence.store is not None:
                life = min(ttl, ticket.fetched + self.l1.bound - self.l1.clock())
            if from_unvouched:
                # derived from a source value nothing vouches for (itself capped in L1 from ITS fetch): computed
                # again from it on each read, never cached, or the cap would restart from this ticket
                life = 0
            entry = self._entry(body, loaded_at, life, loaded_at + ttl, short, gens, incarnation, vouched)
            if life <= 0 or not self.l1.install(ticket, entry):
                self.stats.inc(dt, "fills_rejected")
        return Lookup(body, Source.MISS, loaded_at, gens, incarnation, vouched)

    # ------------------------------------------------------------ helpers
    def _hit(self, key: CacheKey, ticket: Ticket, stored: codec.Stored) -> Lookup:
        dt = key.data_type
        self.stats.inc(dt, "l2_hits")
        loaded_at = stored.loaded_at_ms / 1000
        ttl = self.policy.ttl_for(dt, stored.short)
        entry = self._entry(
            stored.body, loaded_at, ttl, stored.fresh_until_ms / 1000, stored.short, stored.gens, stored.incarnation
        )
        self.l1.install(ticket, entry)
        return Lookup(stored.body, Source.L2, loaded_at, stored.gens, stored.incarnation)

    def _entry(
        self,
        body: bytes,
        loaded_at: float,
        ttl: float,
        fresh_until: float,
        short: bool,
        gens: str,
        incarnation: str,
        vouched: bool = True,
    ) -> Entry:
        """An L1 entry; hot positive entries that will live until their logical expiry get a refresh time.

        ``short`` answers (absences: 404s, ``exists: false``) are never refreshed ahead nor kept as last-known.
        """
        remaining = fresh_until - time.time()
        lifetime = min(ttl, remaining)
        refresh_at = None
        short = short or body == codec.NEGATIVE
        if not short and remaining <= self.l1.max_ttl:
            lead = remaining - self.policy.refresh_ahead * ttl
            if lead > 0:
                refresh_at = self.l1.clock() + lead
        hit = Lookup(body, Source.L1, loaded_at, gens, incarnation, vouched)
        return Entry(
            body,
            loaded_at,
            lifetime,
            fresh_until=fresh_until,
            refresh_at=refresh_at,
            short=short,
            unvouched=not vouched,
            hit=hit,
        )

    def _stale(self, key: CacheKey, stale: codec.Stored | None, now: float) -> Lookup | None:
        """Stale-if-error: the newest last-known value within max-stale, from Redis or this instance."""
        dt = key.data_type
        candidates: list[tuple[bytes, float, float]] = []
        if stale is not None and not stale.short:
            candidates.append((stale.body, stale.loaded_at_ms / 1000, stale.fresh_until_ms / 1000))
        last = self.l1.last_known(key.rendered)
        if last is not None and not last.negative:
            candidates.append((last.body, last.loaded_at, last.fresh_until or last.loaded_at + last.ttl))
        limit = self.policy.max_stale.get(dt, 0)
        usable = [c for c in candidates if now - c[2] <= limit]
        if not usable:
            return None
        body, loaded_at, _ = max(usable, key=lambda c: c[1])
        self.stats.inc(dt, "stale_served")
        if self.tracer is not None:
            self.tracer.start_span("cache.stale", attributes=key_attributes(key, "stale", "stale")).end()
        return Lookup(body, Source.STALE, loaded_at, vouched=False)

    def _span(self, name: str, key: CacheKey, tier: str) -> Any:
        """A span of one tier step (a no-op context when spans are not recorded)."""
        if self.tracer is None:
            return _NO_SPAN
        return self.tracer.start_as_current_span(name, attributes=key_attributes(key, tier))
