"""One contract for the coherence protocol's shared tier, run against real Redis and against our fake.

Each test states a rule of tiers/coherence/__init__.py at the level of the store: fills refused after an
invalidation or during a fence, derived values dead with their source's generation, values of another incarnation
ignored, sequence numbers consecutive, pongs after the messages queued before them.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tests.fakes import FakeRedis, FakeStore
from tiers import codec
from tiers.coherence.redis_store import IncarnationGuard, RedisStore
from tiers.coherence.store import Message, Pong, Status
from tiers.errors import CacheUnavailable
from tiers.l2 import RedisCache

FAR = 2**62  # fresh_until far in the future


@pytest.fixture(params=["fake", "redis"])
async def store(request: Any, redis_url: str, redis_client: aioredis.Redis) -> AsyncIterator[Any]:
    channel = f"test:contract:{secrets.token_hex(4)}"
    if request.param == "fake":
        yield FakeStore(FakeRedis(), channel=channel)
        return
    guard = IncarnationGuard()
    client = aioredis.Redis.from_url(redis_url, redis_connect_func=guard.on_connect)
    sub = aioredis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 0), redis_connect_func=guard.on_connect)
    await client.ping()  # the handshake has read the incarnation
    yield RedisStore(RedisCache(client), guard, channel=channel, subscriber=sub, gen_ttl=3600)
    await sub.aclose()
    await client.aclose()


async def fill(
    store: Any,
    key: str,
    sources: tuple[str, ...],
    gens: str,
    token: str,
    body: bytes,
    *,
    incarnation: str | None = None,
) -> str | None:
    """Fill ``body`` as a load that saw ``gens``; the generations stored with it, None when refused."""
    inc = store.incarnation if incarnation is None else incarnation
    head, tail = codec.pack_parts(body, FAR, int(time.time() * 1000), incarnation=inc)
    return await store.fill(key, sources, gens, token, head, tail, 60_000, gen_px=60_000)


async def load(store: Any, key: str, sources: tuple[str, ...], token: str, **kw: Any) -> Any:
    return await store.acquire(key, sources, token, 5000, int(time.time() * 1000), **kw)


S = "v1:rate:CK:USD"
D = "v1:rate:convert:10:CK:USD"


async def test_one_lease_then_fill_then_hit(store: Any) -> None:
    a = await load(store, S, (S,), "a")
    assert a.status is Status.LEASE and a.gens == "0"  # never loaded, never written: no generation yet
    b = await load(store, S, (S,), "b")
    assert b.status is Status.TAKEN and b.gens == a.gens
    stored = await fill(store, S, (S,), a.gens, "a", b'"v1"')
    assert stored is not None and stored != "0"  # the fill gave the source a generation, as long-lived as the value
    c = await load(store, S, (S,), "c")
    assert c.status is Status.HIT and c.stored.body == b'"v1"'
    assert (await store.read(S, (S,))).body == b'"v1"'


async def test_fill_refused_after_an_invalidation(store: Any) -> None:
    a = await load(store, S, (S,), "a")
    await store.invalidate((S,), b"{}")  # a writer commits v2 and invalidates while A loads v1
    assert not await fill(store, S, (S,), a.gens, "a", b'"v1"')
    assert await store.read(S, (S,)) is None
    c = await load(store, S, (S,), "c")
    assert c.status is Status.LEASE and c.gens != a.gens  # the lease went with the invalidation
    assert await fill(store, S, (S,), c.gens, "c", b'"v2"')


async def test_a_fence_blocks_fills_until_every_writer_lifted_its_own(store: Any) -> None:
    await store.invalidate((S,), b"{}", fence="w1", fence_ms=30_000)
    await store.invalidate((S,), b"{}", fence="w2", fence_ms=30_000)  # a concurrent write of the same key
    a = await load(store, S, (S,), "a")
    assert a.status is Status.FENCED
    assert not await fill(store, S, (S,), a.gens, "a", b'"old"')
    await store.unfence((S,), "w1", committed=True)  # the first writer committed: the second has not
    assert (await load(store, S, (S,), "b")).status is Status.FENCED
    await store.unfence((S,), "w2", committed=True)
    c = await load(store, S, (S,), "c")
    assert c.status is Status.LEASE
    assert await fill(store, S, (S,), c.gens, "c", b'"new"')


async def test_unfence_answers_how_many_fences_the_writer_still_held(store: Any) -> None:
    """A writer learns whether its fences held from before its commit to its unfence: one Redis lost (a restart, an
    older snapshot, a failover), or one that expired, is not counted, and the engine then invalidates again."""
    other = "v1:rate:XK:USD"
    await store.invalidate((S, other), b"{}", fence="w", fence_ms=30_000)
    assert await store.unfence((S, other), "w", committed=True) == 2
    assert await store.unfence((S,), "never-fenced", committed=True) == 0  # as after a restart lost it
    await store.invalidate((S,), b"{}", fence="short", fence_ms=30)
    deadline = time.monotonic() + 5
    while (await load(store, S, (S,), secrets.token_hex(2))).status is Status.FENCED:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)  # polling the fence's expiry, with a deadline
    assert await store.unfence((S,), "short", committed=True) == 0


async def test_a_fence_expires_by_itself(store: Any) -> None:
    await store.invalidate((S,), b"{}", fence="w", fence_ms=50)  # its writer died before lifting it
    deadline = time.monotonic() + 5
    while (await load(store, S, (S,), secrets.token_hex(2))).status is Status.FENCED:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_a_derived_value_dies_with_its_sources_generation(store: Any) -> None:
    src = await load(store, S, (S,), "s")
    rate_gens = await fill(store, S, (S,), src.gens, "s", b'{"rate":"1"}')
    d = await load(store, D, (S,), "d")
    assert d.status is Status.LEASE and d.gens == rate_gens
    # the conversion carries the generations of the rate VALUE it was computed from
    assert await fill(store, D, (S,), rate_gens, "d", b'{"result":"10"}') == rate_gens
    assert (await store.read(D, (S,))).body == b'{"result":"10"}'
    assert (await load(store, D, (S,), "x")).status is Status.HIT
    await store.invalidate((S,), b"{}")  # O(1): the conversion key is not touched ...
    assert await store.read(D, (S,)) is None  # ... yet never served again
    again = await load(store, D, (S,), "e")
    assert again.status is Status.LEASE and again.stored is None  # not even as a stale value


async def test_a_derived_value_computed_from_a_superseded_source_is_refused(store: Any) -> None:
    """Finding 1: a conversion computed from this instance's copy of the rate, after a peer's write."""
    src = await load(store, S, (S,), "s")
    old_rate_gens = await fill(store, S, (S,), src.gens, "s", b'{"rate":"1"}')  # what an L1 copy carries
    await store.invalidate((S,), b"{}")  # the write is acknowledged
    d = await load(store, D, (S,), "d")  # the conversion's own lease is taken AFTER the invalidation
    assert d.status is Status.LEASE
    assert not await fill(store, D, (S,), old_rate_gens, "d", b"old")
    assert await store.read(D, (S,)) is None


async def test_a_missing_generation_key_means_invalid(store: Any, redis_client: aioredis.Redis) -> None:
    src = await load(store, S, (S,), "s")
    assert await fill(store, D, (S,), src.gens, "d", b"x") is None  # a source without a generation: refused
    rate_gens = await fill(store, S, (S,), src.gens, "s", b"1")
    assert await fill(store, D, (S,), rate_gens, "d", b"x")
    if isinstance(store, FakeStore):
        store.server.state.gens.pop(S)
    else:
        await redis_client.delete(S + "|g")  # evicted, or deleted by hand
    assert await store.read(D, (S,)) is None


async def test_values_of_another_incarnation_are_never_served(store: Any) -> None:
    a = await load(store, S, (S,), "a")
    assert await fill(store, S, (S,), a.gens, "a", b'"restored"', incarnation="0ld0ld")
    assert await store.read(S, (S,)) is None
    b = await load(store, S, (S,), "b")
    assert b.status is not Status.HIT and b.stored is None


async def test_replace_installs_a_value_with_a_new_generation(store: Any) -> None:
    a = await load(store, S, (S,), "a")
    head, tail = codec.pack_parts(b'"told"', FAR, 1, incarnation=store.incarnation)
    await store.replace(S, (S,), head, tail, 60_000, b"{}")
    stored = await store.read(S, (S,))
    assert stored is not None and stored.body == b'"told"' and stored.gens not in (a.gens, "0")
    assert not await fill(store, S, (S,), a.gens, "a", b'"loaded"')  # older load


async def test_messages_are_numbered_consecutively_and_pongs_follow_them(store: Any) -> None:
    sub = await store.subscribe()
    try:
        seqs = [await store.invalidate((f"v1:fee:structure:f{i}",), b'{"n":%d}' % i) for i in range(3)]
        await sub.ping(7)
        got: list[Any] = []
        deadline = time.monotonic() + 5
        while len(got) < 4:
            assert time.monotonic() < deadline
            event = await sub.next(0.5)
            if event is not None:
                got.append(event)
        assert [e.seq for e in got[:3]] == seqs and seqs[1] == seqs[0] + 1 and seqs[2] == seqs[1] + 1
        assert [e.payload for e in got[:3] if isinstance(e, Message)] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
        assert got[3] == Pong(7)
    finally:
        await sub.close()


async def test_delete_pattern_bumps_generations_and_spares_fences(store: Any, redis_client: aioredis.Redis) -> None:
    a = await load(store, S, (S,), "a")
    rate_gens = await fill(store, S, (S,), a.gens, "a", b"1")
    assert await fill(store, D, (S,), rate_gens, "d", b"2")
    await store.invalidate(("v1:rate:CK:EUR",), b"{}", fence="w", fence_ms=30_000)
    assert await store.delete_pattern("v1:rate:*", b"{}") == 2
    assert await store.read(S, (S,)) is None and await store.read(D, (S,)) is None
    # the generation of S moved on (not deleted: a purge never makes anything valid again)
    b = await load(store, S, (S,), "b")
    assert b.gens not in (rate_gens, "0")
    assert (await load(store, "v1:rate:CK:EUR", ("v1:rate:CK:EUR",), "c")).status is Status.FENCED


async def test_large_values_round_trip_compressed(store: Any) -> None:
    body = b'{"balances":[' + b",".join(b'{"asset_code":"A%d","balance":"1.0000000"}' % i for i in range(200)) + b"]}"
    a = await load(store, S, (S,), "a")
    head, tail = codec.pack_parts(body, FAR, 1, incarnation=store.incarnation)
    assert len(head + tail) < len(body) / 2
    assert await store.fill(S, (S,), a.gens, "a", head, tail, 60_000, gen_px=60_000)
    assert (await store.read(S, (S,))).body == body
    assert (await load(store, S, (S,), "b")).stored.body == body  # the Lua header check reads it


async def test_a_value_a_fenced_write_moved_aside_is_never_served_and_comes_back_if_the_write_fails(
    store: Any,
) -> None:
    a = await load(store, S, (S,), "a")
    assert await fill(store, S, (S,), a.gens, "a", b'"v1"')
    await store.invalidate((S,), b"{}", fence="w", fence_ms=30_000)
    during = await load(store, S, (S,), "b")
    assert during.status is Status.FENCED and during.stored is None  # not even as a stale answer
    assert await store.read(S, (S,)) is None
    await store.unfence((S,), "w", committed=False)  # the commit failed: v1 is still the truth
    assert (await store.read(S, (S,))).body == b'"v1"'
    await store.invalidate((S,), b"{}", fence="w2", fence_ms=30_000)
    await store.unfence((S,), "w2", committed=True)  # this one committed: v1 is superseded
    assert await store.read(S, (S,)) is None
    assert (await load(store, S, (S,), "d")).stored is None


async def test_a_failed_write_puts_nothing_back_while_another_write_fences_the_key(store: Any) -> None:
    a = await load(store, S, (S,), "a")
    assert await fill(store, S, (S,), a.gens, "a", b'"v1"')
    await store.invalidate((S,), b"{}", fence="w1", fence_ms=30_000)
    await store.invalidate((S,), b"{}", fence="w2", fence_ms=30_000)  # may commit v2 at any moment
    await store.unfence((S,), "w1", committed=False)
    assert await store.read(S, (S,)) is None  # v1 would be stale the moment w2 commits
    await store.unfence((S,), "w2", committed=True)
    assert await store.read(S, (S,)) is None


async def test_a_cold_fill_needs_its_lease_so_a_purge_voids_it(store: Any) -> None:
    a = await load(store, S, (S,), "a")
    assert a.status is Status.LEASE and a.gens == "0"  # never cached: no generation to bump
    await store.delete_pattern("v1:rate:*", b"{}")  # the purge deletes the lease
    assert await fill(store, S, (S,), a.gens, "a", b'"read before the purge"') is None
    b = await load(store, S, (S,), "b")
    assert await fill(store, S, (S,), b.gens, "b", b'"read after"')


async def test_a_purge_of_a_source_kills_what_was_derived_from_it(store: Any) -> None:
    a = await load(store, S, (S,), "a")
    rate_gens = await fill(store, S, (S,), a.gens, "a", b"1")
    assert await fill(store, D, (S,), rate_gens, "d", b"2")
    late = await load(store, S, (S,), "late")  # a load racing the purge, with the generation current
    assert await store.delete_pattern("v1:rate:CK:USD", b"{}") == 1  # the conversion's key does not match ...
    assert await store.read(D, (S,)) is None  # ... yet it is dead
    assert await fill(store, S, (S,), late.gens, "late", b"3") is None


async def test_replace_of_a_derived_key_invalidates_its_source_and_rides_its_new_generation(store: Any) -> None:
    src = "v1:wallet:balance:GCK"
    derived = "v1:wallet:trustline:GCK:USDC:GISSUER"
    a = await load(store, src, (src,), "a")
    old = await fill(store, src, (src,), a.gens, "a", b'{"balances":[]}')
    head, tail = codec.pack_parts(b'{"exists":true}', FAR, 1, incarnation=store.incarnation)
    await store.replace(derived, (src,), head, tail, 60_000, b"{}", invalidate=(src,))
    assert await store.read(src, (src,)) is None  # the balance was invalidated in the same script
    told = await store.read(derived, (src,))
    assert told is not None and told.body == b'{"exists":true}' and told.gens not in (old, "0")
    await store.invalidate((src,), b"{}")  # the balance changes again: the told answer goes with it
    assert await store.read(derived, (src,)) is None


async def test_an_acquire_that_reconnects_to_a_restored_redis_never_hits_what_it_restored(tmp_path) -> None:
    """Real Redis only (it is restarted): the script receives the incarnation as an argument before the call
    reconnects; a restart from a snapshot in between must not turn a restored value into a hit."""
    from testsupport.redis_server import RedisServer

    server = await RedisServer(tmp_path / "redis").start()
    guard = IncarnationGuard()
    client = aioredis.Redis.from_url(server.url, redis_connect_func=guard.on_connect)
    store = RedisStore(RedisCache(client), guard, channel="test:restore", subscriber=client, gen_ttl=3600)
    try:
        a = await load(store, S, (S,), "a")
        assert await fill(store, S, (S,), a.gens, "a", b'"before"')
        await server.save()
        server.kill9()
        await server.start()  # restored: the value is back, stamped with the old incarnation
        old = guard.incarnation
        answers = []
        for token in ("b", "c", "d"):  # these calls reconnect (the handshake sees the new incarnation)
            with contextlib.suppress(CacheUnavailable):
                answers.append((await load(store, S, (S,), token)).status)
        assert guard.incarnation != old
        assert answers and Status.HIT not in answers
    finally:
        await client.aclose()
        server.stop()
