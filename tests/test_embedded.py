"""The embedded default behaves like a real one: files under the data dir only, shared by several instances (the
last one out stops it), a quick stop, and a taken port that fails at once. Real subprocesses, real servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

from service.embedded import EmbeddedRedis
from tests.conftest import ROOT

PY = sys.executable


def _env(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "DATABASE_", "OTEL_", "AFRAMP_"))}
    return {**keep, "PYTHONPATH": str(ROOT), "LOG_FORMAT": "json", **extra}


def test_embedded_redis_is_shared_and_the_last_user_out_stops_it(tmp_path: Path, monkeypatch: Any) -> None:
    data = tmp_path / "d"
    private_tmp = tmp_path / "tmp"  # the system temp dir of both processes here, to see that nothing goes there
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    other = subprocess.Popen(  # another process using the same data dir
        [PY, "-c", textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from service.embedded import EmbeddedRedis
            r = EmbeddedRedis(Path({str(data)!r}))
            print(r.start(), r.started, flush=True)
            sys.stdin.readline()
            r.stop()
            print("stopped", flush=True)
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=_env(TMPDIR=str(private_tmp)),
    )  # fmt: skip
    assert other.stdout is not None and other.stdin is not None
    url, started = other.stdout.readline().split()
    assert started == "True" and url == f"unix://{data.resolve()}/redis/redis.sock"
    mine = EmbeddedRedis(data)
    assert mine.start() == url and not mine.started  # joined the running one
    other.stdin.write("\n")
    other.stdin.flush()
    assert other.stdout.readline().strip() == "stopped"
    assert other.wait(10) == 0
    assert mine._answers()  # the other user left: still running for this one
    pid = mine._pid()
    assert pid is not None
    mine.stop()
    assert not mine._answers()
    import psutil

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    files = {p.relative_to(data).as_posix() for p in data.rglob("*")}
    assert files <= {"redis", "redis/lock", "redis/users", "redis/redis.conf", "redis/redis.log", "redis/redis.pid"}
    assert list(private_tmp.iterdir()) == []  # nothing in the system temp dir


def _start(data: Path, port: int = 0) -> tuple[subprocess.Popen[str], int]:
    tmp = data.parent / "tmp"  # the instance's system temp dir: must stay empty
    tmp.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [PY, "-m", "service", "serve", "--port", str(port)],
        cwd=ROOT, env=_env(AFRAMP_DATA_DIR=str(data), AFRAMP_WARM_LIMIT="10", TMPDIR=str(tmp)),
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # the start-up line names the port (0 picks a free one)
        event: dict[str, Any] = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "listening":
            return proc, int(event["port"])
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"no listening line; exit {proc.wait()}")


def _ready(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as r:
            return str(json.loads(r.read())["status"])
    except OSError:
        return "down"


def _wait_ready(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _ready(port) != "ok":
        assert time.monotonic() < deadline, "not ready before the deadline"
        time.sleep(0.05)  # polling a starting server, with a deadline


def _stop(proc: subprocess.Popen[str]) -> float:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    return time.monotonic() - t0


def test_two_instances_share_one_data_dir_and_either_may_stop_first(tmp_path: Path) -> None:
    data = tmp_path / "d"
    for first_out in (0, 1):
        a, port_a = _start(data)
        b, port_b = _start(data)
        procs, ports = [a, b], [port_a, port_b]
        try:
            for p in ports:
                _wait_ready(p)
            took = _stop(procs[first_out])
            assert took < 5, took  # under a second when idle on an unloaded machine (README); generous under load
            survivor = ports[1 - first_out]
            with urllib.request.urlopen(f"http://127.0.0.1:{survivor}/v1/rates/CNGN/USD", timeout=5) as r:
                assert r.status == 200
            assert _ready(survivor) == "ok"  # its embedded Postgres and Redis are still there
            assert _stop(procs[1 - first_out]) < 5
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        # the last one out stopped both servers
        assert not EmbeddedRedis(data)._answers()
        assert not (data / "postgres" / "postmaster.pid").exists()
    assert list((tmp_path / "tmp").iterdir()) == []  # every file of theirs is under the data dir


def test_a_taken_port_exits_at_once_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        proc = subprocess.run(
            [PY, "-m", "service", "serve", "--port", str(port)],
            cwd=ROOT, env=_env(AFRAMP_DATA_DIR=str(tmp_path / "d")), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        took = time.monotonic() - t0
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"aframp-cache: cannot start: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in proc.stderr
    assert took < 15, took  # the interpreter's start-up only: nothing was started (no embedded server)
    assert not (tmp_path / "d").exists()
