"""Profile one instance under wrk load with py-spy (sampling, --nonblocking) and print where the time goes.

    python -m bench.profile_hot [--path /v1/rates/CNGN/USD] [--seconds 5] [--native]

Writes the collapsed stacks to bench/out/profile_hot.txt (feed it to a flame graph tool) and prints the functions
with the largest inclusive and self share of the samples.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from bench._common import OUT, bench_pairs, flush_bench_redis, prepare_postgres, run_wrk, seed_rates
from bench.cluster import for_benchmark
from bench.http_hot import warm


def summarize(collapsed: Path, top: int = 25) -> str:
    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        for f in set(frames):
            incl[f] += count
        self_[frames[-1]] += count
    out = [f"{total} samples", "", "inclusive %  function"]
    out += [f"{100 * c / total:10.1f}  {f}" for f, c in incl.most_common(top)]
    out += ["", "self %  function"]
    out += [f"{100 * c / total:6.1f}  {f}" for f, c in self_.most_common(top)]
    return "\n".join(out)


async def main_async(path: str, seconds: float, native: bool) -> None:
    dsn = await prepare_postgres()
    await seed_rates(dsn, bench_pairs(4))
    await flush_bench_redis()
    async with for_benchmark(1, name="profile", dsn=dsn) as cluster:
        url = cluster.urls[0] + path
        await warm(url)
        load = threading.Thread(target=run_wrk, args=(url,), kwargs={"duration": seconds + 2, "connections": 32})
        load.start()
        await asyncio.sleep(1)
        out = OUT / "profile_hot.txt"
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        cmd = [
            spy,
            "record",
            "--nonblocking",
            "-r",
            "500",
            "-d",
            str(int(seconds)),
            "-f",
            "raw",
            "-o",
            str(out),
            "-p",
            str(cluster.pids[0]),
        ] + (["--native"] if native else [])
        await asyncio.to_thread(subprocess.run, cmd, check=True, capture_output=True)
        await asyncio.to_thread(load.join)
    print(summarize(out))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", default="/v1/rates/CNGN/USD")
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--native", action="store_true")
    a = p.parse_args(argv)
    asyncio.run(main_async(a.path, a.seconds, a.native))


if __name__ == "__main__":
    main()
