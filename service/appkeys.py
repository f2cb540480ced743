"""Every typed application key, in one module."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import asyncpg
import redis.asyncio
from aiohttp import web
from opentelemetry.sdk.trace import SpanProcessor

from actors.fees import FeesActor
from actors.health import HealthProbe
from actors.rates import RatesActor
from actors.stats import Stats
from actors.wallets import BalancesActor, TrustlinesActor
from service.config import Settings
from service.metrics import Metrics
from service.telemetry import Telemetry
from tiers.breaker import Breaker
from tiers.coherence import Coherence
from tiers.coherence.redis_store import IncarnationGuard
from tiers.horizon import HorizonOrigin
from tiers.l1 import L1
from tiers.l2 import RedisCache
from tiers.postgres import PostgresOrigin
from tiers.redis_pool import ManagedPool


class Phase(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


@dataclass
class Lifecycle:
    phase: Phase = Phase.STARTING
    started: dict[str, bool] = field(default_factory=dict)


@dataclass
class RedisHandles:
    """What the Redis resource context built; ``cache`` is None when running without Redis."""

    url: str | None
    cache: RedisCache | None
    pool: ManagedPool | None
    breaker: Breaker | None = None
    incarnation: IncarnationGuard | None = None
    subscriber: redis.asyncio.Redis | None = None


SETTINGS = web.AppKey("settings", Settings)
# the embedded servers this instance uses, e.g. "postgres (started)", "redis (shared)", for the start-up line
EMBEDDED = web.AppKey("embedded", list[str])
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
PG_DSN = web.AppKey("pg_dsn", str)
PG_POOL = web.AppKey("pg_pool", asyncpg.Pool)
PG_ORIGIN = web.AppKey("pg_origin", PostgresOrigin)
REDIS = web.AppKey("redis", RedisHandles)
L1_CACHE = web.AppKey("l1", L1)
STATS = web.AppKey("stats", Stats)
COHERENCE = web.AppKey("coherence", Coherence)
RATES = web.AppKey("rates", RatesActor)
FEES = web.AppKey("fees", FeesActor)
HORIZON = web.AppKey("horizon", HorizonOrigin)
BALANCES = web.AppKey("balances", BalancesActor)
TRUSTLINES = web.AppKey("trustlines", TrustlinesActor)
HEALTH = web.AppKey("health", HealthProbe)
TELEMETRY = web.AppKey("telemetry", Telemetry)
METRICS = web.AppKey("metrics", Metrics)
# tests and benchmarks: a span processor to record into (set before the app starts; enables tracing)
SPAN_PROCESSOR = web.AppKey("span_processor", SpanProcessor)
