"""L2 hit: a read served from Redis through the actor (L1 off) vs one raw redis.asyncio GET of the same bytes.

Both use one client and connection pool on Redis db 14 (hiredis parser when installed), one read at a time, the
same event loop (uvloop when installed); repeats are interleaved. Target: ≤ 1.3× the raw GET.

    python -m bench.l2_hit [--smoke] [--n N] [--repeats R]
"""

from __future__ import annotations

import asyncio
import statistics
import time

from bench._common import REDIS_URL, Result, flush_bench_redis, new_loop_policy, parser, ratio, summary
from bench.l1_hit import BODY, make_actor

KEYS = 100


async def run(smoke: bool, n: int, repeats: int, out: str) -> Result:
    if smoke:
        n, repeats = 200, 2
    import redis.asyncio as aioredis

    from tiers import codec, keys
    from tiers.coherence.redis_store import IncarnationGuard, RedisStore
    from tiers.l2 import RedisCache

    await flush_bench_redis()
    guard = IncarnationGuard()
    client = aioredis.Redis.from_url(REDIS_URL, max_connections=20, redis_connect_func=guard.on_connect)
    cache = RedisCache(client, op_timeout=0.5)
    store = RedisStore(cache, guard, channel="bench:l2_hit", subscriber=client, gen_ttl=3600)
    actor = make_actor(store)
    actor.l1.bound = 0.0  # L1 serves nothing (no bus lease, no fetch young enough): every read goes to Redis
    await actor.start()
    await client.ping()  # the handshake has read the incarnation
    codes = ["CNGN"] + [f"B{i:05d}" for i in range(KEYS - 1)]
    ckeys = [keys.rate(c, "USD") for c in codes]
    rendered = [k.render() for k in ckeys]
    now_ms = int(time.time() * 1000)
    packed = [
        codec.pack(BODY % c.encode(), now_ms + 3_600_000, now_ms, incarnation=guard.incarnation, gens="1")
        for c in codes
    ]
    for r, p in zip(rendered, packed, strict=True):
        await client.set(r, p, px=3_600_000)
    first = await actor.get(ckeys[0])
    assert first.source.value == "L2", first.source

    async def raw_get(i: int) -> None:
        await client.get(rendered[i % KEYS])

    async def tier_read(i: int) -> None:
        await store.read(rendered[i % KEYS], (rendered[i % KEYS],))

    async def actor_get(i: int) -> None:
        await actor.get(ckeys[i % KEYS])

    contenders = [
        ("raw redis.asyncio GET", raw_get),
        ("RedisStore.read (tier only)", tier_read),
        ("await actor.get(key), L1 off", actor_get),
    ]
    lat: dict[str, list[float]] = {name: [] for name, _ in contenders}
    per_run: dict[str, list[float]] = {name: [] for name, _ in contenders}
    for _ in range(repeats):
        for name, fn in contenders:
            samples = lat[name]
            t_run = time.perf_counter()
            for i in range(n):
                t0 = time.perf_counter()
                await fn(i)
                samples.append((time.perf_counter() - t0) * 1e6)
            per_run[name].append((time.perf_counter() - t_run) / n * 1e6)
    stats = actor.stats.get(ckeys[0].data_type, "l2_hits")
    assert stats >= n * repeats, stats
    await actor.stop()
    await client.aclose()

    res = Result(
        "l2_hit",
        "L2 hit: µs per read from Redis, actor (L1 off) vs raw GET",
        ["contender", "mean µs (best run)", "p50 µs", "p99 µs", "max µs", "× raw GET (mean)"],
    )
    raw_mean = min(per_run["raw redis.asyncio GET"])
    for name, _ in contenders:
        s = summary(lat[name])
        res.row(
            **{
                "contender": name,
                "mean µs (best run)": min(per_run[name]),
                "p50 µs": s["p50"],
                "p99 µs": s["p99"],
                "max µs": s["max"],
                "× raw GET (mean)": ratio(min(per_run[name]), raw_mean),
            }
        )
        res.sample(name, lat[name])
    ours = min(per_run["await actor.get(key), L1 off"])
    r = ratio(ours, raw_mean)
    res.check("actor L2 hit vs raw GET (mean)", ours, raw_mean, r, "≤ 1.3×", r <= 1.3, "µs")
    p50o, p50r = statistics.median(lat["await actor.get(key), L1 off"]), statistics.median(lat["raw redis.asyncio GET"])
    res.check("actor L2 hit vs raw GET (p50)", p50o, p50r, ratio(p50o, p50r), "≤ 1.3×", ratio(p50o, p50r) <= 1.3, "µs")
    res.meta.update(n=n, repeats=repeats, keys=KEYS, body_bytes=len(packed[0]), l2_hits=stats)
    res.write(out)
    return res


def main(argv: list[str] | None = None) -> Result:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000, help="reads per timed run")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    new_loop_policy()
    res = asyncio.run(run(a.smoke, a.n, a.repeats, a.out))
    res.print()
    return res


if __name__ == "__main__":
    main()
