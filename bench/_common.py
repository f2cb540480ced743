"""Shared helpers of the benchmark suite: arguments, statistics, the result table, JSON output, servers.

Every benchmark measures our figure and its baseline in the same run and reports the ratio. Results go to
``bench/out/<name>.json`` (gitignored); ``bench/plots.py`` draws them into ``docs/img/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
IMG = ROOT / "docs" / "img"

# Benchmarks never touch db 0 (production-like) nor 13 (the tests): db 14 only.
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
PG_ADMIN_DSN = os.environ.get("BENCH_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_DATABASE = os.environ.get("BENCH_PG_DATABASE", "aframp_bench")
ADMIN_TOKEN = "bench-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def pg_dsn() -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(PG_ADMIN_DSN)._replace(path="/" + PG_DATABASE))


# ---------------------------------------------------------------- arguments


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--smoke",
        "--quick",
        dest="smoke",
        action="store_true",
        help="tiny sizes, a few seconds (CI): checks the benchmark runs, not its timings",
    )
    p.add_argument("--out", default=str(OUT), help="directory of the JSON result (default bench/out)")
    return p


# ---------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def latency_row(label_column: str, label: str, values: Sequence[float]) -> dict[str, object]:
    """One table row of a latency sample in milliseconds: n, p50, p99, max, mean."""
    st = summary(values)
    return {
        label_column: label,
        "n": st["n"],
        "p50 ms": st["p50"],
        "p99 ms": st["p99"],
        "max ms": st["max"],
        "mean ms": st["mean"],
    }


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of a sample (same unit as the values)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
        "min": min(values),
    }


def ratio(ours: float, baseline: float) -> float:
    return ours / baseline if baseline else float("inf")


# ---------------------------------------------------------------- results


@dataclass
class Result:
    """One benchmark's output: rows (a table), the comparison against the target, raw samples for plots."""

    name: str
    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)  # {"what", "ours", "baseline", "ratio", "target", "met"}
    samples: dict[str, list[float]] = field(default_factory=dict)  # for latency plots (kept short)
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, **values: Any) -> None:
        self.rows.append(values)

    def check(
        self, what: str, ours: float, baseline: float | None, value: float, target: str, met: bool, unit: str = ""
    ) -> None:
        self.checks.append(
            {
                "what": what,
                "ours": ours,
                "baseline": baseline,
                "ratio": value,
                "target": target,
                "met": bool(met),
                "unit": unit,
            }
        )

    def sample(self, label: str, values: Sequence[float], keep: int = 20000) -> None:
        vals = list(values)
        if len(vals) > keep:  # a uniform thinning keeps the distribution's shape
            step = len(vals) / keep
            vals = [vals[int(i * step)] for i in range(keep)]
        self.samples[label] = vals

    def write(self, out_dir: str | os.PathLike[str] = OUT) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.name}.json"
        doc = {
            "name": self.name,
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "checks": self.checks,
            "samples": self.samples,
            "meta": {**machine(), **self.meta},
        }
        path.write_text(json.dumps(doc, indent=1, default=str))
        return path

    def print(self, file: Any = None) -> None:
        file = file or sys.stdout
        print(f"\n== {self.title}", file=file)
        print(table(self.columns, self.rows), file=file)
        if self.checks:
            print(file=file)
            print(
                table(
                    ["what", "ours", "baseline", "ratio", "target", "met"],
                    [{**c, "met": "yes" if c["met"] else "NO"} for c in self.checks],
                ),
                file=file,
            )


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.01 or v == 0:
            return f"{v:.3f}"
        return f"{v:.2e}"
    if v is None:
        return "-"
    return str(v)


def table(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> str:
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, sep, *body])


def machine() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loop": loop,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def new_loop_policy() -> None:
    """The service runs on uvloop when it is installed; in-process benchmarks do the same."""
    try:
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


def wrk_path() -> str | None:
    return shutil.which("wrk")


# ---------------------------------------------------------------- servers: Postgres database, Redis db 14


async def prepare_postgres() -> str:
    """Create the benchmark database if needed, apply the schema, empty the tables. Returns its DSN."""
    import asyncpg

    from tiers import postgres

    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname=$1", PG_DATABASE)
        if not exists:
            await admin.execute(f'CREATE DATABASE "{PG_DATABASE}"')
    finally:
        await admin.close()
    dsn = pg_dsn()
    pool = await postgres.create_pool(dsn, min_size=1, max_size=1, command_timeout=30, connect_timeout=5)
    try:
        await postgres.migrate(pool)
        async with pool.acquire() as conn:
            await conn.execute("TRUNCATE exchange_rates, fee_structures, cache_outbox")
    finally:
        await pool.close()
    return dsn


async def seed_rates(dsn: str, pairs: Sequence[tuple[str, str]], rate: str = "0.00065") -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            """INSERT INTO exchange_rates (base, quote, rate, source) VALUES ($1, $2, $3::numeric, 'bench')
               ON CONFLICT (base, quote) DO UPDATE SET rate = EXCLUDED.rate""",
            [(b, q, rate) for b, q in pairs],
        )
        await conn.execute(
            """INSERT INTO fee_structures (fee_type, rate_bps, flat, min, max, currency) VALUES
               ('onramp',150,0,0,1000,'NGN'), ('offramp',100,50,50,5000,'NGN') ON CONFLICT DO NOTHING"""
        )
    finally:
        await conn.close()


async def flush_bench_redis() -> None:
    """Empty Redis db 14 (the benchmarks' own; never 0 or 13)."""
    import redis.asyncio as aioredis

    assert REDIS_URL.rstrip("/").endswith("/14") or os.environ.get("BENCH_REDIS_URL"), REDIS_URL
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


def bench_pairs(n: int) -> list[tuple[str, str]]:
    """n distinct currency pairs: B00000/USD, B00001/USD, … plus the service's CNGN/USD first."""
    return [("CNGN", "USD")] + [(f"B{i:05d}", "USD") for i in range(n - 1)]


# ---------------------------------------------------------------- wrk (load from a separate process)

_WRK_LUA = """
done = function(summary, latency, requests)
  io.write(string.format("BENCH requests %d\\n", summary.requests))
  io.write(string.format("BENCH duration_us %d\\n", summary.duration))
  local e = summary.errors
  io.write(string.format("BENCH errors %d\\n", e.connect + e.read + e.write + e.status + e.timeout))
  io.write(string.format("BENCH non2xx %d\\n", e.status))
  for _, p in ipairs({1, 5, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 95, 97, 98, 99, 99.5, 99.9, 100}) do
    io.write(string.format("BENCH p %g %d\\n", p, latency:percentile(p)))
  end
end
"""


def run_wrk(
    url: str, *, duration: float, connections: int = 32, threads: int = 1, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run wrk against ``url``; req/s and latency percentiles (ms) from wrk's own histogram."""
    import subprocess
    import tempfile

    wrk = wrk_path()
    if wrk is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_WRK_LUA)
        script = f.name
    cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "-s", script]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(url)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=duration + 30).stdout
    finally:
        os.unlink(script)
    return parse_wrk(out)


def parse_wrk(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {"percentiles_ms": {}}
    for line in out.splitlines():
        parts = line.split()
        if not parts or parts[0] != "BENCH":
            continue
        if parts[1] == "p":
            res["percentiles_ms"][float(parts[2])] = int(parts[3]) / 1000.0
        else:
            res[parts[1]] = int(parts[2])
    secs = res["duration_us"] / 1e6
    res["rps"] = res["requests"] / secs if secs else 0.0
    pct = res["percentiles_ms"]
    res["p50_ms"], res["p99_ms"] = pct.get(50.0), pct.get(99.0)
    return res
