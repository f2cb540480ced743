"""Consistency checker: are reads on every instance fresh within B ms of a write's acknowledgement?

It writes rates through ONE instance (the first URL) and reads the same pairs through ALL instances, open-loop
at fixed rates, then reports stale reads, convergence per write and the keys still stale at the end::

    python bench/consistency.py                                   # starts a local 3-instance Cluster itself
    python bench/consistency.py --urls http://a:8080,http://b:8080 --token $ADMIN_TOKEN
    python bench/consistency.py --kill-subscribers-every 3        # CLIENT KILL TYPE pubsub every 3 s

Each write stores ``rate = "1.<18-digit version>"`` with a version that only grows per key (it starts from the
wall clock in ms x 10^4, so it also grows across runs), so any read tells which write it reflects. Writes to one
key are never concurrent (the next is sent after the previous one's answer); a key whose write timed out (outcome
unknown) is not written again in that run. The checker assumes it is the only writer of its pairs
(``CK0/USD`` …).

Exit code: 0 when no read was stale by more than B and no key was stale at the end; 1 otherwise (also when not a
single read could be judged); 2 for a usage or set-up error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench.cluster import (
    DEFAULT_DATABASE_URL,
    DEFAULT_REDIS_URL,
    Cluster,
    ClusterError,
    cancel_on_sigterm,
    kill_subscribers,
)
from bench.consistency_report import NOT_FOUND, Read, Write, build_report

DIGITS = 18  # the service accepts up to 18 fractional digits in a rate


class SetupError(RuntimeError):
    pass


# ---------------------------------------------------------------- versions in rate values


def encode_version(version: int) -> str:
    if not 0 < version < 10**DIGITS:
        raise ValueError(f"version out of range: {version}")
    return f"1.{version:0{DIGITS}d}"


def decode_version(rate: Any) -> int | None:
    """The version a rate string carries; 0 for a value the checker did not write (older than all of its
    writes); None when it is not a decimal at all."""
    try:
        d = Decimal(str(rate))
    except (InvalidOperation, ValueError):
        return None
    if not d.is_finite():
        return None
    if 1 <= d < 2:
        return int((d - 1).scaleb(DIGITS))
    return 0


def version_base() -> int:
    """Wall-clock ms x 10^4: a later run's versions are above any earlier run's (up to 10^4 writes/key/ms)."""
    return time.time_ns() // 1_000_000 * 10_000


# ---------------------------------------------------------------- the checker


class Checker:
    def __init__(
        self,
        urls: Sequence[str],
        token: str,
        *,
        duration: float = 60.0,
        write_rate: float = 20.0,
        read_rate: float = 300.0,
        keys: int = 20,
        bound_ms: float = 100.0,
        kill_every: float = 0.0,
        kill: Callable[[], Awaitable[int]] | None = None,
        timeout: float = 2.0,
        max_in_flight: int = 64,
        settle: float = 2.0,
        seed: int | None = None,
        key_prefix: str = "CK",
        quote: str = "USD",
        log: Callable[[str], None] | None = None,
    ) -> None:
        if not urls:
            raise ValueError("at least one URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.token = token
        self.duration = duration
        self.write_rate = write_rate
        self.read_rate = read_rate
        self.keys = [f"{key_prefix}{i}/{quote}" for i in range(keys)]
        self.bound_s = bound_ms / 1000
        self.kill_every = kill_every
        self.kill = kill
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.max_in_flight = max_in_flight
        self.settle = settle
        self.rng = random.Random(seed)
        self.log = log or (lambda _msg: None)
        self.writes: list[Write] = []
        self.reads: list[Read] = []
        self.kills: list[dict[str, Any]] = []
        self.skipped = {"reads": 0, "writes": 0}
        self.next_version: dict[str, int] = {}
        self.busy: set[str] = set()  # keys with a write in flight
        self.poisoned: set[str] = set()  # keys whose last write's outcome is unknown: not written again
        self.in_flight = {"reads": 0, "writes": 0}
        self.final: dict[tuple[str, int], int | None] = {}
        self.t0 = 0.0

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------ one request each
    async def _write(self, http: aiohttp.ClientSession, key: str, phase: str = "load") -> Write:
        version = self.next_version[key]
        self.next_version[key] = version + 1
        self.busy.add(key)
        self.in_flight["writes"] += 1
        sent = self.now()
        acked: float | None = None
        try:
            async with http.put(
                f"{self.urls[0]}/v1/rates/{key}",
                json={"rate": encode_version(version), "source": "consistency-check"},
                headers=self.auth,
            ) as resp:
                body = await resp.read()
                status = str(resp.status)
                if resp.status == 200:
                    acked = self.now()
                    got = decode_version(json.loads(body).get("rate"))
                    if got != version:
                        status = "200 wrong-value"
                elif resp.status == 503 and b"invalidation-unavailable" in body:
                    status = "503 refused"  # nothing changed: no read is judged against it
                elif resp.status >= 500:
                    self.poisoned.add(key)  # it may have committed: never race it with a newer write
        except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError) as err:
            status = "timeout" if isinstance(err, TimeoutError) else f"error:{type(err).__name__}"
            self.poisoned.add(key)
        finally:
            self.busy.discard(key)
            self.in_flight["writes"] -= 1
        w = Write(key, version, sent, acked, status)
        self.writes.append(w)
        if phase == "setup" and acked is None:
            raise SetupError(f"PUT {self.urls[0]}/v1/rates/{key} answered {status}")
        return w

    async def _read(self, http: aiohttp.ClientSession, key: str, inst: int, phase: str = "load") -> Read:
        self.in_flight["reads"] += 1
        sent = self.now()
        version: int | None = None
        xcache = None
        try:
            async with http.get(f"{self.urls[inst]}/v1/rates/{key}") as resp:
                body = await resp.read()
                status = str(resp.status)
                xcache = resp.headers.get("X-Cache")
                if resp.status == 200:
                    version = decode_version(json.loads(body).get("rate"))
                elif resp.status == 404:
                    version = NOT_FOUND
        except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError) as err:
            status = "timeout" if isinstance(err, TimeoutError) else f"error:{type(err).__name__}"
        finally:
            self.in_flight["reads"] -= 1
        r = Read(key, inst, sent, self.now(), status, version, xcache, phase)
        self.reads.append(r)
        return r

    # ------------------------------------------------------------ open-loop drivers
    async def _drive(
        self, rate: float, kind: str, fire: Callable[[int], Awaitable[Any] | None], tasks: set[asyncio.Task[Any]]
    ) -> None:
        """Fire ``fire(i)`` at t0 + i/rate for the duration; never more than max_in_flight at once (skipped)."""
        if rate <= 0:
            return
        count = int(self.duration * rate)
        for i in range(count):
            delay = i / rate - self.now()
            if delay > 0:
                await asyncio.sleep(delay)  # the open-loop schedule
            if self.now() > self.duration + 1.0:  # hopelessly behind schedule: stop, do not burst
                self.skipped[kind] += count - i
                break
            if self.in_flight[kind] >= self.max_in_flight:
                self.skipped[kind] += 1
                continue
            coro = fire(i)
            if coro is None:
                self.skipped[kind] += 1
                continue
            task = asyncio.ensure_future(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _killer(self) -> None:
        if self.kill_every <= 0 or self.kill is None:
            return
        for j in range(1, int(self.duration / self.kill_every) + 1):
            delay = j * self.kill_every - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            at = self.now()
            try:
                killed: int | str = await asyncio.wait_for(self.kill(), 5)
            except Exception as err:  # a failed kill is reported, not fatal
                killed = f"error:{type(err).__name__}: {err}"
            self.kills.append({"at_s": round(at, 3), "killed": killed})

    async def _settle(self, http: aiohttp.ClientSession) -> None:
        """After the load: re-read every key from every instance until each shows the last acknowledged write,
        for at most ``settle`` seconds; the last read of each (key, instance) is its final state."""
        last: dict[str, int] = {}
        for w in self.writes:
            if w.acked is not None:
                last[w.key] = max(last.get(w.key, 0), w.version)
        pending = [(k, i) for k in self.keys for i in range(len(self.urls))]
        deadline = self.now() + self.settle
        sem = asyncio.Semaphore(self.max_in_flight)

        async def one(k: str, i: int) -> Read:
            async with sem:
                return await self._read(http, k, i, "settle")

        while pending:
            results = await asyncio.gather(*(one(k, i) for k, i in pending))
            for (k, i), r in zip(pending, results, strict=True):
                self.final[(k, i)] = r.version
            pending = [
                (k, i) for (k, i) in pending if self.final[(k, i)] is None or self.final[(k, i)] < last.get(k, 0)
            ]  # type: ignore[operator]
            if not pending or self.now() >= deadline:
                break
            await asyncio.sleep(0.05)  # between polling rounds

    # ------------------------------------------------------------ the run
    async def run(self) -> dict[str, Any]:
        base = version_base()
        self.next_version = {k: base + 1 for k in self.keys}
        self.t0 = time.monotonic()
        conn_w = aiohttp.TCPConnector(limit=self.max_in_flight)
        conn_r = aiohttp.TCPConnector(limit=self.max_in_flight)
        async with (
            aiohttp.ClientSession(timeout=self.timeout, connector=conn_w) as wh,
            aiohttp.ClientSession(timeout=self.timeout, connector=conn_r) as rh,
        ):
            self.log(f"creating {len(self.keys)} pairs through {self.urls[0]}")
            await asyncio.gather(*(self._write(wh, k, "setup") for k in self.keys))
            setup_writes = len(self.writes)
            old_t0, self.t0 = self.t0, time.monotonic()  # the load's clock starts now; set-up times are < 0
            shift = old_t0 - self.t0
            self.writes = [
                Write(w.key, w.version, w.sent + shift, None if w.acked is None else w.acked + shift, w.status)
                for w in self.writes
            ]
            self.log(f"load: {self.duration:g} s, {self.write_rate:g} writes/s, {self.read_rate:g} reads/s")
            tasks: set[asyncio.Task[Any]] = set()
            n = len(self.urls)

            def fire_write(_i: int) -> Awaitable[Any] | None:
                free = [k for k in self.keys if k not in self.busy and k not in self.poisoned]
                return self._write(wh, self.rng.choice(free)) if free else None

            def fire_read(i: int) -> Awaitable[Any]:
                # round-robin over (key, instance): each pair is read every keys x n / read_rate seconds, and
                # the n instances read a key back to back, so convergence is sampled at a known resolution
                return self._read(rh, self.keys[(i // n) % len(self.keys)], i % n)

            drivers = [
                self._drive(self.write_rate, "writes", fire_write, tasks),
                self._drive(self.read_rate, "reads", fire_read, tasks),
                self._killer(),
            ]
            await asyncio.gather(*drivers)
            if tasks:  # every request has a timeout, so this ends
                await asyncio.wait(set(tasks), timeout=self.timeout.total + 1)
            load_end = self.now()
            self.log(f"load done at {load_end:.1f} s; settling (up to {self.settle:g} s)")
            await self._settle(rh)
        report = build_report(
            self.writes[setup_writes:] + self.writes[:setup_writes],
            self.reads,
            n_instances=len(self.urls),
            bound_s=self.bound_s,
            final=self.final,
            instance_names=self.urls,
            extra={
                "config": {
                    "urls": self.urls,
                    "write_url": self.urls[0],
                    "duration_s": self.duration,
                    "write_rate": self.write_rate,
                    "read_rate": self.read_rate,
                    "keys": len(self.keys),
                    "kill_subscribers_every_s": self.kill_every if self.kill else 0,
                    "timeout_s": self.timeout.total,
                    "max_in_flight": self.max_in_flight,
                    "settle_s": self.settle,
                },
                "setup_writes": setup_writes,
                "sampling_interval_ms": round(1000 * len(self.keys) * len(self.urls) / self.read_rate, 1)
                if self.read_rate > 0
                else None,
                "load_s": round(load_end, 3),
                "skipped": dict(self.skipped),
                "keys_not_written_again": sorted(self.poisoned),
                "subscriber_kills": self.kills,
            },
        )
        if report["reads"]["judged"] == 0:
            report["ok"] = False
            report["note"] = "not a single read could be judged"
        return report


# ---------------------------------------------------------------- printing


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _ms(d: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    return f"p50 {f(d['p50_ms'])} / p99 {f(d['p99_ms'])} / max {f(d['max_ms'])} ms"


def format_report(rep: dict[str, Any]) -> str:
    c, rd, wr, st, cv, end = rep["config"], rep["reads"], rep["writes"], rep["stale"], rep["convergence"], rep["end"]
    lines = [
        f"instances          {len(rep['instances'])}: " + ", ".join(rep["instances"]),
        f"load               {rep['load_s']:.1f} s; writes {c['write_rate']:g}/s via {c['write_url']}; "
        f"reads {c['read_rate']:g}/s over all; {c['keys']} pairs; B = {rep['bound_ms']:g} ms",
        f"writes             {wr['total'] - rep['setup_writes']} (+{rep['setup_writes']} set-up; "
        f"{wr['acked']} acked in all)  status {wr['status']}"
        f"  skipped {rep['skipped']['writes']}",
        f"reads              {rd['total']} (+{rd['settle']} settle; {rd['judged']} judged)  status {rd['status']}"
        f"  skipped {rep['skipped']['reads']}",
        f"read latency       {_ms(rd['latency'])}; each pairxinstance read every {rep['sampling_interval_ms']} ms",
        "x-cache            "
        + "  ".join(f"{k} {v} ({_pct(v, rd['total'])})" for k, v in sorted(rd["x_cache"].items())),
        f"stale reads        {st['count']}  staleness {_ms(st['staleness'])}",
        f"  beyond B         {st['beyond_bound']}",
    ]
    if st["count"]:
        lines.append(f"  by instance      {st['by_instance']}")
        lines.append(f"  by x-cache       {st['by_x_cache']}  by phase {st['by_phase']}")
    nines = cv["nines"]
    share = cv["share_within_target"]
    lines += [
        f"convergence        {cv['converged']}/{cv['writes']} writes converged ({cv['unconverged']} never)  {_ms(cv)}",
        f"  within {cv['target_ms']:g} ms   {cv['within_target']} "
        f"({'-' if share is None else f'{100 * share:.3f}%'}) = {nines} nines",
        f"keys stale at end  {end['keys_stale']} (checked {end['checked']} pairxinstance)",
    ]
    for e in end["stale_pairs"][:10]:
        lines.append(f"  {e['key']} on {e['instance']}: got {e['got']} expected {e['expected']}")
    if rep["subscriber_kills"]:
        killed = sum(k["killed"] for k in rep["subscriber_kills"] if isinstance(k["killed"], int))
        lines.append(f"subscriber kills   {len(rep['subscriber_kills'])} (connections killed: {killed})")
    if rep.get("instance_exits"):
        lines.append(f"instances exited   {rep['instance_exits']}")
    if rep.get("note"):
        lines.append(f"note               {rep['note']}")
    lines.append("RESULT             " + ("PASS" if rep["ok"] else "FAIL"))
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Check that every instance serves a rate no older than B ms after a write's acknowledgement.",
        epilog="Exit code 0: no read stale beyond B and no key stale at the end; 1: otherwise; 2: set-up error.",
    )
    p.add_argument(
        "--urls",
        help="comma-separated instance base URLs; writes go to the first (default: start a local 3-instance cluster)",
    )
    p.add_argument("--token", default=os.environ.get("ADMIN_TOKEN"), help="admin token (default $ADMIN_TOKEN)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--write-rate", type=float, default=20.0, help="writes/s (default 20)")
    p.add_argument("--read-rate", type=float, default=300.0, help="reads/s in total (default 300)")
    p.add_argument("--keys", type=int, default=20, help="number of rate pairs CK0/USD… (default 20)")
    p.add_argument("--bound-ms", type=float, default=100.0, help="staleness bound B in ms (default 100)")
    p.add_argument(
        "--kill-subscribers-every",
        type=float,
        default=0.0,
        metavar="S",
        help="run CLIENT KILL TYPE pubsub every S seconds (needs a local cluster or --redis-url; default 0 = never)",
    )
    p.add_argument(
        "--redis-url",
        help=f"Redis to kill subscribers on / for the local cluster "
        f"(default {DEFAULT_REDIS_URL} for the local cluster)",
    )
    p.add_argument(
        "--database-url", default=DEFAULT_DATABASE_URL, help=f"local cluster only (default {DEFAULT_DATABASE_URL})"
    )
    p.add_argument(
        "--kill-all-pubsub",
        action="store_true",
        help="local cluster: kill every pub/sub connection of the Redis server (plain CLIENT KILL TYPE pubsub), "
        "not only the cluster's own subscribers",
    )
    p.add_argument("--instances", type=int, default=3, help="local cluster size (default 3)")
    p.add_argument("--timeout", type=float, default=2.0, help="per-request timeout, s (default 2)")
    p.add_argument("--max-in-flight", type=int, default=64, help="concurrency bound per kind (default 64)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    return p


async def _amain(args: argparse.Namespace) -> int:
    cancel_on_sigterm()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    common = {
        "duration": args.duration,
        "write_rate": args.write_rate,
        "read_rate": args.read_rate,
        "keys": args.keys,
        "bound_ms": args.bound_ms,
        "kill_every": args.kill_subscribers_every,
        "timeout": args.timeout,
        "max_in_flight": args.max_in_flight,
        "seed": args.seed,
        "log": log,
    }
    if args.urls:
        urls = [u.strip() for u in args.urls.split(",") if u.strip()]
        if not args.token:
            raise SetupError("--token (or $ADMIN_TOKEN) is required with --urls")
        kill = None
        if args.kill_subscribers_every > 0:
            if not args.redis_url:
                raise SetupError("--kill-subscribers-every with --urls needs --redis-url")
            redis_url = args.redis_url

            async def kill() -> int:
                return await kill_subscribers(redis_url)

        await _preflight(urls)
        report = await Checker(urls, args.token, kill=kill, **common).run()
    else:
        cluster = Cluster(
            args.instances,
            database_url=args.database_url,
            redis_url=args.redis_url or DEFAULT_REDIS_URL,
            admin_token=args.token,
        )
        log(f"starting {args.instances} instances (logs in {cluster.out_dir})")
        async with cluster:
            log("cluster ready: " + ", ".join(cluster.urls))
            checker = Checker(
                cluster.urls,
                cluster.admin_token,
                kill=(lambda: cluster.kill_subscribers(only_ours=not args.kill_all_pubsub))
                if args.kill_subscribers_every > 0
                else None,
                **common,
            )
            report = await checker.run()
            exits = {i.instance_id: i.proc.returncode for i in cluster.instances if i.proc and not i.running}
            if exits:
                report["instance_exits"] = exits
            report["logs"] = [str(i.log_path) for i in cluster.instances]
    print(format_report(report))
    if args.json:
        _write_json(Path(args.json), report)
        log(f"report written to {args.json}")
    return 0 if report["ok"] else 1


def _write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


async def _preflight(urls: Sequence[str]) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
        for u in urls:
            try:
                async with http.get(u.rstrip("/") + "/health/ready") as resp:
                    await resp.read()
            except (aiohttp.ClientError, TimeoutError) as err:
                raise SetupError(f"{u}: not reachable ({type(err).__name__}: {err})") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.duration <= 0 or args.keys < 1 or args.write_rate < 0 or args.read_rate < 0:
        print("consistency: --duration and --keys must be positive, rates non-negative", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_amain(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("consistency: interrupted", file=sys.stderr)
        return 130
    except (SetupError, ClusterError) as err:
        print(f"consistency: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
