"""Every benchmark runs in smoke mode (tiny sizes, a few seconds) so the suite cannot rot.

Only exact things are asserted (counts, JSON written, required columns), never timings. Each benchmark runs as
``python -m bench.<name>`` in a subprocess pointed at this session's servers (``BENCH_REDIS_URL``: the session's
own Redis database; ``BENCH_PG_ADMIN_DSN``/``BENCH_PG_DATABASE``: a database of its own next to the session's),
so it runs on the machine's servers or the embedded ones alike and never meets a concurrent suite. The HTTP load
benchmarks need wrk (skipped without it).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

for _mod in ("cashews", "aiocache", "matplotlib", "numpy"):  # the optional group `bench` (dev.sh installs it)
    pytest.importorskip(_mod)

from bench._common import wrk_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
needs_wrk = pytest.mark.skipif(wrk_path() is None, reason="wrk is not installed")
_ENV: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def bench_servers(pg_admin_dsn: str, redis_url: str) -> Iterator[None]:
    """The benchmarks' servers: this session's Redis database and a Postgres database of this module's own."""
    import asyncio

    import asyncpg

    name = f"aframp_bench_{os.getpid()}_{secrets.token_hex(3)}"
    _ENV.update(BENCH_REDIS_URL=redis_url, BENCH_PG_ADMIN_DSN=pg_admin_dsn, BENCH_PG_DATABASE=name)
    yield

    async def drop() -> None:
        conn = await asyncpg.connect(pg_admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())
    _ENV.clear()


def smoke(name: str, out: Path):  # type: ignore[no-untyped-def]
    env = {**os.environ, **_ENV, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", f"bench.{name}", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    res = None
    doc = json.loads((out / f"{name}.json").read_text())
    assert doc["name"] == name
    assert doc["rows"] and doc["checks"]
    for row in doc["rows"]:
        assert set(doc["columns"]) <= set(row), (doc["columns"], row)
    for check in doc["checks"]:
        assert {"what", "ours", "baseline", "ratio", "target", "met"} <= set(check)
    return res, doc


@needs_wrk
def test_http_hot(tmp_path: Path) -> None:
    _, doc = smoke("http_hot", tmp_path)
    assert [r["server"] for r in doc["rows"]] == ["bare aiohttp (same bytes)", "service, L1 hit"]
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in doc["rows"])


def test_l1_hit(tmp_path: Path) -> None:
    _, doc = smoke("l1_hit", tmp_path)
    names = {r["contender"] for r in doc["rows"]}
    assert {
        "raw TTLCache[key]",
        "await actor.get(key)",
        "cashews Memory backend .get",
        "aiocache SimpleMemoryCache.get",
    } <= names


def test_l2_hit(tmp_path: Path) -> None:
    _, doc = smoke("l2_hit", tmp_path)
    assert doc["meta"]["l2_hits"] >= doc["meta"]["n"] * doc["meta"]["repeats"]


def test_stampede_is_one_origin_load(tmp_path: Path) -> None:
    _, doc = smoke("stampede", tmp_path)
    assert [r["origin loads"] for r in doc["rows"]] == [1, 1]


def test_invalidation(tmp_path: Path) -> None:
    _, doc = smoke("invalidation", tmp_path)
    assert doc["rows"][0]["n"] == 2 * doc["meta"]["writes"]  # every write seen by both peers
    assert doc["meta"]["invalidations_received"] >= 2 * doc["meta"]["writes"]


def test_writes(tmp_path: Path) -> None:
    _, doc = smoke("writes", tmp_path)
    assert doc["meta"]["invalidations_sent"] >= doc["meta"]["writes"]


def test_cached_vs_uncached(tmp_path: Path) -> None:
    _, doc = smoke("cached_vs_uncached", tmp_path)
    assert doc["meta"]["horizon_calls"] == doc["meta"]["n"] + 1  # one per cold account, none for cached reads


def test_origin_amplification(tmp_path: Path) -> None:
    _, doc = smoke("origin_amplification", tmp_path)
    assert doc["meta"]["errors"] == 0
    for row in doc["rows"]:
        assert row["ideal loads"] <= row["no-cache loads"]
        assert 0 < row["our loads"] <= row["no-cache loads"]


@needs_wrk
def test_scaling(tmp_path: Path) -> None:
    _, doc = smoke("scaling", tmp_path)
    assert [r["instances"] for r in doc["rows"]] == ["1", "2"]


def test_memory_is_bounded(tmp_path: Path) -> None:
    _, doc = smoke("memory", tmp_path)
    assert {r["data type"] for r in doc["rows"]} == {
        "exchange_rate",
        "conversion",
        "fee_structure",
        "wallet_balance",
        "trustline",
    }
    assert all(r["entries"] == doc["meta"]["max_entries"] and r["bounded"] for r in doc["rows"])


def test_plots(tmp_path: Path) -> None:
    smoke("memory", tmp_path)
    from bench.plots import draw

    made = draw(tmp_path, tmp_path / "img")
    assert [p.name for p in made] == ["memory.png"]
    assert made[0].read_bytes()[:4] == b"\x89PNG"
