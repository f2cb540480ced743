"""Coherence across instances: several real apps (own pools, own subscribers, own L1) on one Redis + Postgres."""

from __future__ import annotations

import asyncio
import time

import orjson

from service import appkeys as K
from tests.conftest import AUTH, eventually
from tests.tcp_proxy import TcpProxy


async def rate_of(client, pair: str = "CNGN/USD") -> tuple[str, str]:
    r = await client.get(f"/v1/rates/{pair}")
    assert r.status == 200
    return (await r.json())["rate"], r.headers["X-Cache"]


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
    bus = b.app[K.BUS]
    gaps = bus.gaps
    await redis_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")

    async def noticed() -> bool:
        return bus.gaps > gaps

    await eventually(noticed, timeout=3)
    # written while b is (or just was) without a subscription: b cannot hear this message
    assert (await a.put("/v1/rates/CNGN/USD", json={"rate": "0.00123"}, headers=AUTH)).status == 200
    rate, source = await rate_of(b)
    assert rate == "0.00123"  # L1 was cleared on the way down, Redis was cleared by the writer
    await asyncio.wait_for(bus.connected_event.wait(), 5)
    rate, _ = await rate_of(b)
    assert rate == "0.00123"
    rate, source = await rate_of(b)
    assert rate == "0.00123" and source == "L1"  # serving from L1 again after the resubscription


async def test_heartbeat_detects_a_silently_dead_subscriber(make_client, settings_factory, redis_url):
    from urllib.parse import urlsplit

    u = urlsplit(redis_url)
    if u.scheme != "redis":
        import pytest

        pytest.skip("needs Redis over TCP to put a proxy in between")
    proxy = await TcpProxy(u.hostname or "127.0.0.1", u.port or 6379).start()
    try:
        url = f"redis://127.0.0.1:{proxy.port}{u.path}"
        client = await make_client(settings_factory(env={"REDIS_URL": url}, coherence={"heartbeat": 0.2}))
        bus, l1 = client.app[K.BUS], client.app[K.L1_CACHE]
        await rate_of(client)
        assert (await rate_of(client))[1] == "L1"
        proxy.blackhole()  # every socket stays open, nothing arrives: a silent death
        started = time.monotonic()

        async def detected() -> bool:
            return not bus.subscribed

        await eventually(detected, timeout=3)
        assert time.monotonic() - started < 1.5  # within a few heartbeat intervals of 0.2 s
        assert not l1.serving and len(l1) == 0
        proxy.resume()
        await asyncio.wait_for(bus.connected_event.wait(), 10)
        assert l1.serving
    finally:
        await proxy.close()


async def test_cold_key_stampede_across_three_instances_loads_once(make_client):
    apps = [await make_client() for _ in range(3)]
    reqs = [apps[i % 3].get("/v1/rates/XLM/USD") for i in range(300)]
    results = await asyncio.gather(*reqs)
    assert all(r.status == 200 for r in results)
    assert sum(a.app[K.PG_ORIGIN].loads for a in apps) == 1
    bodies = {orjson.dumps(await r.json()) for r in results}
    assert len(bodies) == 1


async def test_lease_holder_dies_mid_load_others_still_answer(make_client, settings_factory, redis_client):
    client = await make_client(settings_factory(coherence={"heartbeat": 0.2, "lease_wait": 0.3}))
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
    bus_a = a.app[K.BUS]
    await a.put("/v1/rates/CNGN/USD", json={"rate": "0.00101"}, headers=AUTH)

    async def echo_seen() -> bool:
        return bus_a.echoes_skipped >= 1

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


async def test_a_missing_bus_message_clears_l1(make_client, redis_client, channel):
    a = await make_client()
    await rate_of(a)
    l1 = a.app[K.L1_CACHE]
    assert len(l1) == 1
    peer = {"instance": "ghost/1", "seq": 1, "keys": [], "patterns": []}
    await redis_client.publish(channel, orjson.dumps(peer))
    peer["seq"] = 5  # messages 2..4 never arrived
    await redis_client.publish(channel, orjson.dumps(peer))
    bus = a.app[K.BUS]

    async def gap_seen() -> bool:
        return bus.seq_gaps == 1

    await eventually(gap_seen, timeout=2)
    assert len(l1) == 0


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
