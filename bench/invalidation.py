"""Invalidation propagation: write through one instance, time until each other instance serves the new value.

3 instances. Before each write the peers hold the old value in L1 (checked: ``X-Cache: L1``). Then PUT through
instance 0, and each peer is polled (one keep-alive connection each, back to back) until it answers the new rate.
Figures: ms from the PUT's answer (the write is committed, Redis cleared and the bus message published) and from
sending the PUT, p50/p99/max over all (write, peer) pairs. The polling resolution (one GET round trip) is reported
as the baseline: a peer cannot be seen faster than that. Target: p99 ≤ 5 ms (from the PUT's answer).

    python -m bench.invalidation [--smoke] [--writes N] [--instances K]
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson

from bench._common import (
    AUTH,
    Result,
    bench_pairs,
    flush_bench_redis,
    latency_row,
    parser,
    percentile,
    prepare_postgres,
    seed_rates,
)
from bench.cluster import for_benchmark

PATH = "/v1/rates/CNGN/USD"


async def get(s: aiohttp.ClientSession, url: str) -> tuple[str, str]:
    async with s.get(url) as r:
        body = await r.read()
        return orjson.loads(body)["rate"], r.headers.get("X-Cache", "")


async def run(smoke: bool, writes: int, instances: int, out: str) -> Result:
    if smoke:
        writes = 20
    dsn = await prepare_postgres()
    await seed_rates(dsn, bench_pairs(4))
    await flush_bench_redis()
    after_ack: list[float] = []
    after_send: list[float] = []
    put_ms: list[float] = []
    poll_rtt: list[float] = []
    polls = 0
    not_l1 = 0
    async with for_benchmark(instances, name="invalidation", dsn=dsn) as cluster:
        writer, peers = cluster.urls[0], cluster.urls[1:]
        sessions = [aiohttp.ClientSession() for _ in cluster.urls]
        try:
            for i in range(writes):
                for s, url in zip(sessions[1:], peers, strict=True):  # peers hold the old value in L1
                    await get(s, url + PATH)
                    t0 = time.perf_counter()
                    _, src = await get(s, url + PATH)
                    poll_rtt.append((time.perf_counter() - t0) * 1000)
                    not_l1 += src != "L1"
                new_rate = f"0.{i + 1:07d}"
                t_send = time.perf_counter()
                async with sessions[0].put(writer + PATH, data=orjson.dumps({"rate": new_rate}), headers=AUTH) as r:
                    assert r.status == 200, (r.status, await r.text())
                    stored = orjson.loads(await r.read())["rate"]
                t_ack = time.perf_counter()
                put_ms.append((t_ack - t_send) * 1000)

                async def watch(s: aiohttp.ClientSession, url: str, stored: str = stored) -> float:
                    nonlocal polls
                    deadline = time.perf_counter() + 5
                    while True:
                        rate, _ = await get(s, url + PATH)
                        polls += 1
                        if rate == stored:
                            return time.perf_counter()
                        assert time.perf_counter() < deadline, "peer never served the new value"

                seen = await asyncio.gather(*(watch(s, u) for s, u in zip(sessions[1:], peers, strict=True)))
                for t in seen:
                    after_ack.append(max(0.0, (t - t_ack) * 1000))
                    after_send.append((t - t_send) * 1000)
            async with aiohttp.ClientSession() as s:
                received = sum(st["types"]["exchange_rate"]["invalidations_received"] for st in await cluster.stats(s))
        finally:
            for s in sessions:
                await s.close()
    res = Result(
        "invalidation",
        f"Invalidation propagation over {instances} instances, {writes} writes",
        ["measure", "n", "p50 ms", "p99 ms", "max ms", "mean ms"],
    )
    for label, vals in [
        ("peer serves new value, from PUT answer", after_ack),
        ("peer serves new value, from PUT sent", after_send),
        ("PUT round trip (writer)", put_ms),
        ("baseline: one GET round trip (poll resolution)", poll_rtt),
    ]:
        res.row(**latency_row("measure", label, vals))
        res.sample(label, vals)
    p99 = percentile(after_ack, 99)
    rtt99 = percentile(poll_rtt, 99)
    res.check(
        "propagation p99 (from PUT answer)",
        p99,
        rtt99,
        p99 / rtt99 if rtt99 else float("inf"),
        "≤ 5 ms",
        p99 <= 5.0,
        "ms",
    )
    res.meta.update(
        writes=writes, instances=instances, polls=polls, peer_reads_not_from_l1=not_l1, invalidations_received=received
    )
    res.write(out)
    return res


def main(argv: list[str] | None = None) -> Result:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--writes", type=int, default=1000)
    p.add_argument("--instances", type=int, default=3)
    a = p.parse_args(argv)
    res = asyncio.run(run(a.smoke, a.writes, a.instances, a.out))
    res.print()
    return res


if __name__ == "__main__":
    main()
