"""Stampede: 1000 concurrent requests for one cold key, spread over 3 instances → exactly 1 origin load.

Two cold keys: a rate (Postgres; loads counted by every instance's /v1/cache/stats ``origin_loads``) and a wallet
balance (Horizon stand-in with 50 ms latency, so the stampede really overlaps the load; calls counted by the
stand-in). The baseline is what no coalescing would cost: one origin load per request.

    python -m bench.stampede [--smoke] [--requests N] [--instances K]
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from bench._common import Result, bench_pairs, flush_bench_redis, parser, prepare_postgres, seed_rates, summary
from bench.cluster import for_benchmark


async def storm(session: aiohttp.ClientSession, urls: list[str], path: str, n: int) -> tuple[list[float], dict]:
    gate = asyncio.Event()
    lat: list[float] = []
    sources: dict[str, int] = {}

    async def one(i: int) -> None:
        await gate.wait()
        t0 = time.perf_counter()
        async with session.get(urls[i % len(urls)] + path) as r:
            await r.read()
            assert r.status == 200, r.status
            src = r.headers.get("X-Cache", "?")
        lat.append((time.perf_counter() - t0) * 1000)
        sources[src] = sources.get(src, 0) + 1

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(*tasks)
    return lat, sources


async def run(smoke: bool, requests: int, instances: int, out: str) -> Result:
    if smoke:
        requests = 60
    from stellar_sdk import Keypair

    from testsupport.horizon_standin import HorizonStandin, credit

    dsn = await prepare_postgres()
    await seed_rates(dsn, bench_pairs(8))
    await flush_bench_redis()
    horizon = HorizonStandin()
    await horizon.start()
    account = Keypair.random().public_key
    horizon.fund(account, credit("USDC", Keypair.random().public_key, "125.5000000"))
    horizon.latency = 0.05
    res = Result(
        "stampede",
        f"Stampede: {requests} concurrent requests for one cold key over {instances} instances",
        ["key", "requests", "origin loads", "no-coalescing baseline", "X-Cache", "p50 ms", "p99 ms", "max ms"],
    )
    try:
        async with for_benchmark(instances, name="stampede", dsn=dsn, horizon_url=horizon.url) as cluster:
            conn = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
                # open the client's connections first (a burst of 1000 SYNs overflows the listen backlog and the
                # kernel's 1 s SYN retransmit would be measured instead of the cache)
                await storm(s, cluster.urls, "/health/live", requests)
                for label, path, count in [
                    (
                        "rate v1:rate:B00001:USD (Postgres)",
                        "/v1/rates/B00001/USD",
                        lambda: cluster.total(s, "exchange_rate", "origin_loads"),
                    ),
                    (
                        "balance (Horizon stand-in, 50 ms)",
                        f"/v1/wallets/{account}/balances",
                        lambda: _horizon_calls(horizon, account),
                    ),
                ]:
                    before = await count()
                    lat, sources = await storm(s, cluster.urls, path, requests)
                    loads = await count() - before
                    st = summary(lat)
                    res.row(
                        **{
                            "key": label,
                            "requests": requests,
                            "origin loads": loads,
                            "no-coalescing baseline": requests,
                            "X-Cache": " ".join(f"{k}={v}" for k, v in sorted(sources.items())),
                            "p50 ms": st["p50"],
                            "p99 ms": st["p99"],
                            "max ms": st["max"],
                        }
                    )
                    res.sample(label, lat)
                    res.check(
                        f"origin loads, {label.split(' ')[0]}",
                        loads,
                        requests,
                        loads / requests,
                        "exactly 1",
                        loads == 1,
                        "loads",
                    )
    finally:
        await horizon.close()
    res.meta.update(instances=instances, requests=requests)
    res.write(out)
    return res


async def _horizon_calls(horizon: object, account: str) -> int:
    return horizon.calls[account]  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> Result:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--instances", type=int, default=3)
    a = p.parse_args(argv)
    res = asyncio.run(run(a.smoke, a.requests, a.instances, a.out))
    res.print()
    return res


if __name__ == "__main__":
    main()
