"""L2 against a real Redis: the seed's cache API, the pool settings taking effect, patterns, error translation.

The coherence protocol's scripts (leases, generations, fences) have their own contract suite:
tests/test_store_contract.py."""

from __future__ import annotations

import asyncio
import secrets

import pytest
import redis.asyncio as aioredis

from tests.conftest import eventually
from tiers import codec
from tiers.errors import CacheUnavailable
from tiers.l2 import RedisCache
from tiers.redis_pool import ManagedPool


def make_pool(url: str, **kw) -> ManagedPool:
    opts = dict(
        max_connections=20,
        timeout=5,
        socket_connect_timeout=5,
        socket_timeout=1,
        health_check_interval=30,
        min_idle=0,
        max_lifetime=300,
        idle_timeout=60,
    )
    opts.update(kw)
    return ManagedPool.for_url(url, **opts)


@pytest.fixture
async def cache(redis_url, redis_client):
    pool = make_pool(redis_url)
    client = aioredis.Redis(connection_pool=pool)
    yield RedisCache(client, pool, scan_batch=100)
    await client.aclose()
    await pool.disconnect()


async def test_seed_cache_api(cache: RedisCache):
    await cache.set("v1:auth:session:s1", b'{"user":1}', ttl=60)
    assert await cache.get("v1:auth:session:s1") == b'{"user":1}'
    assert await cache.exists("v1:auth:session:s1")
    assert 59 < (await cache.ttl("v1:auth:session:s1")) <= 60
    assert await cache.expire("v1:auth:session:s1", 5)
    assert (await cache.ttl("v1:auth:session:s1")) <= 5
    await cache.set_many({"v1:bill:provider:a": b"1", "v1:bill:provider:b": b"2"}, ttl=30)
    assert await cache.get_many(["v1:bill:provider:a", "v1:bill:provider:x", "v1:bill:provider:b"]) == [
        b"1",
        None,
        b"2",
    ]
    assert await cache.increment("v1:auth:rate_limit:u:login", ttl=60) == 1
    assert await cache.increment("v1:auth:rate_limit:u:login", by=4, ttl=60) == 5
    assert await cache.decrement("v1:auth:rate_limit:u:login") == 4
    assert (await cache.ttl("v1:auth:rate_limit:u:login")) > 0
    assert await cache.delete("v1:auth:session:s1", "v1:bill:provider:a") == 2
    assert not await cache.exists("v1:auth:session:s1")
    assert await cache.ttl("v1:auth:session:s1") is None


async def test_delete_pattern_spans_many_scan_pages_and_spares_the_rest(cache: RedisCache, redis_client):
    n = 1200  # with COUNT 100: a dozen SCAN pages at least
    await cache.set_many({f"v1:wallet:balance:G{i:05d}": b"x" for i in range(n)}, ttl=60)
    await cache.set_many({f"v1:wallet:trustline:G{i:05d}:USDC:GI": b"x" for i in range(50)}, ttl=60)
    await redis_client.set("v1:wallet:balance:G00001|lease", b"t")
    deleted = await cache.delete_pattern("v1:wallet:balance:*")
    assert deleted == n
    assert await redis_client.keys("v1:wallet:balance:*") == []
    assert len(await redis_client.keys("v1:wallet:trustline:*")) == 50


async def test_pool_bounded_by_max_connections_and_acquire_timeout(redis_url, redis_client):
    pool = make_pool(redis_url, max_connections=2, timeout=0.2)
    held = [await pool.get_connection(), await pool.get_connection()]
    with pytest.raises(Exception, match="No connection available"):
        await pool.get_connection()
    for c in held:
        await pool.release(c)
    await pool.disconnect()


async def test_min_idle_idle_timeout_and_max_lifetime_take_effect(redis_url, redis_client):
    name = f"aframp-pool-test-{secrets.token_hex(4)}"  # CLIENT LIST shows every session's clients
    pool = make_pool(redis_url, min_idle=3, idle_timeout=0.2, max_lifetime=0.5, client_name=name)

    async def clients() -> int:
        listing = await redis_client.client_list()
        return sum(1 for c in listing if c.get("name") == name)

    await pool.maintain()
    assert pool.idle == 3 and await clients() == 3  # REDIS_MIN_IDLE warmed up front

    # REDIS_IDLE_TIMEOUT: idle connections are closed (then topped up again to min_idle, fresh)
    before = {id(c): c.born for c in pool._available_connections}

    async def recycled() -> bool:
        await pool.maintain()
        return pool.recycled >= 3

    await eventually(recycled, timeout=3)
    assert pool.idle == 3
    assert all(c.born != before.get(id(c)) for c in pool._available_connections)

    # REDIS_MAX_LIFETIME: a connection in constant use is still closed on release once too old
    pool.idle_timeout = 3600
    conn = await pool.get_connection()
    born = conn.born

    async def aged() -> bool:
        return conn.born and (asyncio.get_running_loop().time() - born) > 0.6

    await eventually(aged, timeout=3)
    count = pool.recycled
    await pool.release(conn)
    assert pool.recycled == count + 1 and not conn.is_connected
    await pool.disconnect()


async def test_health_check_interval_and_connection_timeout_reach_connections(redis_url):
    pool = make_pool(redis_url, health_check_interval=7, socket_connect_timeout=1.25)
    conn = await pool.get_connection()
    assert conn.health_check_interval == 7
    assert conn.socket_connect_timeout == 1.25
    await pool.release(conn)
    await pool.disconnect()


async def test_errors_are_translated_at_the_tier_boundary():
    pool = make_pool("redis://127.0.0.1:1", max_connections=2, timeout=0.5, socket_connect_timeout=0.5)
    cache = RedisCache(aioredis.Redis(connection_pool=pool), pool)
    with pytest.raises(CacheUnavailable):
        await cache.get("v1:rate:A:B")
    with pytest.raises(CacheUnavailable):
        await cache.delete_pattern("v1:rate:*")
    await pool.disconnect()


async def test_large_values_are_stored_compressed_and_corrupt_ones_are_misses(cache: RedisCache, redis_client):
    body = codec.dumps({"balances": [{"asset_code": f"A{i}", "balance": "1.0000000"} for i in range(200)]})
    assert len(body) > codec.COMPRESS_MIN
    await cache.set("v1:wallet:balance:GBIG", codec.pack(body, 2**62, 1))
    assert await redis_client.strlen("v1:wallet:balance:GBIG") < len(body) / 3  # really compressed in Redis
    stored = codec.unpack(await cache.get("v1:wallet:balance:GBIG"))
    assert stored is not None and stored.body == body and not stored.short
    small = codec.pack(b'{"a":1}', 5, 1)
    assert small.startswith(b"2|") and codec.unpack(small).body == b'{"a":1}'
    assert codec.unpack(codec.pack(body, 5, 1, short=True)).short
    assert codec.unpack(b"Z|1|1|||not zlib") is None  # a corrupt value is a miss, never data
    assert codec.unpack(b"1|1|1|old format") is None  # so is a value of the previous envelope version
