"""L2: Redis through redis.asyncio: the seed's cache API on raw bytes, and the guarded boundary of every Redis call.

The seed's API: get/set/delete/exists/get_many/set_many/increment/decrement/expire/ttl/delete_pattern. The
coherent read-through and invalidation primitives (leases, generations, fences, the bus) are the coherence
protocol's and live in :mod:`tiers.coherence`, on top of :meth:`RedisCache.guard`.

Every Redis or socket error is translated into :class:`tiers.errors.CacheUnavailable` here: ``guard`` applies the
circuit breaker and the operation budget, and translates.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from fnmatch import fnmatchcase

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from tiers.breaker import Breaker
from tiers.errors import CacheUnavailable
from tiers.redis_pool import ManagedPool

LEASE_SUFFIX = "|lease"
COMPANIONS = (LEASE_SUFFIX, "|pre")  # keys that go with a value when it is deleted by pattern

# KEYS[1]=counter ; ARGV: by, ttl_ms. The TTL is set when the counter is created (Redis 6.2 has no PEXPIRE NX).
_INCR_TTL = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return v
"""


def _raw(value: bytes | str | None) -> bytes | None:
    """redis-py types a reply as bytes or str (``decode_responses``); our clients never decode, but say so once."""
    return value.encode() if isinstance(value, str) else value


class RedisCache:
    def __init__(
        self,
        client: aioredis.Redis,
        pool: ManagedPool | None = None,
        *,
        scan_batch: int = 500,
        breaker: Breaker | None = None,
        op_timeout: float | None = None,
    ) -> None:
        self.client = client
        self.pool = pool
        self.scan_batch = scan_batch
        self.breaker = breaker or Breaker()
        self.op_timeout = op_timeout  # whole budget of one operation: pool wait + connect + command
        self._incr_ttl = client.register_script(_INCR_TTL)

    @asynccontextmanager
    async def guard(self, op: str) -> AsyncIterator[None]:
        """The one boundary of every Redis call: breaker, timeout, and translation of errors."""
        breaker = self.breaker
        if not breaker.allow():
            raise CacheUnavailable(f"redis {op}: circuit open")
        try:
            if self.op_timeout is None:
                yield
            else:
                async with asyncio.timeout(self.op_timeout):
                    yield
        except ResponseError as err:  # Redis answered: not an outage, but the operation failed
            breaker.success()
            raise CacheUnavailable(f"redis {op}: {err}") from err
        except (RedisError, OSError, TimeoutError) as err:
            breaker.failure()
            raise CacheUnavailable(f"redis {op}: {type(err).__name__}: {err}") from err
        except BaseException:
            breaker.abandon()  # cancelled (or a bug of ours): no verdict on Redis
            raise
        else:
            breaker.success()

    # ------------------------------------------------------------ the seed's cache API (raw bytes)
    async def get(self, key: str) -> bytes | None:
        async with self.guard("GET"):
            return _raw(await self.client.get(key))

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        async with self.guard("SET"):
            await self.client.set(key, value, px=int(ttl * 1000) if ttl else None)

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        async with self.guard("UNLINK"):
            return int(await self.client.unlink(*keys))

    async def exists(self, key: str) -> bool:
        async with self.guard("EXISTS"):
            return bool(await self.client.exists(key))

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        async with self.guard("MGET"):
            return [_raw(v) for v in await self.client.mget(list(keys))]

    async def set_many(self, items: Mapping[str, bytes], ttl: float | None = None) -> None:
        if not items:
            return
        px = int(ttl * 1000) if ttl else None
        async with self.guard("SET (pipeline)"):
            async with self.client.pipeline(transaction=False) as pipe:
                for k, v in items.items():
                    pipe.set(k, v, px=px)
                await pipe.execute()

    async def increment(self, key: str, by: int = 1, ttl: float | None = None) -> int:
        async with self.guard("INCRBY"):
            if ttl is None:
                return int(await self.client.incrby(key, by))
            return int(await self._incr_ttl(keys=[key], args=[by, int(ttl * 1000)]))

    async def decrement(self, key: str, by: int = 1) -> int:
        async with self.guard("DECRBY"):
            return int(await self.client.decrby(key, by))

    async def expire(self, key: str, ttl: float) -> bool:
        async with self.guard("PEXPIRE"):
            return bool(await self.client.pexpire(key, int(ttl * 1000)))

    async def ttl(self, key: str) -> float | None:
        """Seconds left; None if the key does not exist or has no expiry."""
        async with self.guard("PTTL"):
            ms = int(await self.client.pttl(key))
        return ms / 1000 if ms >= 0 else None

    async def delete_pattern(self, pattern: str) -> int:
        """SCAN + UNLINK in batches (never KEYS). The leases and moved-aside values (``…|lease``, ``…|pre``) of
        matching keys go too; the coherence protocol's generation and fence keys (``…|g``, ``…|w``) never do.
        Returns value keys deleted."""
        deleted = 0
        async for batch in self.scan(pattern):
            doomed = [k for k in batch if "|" not in k and fnmatchcase(k, pattern)]
            leases = [k for k in batch if k.endswith(COMPANIONS) and fnmatchcase(k.rsplit("|", 1)[0], pattern)]
            if leases:
                await self.delete(*leases)
            if doomed:
                deleted += await self.delete(*doomed)
        return deleted

    async def scan(self, pattern: str) -> AsyncIterator[list[str]]:
        """Batches of keys starting like ``pattern`` (with their ``…|suffix`` companions), never KEYS."""
        cursor = 0
        match = pattern + "*"  # also reaches "{key}|lease"
        while True:
            async with self.guard("SCAN"):
                cursor, raw = await self.client.scan(cursor=cursor, match=match, count=self.scan_batch)
            if raw:
                yield [k.decode() if isinstance(k, bytes) else k for k in raw]
            if int(cursor) == 0:
                return

    async def ping(self) -> None:
        async with self.guard("PING"):
            await self.client.ping()
