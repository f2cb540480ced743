"""Scaling: 2 instances vs 1 on this 2-core machine, GET /v1/rates/CNGN/USD from L1, load from wrk.

Both configurations get the same load generator: two wrk processes (1 thread each, C connections each). With one
instance both aim at it; with two, one each. Throughput is the sum. Target: ≥ 1.7× one instance. On a 2-core
machine wrk itself needs a core's worth of CPU, which caps what a second instance can add (see PERFORMANCE.md).

    python -m bench.scaling [--smoke] [--duration S] [--rounds N]
"""

from __future__ import annotations

import asyncio
import statistics
from concurrent.futures import ThreadPoolExecutor

from bench._common import Result, bench_pairs, flush_bench_redis, parser, prepare_postgres, ratio, run_wrk, seed_rates
from bench.cluster import for_benchmark
from bench.http_hot import PATH, warm


def parallel_wrk(urls: list[str], duration: float, connections: int) -> dict:
    with ThreadPoolExecutor(len(urls)) as ex:
        runs = list(ex.map(lambda u: run_wrk(u, duration=duration, connections=connections), urls))
    return {
        "rps": sum(r["rps"] for r in runs),
        "p99_ms": max(r["p99_ms"] for r in runs),
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
    }


async def run(smoke: bool, duration: float, rounds: int, connections: int, out: str) -> Result:
    if smoke:
        duration, rounds, connections = 1, 1, 8
    dsn = await prepare_postgres()
    await seed_rates(dsn, bench_pairs(4))
    await flush_bench_redis()
    one: list[dict] = []
    two: list[dict] = []
    async with for_benchmark(2, name="scaling", dsn=dsn) as cluster:
        urls = [u + PATH for u in cluster.urls]
        for u in urls:
            await warm(u)
        for _ in range(rounds):  # alternate 1 and 2 instances
            one.append(parallel_wrk([urls[0], urls[0]], duration, connections))
            two.append(parallel_wrk(urls, duration, connections))
    res = Result(
        "scaling",
        "Scaling: 2 instances vs 1 (2 cores), L1 hits, two wrk processes",
        ["instances", "req/s (median)", "req/s (best)", "p50 ms", "p99 ms", "errors"],
    )
    for label, runs in [("1", one), ("2", two)]:
        res.row(
            **{
                "instances": label,
                "req/s (median)": statistics.median(r["rps"] for r in runs),
                "req/s (best)": max(r["rps"] for r in runs),
                "p50 ms": statistics.median(r["p50_ms"] for r in runs),
                "p99 ms": statistics.median(r["p99_ms"] for r in runs),
                "errors": sum(r["errors"] for r in runs),
            }
        )
    r1, r2 = res.rows[0]["req/s (median)"], res.rows[1]["req/s (median)"]
    res.check("throughput, 2 instances vs 1", r2, r1, ratio(r2, r1), "≥ 1.7×", ratio(r2, r1) >= 1.7, "req/s")
    res.meta.update(duration_s=duration, rounds=rounds, connections_per_wrk=connections, cpus=2)
    res.write(out)
    return res


def main(argv: list[str] | None = None) -> Result:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=16)
    a = p.parse_args(argv)
    res = asyncio.run(run(a.smoke, a.duration, a.rounds, a.connections, a.out))
    res.print()
    return res


if __name__ == "__main__":
    main()
