"""The composition root: builds pools, tiers, the coherence engine and actors from one frozen Settings object.

Each resource has one cleanup context (aiohttp runs them in order at start-up and in reverse at shutdown);
every background task is owned here, cancelled and awaited at shutdown. Nothing happens at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from actors.cache_actor import CacheActor
from actors.fees import FeesActor
from actors.health import HealthProbe
from actors.rates import RatesActor
from actors.read_through import Policy
from actors.stats import Stats
from actors.wallets import BalancesActor, TrustlinesActor
from service import appkeys as K
from service import logs, telemetry
from service.config import Settings, redact_url
from service.embedded import EmbeddedPostgres, EmbeddedRedis
from service.metrics import Metrics
from service.routes import setup_routes
from service.snapshot import snapshot
from tiers import horizon, postgres
from tiers.breaker import Breaker
from tiers.coherence import Coherence, CoherenceConfig
from tiers.coherence.outbox import PgOutbox
from tiers.coherence.redis_store import IncarnationGuard, RedisStore
from tiers.errors import OriginError
from tiers.l1 import L1
from tiers.l2 import RedisCache
from tiers.redis_pool import ManagedPool

log = logging.getLogger(__name__)

Context = Callable[[web.Application], AsyncIterator[None]]


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)  # no middleware: each route is wrapped (service.observed)
    app[K.SETTINGS] = settings
    app[K.LIFECYCLE] = K.Lifecycle()
    app[K.EMBEDDED] = []
    app[K.METRICS] = Metrics(lambda: (snapshot(app), app[K.STATS]) if K.STATS in app else None)
    logs.register_secret(settings.server.admin_token)
    logs.register_url(settings.postgres.url)
    logs.register_url(settings.redis.url)
    app.on_shutdown.append(_draining)
    app.cleanup_ctx.extend(
        [telemetry_ctx, postgres_ctx, redis_ctx, horizon_ctx, actors_ctx, coherence_ctx, lifecycle_ctx]
    )
    setup_routes(app)
    return app


async def cancel_and_wait(task: asyncio.Task[object]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# ---------------------------------------------------------------- tracing


async def telemetry_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[K.SETTINGS]
    tel = telemetry.build(s.otel, s.server.instance_id, app.get(K.SPAN_PROCESSOR))
    app[K.TELEMETRY] = tel
    try:
        yield
    finally:
        await tel.shutdown()


# ---------------------------------------------------------------- Postgres


async def postgres_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[K.SETTINGS]
    embedded = EmbeddedPostgres(s.server.data_dir) if s.postgres.embedded else None
    if embedded:  # subprocesses and file locks: in a worker thread, never on the event loop
        dsn = await asyncio.to_thread(embedded.start)
        app[K.EMBEDDED].append(f"postgres ({'started' if embedded.started else 'shared'})")
        log.debug("embedded postgres in %s", embedded.path)
    else:
        dsn = s.postgres.url
    try:
        pool = await postgres.create_pool(
            dsn,
            min_size=s.postgres.min_size,
            max_size=s.postgres.max_size,
            command_timeout=s.postgres.command_timeout,
            connect_timeout=s.postgres.connect_timeout,
        )
        try:
            applied = await postgres.migrate(pool)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
            if embedded:
                await postgres.load_demo_data(pool)
            app[K.PG_DSN] = dsn
            app[K.PG_POOL] = pool
            app[K.PG_ORIGIN] = postgres.PostgresOrigin(pool, acquire_timeout=s.postgres.connect_timeout)
            yield
        finally:
            try:  # asyncpg waits for every connection to be released: bounded, then forced
                await asyncio.wait_for(pool.close(), s.server.shutdown_grace)
            except TimeoutError:
                log.warning("postgres pool did not close in time; terminating its connections")
                pool.terminate()
    finally:
        if embedded:
            await asyncio.shield(asyncio.to_thread(embedded.stop))


# ---------------------------------------------------------------- Redis


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[K.SETTINGS].redis
    if s.disabled:
        app[K.REDIS] = K.RedisHandles(None, None, None)
        yield
        return
    embedded = EmbeddedRedis(app[K.SETTINGS].server.data_dir) if s.embedded else None
    if embedded:  # subprocesses and file locks: in a worker thread, never on the event loop
        url = await asyncio.to_thread(embedded.start)
        app[K.EMBEDDED].append(f"redis ({'started' if embedded.started else 'shared'})")
    else:
        url = s.url
    # every new connection checks the server's incarnation before its first command (tiers.coherence, rule 6)
    incarnation = IncarnationGuard()
    pool = ManagedPool.for_url(
        url,
        max_connections=s.max_connections,
        timeout=s.connection_timeout,  # wait for a free pooled connection at most this long
        socket_connect_timeout=s.connection_timeout,
        socket_timeout=s.command_timeout,
        health_check_interval=s.health_check_interval,
        min_idle=s.min_idle,
        max_lifetime=s.max_lifetime,
        idle_timeout=s.idle_timeout,
        redis_connect_func=incarnation.on_connect,
    )
    client = aioredis.Redis(connection_pool=pool)
    app[K.TELEMETRY].instrument_redis(client)
    breaker = Breaker(failure_threshold=s.breaker_failures, reset_after=s.breaker_reset, reset_max=s.breaker_reset_max)
    breaker.subscribe(
        lambda old, new: log.warning(
            "redis circuit breaker: %s -> %s", old, new, extra={"event": "breaker", "from": old, "to": new}
        )
    )
    cache = RedisCache(client, pool, breaker=breaker, op_timeout=s.op_timeout)
    # the subscriber has its own connection, outside the request pool, and no retries: every loss must surface
    subscriber = aioredis.Redis.from_url(
        url,
        socket_connect_timeout=s.connection_timeout,
        socket_timeout=None,
        retry=Retry(NoBackoff(), 0),
        redis_connect_func=incarnation.on_connect,
    )
    app[K.REDIS] = K.RedisHandles(url, cache, pool, breaker, incarnation, subscriber)
    log.info("redis at %s (pool %d, min idle %d)", redact_url(url), s.max_connections, s.min_idle)
    maintenance = asyncio.create_task(_maintain_pool(pool, s.idle_timeout), name="redis-pool-maintenance")
    try:
        yield
    finally:
        await cancel_and_wait(maintenance)
        with contextlib.suppress(TimeoutError, RedisError, OSError):
            async with asyncio.timeout(5):
                await subscriber.aclose()
                await client.aclose()
                await pool.disconnect()
        if embedded:
            await asyncio.shield(asyncio.to_thread(embedded.stop))


async def _maintain_pool(pool: ManagedPool, idle_timeout: float) -> None:
    """Keep REDIS_MIN_IDLE warm connections and close those idle past REDIS_IDLE_TIMEOUT."""
    period = max(0.05, min(5.0, idle_timeout / 4))
    while True:
        try:
            await pool.maintain()
        except (RedisError, OSError, TimeoutError) as err:
            log.debug("redis pool maintenance: %s", err)
        await asyncio.sleep(period)  # a periodic job, not a wait for an event


# ---------------------------------------------------------------- Horizon


async def horizon_ctx(app: web.Application) -> AsyncIterator[None]:
    """One stellar-sdk ServerAsync over one AiohttpClient (one aiohttp session, shared by every request),
    closed at shutdown."""
    s = app[K.SETTINGS].horizon
    server = horizon.create_server(s.url, timeout=s.timeout, trace_configs=app[K.TELEMETRY].client_trace_configs())
    origin = horizon.HorizonOrigin(server, max_concurrency=s.max_concurrency)
    app[K.HORIZON] = origin
    log.info("horizon at %s (timeout %.1fs)", redact_url(s.url), s.timeout)
    try:
        yield
    finally:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await origin.close()


# ---------------------------------------------------------------- coherence, tiers and actors


def build_policy(s: Settings) -> Policy:
    return Policy(
        ttl=s.ttl,
        negative_ttl=s.negative_ttl,
        max_stale=s.max_stale,
        lease_ttl=s.coherence.lease_ttl,
        lease_wait=s.coherence.lease_wait,
        refresh_ahead=s.coherence.refresh_ahead,
    )


def coherence_config(s: Settings) -> CoherenceConfig:
    c = s.coherence
    longest = max(s.ttl[dt] + s.max_stale.get(dt, 0) for dt in s.ttl)
    return CoherenceConfig(
        channel=s.redis.channel,
        instance_id=s.server.instance_id,
        bound=c.bound,
        join_window=c.join_window,
        ping_interval=c.ping_interval,
        dead_after=c.dead_after,
        fence_ttl=c.fence_ttl,
        lease_ttl=c.lease_ttl,
        gen_ttl=longest + c.lease_ttl,  # a bumped generation outlives every value it can guard
        reconnect_max=2.0,
        outbox_sweep=c.outbox_sweep,
        outbox_grace=c.outbox_grace,
    )


async def actors_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[K.SETTINGS]
    stats = Stats()
    handles = app[K.REDIS]
    config = coherence_config(s)
    l1 = L1(s.l1.max_entries, s.l1.max_ttl, bound=config.lease)
    store = None
    if handles.cache is not None and handles.incarnation is not None and handles.subscriber is not None:
        store = RedisStore(
            handles.cache,
            handles.incarnation,
            channel=config.channel,
            subscriber=handles.subscriber,
            gen_ttl=config.gen_ttl,
        )
    tel = app[K.TELEMETRY]
    coherence = Coherence(
        config,
        l1=l1,
        store=store,
        outbox=PgOutbox(app[K.PG_POOL], acquire_timeout=s.postgres.connect_timeout),
        count=stats.inc,
        trace=tel if tel.enabled else None,
    )
    if handles.incarnation is not None:
        handles.incarnation.subscribe(coherence.on_incarnation)
    if handles.breaker is not None:
        breaker = handles.breaker
        coherence.on_session = breaker.probe_now  # the subscriber reached Redis: probe it now rather than later
    common = {"l1": l1, "coherence": coherence, "policy": build_policy(s), "stats": stats, "tracer": tel.tracer}
    origin = app[K.PG_ORIGIN]
    rates = RatesActor(origin=origin, **common)
    fees = FeesActor(origin=origin, **common)
    balances = BalancesActor(origin=app[K.HORIZON], **common)
    trustlines = TrustlinesActor(balances=balances, **common)
    actors: list[CacheActor] = [rates, fees, balances, trustlines]
    for actor in actors:
        await actor.start()
    app[K.STATS], app[K.L1_CACHE], app[K.COHERENCE] = stats, l1, coherence
    app[K.HEALTH] = HealthProbe(app[K.PG_ORIGIN], handles.cache, coherence if store is not None else None)
    app[K.RATES], app[K.FEES] = rates, fees
    app[K.BALANCES], app[K.TRUSTLINES] = balances, trustlines
    try:
        yield
    finally:
        for actor in reversed(actors):
            await actor.stop()


# ---------------------------------------------------------------- the coherence engine's background work


async def coherence_ctx(app: web.Application) -> AsyncIterator[None]:
    """The bus subscriber (L1's trust lease) and the outbox sweeper: owned here, cancelled and awaited."""
    coherence = app[K.COHERENCE]
    tasks = [
        asyncio.create_task(coherence.run_bus(), name="coherence-bus"),
        asyncio.create_task(coherence.run_outbox(), name="coherence-outbox"),
    ]
    if isinstance(coherence.store, RedisStore):
        tasks.append(asyncio.create_task(_check_eviction_policy(coherence.store), name="coherence-policy-check"))
    try:
        yield
    finally:
        for task in tasks:
            await cancel_and_wait(task)
        # every request has finished: the rows of settled writes go now, not with the next instance's sweep
        try:
            async with asyncio.timeout(2.0):
                await coherence.flush_settled()
        except TimeoutError:
            log.info("outbox rows left to the sweep (Postgres slow at shutdown)", extra={"event": "outbox_postponed"})


async def _check_eviction_policy(store: RedisStore) -> None:
    """The protocol's fences and generations must never be evicted: say so loudly if Redis may evict them."""
    policy = await store.eviction_policy()
    if policy is not None and policy != "noeviction":
        log.error(
            "redis maxmemory-policy is %r: Redis may evict the coherence protocol's fences and generations under "
            "memory pressure and serve stale values; set maxmemory-policy noeviction (docs/COHERENCE.md)",
            policy,
            extra={"event": "redis_eviction_policy", "policy": policy},
        )


# ---------------------------------------------------------------- lifecycle


async def lifecycle_ctx(app: web.Application) -> AsyncIterator[None]:
    """Ready once the cache is warm (or warming took too long); draining from shutdown on."""
    s = app[K.SETTINGS]
    log.info(
        "started instance %s (tracing: %s)", s.server.instance_id, app[K.TELEMETRY].mode, extra={"event": "startup"}
    )
    # every effective setting (about 2 KB): at debug level, LOG_LEVEL=debug shows it
    log.debug("effective settings", extra={"event": "settings", "settings": logs.public_settings(s)})
    task = asyncio.create_task(_warm_then_ready(app), name="cache-warming")
    try:
        yield
    finally:
        app[K.LIFECYCLE].phase = K.Phase.DRAINING
        await cancel_and_wait(task)


async def _warm_then_ready(app: web.Application) -> None:
    s = app[K.SETTINGS].server
    try:
        if s.warm_limit > 0:
            started = time.monotonic()
            coherence = app[K.COHERENCE]
            if coherence.store is not None:  # a new bus session empties L1: warm after it, if it comes soon
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(2.0, s.warm_timeout)):
                        await coherence.connected.wait()
            async with asyncio.timeout(s.warm_timeout):
                rates = await app[K.RATES].warm_all(s.warm_limit)
                fees = await app[K.FEES].warm_all(s.warm_limit)
            log.info("cache warm: %d rates, %d fee structures in %.2fs", rates, fees, time.monotonic() - started)
    except TimeoutError:
        log.warning("cache warming did not finish within %.1fs; serving anyway", s.warm_timeout)
    except OriginError as err:
        log.warning("cache warming skipped: %s", err)
    except Exception:  # warming is best effort: a bug there must not keep the instance out of service
        log.exception("cache warming failed; serving anyway")
    finally:
        if app[K.LIFECYCLE].phase is K.Phase.STARTING:
            app[K.LIFECYCLE].phase = K.Phase.READY


async def _draining(app: web.Application) -> None:
    """on_shutdown: the listener is closed and in-flight requests are finishing; say so on /health/ready."""
    app[K.LIFECYCLE].phase = K.Phase.DRAINING
    log.info("draining instance %s", app[K.SETTINGS].server.instance_id, extra={"event": "shutdown"})
