"""Coherence across instances: several real apps (own pools, own subscribers, own L1) on one Redis + Postgres.

One test per finding of the coherence review (tiers/coherence/__init__.py states the rules they check):
stale conversions under write load (rule 1), writes refused rather than deferred and commits nobody answered for
(rules 2-3), a Redis restored from a snapshot (rule 6), a silent subscriber (rule 4), spurious flushes (rule 7),
and state left by reads (finding 6).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from decimal import Decimal
from urllib.parse import urlsplit

import orjson
import pytest

from actors.rates import convert
from service import appkeys as K
from tests.conftest import AUTH, eventually, kill_own_pubsub_connections
from testsupport.redis_server import RedisServer
from testsupport.tcp_proxy import TcpProxy
from tiers import codec, keys
from tiers.keys import DataType


async def rate_of(client, pair: str = "CNGN/USD") -> tuple[str, str]:
    r = await client.get(f"/v1/rates/{pair}")
    assert r.status == 200
    return (await r.json())["rate"], r.headers["X-Cache"]


def redis_proxy_url(redis_url: str, proxy: TcpProxy) -> str:
    u = urlsplit(redis_url)
    return f"redis://127.0.0.1:{proxy.port}{u.path}"


async def tcp_proxy(redis_url: str) -> TcpProxy:
    u = urlsplit(redis_url)
    if u.scheme != "redis":
        pytest.skip("needs Redis over TCP to put a proxy in between")
    return await TcpProxy(u.hostname or "127.0.0.1", u.port or 6379).start()


async def test_write_through_one_is_seen_by_the_others_without_waiting_for_a_ttl(make_client):
    a, b, c = [await make_client() for _ in range(3)]
    for peer in (b, c):
        await rate_of(peer)
        assert (await rate_of(peer))[1] == "L1"
    r = await a.put("/v1/rates/CNGN/USD", json={"rate": "0.00099"}, headers=AUTH)
    assert r.status == 200
    started = time.monotonic()

    async def converged() -> bool:
        rates = [(await rate_of(p))[0] for p in (b, c)]
        return rates == ["0.00099", "0.00099"]

    await eventually(converged, timeout=2)
    assert time.monotonic() - started < 2  # far below the 90 s TTL
    for peer in (b, c):
        stats = peer.app[K.STATS].by_type()["exchange_rate"]
        assert stats["invalidations_received"] >= 1


async def test_writer_l1_is_invalidated_before_the_answer(make_client):
    a = await make_client()
    await rate_of(a)
    assert (await rate_of(a))[1] == "L1"
    await a.put("/v1/rates/CNGN/USD", json={"rate": "0.00077"}, headers=AUTH)
    rate, source = await rate_of(a)  # the very next read, no waiting
    assert rate == "0.00077" and source != "L1"


async def test_subscriber_killed_then_write_elsewhere_no_stale_read_after_reconnect(make_client, redis_client):
    a, b = await make_client(), await make_client()
    await rate_of(b)
    assert (await rate_of(b))[1] == "L1"
    co = b.app[K.COHERENCE]
    sessions = co.sessions
    assert await kill_own_pubsub_connections(redis_client) >= 1  # not other sessions' subscribers
    # written while b is (or just was) without a subscription: b cannot hear this message
    assert (await a.put("/v1/rates/CNGN/USD", json={"rate": "0.00123"}, headers=AUTH)).status == 200

    async def resubscribed() -> bool:
        return co.sessions > sessions and co.subscribed

    await eventually(resubscribed, timeout=5)
    rate, _ = await rate_of(b)
    assert rate == "0.00123"  # the new session emptied L1; Redis was cleared by the writer
    rate, source = await rate_of(b)
    assert rate == "0.00123" and source == "L1"  # serving from L1 again


async def test_a_silent_subscriber_connection_stops_l1_within_the_bound(make_client, settings_factory, redis_url):
    """Finding 4: a black-holed connection. The lease is renewed only by pongs, so it lapses by itself ``bound``
    after the last ping that made it through, however long the connection takes to be declared dead."""
    proxy = await tcp_proxy(redis_url)
    try:
        client = await make_client(settings_factory(env={"REDIS_URL": redis_proxy_url(redis_url, proxy)}))
        co, l1 = client.app[K.COHERENCE], client.app[K.L1_CACHE]
        bound = co.config.bound
        await rate_of(client)
        assert (await rate_of(client))[1] == "L1"
        blackholed_at = time.monotonic()
        proxy.blackhole()  # every socket stays open, nothing arrives: a silent death

        async def lapsed() -> bool:
            return not l1.serving

        await eventually(lapsed, timeout=3)
        # no renewal after the black hole: the lease ends at most `bound` after it began
        assert l1.trusted_until <= blackholed_at + bound
        fetched = l1._cache["v1:rate:CNGN:USD"].fetched
        assert fetched < blackholed_at

        async def past_both_bounds() -> bool:  # the lease and the entry's own bound since its fetch
            return time.monotonic() > max(l1.trusted_until, fetched + bound)

        await eventually(past_both_bounds, timeout=3)
        _, source = await rate_of(client)
        assert source != "L1"  # not served any longer
        proxy.resume()

        async def serving_again() -> bool:
            return l1.serving and co.subscribed

        await eventually(serving_again, timeout=10)
    finally:
        await proxy.close()


async def test_cold_key_stampede_across_three_instances_loads_once(make_client, settings_factory):
    # peers wait for the lease holder's fill; on a loaded machine that fill (300 requests queued on 3 instances)
    # can outlast the default lease_wait of 1 s, after which a peer rightly loads itself, and Redis commands can
    # outlast the 0.25 s command timeout, which opens the breaker (then each instance loads on its own): what
    # is tested here is the single flight, so the waits are long enough for a loaded machine
    s = settings_factory(coherence={"lease_wait": 10.0}, redis={"command_timeout": 5.0, "op_timeout": 10.0})
    apps = [await make_client(s) for _ in range(3)]
    reqs = [apps[i % 3].get("/v1/rates/XLM/USD") for i in range(300)]
    results = await asyncio.gather(*reqs)
    assert all(r.status == 200 for r in results)
    assert sum(a.app[K.PG_ORIGIN].loads for a in apps) == 1
    bodies = {orjson.dumps(await r.json()) for r in results}
    assert len(bodies) == 1


async def test_lease_holder_dies_mid_load_others_still_answer(make_client, settings_factory, redis_client):
    client = await make_client(settings_factory(coherence={"lease_wait": 0.3}))
    # a peer took the fleet lease for this key and died before filling it
    await redis_client.set("v1:rate:XLM:USD|lease", b"dead-peer", px=10_000)
    started = time.monotonic()
    r = await client.get("/v1/rates/XLM/USD")
    assert r.status == 200 and r.headers["X-Cache"] == "MISS"
    assert (await r.json())["rate"] == "0.1123"
    assert time.monotonic() - started < 3  # bounded by lease_wait, not by the 10 s lease
    assert client.app[K.PG_ORIGIN].loads == 1


async def test_self_echo_skipped_without_swallowing_a_peers_invalidation(make_client):
    a, b = await make_client(), await make_client()
    co_a = a.app[K.COHERENCE]
    await a.put("/v1/rates/CNGN/USD", json={"rate": "0.00101"}, headers=AUTH)

    async def echo_seen() -> bool:
        return co_a.echoes_skipped >= 1

    await eventually(echo_seen, timeout=2)
    assert (await rate_of(a))[0] == "0.00101"
    assert (await rate_of(a))[1] == "L1"
    # now a peer invalidates the very same key: a must drop it
    await b.put("/v1/rates/CNGN/USD", json={"rate": "0.00102"}, headers=AUTH)

    async def a_sees_peer_write() -> bool:
        return (await rate_of(a))[0] == "0.00102"

    await eventually(a_sees_peer_write, timeout=2)


async def test_negative_answer_on_a_peer_is_invalidated_by_the_creating_write(make_client):
    a, b = await make_client(), await make_client()
    assert (await b.get("/v1/rates/EUR/USD")).status == 404
    assert (await a.put("/v1/rates/EUR/USD", json={"rate": "1.09"}, headers=AUTH)).status == 200

    async def b_sees_it() -> bool:
        return (await b.get("/v1/rates/EUR/USD")).status == 200

    await eventually(b_sees_it, timeout=2)


async def test_conversions_are_dropped_on_every_instance(make_client):
    a, b = await make_client(), await make_client()
    params = {"amount": "10", "from": "CNGN", "to": "USD"}
    await b.get("/v1/rates/convert", params=params)
    assert (await b.get("/v1/rates/convert", params=params)).headers["X-Cache"] == "L1"
    await a.put("/v1/rates/CNGN/USD", json={"rate": "0.001"}, headers=AUTH)

    async def b_converts_with_new_rate() -> bool:
        r = await b.get("/v1/rates/convert", params=params)
        return (await r.json())["result"] == "0.0100000"

    await eventually(b_converts_with_new_rate, timeout=2)


async def test_a_real_gap_in_the_sequence_starts_a_new_epoch(make_client, redis_client, channel):
    a = await make_client()
    await rate_of(a)
    l1, co = a.app[K.L1_CACHE], a.app[K.COHERENCE]
    assert len(l1) == 1
    peer = orjson.dumps({"i": "ghost/1", "k": [], "p": []})
    seq = int(await redis_client.get(channel + "|seq") or 0)
    await redis_client.publish(channel, b"%d|%s" % (seq + 1, peer))
    await redis_client.publish(channel, b"%d|%s" % (seq + 5, peer))  # messages in between never arrived

    async def gap_seen() -> bool:
        return co.seq_gaps == 1

    await eventually(gap_seen, timeout=2)
    assert len(l1) == 0


async def test_concurrent_writes_cause_no_spurious_flush(make_client):
    """Finding 5: sequence numbers are taken by the publishing script, so concurrency cannot look like a gap."""
    a, b = await make_client(), await make_client()
    co_b = b.app[K.COHERENCE]
    epochs = b.app[K.L1_CACHE].epochs
    slots = asyncio.Semaphore(12)

    async def put(i: int) -> int:
        async with slots:
            pair = ("CNGN/USD", "XLM/USD", "USD/CNGN")[i % 3]
            r = await a.put(f"/v1/rates/{pair}", json={"rate": f"0.{1000 + i}"}, headers=AUTH)
            return r.status

    statuses = await asyncio.gather(*(put(i) for i in range(300)))
    assert statuses == [200] * 300

    async def all_received() -> bool:
        return co_b.received >= 300

    await eventually(all_received, timeout=10)
    assert co_b.seq_gaps == 0 and b.app[K.L1_CACHE].epochs == epochs


async def test_delete_cache_pattern_reaches_every_instance(make_client, redis_client):
    a, b = await make_client(), await make_client()
    await rate_of(b)
    await rate_of(b, "XLM/USD")
    await b.get("/v1/fees/onramp")
    r = await a.delete("/v1/cache", params={"pattern": "v1:rate:*"}, headers=AUTH)
    assert r.status == 200 and (await r.json())["deleted"] == 2
    assert await redis_client.exists("v1:fee:structure:onramp") == 1

    async def b_dropped() -> bool:
        return (await rate_of(b))[1] != "L1"

    await eventually(b_dropped, timeout=2)
    assert (await b.get("/v1/fees/onramp")).headers["X-Cache"] == "L1"


# ---------------------------------------------------------------- finding 1: derived keys under write load


async def test_no_stale_conversion_survives_concurrent_writes_and_reads(
    make_client, settings_factory, redis_client, redis_url
):
    """Rates written through one instance while both instances read conversions of the same pair; afterwards a
    fresh instance reads every conversion Redis still holds: each must match the pair's current rate. B hears the
    bus 10 ms late (a slow link), so it computes conversions from a rate copy that a write has just superseded."""
    proxy = await tcp_proxy(redis_url)
    proxy.delay = 0.01
    a = await make_client()
    b = await make_client(settings_factory(env={"REDIS_URL": redis_proxy_url(redis_url, proxy)}))
    amounts = [f"{n}.{k}" for n in range(1, 9) for k in range(1, 4)]
    stop = asyncio.Event()
    rng = random.Random(7)
    reads = {"a": 0, "b": 0}

    stale_fills: list[tuple[str, str, str]] = []

    async def scan_for_stale_fills(rate: str) -> None:
        """Every conversion Redis would serve (its generations current) must be computed from ``rate``."""
        gen = (await redis_client.get("v1:rate:CNGN:USD|g") or b"0").decode()
        for key in await redis_client.keys("v1:rate:convert:*:CNGN:USD"):
            raw = await redis_client.get(key)
            stored = codec.unpack(raw) if raw else None
            if stored is None or stored.gens != gen:
                continue  # dead: never served
            amount = key.decode().split(":")[3]
            if Decimal(orjson.loads(stored.body)["result"]) != convert(Decimal(amount), Decimal(rate)):
                stale_fills.append((key.decode(), stored.gens, stored.body.decode()))

    async def writer() -> None:
        i = 0
        while i < 60 or min(reads.values()) < 40:  # enough of both, whatever the speed of either
            rate = f"0.000{rng.randint(100, 999)}{i:03d}"
            assert (await a.put("/v1/rates/CNGN/USD", json={"rate": rate}, headers=AUTH)).status == 200
            await scan_for_stale_fills(rate)
            i += 1
        # let both readers go on past the last write (on a loaded machine they may not have read since), so that
        # Redis holds conversions filled around it for the fresh instance below to check
        after = dict(reads)

        async def both_read_again() -> bool:
            return all(reads[n] >= after[n] + 3 for n in reads)

        await eventually(both_read_again, timeout=20)
        stop.set()

    async def reader(name: str, client) -> None:
        while not stop.is_set():
            params = {"amount": rng.choice(amounts), "from": "CNGN", "to": "USD"}
            assert (await client.get("/v1/rates/convert", params=params)).status == 200
            reads[name] += 1

    await asyncio.wait_for(asyncio.gather(writer(), reader("a", a), reader("b", b)), 60)
    current = Decimal((await (await a.get("/v1/rates/CNGN/USD")).json())["rate"])
    fresh = await make_client()  # empty L1: answers from Redis where Redis has a servable value
    present = [k.decode() for k in await redis_client.keys("v1:rate:convert:*:CNGN:USD")]
    assert present
    wrong = []
    for key in present:
        amount = key.split(":")[3]
        r = await fresh.get("/v1/rates/convert", params={"amount": amount, "from": "CNGN", "to": "USD"})
        body = await r.json()
        if Decimal(body["result"]) != convert(Decimal(amount), current):
            wrong.append((key, r.headers["X-Cache"], body["result"]))
    await proxy.close()
    assert wrong == [] and stale_fills == []
    assert b.app[K.STATS].get(DataType.EXCHANGE_RATE, "fills_rejected") > 0  # the race did happen


# ---------------------------------------------------------------- finding 2: no acknowledged write can be lost


async def test_a_writer_that_cannot_reach_redis_refuses_and_changes_nothing(
    make_client, settings_factory, redis_url, pg
):
    proxy = await tcp_proxy(redis_url)
    try:
        writer = await make_client(settings_factory(env={"REDIS_URL": redis_proxy_url(redis_url, proxy)}))
        peer = await make_client()
        assert (await rate_of(peer))[0] == "0.00065"
        await proxy.down()  # only the writer is cut off from Redis
        r = await writer.put("/v1/rates/CNGN/USD", json={"rate": "0.5"}, headers=AUTH)
        assert r.status == 503 and r.headers["Content-Type"].startswith("application/problem+json")
        assert (await r.json())["type"] == "urn:aframp:problem:invalidation-unavailable"
        assert "Retry-After" in r.headers
        assert await pg.fetchval("SELECT rate::text FROM exchange_rates WHERE base='CNGN' AND quote='USD'") == "0.00065"
        assert (await rate_of(peer)) == ("0.00065", "L1")  # still true: nothing changed
        r = await writer.post(
            "/v1/events/balance-updated", json={"account_id": "G" + "A" * 55}, headers=AUTH
        )  # an event without Redis cannot be made certain either
        assert r.status in (400, 503)
    finally:
        await proxy.close()


async def test_a_commit_nobody_answered_for_is_applied_from_the_outbox(make_client, settings_factory, pg):
    """A write that committed although its writer never invalidated (it timed out, or died after the commit):
    the outbox row committed with it is applied by any instance."""
    s = settings_factory(coherence={"outbox_sweep": 0.05, "outbox_grace": 0.1})
    a, b = await make_client(s), await make_client(s)
    for x in (a, b):
        await rate_of(x)
        assert (await rate_of(x))[1] == "L1"
    async with pg.transaction():  # what the dead writer's statement did
        await pg.execute("UPDATE exchange_rates SET rate = 0.00042 WHERE base='CNGN' AND quote='USD'")
        await pg.execute("INSERT INTO cache_outbox (keys) VALUES (ARRAY['v1:rate:CNGN:USD'])")

    async def everyone_sees_it() -> bool:
        return [(await rate_of(x))[0] for x in (a, b)] == ["0.00042", "0.00042"]

    await eventually(everyone_sees_it, timeout=5)

    async def settled() -> bool:  # the sweep deletes the row and counts it after the invalidation others see
        applied = sum(x.app[K.COHERENCE].outbox_applied for x in (a, b))
        return applied >= 1 and await pg.fetchval("SELECT count(*) FROM cache_outbox") == 0

    await eventually(settled, timeout=5)
    assert sum(x.app[K.COHERENCE].outbox_applied for x in (a, b)) == 1  # claimed once (SKIP LOCKED)


async def test_a_settled_write_leaves_no_outbox_row(make_client, settings_factory, pg):
    a = await make_client(settings_factory(coherence={"outbox_sweep": 0.05, "outbox_grace": 5.0}))
    assert (await a.put("/v1/rates/CNGN/USD", json={"rate": "0.00066"}, headers=AUTH)).status == 200

    async def settled() -> bool:
        return await pg.fetchval("SELECT count(*) FROM cache_outbox") == 0

    await eventually(settled, timeout=5)
    assert a.app[K.COHERENCE].outbox_applied == 0  # deleted by its writer, never applied by a sweep


async def test_settled_rows_are_deleted_at_shutdown_not_left_to_the_next_sweep(make_client, settings_factory, pg):
    """Found by the cost benchmark: rows of settled writes waited for the next sweep, so after a stop the next
    instance took them for commits nobody answered for and invalidated those keys once more."""
    a = await make_client(settings_factory(coherence={"outbox_sweep": 3600.0}))  # no sweep runs during the test
    assert (await a.put("/v1/rates/CNGN/USD", json={"rate": "0.00067"}, headers=AUTH)).status == 200
    assert await pg.fetchval("SELECT count(*) FROM cache_outbox") == 1  # settled, not yet deleted
    await a.close()  # the instance stops
    assert await pg.fetchval("SELECT count(*) FROM cache_outbox") == 0


# ---------------------------------------------------------------- finding 3: Redis restored from a snapshot


async def test_redis_restarted_from_a_snapshot_never_resurrects_invalidated_values(
    make_client, settings_factory, tmp_path
):
    server = await RedisServer(tmp_path / "redis").start()
    try:
        s = settings_factory(env={"REDIS_URL": server.url})
        a, b = await make_client(s), await make_client(s)
        for x in (a, b):
            await rate_of(x)
            assert (await x.get("/v1/fees/onramp")).status == 200
        await server.save()  # a stock redis-server snapshots now and then
        assert (await a.put("/v1/rates/CNGN/USD", json={"rate": "0.00201"}, headers=AUTH)).status == 200
        fee = {"rate_bps": 175, "flat": "0", "min": "0", "max": "1000", "currency": "NGN"}
        assert (await a.put("/v1/fees/onramp", json=fee, headers=AUTH)).status == 200
        server.kill9()
        await server.start()  # loads the snapshot: the pre-write rate and fee are back in Redis
        for x in (a, b):
            co = x.app[K.COHERENCE]

            async def back(co=co) -> bool:
                return co.subscribed and co.store.incarnation != ""

            await eventually(back, timeout=10)
        for x in (a, b):
            assert (await rate_of(x))[0] == "0.00201"
            assert (await (await x.get("/v1/fees/onramp")).json())["rate_bps"] == 175
            assert x.app[K.COHERENCE].store.guard.changes >= 1  # the new incarnation was noticed
    finally:
        server.stop()


async def test_a_redis_restart_between_a_writes_fence_and_its_commit_never_leaves_the_old_row(
    make_client, settings_factory, tmp_path, pg
):
    """Found by the simulation: Redis restarts from a snapshot taken before a write's fence while the write waits to
    commit; a peer loads the row as it still is and fills it (nothing fences it any more). The writer must notice
    that its fence did not hold and invalidate again before it answers, or every instance serves the old rate until
    its TTL."""
    import redis.asyncio as aioredis

    server = await RedisServer(tmp_path / "redis").start()
    probe = aioredis.Redis.from_url(server.url)
    try:
        s = settings_factory(env={"REDIS_URL": server.url})
        a, b = await make_client(s), await make_client(s)
        old = (await rate_of(b))[0]
        await server.save()  # the snapshot predates the write's fence
        async with pg.transaction():  # hold the row: the writer's upsert waits between its fence and its commit
            await pg.execute("SELECT 1 FROM exchange_rates WHERE base='CNGN' AND quote='USD' FOR UPDATE")
            put = asyncio.create_task(a.put("/v1/rates/CNGN/USD", json={"rate": "0.00333"}, headers=AUTH))

            async def fenced() -> bool:
                return bool(await probe.exists("v1:rate:CNGN:USD|w"))

            await eventually(fenced)
            server.kill9()
            await server.start()  # the fence and the generation bump are gone with the restart
            await probe.aclose()
            probe = aioredis.Redis.from_url(server.url)
            co_b = b.app[K.COHERENCE]

            async def b_back() -> bool:
                return co_b.subscribed and co_b.store.guard.changes >= 1

            await eventually(b_back, timeout=10)
            during = await rate_of(b)  # the row as it still is, loaded and filled under the new incarnation
            assert during[0] == old
        answer = await put  # the commit
        assert answer.status == 200, await answer.text()
        assert a.app[K.COHERENCE].fences_lost >= 1

        async def everyone_sees_it() -> bool:
            return [(await rate_of(x))[0] for x in (a, b)] == ["0.00333", "0.00333"]

        await eventually(everyone_sees_it, timeout=1.0)
        c = await make_client(s)  # a newcomer reads Redis: nothing servable holds the old row
        assert (await rate_of(c))[0] == "0.00333"
    finally:
        await probe.aclose()
        server.stop()


# ---------------------------------------------------------------- finding 6: state left by reads


async def test_reads_leave_no_index_and_nothing_that_outlives_their_answer(make_client, redis_client):
    a = await make_client()
    for i in range(200):
        assert (
            await a.get("/v1/rates/convert", params={"amount": f"{i}.5", "from": "CNGN", "to": "USD"})
        ).status == 200
    for _ in range(50):
        pair = f"Q{secrets.token_hex(3).upper()}"
        r = await a.get("/v1/rates/convert", params={"amount": "1", "from": pair, "to": "USD"})
        assert r.status == 404
    keys = [k.decode() for k in await redis_client.keys("*")]
    assert not [k for k in keys if "conversions" in k]  # no index of derived keys
    for key in keys:
        ttl = await redis_client.pttl(key)
        assert ttl > 0, key  # everything a read creates expires ...
        if ":Q" in key:  # ... and what an unknown pair leaves lives no longer than its 404 (5 s)
            assert ttl <= 5_000, (key, ttl)
    # invalidating the pair is one O(1) script whatever was derived from it
    started = time.monotonic()
    assert (await a.put("/v1/rates/CNGN/USD", json={"rate": "0.0007"}, headers=AUTH)).status == 200
    assert time.monotonic() - started < 1.0


# ---------------------------------------------------------------- found by the adversarial review


async def test_reads_right_after_a_snapshot_restart_never_get_the_restored_value(
    make_client, settings_factory, tmp_path
):
    """The request pool reconnects inside a call: the incarnation the script compared with must not be the old one.
    Read at once after the restart, before any subscriber has come back."""
    server = await RedisServer(tmp_path / "redis").start()
    try:
        s = settings_factory(env={"REDIS_URL": server.url})
        a, b = await make_client(s), await make_client(s)
        for x in (a, b):
            await rate_of(x)
        await server.save()  # the snapshot holds 0.00065, stamped with the current incarnation
        assert (await a.put("/v1/rates/CNGN/USD", json={"rate": "0.00201"}, headers=AUTH)).status == 200
        acked = time.monotonic()
        server.kill9()

        async def backed_off() -> bool:  # the subscribers retry slowly by now: the first reads come before them
            return all(x.app[K.COHERENCE].reconnects >= 6 for x in (a, b))

        await eventually(backed_off, timeout=10)
        await server.start()
        bound = a.app[K.COHERENCE].config.bound

        async def past_bound() -> bool:
            return time.monotonic() > acked + bound

        await eventually(past_bound)
        for x in (b, a, b, a):
            assert (await rate_of(x))[0] == "0.00201"
    finally:
        server.stop()


async def test_a_failover_and_a_failback_never_resurrect_a_value(make_client, settings_factory, tmp_path):
    """A demoted master keeps its run_id while its data is replaced by the promoted replica's lagging copy; after a
    failback to it, nothing stamped before may be served (the incarnation includes the replication id)."""
    import redis.asyncio as aioredis

    m = await RedisServer(tmp_path / "m").start()
    r = await RedisServer(tmp_path / "r").start()
    mc, rc = aioredis.Redis.from_url(m.url), aioredis.Redis.from_url(r.url)
    proxy = await TcpProxy("127.0.0.1", m.port).start()

    async def synced(replica) -> bool:
        return (await replica.info("replication")).get("master_link_status") == "up"

    try:
        await rc.replicaof("127.0.0.1", m.port)
        await eventually(lambda: synced(rc), timeout=10)
        s = settings_factory(env={"REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0"})
        a, b = await make_client(s), await make_client(s)
        await rate_of(b)  # filled in M, replicated to R

        async def replicated() -> bool:
            return await rc.exists("v1:rate:CNGN:USD") == 1

        await eventually(replicated, timeout=5)
        await rc.replicaof("NO", "ONE")  # R is cut off from M just before the write: it never sees the invalidation
        assert (await a.put("/v1/rates/CNGN/USD", json={"rate": "0.00301"}, headers=AUTH)).status == 200
        proxy.target = ("127.0.0.1", r.port)  # failover to R
        proxy.cut()
        await mc.replicaof("127.0.0.1", r.port)  # M rejoins as R's replica: its data becomes R's ...
        await eventually(lambda: synced(mc), timeout=10)
        await mc.replicaof("NO", "ONE")  # ... and a failback promotes it again, with the same run_id
        proxy.target = ("127.0.0.1", m.port)
        proxy.cut()
        c = await make_client(s)  # an instance started after the failback, too
        for x in (b, a, c, b, a, c):
            for _attempt in range(3):  # the first call on a pooled connection the proxy cut may fail: retried
                resp = await x.get("/v1/rates/CNGN/USD")
                if resp.status == 200:
                    break
            assert (await resp.json())["rate"] == "0.00301"
    finally:
        await mc.aclose()
        await rc.aclose()
        await proxy.close()
        m.stop()
        r.stop()


async def test_a_reader_never_gets_a_fenced_load_it_joined_late(make_client, settings_factory, redis_url):
    """A load that read the origin while a write was fenced (before its commit) carries nothing that vouches for
    its value, and no message follows the commit: a reader that joined it later than the join window reads again."""
    proxy = await tcp_proxy(redis_url)
    a = await make_client()
    b = await make_client()
    origin = b.app[K.PG_ORIGIN]
    gate = asyncio.Event()
    entered = asyncio.Event()
    real = origin.get_rate

    async def slow_get_rate(base: str, quote: str):  # B's origin answers late (a slow reply path)
        row = await real(base, quote)
        entered.set()
        await gate.wait()
        return row

    try:
        origin.get_rate = slow_get_rate
        await rate_of(a)  # cached in Redis and in A
        co_b = b.app[K.COHERENCE]
        heard = co_b.received

        async def b_heard_the_write() -> bool:
            return co_b.received > heard

        async with a.app[K.RATES].coherence.write([keys.rate("CNGN", "USD")]) as w:
            await eventually(b_heard_the_write, timeout=2)  # B's load begins after the write's one message
            first = asyncio.create_task(b.get("/v1/rates/CNGN/USD"))  # fenced: reads the origin, pre-commit
            await entered.wait()
            _row, w.outbox_id = await a.app[K.PG_ORIGIN].upsert_rate(
                "CNGN", "USD", Decimal("0.00999"), "test", outbox=w.keys
            )
        acked = time.monotonic()
        join_window = b.app[K.COHERENCE].config.join_window

        async def late() -> bool:
            return time.monotonic() > acked + join_window

        await eventually(late)
        origin.get_rate = real
        second = asyncio.create_task(b.get("/v1/rates/CNGN/USD"))  # joins the fenced load, late
        await eventually(lambda: _waiting_on_the_flight(b), timeout=2)
        gate.set()
        assert (await (await first).json())["rate"] == "0.00065"  # overlapped the write: either value is fine
        assert (await (await second).json())["rate"] == "0.00999"
        assert b.app[K.STATS].get(DataType.EXCHANGE_RATE, "rereads") >= 1
    finally:
        gate.set()
        await proxy.close()


async def _waiting_on_the_flight(client) -> bool:
    """Two readers wait on the one load in flight (the fenced one)."""
    flights = list(client.app[K.RATES]._flights.values())
    return len(flights) == 1 and flights[0].joined >= 1
