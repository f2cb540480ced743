"""The read-through actor every domain builds on.

Read path: ``get`` checks L1 directly (no mailbox hop). A miss is a ``Load`` message; the actor keeps one
in-flight load per key (single-flight in this process) and answers every asker from it. The load runs in an
owned child task: L2 (Redis) → fleet lease → origin → fill, and reports back with a ``Filled`` message.

Fill tokens: an ``Invalidate`` that reaches the actor while a load of the key is in flight voids that load. The
loaded value still answers the requests that were waiting for it, but it is never installed in L1, and the
next request starts a fresh load. In Redis the same guarantee comes from the lease (tiers.l2).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import secrets
import time
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from opentelemetry.trace import Tracer

from actors.base import Actor, ActorStopped
from actors.stats import Stats
from actors.tracing import A_OUTCOME, key_attributes, l1_span
from tiers import codec
from tiers.errors import CacheUnavailable, OriginError
from tiers.keys import CacheKey, DataType, Namespace, group_for_pattern, group_of, namespace_of
from tiers.l1 import L1, Entry
from tiers.l2 import ACQUIRED_FRESH, ACQUIRED_LEASE, L2, fleet_wait_delays


class Source(enum.StrEnum):
    L1 = "L1"
    L2 = "L2"
    MISS = "MISS"
    STALE = "STALE"


@dataclass(frozen=True, slots=True)
class Lookup:
    body: bytes  # JSON answer; b"null" = known not to exist
    source: Source
    loaded_at: float  # wall-clock seconds

    @property
    def negative(self) -> bool:
        return self.body == codec.NEGATIVE

    def age(self, now: float | None = None) -> int:
        return max(0, int((now or time.time()) - self.loaded_at))


@dataclass(frozen=True, slots=True)
class Answer:
    """What ``origin()`` may return instead of plain body bytes.

    ``short=True``: a real answer (served with 200) that states an absence, e.g. a trustline with
    ``exists: false``; it is cached with the data type's negative TTL and never served stale, like a
    ``b"null"`` "does not exist" answer, but it is answered as a body, not as 404.
    """

    body: bytes
    short: bool = False


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


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Load:
    key: CacheKey


@dataclass(frozen=True, slots=True)
class Refresh:
    """A hot key is close to expiry: reload it in the background (at most one load across the fleet)."""

    key: CacheKey


@dataclass(frozen=True, slots=True)
class Fill:
    """A reader found a fresh value in Redis: install it unless an invalidation came in since it looked."""

    key: str
    entry: Entry
    seq: int  # the actor's invalidation sequence when the read began
    epoch: int  # the L1 trust epoch when the read began


@dataclass(frozen=True, slots=True)
class Filled:
    key: str
    token: int
    entry: Entry | None  # None: do not install (e.g. stale answer)
    lookup: Lookup


@dataclass(frozen=True, slots=True)
class Failed:
    key: str
    token: int
    error: BaseException


@dataclass(frozen=True, slots=True)
class Invalidate:
    keys: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Install:
    """Put a value this instance just learnt to be true (e.g. trustline-created) into L1."""

    key: CacheKey
    body: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    """How far an invalidation got."""

    deleted: int  # keys Redis deleted
    complete: bool  # False: Redis or the bus could not be reached; replayed when it returns


@dataclass(frozen=True, slots=True)
class WriteResult:
    value: dict[str, Any] | None  # the stored row, None for a delete that found nothing
    invalidation: Outcome | None  # None: nothing was written


@dataclass(frozen=True, slots=True)
class _L2Miss:
    stale: codec.Stored | None  # a value past its TTL, kept for stale-if-error
    lease: str | None  # our lease token when we won the fleet lease


@dataclass(eq=False, slots=True)
class _Flight:
    token: int
    key: CacheKey
    group: str | None
    epoch: int  # the L1 trust epoch the load began in
    refresh: bool = False
    future: asyncio.Future[Lookup] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class _NoSpan:
    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_attribute(self, key: str, value: object) -> None:
        pass


_NO_SPAN = _NoSpan()


def _consume(fut: asyncio.Future[Any]) -> None:
    """Mark a shared load's outcome as retrieved even if every asker went away."""
    if not fut.cancelled():
        fut.exception()


class CacheActor(Actor):
    """Subclasses set ``namespaces`` and implement ``origin(key)`` → body bytes (or an :class:`Answer`), or None
    when it does not exist."""

    namespaces: frozenset[Namespace] = frozenset()
    tracer: Tracer | None = None  # set by the composition root when spans are recorded

    def __init__(self, *, l1: L1, l2: L2 | None, policy: Policy, stats: Stats) -> None:
        super().__init__()
        self.l1 = l1
        self.l2 = l2
        self.policy = policy
        self.stats = stats
        self._flights: dict[str, _Flight] = {}  # key -> the current load
        self._voided: dict[tuple[str, int], _Flight] = {}  # loads an invalidation overtook
        self._tokens = 0
        self._refreshing: set[str] = set()  # keys with a Refresh asked for and not yet done
        self._seq = 0  # bumped by every invalidation and install: a direct Redis read older than it never fills

    # ------------------------------------------------------------ hot path
    async def get(self, key: CacheKey) -> Lookup:
        rendered = key.rendered
        entry = self.l1.get(rendered)
        if entry is not None:  # the hot path: a dictionary read, a counter, the answer built at fill time
            self.stats.rows[key.data_type].l1_hits += 1
            if entry.refresh_at is not None and rendered not in self._refreshing:
                if time.monotonic() >= entry.refresh_at:
                    self._refreshing.add(rendered)
                    self.tell(Refresh(key))
            if self.tracer is not None:
                l1_span(self.tracer, key, "hit")
            return entry.hit or Lookup(entry.body, Source.L1, entry.loaded_at)
        if self.tracer is None:
            return await self._miss(key, rendered)
        l1_span(self.tracer, key, "miss")
        with self.tracer.start_as_current_span("cache.load", attributes=key_attributes(key)) as span:
            lookup = await self._miss(key, rendered)
            span.set_attributes({"cache.source": lookup.source.value, "cache.negative": lookup.negative})
            return lookup

    async def _miss(self, key: CacheKey, rendered: str) -> Lookup:
        """An L1 miss. A fresh Redis value is read here, without a mailbox hop, and handed to the actor to
        install (it does so only if no invalidation and no trust change came in between: ``_seq``/epoch).
        Anything else is a ``Load`` through the actor (single-flight, lease, origin)."""
        l2 = self.l2
        if l2 is not None and self.l2_usable() and rendered not in self._flights:
            seq, epoch = self._seq, self.l1.epoch
            dt = key.data_type
            t0 = time.perf_counter()
            try:
                with self._span("cache.l2", key, "l2") as span:
                    stored = await l2.read(rendered)
                    fresh = stored is not None and stored.fresh(int(time.time() * 1000))
                    span.set_attribute(A_OUTCOME, "hit" if fresh else "miss" if stored is None else "stale")
            except CacheUnavailable:
                stored, fresh = None, False
            self.stats.observe(dt, "l2", time.perf_counter() - t0)
            if fresh:
                assert stored is not None
                lookup, entry = self._l2_hit(key, stored, group_of(key))
                self.tell(Fill(rendered, entry, seq, epoch))
                return lookup
        return await self.ask(Load(key))

    async def warm(self, keys_: list[CacheKey], concurrency: int = 8) -> int:
        """Read ``keys_`` through the normal path (so warming is coherent and single-flight); returns how many
        answered. Failures are counted, not raised: warming is best effort."""
        slots = asyncio.Semaphore(concurrency)
        done = 0

        async def one(key: CacheKey) -> None:
            nonlocal done
            async with slots:
                try:
                    await self.get(key)
                    done += 1
                except (OriginError, ActorStopped):
                    pass

        await asyncio.gather(*(one(k) for k in keys_))
        return done

    # ------------------------------------------------------------ subclass API
    async def origin(self, key: CacheKey) -> bytes | Answer | None:
        raise NotImplementedError

    def l2_usable(self) -> bool:
        return self.l2 is not None

    # ------------------------------------------------------------ mailbox
    def receive(self, msg: Any) -> Any:
        match msg:
            case Load(key):
                return self._on_load(key)
            case Refresh(key):
                return self._on_refresh(key)
            case Filled():
                return self._on_filled(msg)
            case Fill(key, entry, seq, epoch):
                if seq == self._seq and epoch == self.l1.epoch and key not in self._flights:
                    self.l1.put(key, entry)
                return None
            case Failed():
                return self._on_failed(msg)
            case Invalidate(keys, patterns):
                return self._on_invalidate(keys, patterns)
            case Install(key, body):
                return self._install(key, body)
        return self.receive_other(msg)

    def receive_other(self, msg: Any) -> Any:
        raise TypeError(f"{self.name}: unexpected message {type(msg).__name__}")

    def _on_load(self, key: CacheKey) -> Awaitable[Lookup] | Lookup:
        rendered = key.render()
        flight = self._flights.get(rendered)
        if flight is not None:
            return flight.future
        entry = self.l1.get(rendered)  # filled while this message waited in the mailbox
        if entry is not None:
            self.stats.inc(key.namespace.data_type, "l1_hits")
            return Lookup(entry.body, Source.L1, entry.loaded_at)
        self._tokens += 1
        flight = _Flight(self._tokens, key, group_of(key), self.l1.epoch)
        flight.future.add_done_callback(_consume)
        self._flights[rendered] = flight
        self.spawn(self._load(flight), name=f"{self.name}:load")
        return flight.future

    def _on_refresh(self, key: CacheKey) -> None:
        rendered = key.render()
        if rendered in self._flights:
            self._refreshing.discard(rendered)
            return
        self._tokens += 1
        flight = _Flight(self._tokens, key, group_of(key), self.l1.epoch, refresh=True)
        flight.future.add_done_callback(_consume)
        self._flights[rendered] = flight
        self.stats.inc(key.namespace.data_type, "refreshes")
        self.spawn(self._load(flight), name=f"{self.name}:refresh")

    async def _load(self, flight: _Flight) -> None:
        rendered = flight.key.render()
        try:
            lookup, entry = await self._read_through(flight.key, flight.group, flight.refresh)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self.tell(Failed(rendered, flight.token, err))
            return
        self.tell(Filled(rendered, flight.token, entry, lookup))

    def _on_filled(self, msg: Filled) -> None:
        flight, current = self._take_flight(msg.key, msg.token)
        if flight is None:
            return
        if flight.epoch != self.l1.epoch:
            current = False  # L1's trust changed while loading (a gap in invalidations): do not install
        if current and msg.entry is not None:
            self.l1.put(msg.key, msg.entry)  # a voided load answers its waiters but never fills L1
        elif not current:
            self.stats.inc(flight.key.namespace.data_type, "fills_rejected")
        if not flight.future.done():
            flight.future.set_result(msg.lookup)

    def _on_failed(self, msg: Failed) -> None:
        flight, _ = self._take_flight(msg.key, msg.token)
        if flight is not None and not flight.future.done():
            flight.future.set_exception(msg.error)

    def _take_flight(self, key: str, token: int) -> tuple[_Flight | None, bool]:
        self._refreshing.discard(key)
        flight = self._flights.get(key)
        if flight is not None and flight.token == token:
            del self._flights[key]
            return flight, True
        return self._voided.pop((key, token), None), False

    def _on_invalidate(self, keys: Iterable[str], patterns: Iterable[str]) -> int:
        self._seq += 1
        dropped = self.l1.drop(keys)
        for k in keys:
            self._void(k)
        for p in patterns:
            group = group_for_pattern(p)
            if group is not None:
                dropped += self.l1.drop_group(group)
                doomed = [k for k, f in self._flights.items() if f.group == group]
            else:
                dropped += self.l1.drop_pattern(p)
                doomed = [k for k in self._flights if fnmatchcase(k, p)]
            for k in doomed:
                self._void(k)
        return dropped

    def _void(self, key: str) -> None:
        flight = self._flights.pop(key, None)
        if flight is not None:
            self._voided[(key, flight.token)] = flight

    def _install(self, key: CacheKey, body: bytes) -> bool:
        self._seq += 1
        rendered = key.render()
        self._void(rendered)
        negative = body == codec.NEGATIVE
        ttl = self.policy.ttl_for(key.namespace.data_type, negative)
        now = time.time()
        return self.l1.put(rendered, self._entry(body, now, ttl, now + ttl, group_of(key)))

    async def on_stopped(self) -> None:
        for flight in [*self._flights.values(), *self._voided.values()]:
            if not flight.future.done():
                flight.future.set_exception(ActorStopped(f"{self.name} stopped"))
        self._flights.clear()
        self._voided.clear()

    # ------------------------------------------------------------ the tiers below L1
    async def _read_through(
        self, key: CacheKey, group: str | None, refresh: bool = False
    ) -> tuple[Lookup, Entry | None]:
        rendered = key.render()
        dt = key.namespace.data_type
        stale: codec.Stored | None = None
        lease: str | None = None
        l2 = self.l2 if self.l2_usable() else None
        if l2 is not None:
            try:
                token = secrets.token_hex(8)
                lease_ms = int(self.policy.lease_ttl * 1000)
                if refresh and await l2.try_lease(rendered, token, lease_ms, group):
                    lease = token  # this instance refreshes the key for the whole fleet
                else:
                    lookup = await self._l2_lookup(key, rendered, group, token, lease_ms)
                    if isinstance(lookup, tuple):
                        return lookup
                    stale, lease = lookup.stale, lookup.lease
            except CacheUnavailable:
                l2 = None  # misses on Redis errors never wait on a lease
                lease = None

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
            if l2 is not None and lease is not None:
                with contextlib.suppress(CacheUnavailable):
                    await l2.release(rendered, lease)  # peers waiting on this lease load (or fail) now
            served = self._stale_answer(dt, rendered, stale, loaded_at)
            if served is not None:
                if self.tracer is not None:
                    self.tracer.start_span("cache.stale", attributes=key_attributes(key, "stale", "stale")).end()
                return served, None
            raise
        if answer is None:
            body, short = codec.NEGATIVE, True
        elif isinstance(answer, Answer):
            body, short = answer.body, answer.short or answer.body == codec.NEGATIVE
        else:
            body, short = answer, answer == codec.NEGATIVE
        ttl = self.policy.ttl_for(dt, short)
        if l2 is not None and lease is not None:
            fresh_until = int((loaded_at + ttl) * 1000)
            px = int((ttl + (0 if short else self.policy.max_stale.get(dt, 0))) * 1000)
            packed = codec.pack(body, fresh_until, int(loaded_at * 1000), short)
            try:
                with self._span("cache.fill", key, "l2"):
                    filled = await l2.fill(rendered, lease, packed, px)
                if not filled:
                    self.stats.inc(dt, "fills_rejected")
            except CacheUnavailable:
                pass
        entry = self._entry(body, loaded_at, ttl, loaded_at + ttl, group, short)
        return Lookup(body, Source.MISS, loaded_at), entry

    async def _l2_lookup(
        self, key: CacheKey, rendered: str, group: str | None, token: str, lease_ms: int
    ) -> tuple[Lookup, Entry] | _L2Miss:
        """Redis: a fresh value, or the fleet lease (waiting, bounded, while a peer holds it)."""
        l2 = self.l2
        assert l2 is not None
        dt = key.namespace.data_type
        t0 = time.perf_counter()
        with self._span("cache.l2", key, "l2") as span:
            acq = await l2.acquire(rendered, token, lease_ms, group)  # a fresh value, or the lease
            span.set_attribute(A_OUTCOME, "hit" if acq.status == ACQUIRED_FRESH else "miss")
        self.stats.observe(dt, "l2", time.perf_counter() - t0)
        stored = acq.stored
        if acq.status not in (ACQUIRED_FRESH, ACQUIRED_LEASE):
            # another instance holds the lease: wait (bounded) for its fill
            for delay in fleet_wait_delays(self.policy.lease_wait):
                await asyncio.sleep(delay)  # polling a peer's fill, with a deadline
                acq = await l2.acquire(rendered, token, lease_ms, group)
                if acq.status in (ACQUIRED_FRESH, ACQUIRED_LEASE):
                    break
        if acq.status == ACQUIRED_FRESH and acq.stored is not None:
            return self._l2_hit(key, acq.stored, group)
        return _L2Miss(acq.stored or stored, token if acq.status == ACQUIRED_LEASE else None)

    def _entry(
        self, body: bytes, loaded_at: float, ttl: float, fresh_until: float, group: str | None, short: bool = False
    ) -> Entry:
        """An L1 entry; hot positive entries that will live until their logical expiry get a refresh time.

        ``short`` answers (absences: 404s, ``exists: false``) are never refreshed ahead nor kept as last-known.
        """
        remaining = fresh_until - time.time()
        lifetime = min(ttl, remaining)
        refresh_at = None
        short = short or body == codec.NEGATIVE
        if not short and remaining <= self.l1.cap:
            lead = remaining - self.policy.refresh_ahead * ttl
            if lead > 0:
                refresh_at = time.monotonic() + lead
        return Entry(
            body, loaded_at, lifetime, group, fresh_until, refresh_at, short, Lookup(body, Source.L1, loaded_at)
        )

    def _l2_hit(self, key: CacheKey, stored: codec.Stored, group: str | None) -> tuple[Lookup, Entry]:
        dt = key.namespace.data_type
        self.stats.inc(dt, "l2_hits")
        loaded_at = stored.loaded_at_ms / 1000
        fresh_until = stored.fresh_until_ms / 1000
        short = stored.short
        ttl = self.policy.ttl_for(dt, short)
        entry = self._entry(stored.body, loaded_at, ttl, fresh_until, group, short)
        return Lookup(stored.body, Source.L2, loaded_at), entry

    def _stale_answer(self, dt: DataType, rendered: str, stale: codec.Stored | None, now: float) -> Lookup | None:
        """Stale-if-error: the newest last-known value within max-stale, from Redis or this instance."""
        candidates: list[tuple[bytes, float, float]] = []
        if stale is not None and not stale.short:
            candidates.append((stale.body, stale.loaded_at_ms / 1000, stale.fresh_until_ms / 1000))
        last = self.l1.last_known(rendered)
        if last is not None and not last.negative:
            candidates.append((last.body, last.loaded_at, last.fresh_until or last.loaded_at + last.ttl))
        limit = self.policy.max_stale.get(dt, 0)
        usable = [c for c in candidates if now - c[2] <= limit]
        if not usable:
            return None
        body, loaded_at, _ = max(usable, key=lambda c: c[1])
        self.stats.inc(dt, "stale_served")
        return Lookup(body, Source.STALE, loaded_at)

    def _span(self, name: str, key: CacheKey, tier: str) -> Any:
        """A span of one tier step (a no-op context when spans are not recorded)."""
        if self.tracer is None:
            return _NO_SPAN
        return self.tracer.start_as_current_span(name, attributes=key_attributes(key, tier))

    def owns(self, rendered: str) -> bool:
        ns = namespace_of(rendered)
        return ns is not None and ns in self.namespaces
