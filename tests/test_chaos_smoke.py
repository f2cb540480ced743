"""The chaos run end to end (~30 s): ``bench/chaos.py --smoke`` as a subprocess, with its own Redis, Postgres,
Horizon stand-in and three instances (never the machine's shared servers). What CI runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PHASES = [
    "baseline",
    "redis-kill-1",
    "redis-kill-2",
    "redis-kill-3",
    "pubsub-kill",
    "postgres-stop",
    "horizon-5xx",
    "horizon-429",
    "horizon-slow",
    "rolling-restart",
    "recovery",
]


def test_chaos_smoke(tmp_path: Path) -> None:
    report_path = tmp_path / "chaos.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "bench/chaos.py", "--smoke", "--json", str(report_path), "--out-dir", str(tmp_path)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:  # run() kills the child; its own cleanup hooks do not run then
        pytest.fail(f"chaos --smoke did not finish within 240 s:\n{err.stdout}\n{err.stderr}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    report = json.loads(report_path.read_text())

    assert report["ok"] is True and report["failures"] == []
    assert [p["phase"] for p in report["phases"]] == PHASES
    for p in report["phases"]:
        assert p["requests"] > 0, p["phase"]
        assert p["status_500"] == 0, p
        assert p["bad_5xx"] == 0, p
        assert p["lost"] == 0 and p["timeouts"] == 0, p
        assert p["stale"]["beyond_documented_bound"] == 0, p
        if p["phase"] not in ("baseline", "recovery"):
            assert p["recovery"]["health_ok_s"] is not None, p  # every fault recovered
    totals = report["totals"]
    assert totals["status_500"] == 0
    assert totals["lost"] == 0 and totals["timeouts"] == 0
    assert totals["stale"]["beyond_documented_bound"] == 0
    assert totals["keys_stale_at_end"] == 0
    # the faults really happened: writes refused (nothing changed) while Redis was down, retries around the
    # restarted instance, writes refused while Postgres was down, subscribers killed
    by_phase = {p["phase"]: p for p in report["phases"]}
    assert sum(by_phase[f"redis-kill-{i}"]["refused_writes"] for i in (1, 2, 3)) > 0
    assert by_phase["rolling-restart"]["fault"]["exit_code"] == 0
    assert by_phase["pubsub-kill"]["fault"]["connections_killed"][0] >= 3
    # everything it started is gone: instances exited, nothing listens on its Redis port, its Postgres data
    # directory (and so the server that ran in it) is removed
    assert all(code is not None for code in report["instance_exit_codes"].values())
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", report["config"]["own_redis_port"])) != 0
    workdir = report["config"]["workdir"]
    assert not Path(workdir).exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert workdir not in ps
