"""Cost of tracing on the L1-hit path: req/s of GET /v1/rates/CNGN/USD served from L1, three configurations.

* ``off``      — no OTEL_* variable: no provider, no instrumentation (the default).
* ``none``     — OTEL_SERVICE_NAME set, OTEL_TRACES_EXPORTER=none: provider built (ALWAYS_OFF), instrumentation
                 installed, context propagated, nothing recorded.
* ``sampled``  — parentbased_traceidratio 0.1, spans recorded and handed (BatchSpanProcessor) to an exporter that
                 drops them.

Each configuration runs as its own server process (``python -m bench.tracing_overhead serve``); the load comes from a
separate process (wrk when installed, else an aiohttp client process). The modes are interleaved in each round and
compared with the ``off`` run of the same round.

    .venv/bin/python -m bench.tracing_overhead [--rounds 3] [--duration 5] [--connections 32]

Needs the machine's Postgres (DATABASE_URL, default postgresql://postgres@127.0.0.1:5432/aframp_bench, created if
missing) and Redis (REDIS_URL, default redis://127.0.0.1:6379/8).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PATH = "/v1/rates/CNGN/USD"
MODES: dict[str, dict[str, str]] = {
    "off": {},
    "none": {"OTEL_SERVICE_NAME": "aframp-bench", "OTEL_TRACES_EXPORTER": "none"},
    "sampled": {
        "OTEL_SERVICE_NAME": "aframp-bench",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    },
}
DEFAULT_DB = "postgresql://postgres@127.0.0.1:5432/aframp_bench"
DEFAULT_REDIS = "redis://127.0.0.1:6379/8"


# ---------------------------------------------------------------- the server process


def serve(mode: str, port: int) -> None:
    from aiohttp import web
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from service import appkeys as K
    from service.app import create_app
    from service.config import load_settings

    class DropExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(MODES[mode])
    env.update({"PORT": str(port), "HOST": "127.0.0.1", "INSTANCE_ID": f"bench-{mode}"})
    settings = load_settings(ROOT / "config.toml", env)
    settings = settings.with_overrides(redis={"channel": f"bench:{mode}:{port}"})
    app = create_app(settings)
    if mode == "sampled":
        app[K.SPAN_PROCESSOR] = BatchSpanProcessor(DropExporter())
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = None
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=loop)


# ---------------------------------------------------------------- the driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _prepare(dsn: str) -> None:
    from urllib.parse import urlsplit, urlunsplit

    import asyncpg

    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname=$1", name):
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


async def _seed(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO exchange_rates (base, quote, rate, source) VALUES ('CNGN','USD',0.00065,'bench') "
            "ON CONFLICT DO NOTHING"
        )
    finally:
        await conn.close()


def _wait_ready(port: int, deadline_s: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1) as r:
                if r.status == 200 and b'"ok"' in r.read():
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server on {port} not ready")
        time.sleep(0.1)  # polling a starting process, bounded by the deadline


def _get(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{PATH}", timeout=5) as r:
        return r.headers["X-Cache"]


def _load(port: int, duration: float, connections: int) -> float:
    url = f"http://127.0.0.1:{port}{PATH}"
    if shutil.which("wrk"):
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if not m or "Non-2xx" in out:
            raise RuntimeError(f"wrk: {out}")
        return float(m.group(1))
    out = subprocess.run(
        [sys.executable, "-m", "bench.tracing_overhead", "client", url, str(duration), str(connections)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    return float(out.strip())


def client(url: str, duration: float, connections: int) -> None:
    """The fallback load generator (its own process): ``connections`` keep-alive loops for ``duration`` s."""
    import aiohttp

    async def main() -> None:
        done = 0
        stop = time.monotonic() + duration
        conn = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=conn) as session:

            async def worker() -> None:
                nonlocal done
                while time.monotonic() < stop:
                    async with session.get(url) as r:
                        await r.read()
                        assert r.status == 200
                    done += 1

            t0 = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(connections)))
            print(done / (time.monotonic() - t0))

    asyncio.run(main())


def run(rounds: int, duration: float, connections: int) -> dict[str, list[float]]:
    dsn = os.environ.get("DATABASE_URL", DEFAULT_DB)
    redis = os.environ.get("REDIS_URL", DEFAULT_REDIS)
    asyncio.run(_prepare(dsn))
    results: dict[str, list[float]] = {m: [] for m in MODES}
    env = {**os.environ, "DATABASE_URL": dsn, "REDIS_URL": redis, "PYTHONPATH": str(ROOT)}
    env.pop("ADMIN_TOKEN", None)
    seeded = False
    for r in range(rounds):
        for mode in MODES:
            port = _free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.tracing_overhead", "serve", mode, str(port)],
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                _wait_ready(port)
                if not seeded:
                    asyncio.run(_seed(dsn))
                    seeded = True
                _get(port)
                assert _get(port) == "L1", "the benchmark measures the L1-hit path"
                _load(port, 1.0, connections)  # warm-up
                rps = _load(port, duration, connections)
                results[mode].append(rps)
                print(f"round {r + 1} {mode:8s} {rps:10.0f} req/s", flush=True)
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return results


def report(results: dict[str, list[float]]) -> str:
    off = results["off"]
    lines = [
        "| configuration | req/s (median) | runs | ratio to off (median of per-round ratios) |",
        "|---|---:|---|---:|",
    ]
    for mode, xs in results.items():
        ratios = [x / o for x, o in zip(xs, off, strict=True)]
        runs = ", ".join(f"{x:.0f}" for x in xs)
        lines.append(f"| {mode} | {statistics.median(xs):.0f} | {runs} | {statistics.median(ratios):.3f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        client(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=32)
    args = p.parse_args()
    load = "wrk -t1" if shutil.which("wrk") else "aiohttp client process"
    print(f"load: {load}, {args.connections} connections, {args.duration:g} s per run, {args.rounds} rounds")
    print(report(run(args.rounds, args.duration, args.connections)))


if __name__ == "__main__":
    main()
