"""Rates, conversions and fees through the real HTTP app, real Postgres and real Redis."""

from __future__ import annotations

import asyncio

import pytest

from service import appkeys as K
from tests.conftest import AUTH


async def test_read_through_each_tier(make_client, redis_client):
    client = await make_client()
    r = await client.get("/v1/rates/cngn/usd")
    assert r.status == 200
    assert r.headers["X-Cache"] == "MISS"
    body = await r.json()
    assert body["base"] == "CNGN" and body["quote"] == "USD" and body["rate"] == "0.00065"
    assert body["source"] == "test" and body["updated_at"].endswith("Z")

    r = await client.get("/v1/rates/CNGN/USD")
    assert r.headers["X-Cache"] == "L1"
    assert await r.json() == body

    # the value is in Redis under the documented key
    assert await redis_client.exists("v1:rate:CNGN:USD") == 1
    # a second instance (own L1) is served from Redis without touching Postgres
    other = await make_client()
    origin = other.app[K.PG_ORIGIN]
    r = await other.get("/v1/rates/CNGN/USD")
    assert r.headers["X-Cache"] == "L2"
    assert await r.json() == body
    assert origin.loads == 0


async def test_unknown_pair_is_404_problem(make_client):
    client = await make_client()
    r = await client.get("/v1/rates/CNGN/EUR")
    assert r.status == 404
    assert r.headers["Content-Type"].startswith("application/problem+json")
    p = await r.json()
    assert p["status"] == 404 and p["type"].startswith("urn:aframp:problem:") and "CNGN/EUR" in p["detail"]


async def test_single_flight_many_concurrent_misses_one_query(make_client):
    client = await make_client()
    origin = client.app[K.PG_ORIGIN]
    results = await asyncio.gather(*(client.get("/v1/rates/XLM/USD") for _ in range(50)))
    assert all(r.status == 200 for r in results)
    assert origin.loads == 1
    assert {r.headers["X-Cache"] for r in results} <= {"L1", "L2", "MISS"}  # late readers may find the fill


async def test_conversion_quantised_half_even_and_canonical_key(make_client, redis_client):
    client = await make_client()
    r = await client.get("/v1/rates/convert", params={"amount": "100.50", "from": "cngn", "to": "usd"})
    assert r.status == 200
    assert await r.json() == {
        "amount": "100.50",
        "from": "CNGN",
        "to": "USD",
        "rate": "0.00065",
        "result": "0.0653250",
    }
    assert await redis_client.exists("v1:rate:convert:100.5:CNGN:USD") == 1
    # 100.5 shares the key with 100.50, and answers with the caller's own amount text
    r = await client.get("/v1/rates/convert", params={"amount": "100.5", "from": "CNGN", "to": "USD"})
    assert r.headers["X-Cache"] == "L1"
    assert (await r.json())["amount"] == "100.5"
    # half-even at the 7th place: 0.00000005 -> 0.0000000 ; 0.00000015 -> 0.0000002
    await client.put("/v1/rates/A/B", json={"rate": "0.00000005"}, headers=AUTH)
    r = await client.get("/v1/rates/convert", params={"amount": "1", "from": "A", "to": "B"})
    assert (await r.json())["result"] == "0.0000000"
    await client.put("/v1/rates/A/B", json={"rate": "0.00000015"}, headers=AUTH)
    r = await client.get("/v1/rates/convert", params={"amount": "1", "from": "A", "to": "B"})
    assert (await r.json())["result"] == "0.0000002"


async def test_write_invalidates_pair_and_every_conversion(make_client, redis_client):
    client = await make_client()
    for amount in ("1", "2.5", "100.50"):
        r = await client.get("/v1/rates/convert", params={"amount": amount, "from": "CNGN", "to": "USD"})
        assert r.status == 200
    await client.get("/v1/rates/CNGN/USD")
    await client.get("/v1/rates/USD/CNGN")
    assert len(await redis_client.keys("v1:rate:convert:*:CNGN:USD")) == 3

    r = await client.put("/v1/rates/cngn/usd", json={"rate": "0.00070", "source": "feed"}, headers=AUTH)
    assert r.status == 200
    stored = await r.json()
    assert stored["rate"] == "0.00070" and stored["source"] == "feed" and stored["base"] == "CNGN"

    # O(1) in Redis: the pair's value is gone, its conversions are left alone yet dead (its generation moved on)
    assert len(await redis_client.keys("v1:rate:convert:*:CNGN:USD")) == 3
    assert await redis_client.exists("v1:rate:CNGN:USD") == 0
    assert await redis_client.exists("v1:rate:USD:CNGN") == 1  # the reverse pair is another row
    r = await client.get("/v1/rates/CNGN/USD")
    assert r.headers["X-Cache"] == "MISS" and (await r.json())["rate"] == "0.00070"
    for amount, result in (("1", "0.0007000"), ("2.5", "0.0017500"), ("100.50", "0.0703500")):
        r = await client.get("/v1/rates/convert", params={"amount": amount, "from": "CNGN", "to": "USD"})
        assert r.headers["X-Cache"] == "MISS"
        assert (await r.json())["result"] == result


async def test_put_creates_pair_cached_as_missing(make_client):
    client = await make_client()
    assert (await client.get("/v1/rates/EUR/USD")).status == 404
    assert (await client.get("/v1/rates/EUR/USD")).status == 404  # negative answer cached
    r = await client.put("/v1/rates/EUR/USD", json={"rate": "1.08"}, headers=AUTH)
    assert r.status == 200 and (await r.json())["source"] == "manual"
    r = await client.get("/v1/rates/EUR/USD")
    assert r.status == 200 and (await r.json())["rate"] == "1.08"


async def test_delete_rate(make_client):
    client = await make_client()
    other = await make_client()
    assert (await other.get("/v1/rates/XLM/USD")).status == 200
    r = await client.delete("/v1/rates/XLM/USD", headers=AUTH)
    assert r.status == 204
    assert (await client.get("/v1/rates/XLM/USD")).status == 404
    assert (await client.delete("/v1/rates/XLM/USD", headers=AUTH)).status == 404


async def test_fees_read_and_write(make_client, redis_client):
    client = await make_client()
    r = await client.get("/v1/fees/onramp")
    assert r.status == 200 and r.headers["X-Cache"] == "MISS"
    assert await r.json() == {
        "fee_type": "onramp",
        "rate_bps": 150,
        "flat": "0",
        "min": "0",
        "max": "1000",
        "currency": "NGN",
    }
    assert (await client.get("/v1/fees/onramp")).headers["X-Cache"] == "L1"
    assert await redis_client.exists("v1:fee:structure:onramp") == 1
    new = {"rate_bps": 120, "flat": "10", "min": "10", "max": "900", "currency": "ngn"}
    r = await client.put("/v1/fees/onramp", json=new, headers=AUTH)
    assert r.status == 200
    assert (await r.json())["currency"] == "NGN"
    assert await redis_client.exists("v1:fee:structure:onramp") == 0
    r = await client.get("/v1/fees/onramp")
    assert r.headers["X-Cache"] == "MISS" and (await r.json())["rate_bps"] == 120
    assert (await client.get("/v1/fees/unknown_fee")).status == 404


async def test_ttl_expiry_per_type(make_client, settings_factory):
    from tiers.keys import DataType

    s = settings_factory()
    ttl = dict(s.ttl)
    ttl[DataType.EXCHANGE_RATE] = 0.3
    client = await make_client(s.with_overrides(ttl=ttl))
    origin = client.app[K.PG_ORIGIN]
    assert (await client.get("/v1/rates/CNGN/USD")).headers["X-Cache"] == "MISS"
    assert (await client.get("/v1/fees/onramp")).headers["X-Cache"] == "MISS"
    assert (await client.get("/v1/rates/CNGN/USD")).headers["X-Cache"] == "L1"

    l1 = client.app[K.L1_CACHE]

    async def rate_expired() -> bool:  # nobody reads meanwhile, so no refresh-ahead keeps it alive
        return l1.get("v1:rate:CNGN:USD") is None

    from tests.conftest import eventually

    await eventually(rate_expired, timeout=3)
    assert (await client.get("/v1/rates/CNGN/USD")).headers["X-Cache"] == "MISS"
    assert origin.loads == 3
    # fees (1 h) still from L1
    assert (await client.get("/v1/fees/onramp")).headers["X-Cache"] == "L1"


async def test_l1_bounded(make_client, settings_factory):
    client = await make_client(settings_factory(env={"L1_MAX_ENTRIES": "5"}))
    for i in range(20):
        r = await client.put(f"/v1/rates/C{i}/USD", json={"rate": "1"}, headers=AUTH)
        assert r.status == 200
        assert (await client.get(f"/v1/rates/C{i}/USD")).status == 200
        assert len(client.app[K.L1_CACHE]) <= 5
    assert len(client.app[K.L1_CACHE]) == 5


async def test_two_instances_see_each_others_writes(make_client):
    a = await make_client()
    b = await make_client()
    assert (await (await b.get("/v1/rates/CNGN/USD")).json())["rate"] == "0.00065"
    r = await a.put("/v1/rates/CNGN/USD", json={"rate": "0.00071"}, headers=AUTH)
    assert r.status == 200

    async def b_sees_new() -> bool:
        return (await (await b.get("/v1/rates/CNGN/USD")).json())["rate"] == "0.00071"

    from tests.conftest import eventually

    await eventually(b_sees_new, timeout=2)


@pytest.mark.parametrize("redis_url_value", ["none"])
async def test_runs_without_redis(make_client, settings_factory, redis_url_value):
    client = await make_client(settings_factory(env={"REDIS_URL": redis_url_value}))
    r = await client.get("/v1/rates/CNGN/USD")
    assert r.status == 200 and r.headers["X-Cache"] == "MISS"
    assert (await client.get("/v1/rates/CNGN/USD")).headers["X-Cache"] == "L1"
    r = await client.put("/v1/rates/CNGN/USD", json={"rate": "0.0007"}, headers=AUTH)
    assert r.status == 200
    assert (await (await client.get("/v1/rates/CNGN/USD")).json())["rate"] == "0.0007"
    ready = await (await client.get("/health/ready")).json()
    assert ready["status"] == "ok" and ready["redis_mode"] == "disabled"


async def test_cache_warming_at_start_up(make_client, settings_factory):
    await make_client()  # seeds the rows
    client = await make_client(settings_factory(env={"AFRAMP_WARM_LIMIT": "100"}))
    # ready only after warming: every rate and fee structure is already in this instance's L1
    for path in ("/v1/rates/CNGN/USD", "/v1/rates/USD/CNGN", "/v1/rates/XLM/USD", "/v1/fees/onramp"):
        r = await client.get(path)
        assert r.status == 200 and r.headers["X-Cache"] == "L1", path
    assert client.app[K.LIFECYCLE].phase is K.Phase.READY
