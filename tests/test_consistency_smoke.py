"""The consistency checker end to end for ~3 s against two real apps (in-process, sharing Postgres and Redis)."""

from __future__ import annotations

import asyncio

from bench.consistency import Checker
from tests.conftest import ADMIN, AppFactory


async def test_checker_runs_against_two_instances_and_finds_no_key_stale_at_the_end(make_client: AppFactory) -> None:
    apps = [await make_client(), await make_client()]
    urls = [str(c.make_url("")).rstrip("/") for c in apps]
    checker = Checker(urls, ADMIN, duration=3.0, write_rate=10, read_rate=100, keys=5, settle=2.0, seed=1)
    async with asyncio.timeout(30):  # a checker bug fails the test instead of hanging the suite
        rep = await checker.run()
    assert rep["setup_writes"] == 5
    assert rep["writes"]["total"] > 5
    assert rep["writes"]["acked"] > 5
    assert rep["reads"]["total"] > 0
    assert rep["reads"]["judged"] > 0
    assert set(rep["reads"]["per_instance"]) == set(urls)
    assert rep["end"]["checked"] == 5 * 2
    assert rep["end"]["keys_stale"] == 0, rep["end"]["stale_pairs"]


async def test_checker_flags_an_instance_that_never_hears_invalidations(make_client: AppFactory) -> None:
    """Negative control: the second app runs without Redis (L1 only), so nothing ever invalidates its copies."""
    apps = [await make_client(), await make_client(env={"REDIS_URL": "none"})]
    urls = [str(c.make_url("")).rstrip("/") for c in apps]
    checker = Checker(urls, ADMIN, duration=1.5, write_rate=10, read_rate=100, keys=3, settle=0.3, seed=2)
    async with asyncio.timeout(30):  # a checker bug fails the test instead of hanging the suite
        rep = await checker.run()
    assert rep["stale"]["beyond_bound"] > 0
    assert set(rep["stale"]["by_instance"]) == {urls[1]}
    assert rep["end"]["keys_stale"] > 0
    assert {e["instance"] for e in rep["end"]["stale_pairs"]} == {urls[1]}
    assert rep["ok"] is False
