"""Writes: PUT /v1/rates/{base}/{quote} end to end (commit, Redis delete, publish) vs one bare Postgres upsert.

One instance; the client sends writes one at a time (keep-alive). The baseline is the service's own upsert SQL run
from the benchmark process over one asyncpg connection. Rounds alternate between the two. Target: p99 ≤ 5 ms.

    python -m bench.writes [--smoke] [--writes N]
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import aiohttp
import asyncpg
import orjson

from bench._common import (
    AUTH,
    Result,
    bench_pairs,
    flush_bench_redis,
    latency_row,
    parser,
    prepare_postgres,
    seed_rates,
    summary,
)
from bench.cluster import for_benchmark

UPSERT = """INSERT INTO exchange_rates (base, quote, rate, source, updated_at)
               VALUES ($1, $2, $3, $4, now())
               ON CONFLICT (base, quote) DO UPDATE
                 SET rate = EXCLUDED.rate, source = EXCLUDED.source, updated_at = now()
               RETURNING base, quote, rate, source, updated_at"""


async def run(smoke: bool, writes: int, out: str) -> Result:
    if smoke:
        writes = 40
    dsn = await prepare_postgres()
    await seed_rates(dsn, bench_pairs(4))
    await flush_bench_redis()
    ours: list[float] = []
    bare: list[float] = []
    rounds = 10 if writes >= 100 else 2
    per = max(1, writes // rounds)
    async with for_benchmark(1, name="writes", dsn=dsn) as cluster:
        url = cluster.urls[0] + "/v1/rates/CNGN/USD"
        conn = await asyncpg.connect(dsn)
        async with aiohttp.ClientSession() as s:
            async with s.get(url) as r:  # warm: the pair is cached, so each write really invalidates
                await r.read()
            n = 0
            for _ in range(rounds):
                for _ in range(per):
                    n += 1
                    rate = f"0.{n:07d}"
                    t0 = time.perf_counter()
                    await conn.fetchrow(UPSERT, "B00001", "USD", Decimal(rate), "bench")
                    bare.append((time.perf_counter() - t0) * 1000)
                for _ in range(per):
                    n += 1
                    t0 = time.perf_counter()
                    async with s.put(url, data=orjson.dumps({"rate": f"0.{n:07d}"}), headers=AUTH) as r:
                        await r.read()
                        assert r.status == 200 and "X-Invalidation" not in r.headers, r.status
                    ours.append((time.perf_counter() - t0) * 1000)
            sent = sum(st["types"]["exchange_rate"]["invalidations_sent"] for st in await cluster.stats(s))
        await conn.close()
    res = Result(
        "writes",
        "Writes: PUT /v1/rates end to end vs one bare Postgres upsert",
        ["operation", "n", "p50 ms", "p99 ms", "max ms", "mean ms"],
    )
    so, sb = summary(ours), summary(bare)
    for label, vals in [
        ("bare asyncpg upsert (same SQL)", bare),
        ("PUT /v1/rates (commit + Redis delete + publish)", ours),
    ]:
        res.row(**latency_row("operation", label, vals))
        res.sample(label, vals)
    res.check("PUT p99", so["p99"], sb["p99"], so["p99"] / sb["p99"], "≤ 5 ms", so["p99"] <= 5.0, "ms")
    res.check("PUT p50", so["p50"], sb["p50"], so["p50"] / sb["p50"], "(reported)", True, "ms")
    res.meta.update(writes=len(ours), invalidations_sent=sent)
    res.write(out)
    return res


def main(argv: list[str] | None = None) -> Result:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--writes", type=int, default=1000)
    a = p.parse_args(argv)
    res = asyncio.run(run(a.smoke, a.writes, a.out))
    res.print()
    return res


if __name__ == "__main__":
    main()
