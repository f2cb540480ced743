"""L2: Redis through redis.asyncio, values as orjson bodies in a small envelope (tiers.codec).

Besides the seed's cache API (get/set/delete/exists/get_many/set_many/increment/decrement/expire/ttl/
delete_pattern) this tier implements the coherent read-through primitives, modelled on memcache leases:

* ``acquire``: if the key holds a fresh value return it; otherwise try to take the key's short lease
  (``{key}|lease``). The winner loads from the origin; the others wait for its fill.
* ``fill``: install a value only while the caller still holds its lease (a Lua check-and-set). An invalidation
  deletes the lease along with the key, so a load that started before a write can never overwrite it.
* ``invalidate``: UNLINK the keys and their leases, the members of invalidation groups (e.g. every cached
  conversion of a pair, indexed in ``{group}``), and SCAN+UNLINK for patterns.

Every Redis or socket error is translated into :class:`tiers.errors.CacheUnavailable` here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from tiers import codec
from tiers.breaker import Breaker
from tiers.errors import CacheUnavailable
from tiers.redis_pool import ManagedPool

LEASE_SUFFIX = "|lease"

# KEYS[1]=key KEYS[2]=lease KEYS[3]=group index or "" ; ARGV: token, lease_ms, now_ms, group_ttl_ms
_ACQUIRE = """
local v = redis.call('GET', KEYS[1])
if v then
  local fresh_until = tonumber(string.match(v, '^[1syz]|(%d+)|'))
  if fresh_until and fresh_until > tonumber(ARGV[3]) then return {1, v} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if KEYS[3] ~= '' then
    redis.call('SADD', KEYS[3], KEYS[1])
    redis.call('PEXPIRE', KEYS[3], ARGV[4])
  end
  return {2, v or false}
end
return {3, v or false}
"""

# KEYS[1]=key KEYS[2]=lease ; ARGV: token, value, px
_FILL = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""

# KEYS[1]=lease ; ARGV[1]=token. Give a lease back (the load failed), only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS = value keys, then group index keys; ARGV[1] = how many value keys; ARGV[2], ARGV[3] = a channel and a
# message to PUBLISH once the keys are gone (empty: none), so a write costs one round trip. Returns keys unlinked.
_INVALIDATE = """
local n = 0
local nkeys = tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
  if i <= nkeys then
    n = n + redis.call('UNLINK', k)
    redis.call('UNLINK', k .. '|lease')
  else
    local members = redis.call('SMEMBERS', k)
    for _, m in ipairs(members) do
      n = n + redis.call('UNLINK', m)
      redis.call('UNLINK', m .. '|lease')
    end
    redis.call('UNLINK', k)
  end
end
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return n
"""

# KEYS[1]=counter ; ARGV: by, ttl_ms. The TTL is set when the counter is created (Redis 6.2 has no PEXPIRE NX).
_INCR_TTL = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return v
"""

ACQUIRED_FRESH, ACQUIRED_LEASE, LEASE_TAKEN = 1, 2, 3


@dataclass(frozen=True, slots=True)
class Acquire:
    status: int  # ACQUIRED_FRESH | ACQUIRED_LEASE | LEASE_TAKEN
    stored: codec.Stored | None  # the fresh value, or a stale one when present


class L2(Protocol):
    """What the actors need from the shared tier."""

    async def read(self, key: str) -> codec.Stored | None: ...
    async def acquire(self, key: str, token: str, lease_ms: int, group: str | None) -> Acquire: ...
    async def try_lease(self, key: str, token: str, lease_ms: int, group: str | None = None) -> bool: ...
    async def fill(self, key: str, token: str, value: bytes, px: int) -> bool: ...
    async def release(self, key: str, token: str) -> bool: ...
    async def invalidate(
        self,
        keys: Sequence[str],
        groups: Sequence[str],
        patterns: Sequence[str],
        publish: tuple[str, bytes] | None = None,
    ) -> int: ...


def _now_ms() -> int:
    return int(time.time() * 1000)


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
        self._acquire = client.register_script(_ACQUIRE)
        self._fill = client.register_script(_FILL)
        self._invalidate = client.register_script(_INVALIDATE)
        self._incr_ttl = client.register_script(_INCR_TTL)
        self._release = client.register_script(_RELEASE)

    @asynccontextmanager
    async def _guard(self, op: str) -> AsyncIterator[None]:
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
        async with self._guard("GET"):
            return await self.client.get(key)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        async with self._guard("SET"):
            await self.client.set(key, value, px=int(ttl * 1000) if ttl else None)

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        async with self._guard("UNLINK"):
            return int(await self.client.unlink(*keys))

    async def exists(self, key: str) -> bool:
        async with self._guard("EXISTS"):
            return bool(await self.client.exists(key))

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        async with self._guard("MGET"):
            return list(await self.client.mget(list(keys)))

    async def set_many(self, items: Mapping[str, bytes], ttl: float | None = None) -> None:
        if not items:
            return
        px = int(ttl * 1000) if ttl else None
        async with self._guard("SET (pipeline)"):
            async with self.client.pipeline(transaction=False) as pipe:
                for k, v in items.items():
                    pipe.set(k, v, px=px)
                await pipe.execute()

    async def increment(self, key: str, by: int = 1, ttl: float | None = None) -> int:
        async with self._guard("INCRBY"):
            if ttl is None:
                return int(await self.client.incrby(key, by))
            return int(await self._incr_ttl(keys=[key], args=[by, int(ttl * 1000)]))

    async def decrement(self, key: str, by: int = 1) -> int:
        async with self._guard("DECRBY"):
            return int(await self.client.decrby(key, by))

    async def expire(self, key: str, ttl: float) -> bool:
        async with self._guard("PEXPIRE"):
            return bool(await self.client.pexpire(key, int(ttl * 1000)))

    async def ttl(self, key: str) -> float | None:
        """Seconds left; None if the key does not exist or has no expiry."""
        async with self._guard("PTTL"):
            ms = int(await self.client.pttl(key))
        return ms / 1000 if ms >= 0 else None

    async def delete_pattern(self, pattern: str) -> int:
        """SCAN + UNLINK in batches (never KEYS). Leases of matching keys go too. Returns keys deleted."""
        deleted = 0
        async for batch in self._scan(pattern):
            doomed = [k for k in batch if fnmatchcase(k, pattern)]
            leases = [k for k in batch if k.endswith(LEASE_SUFFIX) and fnmatchcase(k[: -len(LEASE_SUFFIX)], pattern)]
            if leases:
                await self.delete(*leases)
            if doomed:
                deleted += await self.delete(*doomed)
        return deleted

    async def _scan(self, pattern: str) -> AsyncIterator[list[str]]:
        cursor = 0
        match = pattern + "*"  # also reaches "{key}|lease"
        while True:
            async with self._guard("SCAN"):
                cursor, raw = await self.client.scan(cursor=cursor, match=match, count=self.scan_batch)
            if raw:
                yield [k.decode() if isinstance(k, bytes) else k for k in raw]
            if int(cursor) == 0:
                return

    async def ping(self) -> None:
        async with self._guard("PING"):
            await self.client.ping()

    # ------------------------------------------------------------ coherent read-through
    async def read(self, key: str) -> codec.Stored | None:
        raw = await self.get(key)
        return codec.unpack(raw) if raw is not None else None

    async def acquire(self, key: str, token: str, lease_ms: int, group: str | None = None) -> Acquire:
        async with self._guard("EVALSHA acquire"):
            res = await self._acquire(
                keys=[key, key + LEASE_SUFFIX, group or ""],
                args=[token, lease_ms, _now_ms(), 24 * 3600 * 1000],
            )
        status = int(res[0])
        raw = res[1] if len(res) > 1 and res[1] else None
        return Acquire(status, codec.unpack(raw) if raw else None)

    async def try_lease(self, key: str, token: str, lease_ms: int, group: str | None = None) -> bool:
        """Take the key's lease if nobody holds it (a background refresh of a still-fresh value)."""
        async with self._guard("SET NX lease"):
            if group:
                async with self.client.pipeline(transaction=True) as pipe:
                    pipe.set(key + LEASE_SUFFIX, token, nx=True, px=lease_ms)
                    pipe.sadd(group, key)
                    pipe.pexpire(group, 24 * 3600 * 1000)
                    won, _, _ = await pipe.execute()
                    return bool(won)
            return bool(await self.client.set(key + LEASE_SUFFIX, token, nx=True, px=lease_ms))

    async def release(self, key: str, token: str) -> bool:
        """Give back a lease whose load failed, so peers stop waiting for a fill that will not come."""
        async with self._guard("EVALSHA release"):
            return bool(await self._release(keys=[key + LEASE_SUFFIX], args=[token]))

    async def fill(self, key: str, token: str, value: bytes, px: int) -> bool:
        async with self._guard("EVALSHA fill"):
            return bool(await self._fill(keys=[key, key + LEASE_SUFFIX], args=[token, value, px]))

    async def put(self, key: str, value: bytes, px: int) -> None:
        """Install a value known to be true (e.g. a trustline the platform just created), unconditionally.

        The key's lease is deleted first, in the same MULTI, so a load that started before (and may have read
        the old answer from the origin) can no longer fill over this value.
        """
        async with self._guard("SET (replace)"):
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.unlink(key + LEASE_SUFFIX)
                pipe.set(key, value, px=px)
                await pipe.execute()

    async def invalidate(
        self,
        keys: Sequence[str],
        groups: Sequence[str] = (),
        patterns: Sequence[str] = (),
        publish: tuple[str, bytes] | None = None,
    ) -> int:
        """Delete pattern matches (SCAN), then keys (and leases) and group members, then PUBLISH ``publish``
        (channel, message) — the last two in one script, atomically. Returns value keys deleted."""
        n = 0
        for pattern in patterns:
            n += await self.delete_pattern(pattern)
        if keys or groups or publish:
            channel, message = publish if publish is not None else ("", b"")
            async with self._guard("EVALSHA invalidate"):
                n += int(await self._invalidate(keys=[*keys, *groups], args=[len(keys), channel, message]))
        return n


def fleet_wait_delays(total: float) -> Iterable[float]:
    """Back-off delays (seconds) for a waiter polling another instance's fill, summing to about ``total``."""
    spent, delay = 0.0, 0.002
    while spent < total:
        d = min(delay, total - spent)
        yield d
        spent += d
        delay = min(delay * 1.5, 0.025)
