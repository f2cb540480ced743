"""L1: one bounded in-process cache (cachetools TLRUCache), each entry with its own lifetime.

Reads are plain dictionary work, never awaited. Writes go through *tickets*, so a value can never be installed if
an invalidation overtook the load that produced it (the in-process half of the coherence protocol, stated in
:mod:`tiers.coherence`):

* ``ticket(key, deps)`` is taken before a value is fetched (from Redis or the origin). It records the L1's logical
  clock, its epoch and the fetch time.
* ``invalidate(keys)`` advances the logical clock and remembers, per key, the tick of its last invalidation.
* ``install(ticket, entry)`` refuses the entry when the key or any of its sources (``deps``: the rate a conversion
  was computed from) was invalidated after the ticket was taken, or when the epoch changed.
* An entry of a derived key is also checked against its sources on every hit, so invalidating a rate makes every
  conversion of it unservable at once, without any index of conversions.

The memory of invalidation ticks is bounded: when it is full the oldest tick is forgotten and becomes the
``floor`` that every unknown key is assumed to have been invalidated at (spurious misses, never a stale hit).

Trust: an entry is served while the invalidation bus' lease is valid (``trusted_until``, renewed by the bus on
every confirmed round trip), or, when it is not, only within ``bound`` seconds of the moment its value was
fetched (never a derived entry then). Either way no entry is served more than ``bound`` after a write that it
missed was acknowledged. (``bound`` here is the protocol's B minus the flight-join window: tiers.coherence.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any

from cachetools import LRUCache, TLRUCache

INF = float("inf")


@dataclass(frozen=True, slots=True)
class Entry:
    body: bytes  # the JSON answer (b"null": known not to exist)
    loaded_at: float  # wall-clock seconds when the origin produced it (for Age)
    ttl: float  # seconds this entry may live in L1
    fetched: float = 0.0  # L1 clock when the value was fetched from Redis or the origin (the ticket's time)
    fresh_until: float = 0.0  # wall-clock logical expiry (for max-stale)
    refresh_at: float | None = None  # L1 clock from which a hit triggers a background refresh
    short: bool = False  # an absence (404, exists=false): never kept as a last-known value
    # nothing vouched that the value was current when fetched (Redis could not be asked, or refused or could not take
    # its fill): never kept as a last-known value (stale-if-error must not revive what a write it missed replaced)
    unvouched: bool = False
    deps: tuple[str, ...] = ()  # the sources of a derived key (its own key is not listed)
    stamp: int = 0  # the logical clock of the ticket that installed it (checked against ``deps``)
    hit: Any = field(default=None, compare=False)  # the answer to return on a hit, built once by the owner

    @property
    def negative(self) -> bool:
        return self.body == b"null"


@dataclass(frozen=True, slots=True)
class Ticket:
    key: str
    deps: tuple[str, ...]
    tick: int  # logical clock when taken
    epoch: int
    fetched: float  # L1 clock when taken (before the fetch began)


def _ttu(_key: str, entry: Entry, now: float) -> float:
    return now + entry.ttl


class L1:
    def __init__(
        self,
        max_entries: int,
        max_ttl: float,
        *,
        bound: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        trusted: bool = False,
        memory: int | None = None,
    ) -> None:
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.bound = bound
        self.clock = clock
        self._cache: TLRUCache[str, Entry] = TLRUCache(maxsize=max_entries, ttu=_ttu, timer=clock)
        # last-known values for stale-if-error: they outlive expiry, never an invalidation or an epoch change
        self._last: LRUCache[str, Entry] = LRUCache(maxsize=max_entries)
        # the bus' lease: entries are served without the per-entry bound until then (inf: no bus is needed)
        self.trusted_until = INF if trusted else -INF
        self.epoch = 0
        self._tick = 0
        self._invalidated: dict[str, int] = {}  # key -> tick of its last invalidation, oldest first
        self._floor = 0  # assumed invalidation tick of every key not in _invalidated
        self._void_before = 0  # tickets older than this are void (pattern invalidations)
        self._memory = memory or 4 * max_entries
        self.installs_refused = 0
        self.epochs = 0

    # ---- reads (hot path)
    def get(self, key: str) -> Entry | None:
        try:
            entry = self._cache[key]
        except KeyError:
            return None
        now = self.clock()
        if now < self.trusted_until:
            if entry.deps and not self._deps_valid(entry):
                return None
            return entry
        # the lease lapsed: only a value fetched within the bound, and never a derived one (its sources may have
        # been fetched up to a bound earlier than itself)
        if not entry.deps and now < entry.fetched + self.bound:
            return entry
        return None

    def _deps_valid(self, entry: Entry) -> bool:
        inval, floor = self._invalidated, self._floor
        return all(inval.get(d, floor) <= entry.stamp for d in entry.deps)

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    @property
    def serving(self) -> bool:
        """Whether entries are served past ``bound`` after their fetch (the bus' lease is valid)."""
        return self.clock() < self.trusted_until

    def last_known(self, key: str) -> Entry | None:
        """The last value this instance held for ``key`` (even expired), unless it was invalidated since — which this
        instance can only vouch for while the lease holds (or for what it fetched within the bound)."""
        entry = self._last.get(key)
        if entry is None:
            return None
        now = self.clock()
        if now >= self.trusted_until and (entry.deps or now >= entry.fetched + self.bound):
            return None
        if entry.deps and not self._deps_valid(entry):
            return None
        return entry

    def keys(self) -> list[str]:
        return list(self._cache.keys())

    def items_sample(self, n: int) -> Iterable[tuple[str, Entry]]:
        """Up to ``n`` (key, entry) pairs, without touching recency (for size estimates)."""
        cache = self._cache
        for i, key in enumerate(list(cache.keys())):
            if i >= n:
                return
            entry = cache.get(key)
            if entry is not None:
                yield key, entry

    # ---- fills (tickets)
    def ticket(self, key: str, deps: tuple[str, ...] = ()) -> Ticket:
        return Ticket(key, deps, self._tick, self.epoch, self.clock())

    def valid(self, ticket: Ticket) -> bool:
        """True while nothing overtook the ticket: no invalidation of its key or deps, no epoch change."""
        if ticket.epoch != self.epoch or ticket.tick < self._void_before:
            return False
        inval, floor, tick = self._invalidated, self._floor, ticket.tick
        if inval.get(ticket.key, floor) > tick:
            return False
        return all(inval.get(d, floor) <= tick for d in ticket.deps)

    def install(self, ticket: Ticket, entry: Entry) -> bool:
        """Install ``entry`` for ``ticket.key`` unless the ticket was overtaken; its ttl is capped at ``max_ttl``."""
        if not self.valid(ticket) or entry.ttl <= 0:
            self.installs_refused += 1
            return False
        entry = replace(
            entry, ttl=min(entry.ttl, self.max_ttl), fetched=ticket.fetched, deps=ticket.deps, stamp=ticket.tick
        )
        self._cache[ticket.key] = entry
        if not entry.short and not entry.negative and not entry.unvouched:
            self._last[ticket.key] = entry
        return True

    # ---- invalidation
    def invalidate(self, keys: Iterable[str]) -> int:
        """Drop ``keys`` and make every derived entry and every ticket that depends on them unusable."""
        self._tick += 1
        tick, inval = self._tick, self._invalidated
        dropped = 0
        for key in keys:
            inval.pop(key, None)
            inval[key] = tick
            self._last.pop(key, None)
            if self._cache.pop(key, None) is not None:
                dropped += 1
        while len(inval) > self._memory:
            oldest = next(iter(inval))
            self._floor = max(self._floor, inval.pop(oldest))
        return dropped

    def invalidate_pattern(self, pattern: str) -> int:
        """Drop every entry whose key or source matches the glob ``pattern``; void every ticket in flight."""
        self._tick += 1
        self._void_before = self._tick
        doomed = [
            k
            for k, e in [*self._cache.items(), *self._last.items()]
            if fnmatchcase(k, pattern) or any(fnmatchcase(d, pattern) for d in e.deps)
        ]
        dropped = 0
        for key in set(doomed):
            self._last.pop(key, None)
            if self._cache.pop(key, None) is not None:
                dropped += 1
        return dropped

    def new_epoch(self) -> None:
        """Forget everything: nothing held (or being loaded) can be trusted across a gap in invalidations."""
        self.epoch += 1
        self.epochs += 1
        self._cache.clear()
        self._last.clear()

    def expire(self) -> None:
        self._cache.expire()
