"""Every benchmark runs in smoke mode (tiny sizes, a few seconds) so the suite cannot rot.

Only exact things are asserted (counts, JSON written, required columns), never timings. Benchmarks use Redis db 14
and their own Postgres database; they need the machine's Postgres and Redis (skipped otherwise) and wrk for the HTTP
load benchmarks.
"""

from __future__ import annotations

import importlib
import json
import socket
from pathlib import Path

import pytest

for _mod in ("cashews", "aiocache", "matplotlib", "numpy"):  # the optional group `bench` (dev.sh installs it)
    pytest.importorskip(_mod)

from bench._common import wrk_path  # noqa: E402


def _open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


servers = pytest.mark.skipif(not (_open(5432) and _open(6379)), reason="needs Postgres :5432 and Redis :6379")
needs_wrk = pytest.mark.skipif(wrk_path() is None, reason="wrk is not installed")


def smoke(name: str, out: Path):  # type: ignore[no-untyped-def]
    res = importlib.import_module(f"bench.{name}").main(["--smoke", "--out", str(out)])
    doc = json.loads((out / f"{name}.json").read_text())
    assert doc["name"] == name
    assert doc["rows"] and doc["checks"]
    for row in doc["rows"]:
        assert set(doc["columns"]) <= set(row), (doc["columns"], row)
    for check in doc["checks"]:
        assert {"what", "ours", "baseline", "ratio", "target", "met"} <= set(check)
    return res, doc


@servers
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


@servers
def test_l2_hit(tmp_path: Path) -> None:
    _, doc = smoke("l2_hit", tmp_path)
    assert doc["meta"]["l2_hits"] >= doc["meta"]["n"] * doc["meta"]["repeats"]


@servers
def test_stampede_is_one_origin_load(tmp_path: Path) -> None:
    _, doc = smoke("stampede", tmp_path)
    assert [r["origin loads"] for r in doc["rows"]] == [1, 1]


@servers
def test_invalidation(tmp_path: Path) -> None:
    _, doc = smoke("invalidation", tmp_path)
    assert doc["rows"][0]["n"] == 2 * doc["meta"]["writes"]  # every write seen by both peers
    assert doc["meta"]["invalidations_received"] >= 2 * doc["meta"]["writes"]


@servers
def test_writes(tmp_path: Path) -> None:
    _, doc = smoke("writes", tmp_path)
    assert doc["meta"]["invalidations_sent"] >= doc["meta"]["writes"]


@servers
def test_cached_vs_uncached(tmp_path: Path) -> None:
    _, doc = smoke("cached_vs_uncached", tmp_path)
    assert doc["meta"]["horizon_calls"] == doc["meta"]["n"] + 1  # one per cold account, none for cached reads


@servers
def test_origin_amplification(tmp_path: Path) -> None:
    _, doc = smoke("origin_amplification", tmp_path)
    assert doc["meta"]["errors"] == 0
    for row in doc["rows"]:
        assert row["ideal loads"] <= row["no-cache loads"]
        assert 0 < row["our loads"] <= row["no-cache loads"]


@servers
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
