"""Readiness probes of the tiers, so HTTP handlers never touch Postgres or Redis themselves."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Protocol

from tiers.errors import TierError


class Pingable(Protocol):
    async def ping(self) -> None: ...


class Subscriber(Protocol):
    @property
    def listening(self) -> bool: ...


class HealthProbe:
    def __init__(
        self,
        postgres: Pingable,
        redis: Pingable | None,
        bus: Subscriber | None = None,
        *,
        pg_timeout: float = 1.0,
        redis_timeout: float = 0.5,
    ) -> None:
        self.postgres = postgres
        self.redis = redis
        self.bus = bus
        self.pg_timeout = pg_timeout
        self.redis_timeout = redis_timeout

    async def checks(self) -> dict[str, str]:
        """The contract's checks: postgres up/down, redis up/down, invalidation subscribed/disconnected.

        Both pings run at once, each bounded; Redis is not pinged past an open circuit breaker (the ping itself
        goes through it and is refused at once)."""
        pg, rd = await asyncio.gather(
            _up(self.postgres.ping(), self.pg_timeout),
            _up(self.redis.ping(), self.redis_timeout) if self.redis is not None else _down(),
        )
        hearing = self.bus is not None and self.bus.listening  # subscribed, and its lease proves it hears the bus
        return {"postgres": pg, "redis": rd, "invalidation": "subscribed" if hearing else "disconnected"}


async def _up(ping: Awaitable[None], limit: float) -> str:
    try:
        async with asyncio.timeout(limit):
            await ping
        return "up"
    except (TierError, TimeoutError):
        return "down"


async def _down() -> str:
    return "down"
