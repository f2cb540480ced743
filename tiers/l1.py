"""L1: one bounded in-process cache (cachetools TLRUCache), each entry with its own lifetime.

An entry's lifetime is the smaller of its data type's remaining TTL and ``max_ttl`` (the staleness bound when
every invalidation signal is lost). Reads are plain dictionary work, never awaited. Only the owning actors write.

``serving`` is switched off while this instance cannot trust its L1 (invalidation subscriber down): reads then
miss, and the cache is cleared on the way down and again on the way back up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from cachetools import LRUCache, TLRUCache


@dataclass(frozen=True, slots=True)
class Entry:
    body: bytes  # the JSON answer (b"null": known not to exist)
    loaded_at: float  # wall-clock seconds when the origin produced it (for Age)
    ttl: float  # seconds this entry may live in L1
    group: str | None = None  # invalidation group (e.g. all conversions of a pair)
    fresh_until: float = 0.0  # wall-clock logical expiry (for max-stale)
    refresh_at: float | None = None  # monotonic time from which a hit triggers a background refresh
    short: bool = False  # an absence (404, exists=false): never kept as a last-known value
    hit: Any = field(default=None, compare=False)  # the answer to return on a hit, built once by the owner

    @property
    def negative(self) -> bool:
        return self.body == b"null"


def _ttu(_key: str, entry: Entry, now: float) -> float:
    return now + entry.ttl


class L1:
    def __init__(self, max_entries: int, max_ttl: float, timer: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.cap = max_ttl  # lowered while degraded
        self._cache: TLRUCache[str, Entry] = TLRUCache(maxsize=max_entries, ttu=_ttu, timer=timer)
        self._groups: dict[str, set[str]] = {}
        # last-known values for stale-if-error: they outlive expiry and L1 clears, never an invalidation
        self._last: LRUCache[str, Entry] = LRUCache(maxsize=max_entries)
        self.serving = True
        self.mode = "normal"
        self.epoch = 0  # bumped by every mode change: a load begun in an older epoch never fills L1

    # ---- reads (hot path)
    def get(self, key: str) -> Entry | None:
        if not self.serving:
            return None
        try:
            return self._cache[key]
        except KeyError:
            return None

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    # ---- writes (actors only)
    def put(self, key: str, entry: Entry) -> bool:
        """Install an entry; its ttl is clamped to the cap. Returns False if L1 is not serving."""
        if not self.serving or entry.ttl <= 0:
            return False
        if entry.ttl > self.cap:
            entry = Entry(
                entry.body, entry.loaded_at, self.cap, entry.group, entry.fresh_until, None, entry.short, entry.hit
            )
        self._cache[key] = entry
        if not entry.short and not entry.negative:
            self._last[key] = entry
        if entry.group is not None:
            members = self._groups.setdefault(entry.group, set())
            members.add(key)
            if len(members) > 2 * self.max_entries or len(self._groups) > 2 * self.max_entries:
                self._prune_groups()
        return True

    def _prune_groups(self) -> None:
        """Evicted members linger in the group index; drop those no tier of L1 still holds."""
        live = {*self._cache.keys(), *self._last.keys()}
        for group in list(self._groups):
            members = self._groups[group]
            members.intersection_update(live)
            if not members:
                del self._groups[group]

    def pop(self, key: str) -> bool:
        self._last.pop(key, None)
        return self._cache.pop(key, None) is not None

    def drop(self, keys: Iterable[str]) -> int:
        return sum(1 for k in keys if self.pop(k))

    def drop_group(self, group: str) -> int:
        members = self._groups.pop(group, ())
        return self.drop(members)

    def drop_pattern(self, pattern: str) -> int:
        """Glob pattern (only ``*`` is used by the service); scans the bounded cache."""
        doomed = [k for k in {*self._cache.keys(), *self._last.keys()} if fnmatchcase(k, pattern)]
        return self.drop(doomed)

    def last_known(self, key: str) -> Entry | None:
        """The last value this instance held for ``key`` (even expired), unless it was invalidated since."""
        return self._last.get(key)

    def clear(self) -> None:
        """Forget what L1 serves (not the last-known values, which only answer origin failures as STALE)."""
        self._cache.clear()

    def expire(self) -> None:
        self._cache.expire()

    # ---- trust modes (see actors.invalidation.Invalidator.update_trust)
    def set_mode(self, mode: str, degraded_ttl: float = 1.0) -> None:
        """normal: serve, cap max_ttl; degraded: serve, cap degraded_ttl; off: serve nothing. Always clears."""
        self.clear()
        self.epoch += 1
        self.mode = mode
        self.serving = mode != "off"
        self.cap = degraded_ttl if mode == "degraded" else self.max_ttl

    def keys(self) -> list[str]:
        return list(self._cache.keys())
