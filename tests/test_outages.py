"""Outages: the Redis circuit breaker, running without Redis, stale-if-error, early refresh, shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest

from service import appkeys as K
from tests.conftest import ADMIN, AUTH, ROOT, eventually
from testsupport.tcp_proxy import TcpProxy
from tiers.breaker import Breaker, State
from tiers.keys import DataType


def via(url: str, proxy: TcpProxy) -> str:
    u = urlsplit(url)
    netloc = u.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(u._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


async def proxy_for(url: str) -> TcpProxy:
    u = urlsplit(url)
    if u.scheme not in ("redis", "postgresql", "postgres") or not u.port:
        pytest.skip("needs the server over TCP to put a proxy in between")
    return await TcpProxy(u.hostname or "127.0.0.1", u.port).start()


def short_rate_ttl(s, seconds: float):
    ttl = dict(s.ttl)
    ttl[DataType.EXCHANGE_RATE] = seconds
    return s.with_overrides(ttl=ttl)


# ---------------------------------------------------------------- breaker


def test_breaker_transitions():
    now = [0.0]
    b = Breaker(failure_threshold=3, reset_after=1.0, reset_max=4.0, clock=lambda: now[0])
    seen = []
    b.subscribe(lambda old, new: seen.append((old, new)))
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state is State.CLOSED
    assert b.allow()
    b.success()  # a success resets the count of consecutive failures
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state is State.OPEN
    assert not b.allow()  # open: refused at once
    now[0] = 1.0
    assert b.allow() and b.state is State.HALF_OPEN  # one probe ...
    assert not b.allow()  # ... at a time
    b.failure()
    assert b.state is State.OPEN and b.reset_after == 2.0  # the wait doubles
    now[0] = 2.5
    assert not b.allow()
    now[0] = 3.0
    assert b.allow()
    b.abandon()  # a cancelled probe frees the slot without a verdict
    assert b.allow()
    b.success()
    assert b.state is State.CLOSED and b.reset_after == 1.0
    assert seen == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]


async def test_requests_while_redis_is_silent_do_not_wait_for_socket_timeouts(make_client, settings_factory, redis_url):
    proxy = await proxy_for(redis_url)
    try:
        client = await make_client(settings_factory(env={"REDIS_URL": via(redis_url, proxy)}))
        breaker = client.app[K.REDIS].breaker
        assert (await client.get("/v1/rates/CNGN/USD")).status == 200
        proxy.blackhole()  # Redis accepts nothing and answers nothing: the worst kind of outage
        # the first calls pay the operation timeout (0.5 s) until the breaker opens ...
        for pair in ("XLM/USD", "USD/CNGN", "XLM/USD", "USD/CNGN"):
            assert (await client.get(f"/v1/rates/{pair}")).status == 200
        assert breaker.state is not State.CLOSED
        # ... then no request waits on Redis at all (its connect timeout is 5 s)
        for _ in range(10):
            started = time.monotonic()
            r = await client.get("/v1/fees/onramp")
            assert r.status == 200
            assert time.monotonic() - started < 0.25
        ready = await (await client.get("/health/ready")).json()
        assert ready["status"] == "degraded" and ready["checks"]["redis"] == "down"
    finally:
        await proxy.close()


async def test_start_with_redis_down_serves_from_origin_and_reports_degraded(make_client, settings_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens here once the socket is closed
    client = await make_client(
        settings_factory(env={"REDIS_URL": f"redis://127.0.0.1:{dead}/0"}), wait_subscribed=False
    )
    r = await client.get("/v1/rates/CNGN/USD")
    assert r.status == 200 and r.headers["X-Cache"] == "MISS"
    r = await client.get("/health/ready")
    assert r.status == 200
    assert await r.json() == {
        "status": "degraded",
        "checks": {"postgres": "up", "redis": "down", "invalidation": "disconnected"},
    }
    # a write cannot invalidate every instance first: refused, nothing changed (the contract's coherence rule)
    r = await client.put("/v1/rates/CNGN/USD", json={"rate": "0.0008"}, headers=AUTH)
    assert r.status == 503 and (await r.json())["type"] == "urn:aframp:problem:invalidation-unavailable"
    assert (await (await client.get("/v1/rates/CNGN/USD")).json())["rate"] == "0.00065"


async def test_without_redis_l1_serves_only_fresh_fetches_and_a_peers_write_is_seen_within_the_bound(
    make_client, settings_factory, redis_url
):
    """An instance cut off from Redis (a partition) while its peers write: it cannot hear the bus, so L1 serves
    only what it fetched within the bound; a peer's acknowledged write is seen at once. Back: a new session."""
    proxy = await proxy_for(redis_url)
    try:
        client = await make_client(settings_factory(env={"REDIS_URL": via(redis_url, proxy)}))
        peer = await make_client()  # talks to Redis directly
        co, l1 = client.app[K.COHERENCE], client.app[K.L1_CACHE]
        assert (await client.get("/v1/rates/CNGN/USD")).status == 200
        sessions = co.sessions
        await proxy.down()

        async def lapsed() -> bool:
            return not l1.serving

        await eventually(lapsed, timeout=5)
        r = await peer.put("/v1/rates/CNGN/USD", json={"rate": "0.00111"}, headers=AUTH)
        assert r.status == 200
        acked = time.monotonic()

        async def bound_passed() -> bool:  # the contract: no read that starts later than B after the answer
            return time.monotonic() > acked + co.config.bound

        await eventually(bound_passed, timeout=2)
        r = await client.get("/v1/rates/CNGN/USD")
        assert (await r.json())["rate"] == "0.00111", r.headers["X-Cache"]
        # reads go to the origin (the breaker keeps them from waiting on Redis); what they fetch serves briefly
        await proxy.up()

        async def back() -> bool:
            return co.sessions > sessions and l1.serving

        await eventually(back, timeout=10)
        assert (await (await client.get("/v1/rates/CNGN/USD")).json())["rate"] == "0.00111"
    finally:
        await proxy.close()


async def test_stale_if_error_from_redis_when_postgres_is_down(make_client, settings_factory, pg_dsn, redis_client):
    proxy = await proxy_for(pg_dsn)
    try:
        s = short_rate_ttl(settings_factory(env={"DATABASE_URL": via(pg_dsn, proxy)}), 0.3)
        client = await make_client(s)
        fresh = await client.get("/v1/rates/CNGN/USD")
        body = await fresh.json()
        l1 = client.app[K.L1_CACHE]

        async def expired() -> bool:
            return l1.get("v1:rate:CNGN:USD") is None

        await eventually(expired, timeout=3)
        await proxy.down()
        r = await client.get("/v1/rates/CNGN/USD")
        assert r.status == 200 and r.headers["X-Cache"] == "STALE"
        assert int(r.headers["Age"]) >= 0 and await r.json() == body
        # a key with no last-known value: a clear problem, not a hang and not a 500
        r = await client.get("/v1/rates/XLM/USD")
        assert r.status == 503 and r.headers["Content-Type"].startswith("application/problem+json")
        stats = (client.app[K.STATS]).by_type()["exchange_rate"]
        assert stats["stale_served"] == 1 and stats["load_errors"] == 2
    finally:
        await proxy.close()


async def test_stale_if_error_from_this_instance_without_redis(make_client, settings_factory, pg_dsn):
    proxy = await proxy_for(pg_dsn)
    try:
        s = settings_factory(env={"DATABASE_URL": via(pg_dsn, proxy), "REDIS_URL": "none"})
        client = await make_client(short_rate_ttl(s, 0.3))
        assert (await client.get("/v1/rates/CNGN/USD")).status == 200
        l1 = client.app[K.L1_CACHE]

        async def expired() -> bool:
            return l1.get("v1:rate:CNGN:USD") is None

        await eventually(expired, timeout=3)
        await proxy.down()
        r = await client.get("/v1/rates/CNGN/USD")
        assert r.status == 200 and r.headers["X-Cache"] == "STALE" and "Age" in r.headers
    finally:
        await proxy.close()


async def test_stale_if_error_for_horizon(wallet_client, horizon, settings_factory):
    from tests.test_wallets_http import new_account

    g = new_account()
    horizon.fund(g)
    s = settings_factory()
    ttl = dict(s.ttl)
    ttl[DataType.WALLET_BALANCE] = 0.3
    client = await wallet_client(ttl=ttl)
    body = await (await client.get(f"/v1/wallets/{g}/balances")).json()
    l1 = client.app[K.L1_CACHE]

    async def expired() -> bool:
        return l1.get(f"v1:wallet:balance:{g}") is None

    await eventually(expired, timeout=3)
    horizon.mode, horizon.fail_status = "fail", 503
    r = await client.get(f"/v1/wallets/{g}/balances")
    assert r.status == 200 and r.headers["X-Cache"] == "STALE" and "Age" in r.headers
    assert await r.json() == body


async def test_write_during_postgres_outage_is_refused_and_stale_answers_survive_it(
    make_client, settings_factory, pg_dsn, redis_client
):
    proxy = await proxy_for(pg_dsn)
    try:
        client = await make_client(settings_factory(env={"DATABASE_URL": via(pg_dsn, proxy)}))
        assert (await client.get("/v1/rates/CNGN/USD")).status == 200
        await proxy.down()
        r = await client.put("/v1/rates/CNGN/USD", json={"rate": "0.5"}, headers=AUTH)
        assert r.status == 503 and r.headers["Content-Type"].startswith("application/problem+json")
        # the keys were invalidated before the commit was tried; the commit failed, so the value moved aside is the
        # truth again: put back in Redis, and reads while Postgres is down are still answered
        r = await client.get("/v1/rates/CNGN/USD")
        assert r.status == 200 and r.headers["X-Cache"] in ("L2", "STALE")
        assert (await r.json())["rate"] == "0.00065"
        assert await redis_client.zcard("v1:rate:CNGN:USD|w") == 0
        await proxy.up()
        r = await client.get("/v1/rates/CNGN/USD")
        assert (await r.json())["rate"] == "0.00065"
    finally:
        await proxy.close()


# ---------------------------------------------------------------- early refresh


async def test_hot_key_is_refreshed_ahead_once_across_the_fleet(make_client, settings_factory):
    s = short_rate_ttl(settings_factory(coherence={"refresh_ahead": 0.5}), 1.0)
    apps = [await make_client(s) for _ in range(3)]
    sources = []
    for a in apps:
        sources.append((await a.get("/v1/rates/CNGN/USD")).headers["X-Cache"])
    assert sources == ["MISS", "L2", "L2"]

    def loads() -> int:
        return sum(a.app[K.PG_ORIGIN].loads for a in apps)

    async def refreshed() -> bool:
        for a in apps:
            sources.append((await a.get("/v1/rates/CNGN/USD")).headers["X-Cache"])
        return loads() >= 2  # a count that can jump past 2 must not be waited for exactly

    await eventually(refreshed, timeout=3, interval=0.02)
    # readers never waited on an expiry: the only miss was the very first read
    assert sources.count("MISS") == 1 and "STALE" not in sources
    assert sum(a.app[K.STATS].get(DataType.EXCHANGE_RATE, "refreshes") for a in apps) >= 1


# ---------------------------------------------------------------- graceful shutdown


async def test_sigterm_drains_in_flight_requests(pg, pg_dsn, redis_url, redis_client, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "DATABASE_", "OTEL_"))},
        "DATABASE_URL": pg_dsn,
        "REDIS_URL": redis_url,
        "ADMIN_TOKEN": ADMIN,
        "PORT": str(port),
        "AFRAMP_DATA_DIR": str(tmp_path),
    }
    proc = subprocess.Popen(  # noqa: ASYNC220 - starting the server under test, once
        [sys.executable, "-m", "service", "serve", "--config", str(ROOT / "config.toml")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def up() -> bool:
                try:
                    async with http.get(base + "/health/ready") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(up, timeout=30, interval=0.1)
            await pg.execute("INSERT INTO exchange_rates (base, quote, rate) VALUES ('SLOW', 'USD', 2)")
            locker = await __import__("asyncpg").connect(pg_dsn)
            tx = locker.transaction()
            await tx.start()
            await locker.execute("LOCK TABLE exchange_rates IN ACCESS EXCLUSIVE MODE")
            in_flight = asyncio.create_task(http.get(base + "/v1/rates/SLOW/USD"))

            async def blocked() -> bool:
                n = await pg.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"  # not other sessions'
                    " AND wait_event_type = 'Lock' AND (query LIKE '%SLOW%' OR query LIKE '%exchange_rates%')"
                )
                return n >= 1

            await eventually(blocked, timeout=10)
            proc.send_signal(signal.SIGTERM)

            async def refusing() -> bool:
                try:
                    async with http.get(base + "/health/live"):
                        return False
                except aiohttp.ClientError:
                    return True

            await eventually(refusing, timeout=5)  # the listener is closed ...
            assert proc.poll() is None  # ... but the process waits for the request in flight
            await tx.rollback()
            await locker.close()
            r = await asyncio.wait_for(in_flight, 10)
            assert r.status == 200 and (await r.json())["rate"] == "2"
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
