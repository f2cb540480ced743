"""Origin load amplification: 3 instances, Zipf(1.1) reads over 10 000 keys, TTLs shortened so windows pass.

Keys: rates (Postgres), conversions of rates (computed from the pair's rate, read through the tiers) and wallet
balances (Horizon stand-in). The client logs every request (time, key); the ideal is computed from that log: per key,
a perfect fleet-wide cache loads at the first request and again at the first request after each TTL window (a
conversion also needs its pair's rate at that moment). Our figure is what the instances report (sum of
``origin_loads`` per data type over /v1/cache/stats) and what the Horizon stand-in counted. The no-cache baseline is
one origin load per request (a conversion: the computation and its rate query). Target: ≤ 1.05× ideal.

    python -m bench.origin_amplification [--smoke] [--duration S] [--ttl S] [--keys N] [--concurrency C]
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np

from bench._common import Result, flush_bench_redis, parser, prepare_postgres, ratio, seed_rates
from bench.cluster import for_benchmark


def ideal_loads(times: list[float], ttl: float) -> int:
    loads, valid_until = 0, -1.0
    for t in sorted(times):
        if t >= valid_until:
            loads += 1
            valid_until = t + ttl
    return loads


async def run(
    smoke: bool,
    duration: float,
    ttl: float,
    nkeys: int,
    concurrency: int,
    instances: int,
    refresh_ahead: float | None,
    out: str,
) -> Result:
    if smoke:
        duration, ttl, nkeys, concurrency = 2.0, 1.0, 300, 8
    from stellar_sdk import Keypair

    from testsupport.horizon_standin import HorizonStandin

    n_rates, n_conv = nkeys // 2, nkeys // 4
    n_bal = nkeys - n_rates - n_conv
    pairs = [(f"B{i:05d}", "USD") for i in range(n_rates)]
    dsn = await prepare_postgres()
    await seed_rates(dsn, pairs)
    await flush_bench_redis()
    horizon = HorizonStandin()
    await horizon.start()
    accounts = [Keypair.random().public_key for _ in range(n_bal)]
    for a in accounts:
        horizon.fund(a)
    # key id -> (kind, path, rate pair index for the ideal)
    keyspace: list[tuple[str, str, int]] = []
    keyspace += [("rate", f"/v1/rates/{b}/{q}", i) for i, (b, q) in enumerate(pairs)]
    keyspace += [
        ("conversion", f"/v1/rates/convert?amount={i + 1}.5&from={pairs[i % n_rates][0]}&to=USD", i % n_rates)
        for i in range(n_conv)
    ]
    keyspace += [("balance", f"/v1/wallets/{a}/balances", -1) for a in accounts]
    rng = np.random.default_rng(42)
    order = rng.permutation(len(keyspace))  # rank -> key: every kind gets hot and cold keys
    weights = 1.0 / np.arange(1, len(keyspace) + 1) ** 1.1
    weights /= weights.sum()
    draws = order[rng.choice(len(keyspace), size=2_000_000 if not smoke else 50_000, p=weights)]

    overrides: dict = {"ttl": {"exchange_rate": ttl, "wallet_balance": ttl}, "l1": {"max_ttl": max(30.0, ttl)}}
    if refresh_ahead is not None:
        overrides["coherence"] = {"refresh_ahead": refresh_ahead}
    log: list[tuple[float, int]] = []
    errors = 0
    try:
        async with for_benchmark(
            instances, name="amplification", dsn=dsn, horizon_url=horizon.url, overrides=overrides
        ) as cluster:
            urls = cluster.urls
            conn = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=conn) as s:
                before = await cluster.total(s, "exchange_rate", "origin_loads")
                h_before = horizon.total
                t_start = time.perf_counter()
                t_end = t_start + duration
                cursor = 0

                async def worker(w: int) -> None:
                    nonlocal cursor, errors
                    while time.perf_counter() < t_end and cursor < len(draws):
                        k = int(draws[cursor])
                        i = cursor
                        cursor += 1
                        log.append((time.perf_counter() - t_start, k))
                        async with s.get(urls[i % len(urls)] + keyspace[k][1]) as r:
                            await r.read()
                            errors += r.status != 200

                await asyncio.gather(*(worker(w) for w in range(concurrency)))
                await asyncio.sleep(0.2)  # background refreshes started during the run finish
                rate_loads = await cluster.total(s, "exchange_rate", "origin_loads") - before
                stats = await cluster.stats(s)
                horizon_calls = horizon.total - h_before
                bal_loads = sum(st["types"]["wallet_balance"]["origin_loads"] for st in stats)
                refreshes = {
                    dt: sum(st["types"][dt]["refreshes"] for st in stats) for dt in ("exchange_rate", "wallet_balance")
                }
    finally:
        await horizon.close()

    per_key: dict[int, list[float]] = {}
    implied_rate: dict[int, list[float]] = {}
    counts = {"rate": 0, "conversion": 0, "balance": 0}
    for t, k in log:
        kind, _, pair = keyspace[k]
        counts[kind] += 1
        per_key.setdefault(k, []).append(t)
        if kind == "conversion":
            implied_rate.setdefault(pair, []).append(t)
    ideal_rate = ideal_bal = 0
    for k, ts in per_key.items():
        kind, _, pair = keyspace[k]
        if kind == "balance":
            ideal_bal += ideal_loads(ts, ttl)
        elif kind == "conversion":
            ideal_rate += ideal_loads(ts, ttl)
        else:
            ideal_rate += ideal_loads(ts + implied_rate.pop(pair, []), ttl)
    for _pair, ts in implied_rate.items():  # rates needed only by conversions
        ideal_rate += ideal_loads(ts, ttl)
    nocache_rate = counts["rate"] + 2 * counts["conversion"]
    nocache_bal = counts["balance"]
    res = Result(
        "origin_amplification",
        f"Origin loads: {instances} instances, Zipf(1.1) over {len(keyspace)} keys, TTL {ttl:g} s, {duration:g} s",
        [
            "origin",
            "requests",
            "no-cache loads",
            "ideal loads",
            "our loads",
            "× ideal",
            "reduction vs no cache",
            "background refreshes",
        ],
    )
    res.row(
        **{
            "origin": "Postgres (rates + conversions)",
            "requests": counts["rate"] + counts["conversion"],
            "no-cache loads": nocache_rate,
            "ideal loads": ideal_rate,
            "our loads": rate_loads,
            "× ideal": ratio(rate_loads, ideal_rate),
            "reduction vs no cache": ratio(nocache_rate, rate_loads),
            "background refreshes": refreshes["exchange_rate"],
        }
    )
    res.row(
        **{
            "origin": "Horizon (balances)",
            "requests": counts["balance"],
            "no-cache loads": nocache_bal,
            "ideal loads": ideal_bal,
            "our loads": horizon_calls,
            "× ideal": ratio(horizon_calls, ideal_bal),
            "reduction vs no cache": ratio(nocache_bal, horizon_calls),
            "background refreshes": refreshes["wallet_balance"],
        }
    )
    for row in res.rows:
        res.check(
            f"loads vs ideal, {row['origin'].split(' ')[0]}",
            row["our loads"],
            row["ideal loads"],
            row["× ideal"],
            "≤ 1.05×",
            row["× ideal"] <= 1.05,
            "loads",
        )
    res.meta.update(
        duration_s=duration,
        ttl_s=ttl,
        keys=len(keyspace),
        concurrency=concurrency,
        instances=instances,
        requests=len(log),
        errors=errors,
        req_per_s=len(log) / duration,
        distinct_keys=len(per_key),
        balance_origin_loads=bal_loads,
        counts=counts,
        refresh_ahead=refresh_ahead if refresh_ahead is not None else "config default",
    )
    res.write(out)
    return res


def main(argv: list[str] | None = None) -> Result:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--ttl", type=float, default=2.0)
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--instances", type=int, default=3)
    p.add_argument("--refresh-ahead", type=float, default=None, help="override coherence.refresh_ahead (0: off)")
    a = p.parse_args(argv)
    res = asyncio.run(run(a.smoke, a.duration, a.ttl, a.keys, a.concurrency, a.instances, a.refresh_ahead, a.out))
    res.print()
    return res


if __name__ == "__main__":
    main()
