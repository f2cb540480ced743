"""Start N real service instances as subprocesses (``python -m service serve``) for the multi-instance benchmarks.

* free ports, one shared Redis db (14) and the benchmark Postgres database;
* a temporary copy of config.toml with the benchmark's overrides (shortened TTLs, a pub/sub channel of its own,
  because pub/sub ignores Redis database numbers) passed with ``--config``;
* waits for every ``/health/ready`` to say ``ok`` (subscribed) within a deadline;
* logs to ``bench/out/<name>-<i>.log``;
* clean shutdown even on errors: SIGTERM, then SIGKILL after a grace period, of the processes it started only.

    async with Cluster(3, name="stampede", overrides={"ttl": {"exchange_rate": 2}}) as cluster:
        cluster.urls  # ["http://127.0.0.1:P1", ...]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import aiohttp

from bench._common import ADMIN_TOKEN, OUT, REDIS_URL, ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- config copy


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(doc: dict[str, Any]) -> str:
    """Enough TOML for config.toml: tables of scalars, one level of sub-tables, arrays of tables."""
    lines: list[str] = []

    def table(prefix: str, tbl: dict[str, Any]) -> None:
        scalars = {k: v for k, v in tbl.items() if not isinstance(v, dict | list)}
        lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        lines.append("")
        for k, v in tbl.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}", v)
            elif isinstance(v, list):
                for item in v:
                    lines.append(f"[[{prefix}.{k}]]")
                    lines.extend(f"{ik} = {_toml_value(iv)}" for ik, iv in item.items())
                    lines.append("")

    for name, tbl in doc.items():
        table(name, tbl)
    return "\n".join(lines)


def write_config(overrides: dict[str, Any], directory: Path) -> Path:
    with open(ROOT / "config.toml", "rb") as f:
        doc = tomllib.load(f)
    path = directory / "config.toml"
    path.write_text(dump_toml(_merge(doc, overrides)))
    return path


# ---------------------------------------------------------------- the cluster


class Cluster:
    def __init__(
        self,
        n: int,
        *,
        name: str,
        dsn: str,
        overrides: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        redis_url: str = REDIS_URL,
        horizon_url: str = "http://127.0.0.1:9",
        ready_deadline: float = 30.0,
        log_dir: Path = OUT,
    ) -> None:
        self.n = n
        self.name = name
        self.dsn = dsn
        self.redis_url = redis_url
        self.horizon_url = horizon_url
        self.ready_deadline = ready_deadline
        self.log_dir = Path(log_dir)
        self.env = env or {}
        self.channel = f"bench:{name}:{secrets.token_hex(4)}"
        self.overrides = _merge(
            {
                "redis": {"channel": self.channel, "min_idle": 2},
                "server": {"shutdown_grace": 1.0, "access_log": False},
            },
            overrides or {},
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._logs: list[Any] = []

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    async def __aenter__(self) -> Cluster:
        try:
            self.start()
            await self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"aframp-bench-{self.name}-")
        config = write_config(self.overrides, Path(self._tmp.name))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.n):
            port = free_port()
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "DATABASE_URL": self.dsn,
                "REDIS_URL": self.redis_url,
                "ADMIN_TOKEN": ADMIN_TOKEN,
                "INSTANCE_ID": f"bench-{self.name}-{i}",
                "HORIZON_URL": self.horizon_url,
                "AFRAMP_DATA_DIR": str(Path(self._tmp.name) / "data"),
                "AFRAMP_WARM_LIMIT": "0",  # cold keys must stay cold for the stampede / miss measurements
                **self.env,
            }
            log = open(self.log_dir / f"{self.name}-{i}.log", "wb")
            self._logs.append(log)
            proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", "--port", str(port), "--config", str(config)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.procs.append(proc)
            self.ports.append(port)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_deadline
        async with aiohttp.ClientSession() as s:
            for i, url in enumerate(self.urls):
                while True:
                    if self.procs[i].poll() is not None:
                        raise RuntimeError(
                            f"instance {i} exited ({self.procs[i].returncode}); see "
                            f"{self.log_dir / f'{self.name}-{i}.log'}"
                        )
                    with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                        async with s.get(url + "/health/ready", timeout=aiohttp.ClientTimeout(total=1)) as r:
                            if r.status == 200 and (await r.json()).get("status") == "ok":
                                break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"instance {i} not ready within {self.ready_deadline}s")
                    await asyncio.sleep(0.05)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(timeout=5)
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def stats(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        out = []
        for url in self.urls:
            async with session.get(url + "/v1/cache/stats") as r:
                out.append(await r.json())
        return out

    async def total(self, session: aiohttp.ClientSession, data_type: str, counter: str) -> int:
        return sum(s["types"].get(data_type, {}).get(counter, 0) for s in await self.stats(session))
