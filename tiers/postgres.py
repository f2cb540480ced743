"""The Postgres origin: an asyncpg pool, versioned migrations under an advisory lock, rate and fee queries.

asyncpg and socket errors are translated here into tiers.errors (OriginUnavailable, OriginTimeout, Conflict).
Values leave this module as JSON-ready dicts with decimal strings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from typing import Any, Protocol

import asyncpg

from tiers.errors import Conflict, OriginTimeout, OriginUnavailable

MIGRATION_LOCK = 0x4166_7261_6D70  # "Aframp": one advisory lock id for every instance

DEMO_RATES = [
    ("CNGN", "USD", "0.00065", "demo"),
    ("USD", "CNGN", "1538.46", "demo"),
    ("CNGN", "NGN", "1", "demo"),
    ("NGN", "CNGN", "1", "demo"),
    ("XLM", "USD", "0.1123", "demo"),
    ("USDC", "USD", "1", "demo"),
]
DEMO_FEES = [
    ("onramp", 150, "0", "0", "1000", "NGN"),
    ("offramp", 100, "50", "50", "5000", "NGN"),
    ("bill_payment", 50, "100", "100", "2000", "NGN"),
]


def decimal_str(d: Decimal) -> str:
    """Plain (never scientific) string of a Decimal, as the contract's decimal strings."""
    return format(d, "f")


def rfc3339(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def rate_row(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "base": r["base"],
        "quote": r["quote"],
        "rate": decimal_str(r["rate"]),
        "source": r["source"],
        "updated_at": rfc3339(r["updated_at"]),
    }


def fee_row(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "fee_type": r["fee_type"],
        "rate_bps": r["rate_bps"],
        "flat": decimal_str(r["flat"]),
        "min": decimal_str(r["min"]),
        "max": decimal_str(r["max"]),
        "currency": r["currency"],
    }


# Writes take ``outbox``: the cache keys they invalidate. The keys are recorded in ``cache_outbox`` by the same
# statement (so with the same commit) and the row's id is returned with the result (tiers.coherence.outbox).
Written = tuple[dict[str, Any], int | None]


class RatesOrigin(Protocol):
    async def get_rate(self, base: str, quote: str) -> dict[str, Any] | None: ...
    async def list_pairs(self, limit: int) -> list[tuple[str, str]]: ...
    async def upsert_rate(
        self, base: str, quote: str, rate: Decimal, source: str, *, outbox: Sequence[str] = ()
    ) -> Written: ...
    async def delete_rate(self, base: str, quote: str, *, outbox: Sequence[str] = ()) -> tuple[bool, int | None]: ...


class FeesOrigin(Protocol):
    async def get_fee(self, fee_type: str) -> dict[str, Any] | None: ...
    async def list_fee_types(self, limit: int) -> list[str]: ...
    async def upsert_fee(self, fee_type: str, fee: dict[str, Any], *, outbox: Sequence[str] = ()) -> Written: ...


# a data-modifying CTE that records the outbox row in the same statement: ``$n`` is the keys array
def _with_outbox(param: int, source: str = "") -> str:
    return (
        f"ob AS (INSERT INTO cache_outbox (keys) SELECT ${param}::text[] {source}"
        f" WHERE cardinality(${param}::text[]) > 0 RETURNING id)"
    )


@asynccontextmanager
async def translate(op: str) -> AsyncIterator[None]:
    """Map asyncpg/socket failures to the service's own errors."""
    try:
        yield
    except TimeoutError as err:
        raise OriginTimeout("postgres", f"{op} timed out") from err
    except asyncpg.IntegrityConstraintViolationError as err:
        raise Conflict(f"{op}: {err}") from err
    except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError) as err:
        raise OriginUnavailable("postgres", f"{op}: {type(err).__name__}") from err
    except asyncpg.PostgresError as err:
        # CannotConnectNow, AdminShutdown, too many connections, ...: the origin cannot answer now
        raise OriginUnavailable("postgres", f"{op}: {type(err).__name__}: {err}") from err


class PostgresOrigin:
    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout: float = 5.0) -> None:
        self.pool = pool
        self.acquire_timeout = acquire_timeout
        self.loads = 0  # queries issued by reads, for stats and tests

    async def _fetchrow(self, op: str, sql: str, *args: Any) -> asyncpg.Record | None:
        async with translate(op):
            async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
                return await conn.fetchrow(sql, *args)

    async def ping(self) -> None:
        await self._fetchrow("ping", "SELECT 1")

    # ---- rates
    async def get_rate(self, base: str, quote: str) -> dict[str, Any] | None:
        self.loads += 1
        r = await self._fetchrow(
            "get rate",
            "SELECT base, quote, rate, source, updated_at FROM exchange_rates WHERE base=$1 AND quote=$2",
            base,
            quote,
        )
        return rate_row(r) if r else None

    async def list_pairs(self, limit: int) -> list[tuple[str, str]]:
        """The most recently updated pairs, for cache warming."""
        async with translate("list pairs"):
            async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
                rows = await conn.fetch(
                    "SELECT base, quote FROM exchange_rates ORDER BY updated_at DESC LIMIT $1", limit
                )
        return [(r["base"], r["quote"]) for r in rows]

    async def list_fee_types(self, limit: int) -> list[str]:
        async with translate("list fee types"):
            async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
                rows = await conn.fetch("SELECT fee_type FROM fee_structures ORDER BY fee_type LIMIT $1", limit)
        return [r["fee_type"] for r in rows]

    async def upsert_rate(
        self, base: str, quote: str, rate: Decimal, source: str, *, outbox: Sequence[str] = ()
    ) -> Written:
        r = await self._fetchrow(
            "upsert rate",
            f"""WITH up AS (
                 INSERT INTO exchange_rates (base, quote, rate, source, updated_at)
                 VALUES ($1, $2, $3, $4, now())
                 ON CONFLICT (base, quote) DO UPDATE
                   SET rate = EXCLUDED.rate, source = EXCLUDED.source, updated_at = now()
                 RETURNING base, quote, rate, source, updated_at),
               {_with_outbox(5)}
               SELECT up.*, (SELECT id FROM ob) AS outbox_id FROM up""",
            base,
            quote,
            rate,
            source,
            list(outbox),
        )
        assert r is not None
        return rate_row(r), r["outbox_id"]

    async def delete_rate(self, base: str, quote: str, *, outbox: Sequence[str] = ()) -> tuple[bool, int | None]:
        r = await self._fetchrow(
            "delete rate",
            f"""WITH d AS (DELETE FROM exchange_rates WHERE base=$1 AND quote=$2 RETURNING 1),
               {_with_outbox(3, "FROM d")}
               SELECT (SELECT count(*) FROM d) AS deleted, (SELECT id FROM ob) AS outbox_id""",
            base,
            quote,
            list(outbox),
        )
        assert r is not None
        return r["deleted"] > 0, r["outbox_id"]

    # ---- fees
    async def get_fee(self, fee_type: str) -> dict[str, Any] | None:
        self.loads += 1
        r = await self._fetchrow(
            "get fee",
            "SELECT fee_type, rate_bps, flat, min, max, currency FROM fee_structures WHERE fee_type=$1",
            fee_type,
        )
        return fee_row(r) if r else None

    async def upsert_fee(self, fee_type: str, fee: dict[str, Any], *, outbox: Sequence[str] = ()) -> Written:
        r = await self._fetchrow(
            "upsert fee",
            f"""WITH up AS (
                 INSERT INTO fee_structures (fee_type, rate_bps, flat, min, max, currency, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, now())
                 ON CONFLICT (fee_type) DO UPDATE
                   SET rate_bps = EXCLUDED.rate_bps, flat = EXCLUDED.flat, min = EXCLUDED.min,
                       max = EXCLUDED.max, currency = EXCLUDED.currency, updated_at = now()
                 RETURNING fee_type, rate_bps, flat, min, max, currency),
               {_with_outbox(7)}
               SELECT up.*, (SELECT id FROM ob) AS outbox_id FROM up""",
            fee_type,
            fee["rate_bps"],
            fee["flat"],
            fee["min"],
            fee["max"],
            fee["currency"],
            list(outbox),
        )
        assert r is not None
        return fee_row(r), r["outbox_id"]


# ---------------------------------------------------------------- pool, migrations, demo data


async def create_pool(
    dsn: str, *, min_size: int, max_size: int, command_timeout: float, connect_timeout: float
) -> asyncpg.Pool:
    """A pool whose statements Postgres itself aborts after ``command_timeout`` (``statement_timeout``), so a write
    can never commit long after its writer gave up on it (the coherence protocol's write fences outlive it)."""
    async with translate("connect"):
        return await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            command_timeout=command_timeout,
            timeout=connect_timeout,
            server_settings={"statement_timeout": str(int(command_timeout * 1000))},
        )


def migration_files() -> list[tuple[int, str, str]]:
    out = []
    for entry in resources.files("tiers.migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            out.append((int(name[:3]), name, entry.read_text(encoding="utf-8")))
    return sorted(out)


async def migrate(pool: asyncpg.Pool) -> list[str]:
    """Apply pending migrations under a session advisory lock; safe when many instances start at once."""
    applied: list[str] = []
    async with translate("migrate"):
        async with pool.acquire() as conn:
            await conn.execute("SET statement_timeout = 0")  # waiting for another instance's migration is fine
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
            try:
                await conn.execute(
                    """CREATE TABLE IF NOT EXISTS schema_migrations (
                           version INTEGER PRIMARY KEY, name TEXT NOT NULL,
                           applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"""
                )
                done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
                for version, name, sql in migration_files():
                    if version in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                        )
                    applied.append(name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
                await conn.execute("RESET statement_timeout")
    return applied


async def load_demo_data(pool: asyncpg.Pool) -> None:
    async with translate("demo data"):
        async with pool.acquire() as conn:
            await conn.executemany(
                """INSERT INTO exchange_rates (base, quote, rate, source) VALUES ($1, $2, $3::numeric, $4)
                   ON CONFLICT DO NOTHING""",
                DEMO_RATES,
            )
            await conn.executemany(
                """INSERT INTO fee_structures (fee_type, rate_bps, flat, min, max, currency)
                   VALUES ($1, $2, $3::numeric, $4::numeric, $5::numeric, $6) ON CONFLICT DO NOTHING""",
                DEMO_FEES,
            )
