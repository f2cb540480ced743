"""What the coherence protocol needs from the shared tier: a narrow Protocol, implemented on Redis by
:mod:`tiers.coherence.redis_store` (Lua scripts) and in memory by the tests' own fake (tests/fakes.py). One
contract suite runs against both.

Names: ``key`` is a rendered cache key; ``sources`` are the keys whose generations guard it (the key itself for a
value loaded from an origin, the rate for a conversion).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tiers.codec import Stored


class Status(enum.IntEnum):
    HIT = 1  # a fresh, valid value
    LEASE = 2  # no fresh value; this caller holds the key's load lease (one origin load across the fleet)
    TAKEN = 3  # no fresh value; another caller holds the lease
    FENCED = 4  # a write of a source is in progress: nothing may be filled until it ends


@dataclass(frozen=True, slots=True)
class Acquired:
    status: Status
    stored: Stored | None  # HIT: the fresh value; otherwise a valid stale one (stale-if-error) or None
    gens: str  # the sources' current generations: a fill must present them
    incarnation: str  # the Redis incarnation that answered: a fill is stamped with it


@dataclass(frozen=True, slots=True)
class Message:
    seq: int | None  # the channel's sequence number (None: not published by this protocol)
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    token: int


class Subscription(Protocol):
    """One subscriber session: messages and pongs arrive in the order Redis sent them."""

    async def next(self, wait: float) -> Message | Pong | None: ...  # None: nothing within ``wait`` s
    async def ping(self, token: int) -> None: ...
    async def close(self) -> None: ...


class Store(Protocol):
    @property
    def incarnation(self) -> str: ...

    async def read(self, key: str, sources: Sequence[str]) -> Stored | None: ...
    async def acquire(
        self, key: str, sources: Sequence[str], token: str, lease_ms: int, now_ms: int, *, refresh: bool = False
    ) -> Acquired: ...
    async def fill(
        self,
        key: str,
        sources: Sequence[str],
        gens: str,
        token: str,
        head: bytes,
        tail: bytes,
        px: int,
        *,
        gen_px: int,
    ) -> str | None: ...  # the generations stored with the value, None when refused
    async def release(self, key: str, token: str) -> None: ...
    async def invalidate(
        self, sources: Sequence[str], message: bytes, *, fence: str | None = None, fence_ms: int = 0
    ) -> int: ...
    async def unfence(
        self, sources: Sequence[str], token: str, *, committed: bool
    ) -> int: ...  # how many of this writer's fences were still held
    async def replace(
        self,
        key: str,
        sources: Sequence[str],
        head: bytes,
        tail: bytes,
        px: int,
        message: bytes,
        *,
        invalidate: Sequence[str] = (),
    ) -> int: ...
    async def delete_pattern(self, pattern: str, message: bytes) -> int: ...
    async def subscribe(self) -> Subscription: ...
