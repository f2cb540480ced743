"""Start N real instances (``python -m service serve --port P``) sharing one Postgres and one Redis.

As a module::

    async with Cluster(n=3) as c:          # started, each ready and subscribed
        c.urls                              # ["http://127.0.0.1:PORT", ...]
        await c.kill_subscribers()          # CLIENT KILL TYPE pubsub
        await c.restart(1)

As a command: ``python -m bench.cluster --n 3`` runs them until Ctrl-C (or ``--duration``), printing the URLs.

For the benchmarks, :func:`for_benchmark` builds one with their defaults (Redis db 14, the benchmark token and
Postgres database, a pub/sub channel of its own, a temporary copy of config.toml with their ``overrides`` —
:func:`write_config`), and :meth:`Cluster.stats` / :meth:`Cluster.total` read every instance's ``/v1/cache/stats``.
An instance is ready when ``/health/ready`` answers 200 with ``checks.invalidation == "subscribed"``.

Every instance logs to ``bench/out/<instance-id>.log``. Every subprocess is stopped on exit (SIGTERM, then
SIGKILL after a grace period), also on Ctrl-C or an exception; an ``atexit`` hook SIGKILLs any survivor if the
event loop never got to clean up, and on Linux each child gets SIGTERM if this process dies.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class ClusterError(RuntimeError):
    pass


@dataclass
class Instance:
    index: int
    instance_id: str
    port: int
    host: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    forced_kills: int = 0  # stops that needed SIGKILL
    _log: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports the kernel says are unused right now (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only, best effort)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# ---------------------------------------------------------------- config copies


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
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


def dump_toml(doc: Mapping[str, Any]) -> str:
    """Enough TOML for config.toml: tables of scalars, one level of sub-tables, arrays of tables."""
    lines: list[str] = []

    def table(prefix: str, tbl: Mapping[str, Any]) -> None:
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


def write_config(overrides: Mapping[str, Any], directory: Path) -> Path:
    """``directory/config.toml``: the repository's config.toml with ``overrides`` merged in (tables recursively)."""
    with open(ROOT / "config.toml", "rb") as f:
        doc = tomllib.load(f)
    path = Path(directory) / "config.toml"
    path.write_text(dump_toml(_merge(doc, overrides)))
    return path


_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_survivors() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()


class Cluster:
    def __init__(
        self,
        n: int = 3,
        base_port: int | None = None,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
        cwd: str | os.PathLike[str] = ROOT,
        *,
        database_url: str = DEFAULT_DATABASE_URL,
        redis_url: str = DEFAULT_REDIS_URL,
        admin_token: str | None = None,
        host: str = "127.0.0.1",
        out_dir: str | os.PathLike[str] = OUT,
        ready_timeout: float = 30.0,
        stop_grace: float = 15.0,
        name: str = "bench",
        instance_env: Sequence[Mapping[str, str]] | None = None,
        overrides: Mapping[str, Any] | None = None,
        horizon_url: str | None = None,
    ) -> None:
        """``overrides``: a temporary copy of config.toml with these merged in is every instance's config
        (``AFRAMP_CONFIG``); ``horizon_url``: ``HORIZON_URL`` of every instance."""
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n
        self.python = python
        self.cwd = Path(cwd)
        self.database_url = database_url
        self.redis_url = redis_url
        self.admin_token = admin_token or secrets.token_hex(16)  # 32 characters
        self.host = host
        self.out_dir = Path(out_dir)
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.extra_env = dict(env or {})
        self.instance_env = [dict(e) for e in (instance_env or [])]  # per instance, over env
        self.overrides = dict(overrides) if overrides is not None else None
        self.horizon_url = horizon_url
        self._config_dir: tempfile.TemporaryDirectory[str] | None = None
        self.config_path: Path | None = None
        run = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        if base_port is not None:
            ports = [base_port + i for i in range(n)]
            busy = [p for p in ports if not port_free(p, host)]
            if busy:
                raise ClusterError(f"ports already in use: {busy}")
        else:
            ports = free_ports(n, host)
        self.instances = [
            Instance(i, f"{run}-{i}", p, host, self.out_dir / f"{run}-{i}.log") for i, p in enumerate(ports)
        ]

    # ------------------------------------------------------------ properties
    @property
    def urls(self) -> list[str]:
        return [inst.url for inst in self.instances]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    @property
    def pids(self) -> list[int]:
        return [i.proc.pid for i in self.instances if i.proc is not None]

    def env_for(self, inst: Instance) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "ADMIN_TOKEN": self.admin_token,
                "INSTANCE_ID": inst.instance_id,
                "HOST": inst.host,
                "PORT": str(inst.port),
                "AFRAMP_DATA_DIR": str(self.out_dir / "data" / inst.instance_id),
                "PYTHONUNBUFFERED": "1",
            }
        )
        pp = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(self.cwd) + (os.pathsep + pp if pp else "")  # the tree under test comes first
        if self.horizon_url is not None:
            env["HORIZON_URL"] = self.horizon_url
        if self.config_path is not None:
            env["AFRAMP_CONFIG"] = str(self.config_path)
        env.update(self.extra_env)
        if inst.index < len(self.instance_env):
            env.update(self.instance_env[inst.index])
        return env

    # ------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Cluster:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self.overrides is not None and self.config_path is None:
            self._config_dir = tempfile.TemporaryDirectory(prefix="aframp-cluster-")
            self.config_path = write_config(self.overrides, Path(self._config_dir.name))
        for inst in self.instances:
            self._spawn(inst)
        await asyncio.gather(*(self.wait_ready(i) for i in range(self.n)))

    async def stop(self) -> None:
        # shield: a second Ctrl-C must not leave children behind half-stopped
        try:
            await asyncio.shield(asyncio.gather(*(self.stop_instance(i) for i in range(self.n))))
        finally:
            if self._config_dir is not None and not any(i.running for i in self.instances):
                self._config_dir.cleanup()
                self._config_dir = None
                self.config_path = None

    def _spawn(self, inst: Instance) -> None:
        if inst.running:
            raise ClusterError(f"{inst.instance_id} is already running")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        inst._log = open(inst.log_path, "ab")  # closed in stop_instance
        inst._log.write(f"--- start #{inst.starts + 1} at {time.strftime('%H:%M:%S')} on {inst.url}\n".encode())
        inst._log.flush()
        inst.proc = subprocess.Popen(
            [self.python, "-m", "service", "serve", "--port", str(inst.port)],
            cwd=self.cwd,
            env=self.env_for(inst),
            stdin=subprocess.DEVNULL,
            stdout=inst._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the children in order
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        inst.starts += 1
        _LIVE.add(inst.proc)

    async def wait_ready(self, index: int, within: float | None = None) -> None:
        """Poll /health/ready until 200 with checks.invalidation == "subscribed" (or fail at the deadline)."""
        inst = self.instances[index]
        deadline = time.monotonic() + (within or self.ready_timeout)
        last = "no answer yet"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
            while True:
                if inst.proc is None or inst.proc.poll() is not None:
                    code = None if inst.proc is None else inst.proc.returncode
                    raise ClusterError(f"{inst.instance_id} exited ({code}) before it was ready:\n{self.tail(index)}")
                try:
                    async with http.get(inst.url + "/health/ready") as resp:
                        body = await resp.json(content_type=None)
                        last = f"{resp.status} {body}"
                        subscribed = body.get("checks", {}).get("invalidation") == "subscribed"
                        no_bus = self.env_for(inst).get("REDIS_URL") == "none"
                        if resp.status == 200 and (subscribed or no_bus):
                            return
                except (aiohttp.ClientError, TimeoutError, ValueError) as err:
                    last = f"{type(err).__name__}: {err}"
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"{inst.instance_id} not ready within the deadline; last: {last}\n{self.tail(index)}"
                    )
                await asyncio.sleep(0.05)  # polling interval

    async def stop_instance(self, index: int, grace: float | None = None) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit code."""
        inst = self.instances[index]
        proc = inst.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(proc.wait, self.stop_grace if grace is None else grace)
                except subprocess.TimeoutExpired:
                    inst.forced_kills += 1
                    if inst._log is not None:
                        inst._log.write(b"--- bench/cluster: no exit within the grace period after SIGTERM: SIGKILL\n")
                        inst._log.flush()
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await asyncio.to_thread(proc.wait, 5)
            return proc.returncode
        finally:
            _LIVE.discard(proc)
            if inst._log is not None:
                inst._log.close()
                inst._log = None

    async def kill9(self, index: int) -> int | None:
        """SIGKILL (a crash: no shutdown step runs). Returns the exit code."""
        inst = self.instances[index]
        if inst.proc is not None and inst.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                inst.proc.kill()
        if inst._log is not None:
            inst._log.write(b"--- bench/cluster: SIGKILL (fault injection)\n")
            inst._log.flush()
        return await self.stop_instance(index, grace=5.0)

    async def restart(self, index: int, grace: float | None = None) -> None:
        await self.stop_instance(index, grace)
        self._spawn(self.instances[index])
        await self.wait_ready(index)

    async def stats(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        """Every running instance's ``/v1/cache/stats``, in instance order."""
        out = []
        for inst in self.instances:
            if inst.running:
                async with session.get(inst.url + "/v1/cache/stats") as r:
                    out.append(await r.json())
        return out

    async def total(self, session: aiohttp.ClientSession, data_type: str, counter: str) -> int:
        """One counter of one data type (``types.<data_type>.<counter>`` of the stats) summed over the instances."""
        return sum(s["types"].get(data_type, {}).get(counter, 0) for s in await self.stats(session))

    def check_alive(self) -> None:
        dead = [i.instance_id for i in self.instances if not i.running]
        if dead:
            raise ClusterError(f"instance(s) exited: {', '.join(dead)}")

    def tail(self, index: int, lines: int = 20) -> str:
        try:
            text = self.instances[index].log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------ faults
    async def kill_subscribers(self, *, only_ours: bool = True) -> int:
        """Drop every instance's invalidation-subscriber connection; returns how many connections were killed.

        ``only_ours=False`` is plain ``CLIENT KILL TYPE pubsub``: every pub/sub connection of that Redis server,
        including other users' (another test run sharing the server). By default (Linux) only the pub/sub
        connections whose client port belongs to one of this cluster's processes are killed, by id
        (``CLIENT LIST TYPE pubsub`` + ``CLIENT KILL ID``); where the sockets cannot be matched it falls back to
        ``CLIENT KILL TYPE pubsub``."""
        if only_ours:
            pids = [i.proc.pid for i in self.instances if i.proc is not None and i.running]
            ports = local_tcp_ports(pids)
            if ports is not None:
                return await kill_subscribers(self.redis_url, client_ports=ports)
        return await kill_subscribers(self.redis_url)


def for_benchmark(
    n: int,
    *,
    name: str,
    dsn: str,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    redis_url: str | None = None,
    horizon_url: str = "http://127.0.0.1:9",
) -> Cluster:
    """A cluster with the benchmarks' defaults: Redis db 14 (``BENCH_REDIS_URL``), the benchmark admin token, a
    pub/sub channel of its own (pub/sub ignores database numbers), warming off (cold keys stay cold), a short
    shutdown grace, no access log; ``overrides`` are merged into that config copy, ``env`` over the environment."""
    from bench._common import ADMIN_TOKEN, REDIS_URL

    config = _merge(
        {
            "redis": {"channel": f"bench:{name}:{secrets.token_hex(4)}", "min_idle": 2},
            "server": {"shutdown_grace": 1.0, "access_log": False},
        },
        overrides or {},
    )
    return Cluster(
        n,
        env={"AFRAMP_WARM_LIMIT": "0", **(env or {})},
        database_url=dsn,
        redis_url=redis_url or REDIS_URL,
        admin_token=ADMIN_TOKEN,
        stop_grace=5.0,
        name=name,
        overrides=config,
        horizon_url=horizon_url,
    )


def local_tcp_ports(pids: list[int]) -> set[int] | None:
    """Local TCP ports of the sockets these processes hold (Linux /proc); None when /proc cannot tell."""
    inodes: set[int] = set()
    try:
        for pid in pids:
            fd_dir = f"/proc/{pid}/fd"
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"{fd_dir}/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(int(link[8:-1]))
        ports: set[int] = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(FileNotFoundError), open(table) as fh:
                next(fh, None)
                for line in fh:
                    cols = line.split()
                    if len(cols) > 9 and int(cols[9]) in inodes:
                        ports.add(int(cols[1].rsplit(":", 1)[1], 16))
        return ports
    except (OSError, ValueError):
        return None


async def kill_subscribers(redis_url: str, *, client_ports: set[int] | None = None) -> int:
    """``CLIENT KILL TYPE pubsub``; with ``client_ports``, only the pub/sub clients connecting from those ports."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        if client_ports is None:
            return int(await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
        listing = await client.execute_command("CLIENT", "LIST", "TYPE", "pubsub")
        text = listing.decode() if isinstance(listing, bytes) else str(listing)
        killed = 0
        for line in text.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            port = fields.get("addr", "").rsplit(":", 1)[-1]
            if port.isdigit() and int(port) in client_ports:
                killed += int(await client.execute_command("CLIENT", "KILL", "ID", fields["id"], "SKIPME", "yes"))
        return killed
    finally:
        await client.aclose()


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run N local instances of the cache service on one Postgres and Redis.")
    p.add_argument("--n", type=int, default=3, help="number of instances (default 3)")
    p.add_argument("--base-port", type=int, help="first port (default: free ports)")
    p.add_argument("--database-url", default=DEFAULT_DATABASE_URL, help=f"default {DEFAULT_DATABASE_URL}")
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help=f"default {DEFAULT_REDIS_URL}")
    p.add_argument("--token", help="ADMIN_TOKEN (default: a random 32-character token, printed)")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default: Ctrl-C)")
    return p


def cancel_on_sigterm() -> None:
    """SIGTERM cancels the main task, so the cluster is stopped on the way out (as on Ctrl-C)."""
    task = asyncio.current_task()
    if task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


async def _main(args: argparse.Namespace) -> int:
    cancel_on_sigterm()
    cluster = Cluster(
        args.n, args.base_port, database_url=args.database_url, redis_url=args.redis_url, admin_token=args.token
    )
    async with cluster:
        for inst in cluster.instances:
            print(f"{inst.instance_id}  {inst.url}  log {inst.log_path}")
        print(f"ADMIN_TOKEN={cluster.admin_token}", flush=True)
        end = time.monotonic() + args.duration if args.duration > 0 else None
        while end is None or time.monotonic() < end:
            cluster.check_alive()
            await asyncio.sleep(0.5)  # watchdog period
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    except ClusterError as err:
        print(f"cluster: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
