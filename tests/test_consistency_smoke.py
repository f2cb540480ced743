"""The consistency checker end to end for ~3 s against two real instances (subprocesses sharing the test
Postgres and Redis, started by bench/cluster.py: a stuck shutdown is SIGKILLed rather than hanging the suite)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from bench.cluster import Cluster
from bench.consistency import Checker
from tests.conftest import ADMIN

ClusterFactory = Callable[..., Any]


@pytest.fixture
async def cluster(pg_dsn: str, redis_url: str, tmp_path: Any) -> AsyncIterator[ClusterFactory]:
    started: list[Cluster] = []

    async def start(n: int = 2, **kw: Any) -> Cluster:
        c = Cluster(
            n,
            database_url=pg_dsn,
            redis_url=redis_url,
            admin_token=ADMIN,
            out_dir=tmp_path,
            env={"HORIZON_URL": "http://127.0.0.1:9"},
            stop_grace=5.0,
            name="smoke",
            **kw,
        )
        started.append(c)
        await c.start()
        return c

    yield start
    for c in started:
        await c.stop()


async def test_checker_runs_against_two_instances_and_finds_no_key_stale_at_the_end(cluster: ClusterFactory) -> None:
    c = await cluster()
    checker = Checker(c.urls, ADMIN, duration=3.0, write_rate=10, read_rate=100, keys=5, settle=2.0, seed=1)
    async with asyncio.timeout(30):  # a checker bug fails the test instead of hanging the suite
        rep = await checker.run()
    assert rep["setup_writes"] == 5
    assert rep["writes"]["total"] > 5
    assert rep["writes"]["acked"] > 5
    assert rep["reads"]["total"] > 0
    assert rep["reads"]["judged"] > 0
    assert set(rep["reads"]["per_instance"]) == set(c.urls)
    assert rep["end"]["checked"] == 5 * 2
    assert rep["end"]["keys_stale"] == 0, rep["end"]["stale_pairs"]


async def test_checker_flags_an_instance_that_never_hears_invalidations(cluster: ClusterFactory) -> None:
    """Negative control: the second instance runs without Redis (L1 only), so nothing invalidates its copies."""
    c = await cluster(instance_env=[{}, {"REDIS_URL": "none"}])
    checker = Checker(c.urls, ADMIN, duration=1.5, write_rate=10, read_rate=100, keys=3, settle=0.3, seed=2)
    async with asyncio.timeout(30):
        rep = await checker.run()
    assert rep["stale"]["beyond_bound"] > 0
    assert c.urls[1] in rep["stale"]["by_instance"]
    assert rep["end"]["keys_stale"] > 0
    assert c.urls[1] in {e["instance"] for e in rep["end"]["stale_pairs"]}
    assert rep["ok"] is False
