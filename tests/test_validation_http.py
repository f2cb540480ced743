"""Every validation error and the admin auth of the contract: clear 4xx problem+json, nothing touched."""

from __future__ import annotations

import asyncio

import pytest

from service import appkeys as K
from tests.conftest import ADMIN, AUTH


def assert_problem(r, status: int) -> None:
    assert r.status == status, r.status
    assert r.headers["Content-Type"].startswith("application/problem+json")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/rates/CNGN!/USD",
        "/v1/rates/ABCDEFGHIJKLM/USD",  # 13 characters
        "/v1/rates/CNGN/US%20D",
        "/v1/rates/CN*G/USD",
        "/v1/rates/CNGN/%C3%A9",
        "/v1/rates/CN:GN/USD",
        "/v1/fees/OnRamp",
        "/v1/fees/on-ramp",
        "/v1/fees/" + "a" * 33,
    ],
)
async def test_bad_codes_400_and_no_origin_touched(make_client, path):
    client = await make_client()
    r = await client.get(path)
    assert_problem(r, 400)
    body = await r.json()
    assert body["status"] == 400 and body["detail"] and body["title"]
    assert client.app[K.PG_ORIGIN].loads == 0
    assert len(client.app[K.L1_CACHE]) == 0


@pytest.mark.parametrize(
    "params",
    [
        {"from": "CNGN", "to": "USD"},
        {"amount": "0", "from": "CNGN", "to": "USD"},
        {"amount": "-1", "from": "CNGN", "to": "USD"},
        {"amount": "1.12345678", "from": "CNGN", "to": "USD"},
        {"amount": "922337203685.4775808", "from": "CNGN", "to": "USD"},
        {"amount": "1e3", "from": "CNGN", "to": "USD"},
        {"amount": "NaN", "from": "CNGN", "to": "USD"},
        {"amount": "Infinity", "from": "CNGN", "to": "USD"},
        {"amount": " 1", "from": "CNGN", "to": "USD"},
        {"amount": "1.", "from": "CNGN", "to": "USD"},
        {"amount": "+1", "from": "CNGN", "to": "USD"},
        {"amount": "1", "from": "CNGN"},
        {"amount": "1", "from": "CN GN", "to": "USD"},
        {"amount": "1", "from": "CNGN", "to": "USD", "extra": "x"},
    ],
)
async def test_bad_conversions_400(make_client, params):
    client = await make_client()
    r = await client.get("/v1/rates/convert", params=params)
    assert_problem(r, 400)
    assert client.app[K.PG_ORIGIN].loads == 0


async def test_max_amount_accepted(make_client):
    client = await make_client()
    r = await client.get("/v1/rates/convert", params={"amount": "922337203685.4775807", "from": "USD", "to": "CNGN"})
    assert r.status == 200
    assert (await r.json())["result"] == "1418978894381959.8388037"


@pytest.mark.parametrize(
    "body",
    [
        {"rate": 0.00066},
        {"rate": "0"},
        {"rate": "-0.1"},
        {"rate": "abc"},
        {"rate": "1e-3"},
        {"rate": None},
        {"source": "x"},
        {"rate": "1", "source": 5},
        {"rate": "1", "unexpected": True},
        ["rate", "1"],
    ],
)
async def test_bad_rate_bodies_400_change_nothing(make_client, pg, body):
    client = await make_client()
    r = await client.put("/v1/rates/CNGN/USD", json=body, headers=AUTH)
    assert_problem(r, 400)
    assert await pg.fetchval("SELECT rate::text FROM exchange_rates WHERE base='CNGN' AND quote='USD'") == "0.00065"


async def test_not_json_400(make_client):
    client = await make_client()
    r = await client.put("/v1/rates/CNGN/USD", data=b"{rate:", headers=AUTH)
    assert_problem(r, 400)


@pytest.mark.parametrize(
    "body",
    [
        {"rate_bps": "150", "flat": "0", "min": "0", "max": "1", "currency": "NGN"},
        {"rate_bps": 10001, "flat": "0", "min": "0", "max": "1", "currency": "NGN"},
        {"rate_bps": True, "flat": "0", "min": "0", "max": "1", "currency": "NGN"},
        {"rate_bps": 1, "flat": 0, "min": "0", "max": "1", "currency": "NGN"},
        {"rate_bps": 1, "flat": "0", "min": "5", "max": "1", "currency": "NGN"},
        {"rate_bps": 1, "flat": "0", "min": "0", "max": "1", "currency": "N G"},
        {"rate_bps": 1, "flat": "0", "min": "0", "max": "1"},
        {"fee_type": "onramp", "rate_bps": 1, "flat": "0", "min": "0", "max": "1", "currency": "NGN"},
    ],
)
async def test_bad_fee_bodies_400(make_client, pg, body):
    client = await make_client()
    r = await client.put("/v1/fees/onramp", json=body, headers=AUTH)
    assert_problem(r, 400)
    assert await pg.fetchval("SELECT rate_bps FROM fee_structures WHERE fee_type='onramp'") == 150


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/v1/rates/CNGN/USD", {"rate": "1"}),
        ("DELETE", "/v1/rates/CNGN/USD", None),
        ("PUT", "/v1/fees/onramp", {"rate_bps": 1, "flat": "0", "min": "0", "max": "1", "currency": "NGN"}),
        ("DELETE", "/v1/cache?pattern=v1:rate:*", None),
    ],
)
async def test_admin_auth(make_client, settings_factory, pg, method, path, body):
    client = await make_client()
    for headers in ({}, {"Authorization": "Bearer wrong-token-xxxxxxxxxx"}, {"Authorization": "Basic abc"}):
        r = await client.request(method, path, json=body, headers=headers)
        assert_problem(r, 401)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    closed = await make_client(settings_factory(env={"ADMIN_TOKEN": ""}))
    r = await closed.request(method, path, json=body, headers=AUTH)
    assert_problem(r, 403)
    assert await pg.fetchval("SELECT rate::text FROM exchange_rates WHERE base='CNGN' AND quote='USD'") == "0.00065"


@pytest.mark.parametrize(
    "pattern",
    ["", "*", "v2:rate:*", "v1:*", "v1:nope:*", "v1:rate:", "v1:rate:C?GN:*", "v1:rate:[A]*", "v1:rate:a b"],
)
async def test_bad_cache_patterns_400(make_client, pattern):
    client = await make_client()
    r = await client.delete("/v1/cache", params={"pattern": pattern}, headers=AUTH)
    assert_problem(r, 400)


async def test_admin_auth_header_not_utf8_is_401(make_client):
    """Bytes that are not UTF-8 in Authorization were a 500 (UnicodeEncodeError comparing the token): a 401."""
    client = await make_client()
    host, port = client.server.host, client.server.port
    for value in (b"Bearer \xff\xfe", b"Bearer " + ADMIN.encode() + b"\xff", "Bearer \u00e9".encode()):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"DELETE /v1/cache?pattern=v1:rate:* HTTP/1.1\r\nHost: t\r\nAuthorization: "
            + value
            + b"\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        answer = await reader.read()
        writer.close()
        head = answer.split(b"\r\n\r\n", 1)[0]
        assert head.startswith(b"HTTP/1.1 401 "), (value, answer[:200])
        assert b"WWW-Authenticate: Bearer" in head and b"application/problem+json" in head


async def test_unknown_route_and_method_are_problems(make_client):
    client = await make_client()
    assert_problem(await client.get("/v1/nothing"), 404)
    r = await client.post("/v1/rates/CNGN/USD")
    assert_problem(r, 405)
    assert "PUT" in r.headers["Allow"]
