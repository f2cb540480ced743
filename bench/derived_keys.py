"""Derived keys: N distinct conversion amounts of one pair, then a write of the pair.

What the coherence review measured (finding 6): every distinct ``amount`` read on ``/v1/rates/convert`` added a
member to a per-pair index, and the pair's next write ran one script over all of them (1.51 s for 200 000). Now a
conversion dies with its rate's generation: the write is O(1) whatever was derived, and every key a read creates
expires with its answer. Reported: the write's latency with N conversions cached vs with none (same run), Redis keys
and bytes the reads left, and whether any of them lacks a TTL or outlives its answer.

    python -m bench.derived_keys [--smoke] [--amounts N]
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import redis.asyncio as aioredis

from bench._common import (
    AUTH,
    REDIS_URL,
    Result,
    flush_bench_redis,
    latency_row,
    parser,
    prepare_postgres,
    seed_rates,
    summary,
)
from bench.cluster import for_benchmark

PAIR = ("CNGN", "USD")
META = ("amounts", "read_seconds", "redis_keys", "bytes_per_key", "approx_redis_bytes", "slowlog_max_ms")


async def put_latencies(s: aiohttp.ClientSession, url: str, n: int, start: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        async with s.put(url, data=orjson.dumps({"rate": f"0.{start + i:07d}"}), headers=AUTH) as r:
            await r.read()
            assert r.status == 200, r.status
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def run(smoke: bool, amounts: int, out: str) -> Result:
    if smoke:
        amounts = 500
    dsn = await prepare_postgres()
    await seed_rates(dsn, [PAIR])
    await flush_bench_redis()
    redis = aioredis.Redis.from_url(REDIS_URL)
    async with for_benchmark(1, name="derived_keys", dsn=dsn) as cluster:
        base = cluster.urls[0]
        put_url = f"{base}/v1/rates/{PAIR[0]}/{PAIR[1]}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as s:
            empty = await put_latencies(s, put_url, 20, 1)  # baseline: nothing derived is cached
            slots = asyncio.Semaphore(32)

            async def convert(i: int) -> None:
                params = {"amount": f"{i + 1}.25", "from": PAIR[0], "to": PAIR[1]}
                async with slots, s.get(f"{base}/v1/rates/convert", params=params) as r:
                    await r.read()
                    assert r.status == 200, r.status

            t0 = time.perf_counter()
            await asyncio.gather(*(convert(i) for i in range(amounts)))
            read_s = time.perf_counter() - t0
            keys = [k async for k in redis.scan_iter(match="v1:*", count=1000)]
            no_ttl = [k for k in keys if await redis.pttl(k) < 0]
            sample = keys[:: max(1, len(keys) // 500)]
            mem = [await redis.memory_usage(k) or 0 for k in sample]
            last = await redis.slowlog_get(1)
            last_id = last[0]["id"] if last else -1
            loaded = await put_latencies(s, put_url, 20, 100)  # the pair's writes with every conversion cached
            # Redis' own record of slow commands (over slowlog-log-slower-than, 10 ms by default) since then
            slow = [e for e in await redis.slowlog_get(128) if e["id"] > last_id]
    await redis.aclose()
    res = Result(
        "derived_keys",
        f"A pair's write with {amounts} conversions cached vs none",
        ["what", "n", "p50 ms", "p99 ms", "max ms", "mean ms"],
    )
    se, sl = summary(empty), summary(loaded)
    res.row(**latency_row("what", "PUT, no conversion cached", empty))
    res.row(**latency_row("what", f"PUT, {amounts} conversions cached", loaded))
    res.check("write cost with N derived (p50)", sl["p50"], se["p50"], sl["p50"] / se["p50"], "≈ 1× (O(1))",
              sl["p50"] <= 2 * se["p50"] + 1, "ms")  # fmt: skip
    res.check("write max with N derived", sl["max"], se["max"], sl["max"] / se["max"], "a few ms", sl["max"] < 20, "ms")
    res.check("keys without a TTL", len(no_ttl), 0, 0.0, "0", not no_ttl, "keys")
    slowest = max((e["duration"] for e in slow), default=0) / 1000
    res.check("Redis SLOWLOG entries during the writes", len(slow), 0, 0.0, "0", not slow, "entries")
    res.meta.update(
        amounts=amounts,
        read_seconds=round(read_s, 2),
        redis_keys=len(keys),
        bytes_per_key=round(sum(mem) / max(1, len(mem))),
        approx_redis_bytes=round(sum(mem) / max(1, len(mem)) * len(keys)),
        slowlog_max_ms=slowest,
    )
    res.write(out)
    return res


def main(argv: list[str] | None = None) -> Result:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--amounts", type=int, default=100_000)
    a = p.parse_args(argv)
    res = asyncio.run(run(a.smoke, a.amounts, a.out))
    res.print()
    print("\n" + ", ".join(f"{k}: {v}" for k, v in res.meta.items() if k in META))
    return res


if __name__ == "__main__":
    main()
