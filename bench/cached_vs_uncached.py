"""Cached vs uncached: end-to-end response time of a cached read (L1 hit) vs a cold read that goes to the origin.

One instance; Horizon stand-in answering after 50 ms; Postgres. Cold reads use keys never read before (a fresh
rate pair / a fresh funded account per request), so each one really loads from the origin. Sequential requests
over one keep-alive connection. Target: cached ≥ 20× faster.

    python -m bench.cached_vs_uncached [--smoke] [--n N]
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from bench._common import Result, bench_pairs, flush_bench_redis, parser, prepare_postgres, seed_rates, summary
from bench.cluster import for_benchmark


async def timed_get(s: aiohttp.ClientSession, url: str, expect: str) -> float:
    t0 = time.perf_counter()
    async with s.get(url) as r:
        await r.read()
        assert r.status == 200, r.status
        assert r.headers.get("X-Cache") == expect, (r.headers.get("X-Cache"), expect)
    return (time.perf_counter() - t0) * 1000


async def run(smoke: bool, n: int, latency: float, out: str) -> Result:
    if smoke:
        n = 10
    from stellar_sdk import Keypair

    from testsupport.horizon_standin import HorizonStandin

    dsn = await prepare_postgres()
    pairs = bench_pairs(n + 1)
    await seed_rates(dsn, pairs)
    await flush_bench_redis()
    horizon = HorizonStandin()
    await horizon.start()
    horizon.latency = latency
    accounts = [Keypair.random().public_key for _ in range(n + 1)]
    for a in accounts:
        horizon.fund(a)
    lat: dict[str, list[float]] = {}
    try:
        async with for_benchmark(1, name="cached_vs_uncached", dsn=dsn, horizon_url=horizon.url) as cluster:
            base = cluster.urls[0]
            async with aiohttp.ClientSession() as s:
                for label, paths in [
                    ("rate (Postgres)", [f"/v1/rates/{b}/{q}" for b, q in pairs]),
                    (f"balance (Horizon, {latency * 1000:.0f} ms)", [f"/v1/wallets/{a}/balances" for a in accounts]),
                ]:
                    await timed_get(s, base + paths[0], "MISS")  # warm-up: pools, code paths
                    await timed_get(s, base + paths[0], "L1")
                    cold, hot = [], []
                    for p in paths[1:]:  # alternate a cold read and a hot read
                        cold.append(await timed_get(s, base + p, "MISS"))
                        hot.append(await timed_get(s, base + paths[0], "L1"))
                    lat[f"{label}: uncached (origin)"] = cold
                    lat[f"{label}: cached (L1)"] = hot
    finally:
        await horizon.close()
    res = Result(
        "cached_vs_uncached",
        "Cached vs uncached end-to-end response time (one instance)",
        ["read", "n", "p50 ms", "p99 ms", "mean ms"],
    )
    for label, vals in lat.items():
        st = summary(vals)
        res.row(**{"read": label, "n": st["n"], "p50 ms": st["p50"], "p99 ms": st["p99"], "mean ms": st["mean"]})
        res.sample(label, vals)
    labels = list(lat)
    for i in range(0, len(labels), 2):
        cold, hot = summary(lat[labels[i]]), summary(lat[labels[i + 1]])
        speedup = cold["p50"] / hot["p50"]
        res.check(
            f"speed-up (p50), {labels[i].split(':')[0]}", hot["p50"], cold["p50"], speedup, "≥ 20×", speedup >= 20, "ms"
        )
    res.meta.update(n=n, horizon_latency_s=latency, horizon_calls=horizon.total)
    res.write(out)
    return res


def main(argv: list[str] | None = None) -> Result:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--horizon-latency", type=float, default=0.05)
    a = p.parse_args(argv)
    res = asyncio.run(run(a.smoke, a.n, a.horizon_latency, a.out))
    res.print()
    return res


if __name__ == "__main__":
    main()
