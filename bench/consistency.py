"""Consistency checker: are reads on every instance fresh within B ms of a write's acknowledgement?

It writes rates through ONE instance (the first URL) and reads the same pairs through ALL instances, open-loop
at fixed rates, then reports stale reads, convergence per write and the keys still stale at the end::

    python -m bench.consistency                                   # starts a local 3-instance Cluster itself
    python -m bench.consistency --urls http://a:8080,http://b:8080 --token $ADMIN_TOKEN
    python -m bench.consistency --kill-subscribers-every 3        # CLIENT KILL TYPE pubsub every 3 s

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
import itertools
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import aiohttp

from bench.cluster import (
    DEFAULT_DATABASE_URL,
    DEFAULT_REDIS_URL,
    OUT,
    Cluster,
    ClusterError,
    cancel_on_sigterm,
    kill_subscribers,
)
from bench.consistency_faults import FAULTS, CommitLog, Fault, committed_rates, result_ok, scan_redis
from bench.consistency_report import NOT_FOUND, Read, Write, build_report, stale_reads

DIGITS = 18  # the service accepts up to 18 fractional digits in a rate
# conversion amounts: a small set, so conversions repeat and are cached (canonical forms: the service's key is the
# canonical amount, so "2.5" and "2.50" would share one key)
AMOUNTS = ("1", "2.5", "10", "100", "1234.5678", "0.0000003", "99999.99")


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
        convert_share: float = 0.5,
        amounts: Sequence[str] = AMOUNTS,
        fault: Fault | None = None,
        redis_url: str | None = None,
        database_url: str | None = None,
        scan_every: float = 5.0,
        writers: int | None = None,
        rewrite_share: float = 0.0,
    ) -> None:
        if not urls:
            raise ValueError("at least one URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.token = token
        self.duration = duration
        self.write_rate = write_rate
        self.read_rate = read_rate
        self.keys = [f"{key_prefix}{i}/{quote}" for i in range(keys)]
        self.convert_share = convert_share
        self.amounts = list(amounts)
        self.fault = fault
        self.redis_url = redis_url  # for the stale-fill scan (with database_url)
        self.database_url = database_url
        self.scan_every = scan_every
        self.writers = writers if writers is not None else (fault.writers if fault else 1)
        self.rewrite_share = rewrite_share  # share of writes followed at once by a second write of the pair
        self.writer = 0  # the instance single writes go to (a fault may move it)
        self.down: set[int] = set()  # instances a fault killed: not read any more
        self.restart_noticed: list[float] = []
        self.scans: list[dict[str, Any]] = []
        self.write_events: dict[str, int] = {k: 0 for k in self.keys}  # +1 at every write's start and end
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
        self.skipped = {"reads": 0, "writes": 0, "reads_of_down_instances": 0}
        self.next_version: dict[str, int] = {}
        self.busy: dict[str, int] = {}  # keys with writes in flight: how many
        self.poisoned: set[str] = set()  # keys whose last write's outcome is unknown: not written again
        self.in_flight = {"reads": 0, "writes": 0}
        self.final: dict[tuple[str, int], int | None] = {}
        self.t0 = 0.0
        self.version_base = 0
        self.commit_log: CommitLog | None = None

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def acked_writes(self) -> int:
        return sum(1 for w in self.writes if w.acked is not None)

    # ------------------------------------------------------------ one request each
    async def _write(self, http: aiohttp.ClientSession, key: str, phase: str = "load", via: int | None = None) -> Write:
        version = self.next_version[key]
        self.next_version[key] = version + 1
        via = self.writer if via is None else via
        self.busy[key] = self.busy.get(key, 0) + 1
        self.write_events[key] = self.write_events.get(key, 0) + 1
        self.in_flight["writes"] += 1
        sent = self.now()
        acked: float | None = None
        try:
            async with http.put(
                f"{self.urls[via]}/v1/rates/{key}",
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
            self.busy[key] -= 1
            if not self.busy[key]:
                del self.busy[key]
            self.write_events[key] += 1
            self.in_flight["writes"] -= 1
        w = Write(key, version, sent, acked, status, via)
        self.writes.append(w)
        if phase == "setup" and acked is None:
            raise SetupError(f"PUT {self.urls[via]}/v1/rates/{key} answered {status}")
        return w

    async def _write_twice(self, http: aiohttp.ClientSession, key: str) -> None:
        """A write, then at once (after its answer) another of the same pair: loads that began between the two —
        the reads the first one's invalidation caused — race the second one (issue 12, finding 1)."""
        self.busy[key] = self.busy.get(key, 0) + 1  # no other write of the pair in between
        try:
            first = await self._write(http, key)
            if first.acked is not None:
                await asyncio.sleep(self.rng.uniform(0.0, 0.01))  # let the first one's misses start
                await self._write(http, key)
        finally:
            self.busy[key] -= 1
            if not self.busy[key]:
                del self.busy[key]

    async def _burst(self, http: aiohttp.ClientSession, key: str) -> None:
        """``writers`` PUTs to one pair at once, each through another instance (concurrent writes)."""
        live = [i for i in range(len(self.urls)) if i not in self.down] or [self.writer]
        vias = [live[j % len(live)] for j in range(self.writers)]
        await asyncio.gather(*(self._write(http, key, via=v) for v in vias))

    async def _read(
        self, http: aiohttp.ClientSession, key: str, inst: int, phase: str = "load", amount: str | None = None
    ) -> Read:
        self.in_flight["reads"] += 1
        sent = self.now()
        version: int | None = None
        xcache = None
        if amount is None:
            url = f"{self.urls[inst]}/v1/rates/{key}"
        else:
            base, quote = key.split("/")
            url = f"{self.urls[inst]}/v1/rates/convert?amount={amount}&from={base}&to={quote}"
        try:
            async with http.get(url) as resp:
                body = await resp.read()
                status = str(resp.status)
                xcache = resp.headers.get("X-Cache")
                if resp.status == 200:
                    doc = json.loads(body)
                    version = decode_version(doc.get("rate"))
                    if amount is not None and not result_ok(amount, doc.get("rate"), doc.get("result")):
                        status, version = "200 bad-result", None  # amount x rate wrong: a failure, not judged
                elif resp.status == 404:
                    version = NOT_FOUND
        except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError) as err:
            status = "timeout" if isinstance(err, TimeoutError) else f"error:{type(err).__name__}"
        finally:
            self.in_flight["reads"] -= 1
        r = Read(key, inst, sent, self.now(), status, version, xcache, phase, "rate" if amount is None else "convert")
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
        if self.database_url:  # racing writers: the last committed is not always the highest version
            with contextlib.suppress(Exception):
                pairs = [(k.split("/")[0], k.split("/")[1]) for k in self.keys]
                for (b, q), rate in (await committed_rates(self.database_url, pairs)).items():
                    v = decode_version(str(rate))
                    if v is not None:
                        last[f"{b}/{q}"] = v
        pending = [(k, i) for k in self.keys for i in range(len(self.urls)) if i not in self.down]
        deadline = self.now() + self.settle
        sem = asyncio.Semaphore(self.max_in_flight)
        amounts: list[str | None] = [None, *self.amounts] if self.convert_share > 0 else [None]

        async def one(k: str, i: int) -> int | None:
            """The oldest version the instance serves for the pair: its rate and every amount's conversion."""

            async def each(a: str | None) -> Read:
                async with sem:
                    return await self._read(http, k, i, "settle", a)

            got = [r.version for r in await asyncio.gather(*(each(a) for a in amounts))]
            return None if any(v is None for v in got) else min(got)  # type: ignore[type-var]

        while pending:
            results = await asyncio.gather(*(one(k, i) for k, i in pending))
            for (k, i), v in zip(pending, results, strict=True):
                self.final[(k, i)] = v
            pending = [(k, i) for (k, i) in pending if (self.final[(k, i)] or NOT_FOUND) < last.get(k, 0)]
            if not pending or self.now() >= deadline:
                break
            await asyncio.sleep(0.05)  # between polling rounds

    # ------------------------------------------------------------ the run
    async def run(self) -> dict[str, Any]:
        base = version_base()
        self.version_base = base
        self.next_version = {k: base + 1 for k in self.keys}
        if self.writers > 1 and self.database_url:
            self.commit_log = CommitLog(self.database_url)
            await self.commit_log.install()
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
                if not free:
                    return None
                key = self.rng.choice(free)
                if self.writers > 1:
                    return self._burst(wh, key)
                if self.rewrite_share > 0 and self.rng.random() < self.rewrite_share:
                    return self._write_twice(wh, key)
                return self._write(wh, key)

            def fire_read(i: int) -> Awaitable[Any] | None:
                # round-robin over (key, instance): each pair is read every keys x n / read_rate seconds, and
                # the n instances read a key back to back, so convergence is sampled at a known resolution;
                # about convert_share of them are conversions of a random amount of that pair
                inst = i % n
                if inst in self.down:
                    self.skipped["reads_of_down_instances"] += 1
                    return None
                amount = self.rng.choice(self.amounts) if self.rng.random() < self.convert_share else None
                return self._read(rh, self.keys[(i // n) % len(self.keys)], inst, amount=amount)

            drivers = [
                self._drive(self.write_rate / max(1, self.writers), "writes", fire_write, tasks),
                self._drive(self.read_rate, "reads", fire_read, tasks),
                self._killer(),
                self._scanner(),
            ]
            if self.fault is not None:
                drivers.append(self.fault.run(self))
            await asyncio.gather(*drivers)
            if tasks:  # every request has a timeout, so this ends
                await asyncio.wait(set(tasks), timeout=(self.timeout.total or 2.0) + 1)
            load_end = self.now()
            self.log(f"load done at {load_end:.1f} s; settling (up to {self.settle:g} s)")
            await self._settle(rh)
            final_scan = await self._scan(final=True)
            stats = await self._stats(rh)
        self.skipped["reads"] -= self.skipped["reads_of_down_instances"]
        writes = self.writes[setup_writes:] + self.writes[:setup_writes]
        reads = self.reads
        commit_order = None
        if self.commit_log is not None:
            writes, reads, commit_order = await self._by_commit_order(writes, reads)
        report = build_report(
            writes,
            reads,
            n_instances=len(self.urls),
            bound_s=self.bound_s,
            final=self.final,
            instance_names=self.urls,
            converge_on=None if not self.down else [i for i in range(len(self.urls)) if i not in self.down],
            extra={
                "config": {
                    "urls": self.urls,
                    "write_url": self.urls[0],
                    "duration_s": self.duration,
                    "write_rate": self.write_rate,
                    "writers": self.writers,
                    "rewrite_share": self.rewrite_share,
                    "convert_share": self.convert_share,
                    "amounts": self.amounts,
                    "fault": self.fault.name if self.fault else "none",
                    "scan_every_s": self.scan_every,
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
        # for a post-mortem: the load's clock in wall time (instance logs are in wall time), and every write of the
        # keys the worst stale reads were on
        report["t0_wall"] = time.strftime("%H:%M:%S", time.localtime(time.time() - self.now())) + (
            f".{int((time.time() - self.now()) % 1 * 1000):03d}"
        )
        stale_keys = {e["key"] for e in report["stale"]["worst"]}
        report["writes_of_stale_keys"] = [
            {
                "key": w.key,
                "version": w.version,
                "via": self.urls[w.via],
                "sent_s": round(w.sent, 4),
                "acked_s": None if w.acked is None else round(w.acked, 4),
                "status": w.status,
            }
            for w in writes
            if w.key in stale_keys
        ]
        failures: list[str] = []
        bad = sum(1 for r in self.reads if r.status == "200 bad-result")
        report["bad_results"] = bad
        if bad:
            failures.append(f"{bad} conversion(s) answered a result that is not amount x rate")
        if self.fault is not None and hasattr(self.fault, "restored"):
            self.scans += self.fault.restored  # the scans right after each restart count too
        periodic = [sc for sc in self.scans if "error" not in sc]
        report["redis_scan"] = {
            "final": final_scan,
            "periodic": {
                "scans": len(self.scans),
                "errors": [sc["error"] for sc in self.scans if "error" in sc],
                "discarded": sum(1 for sc in periodic if "discarded" in sc),
                "values": sum(sc["values"] for sc in periodic),
                "servable": sum(sc["servable"] for sc in periodic),
                "not_judged": sum(sc.get("not_judged", 0) for sc in periodic),
                "fenced_incarnation": sum(sc["fenced_incarnation"] for sc in periodic),
                "fenced_generation": sum(sc["fenced_generation"] for sc in periodic),
                "stale_fills": [e for sc in periodic for e in sc["stale_fills"]],
                "bad_results": [e for sc in periodic for e in sc["bad_results"]],
            },
        }
        if final_scan is not None:
            seen = final_scan.get("stale_fills", []) + report["redis_scan"]["periodic"]["stale_fills"]
            # one stale value seen by several scans counts once: distinct (key, rate served)
            sf = len({(e["key"], e["served_rate"]) for e in seen})
            report["stale_fills"] = sf
            report["stale_fill_observations"] = len(seen)
            if sf:
                failures.append(f"{sf} stale fill(s) in Redis")
            br = len(final_scan.get("bad_results", [])) + len(report["redis_scan"]["periodic"]["bad_results"])
            if br:
                failures.append(f"{br} conversion value(s) in Redis whose result is not amount x rate")
            if "error" in final_scan or "discarded" in final_scan:
                failures.append("the final Redis scan failed")
        report["instance_stats"] = stats
        gaps = sum(st.get("seq_gaps", 0) for st in stats.values() if isinstance(st, dict))
        report["seq_gaps"] = gaps
        if gaps:
            failures.append(f"{gaps} sequence gap(s) (spurious L1 flushes unless a message was lost)")
        if commit_order is not None:
            report["commit_order"] = commit_order
            if commit_order["acked_not_committed"] or commit_order["phantom_reads"]:
                failures.append("acknowledged writes missing from the commit log, or reads of values never committed")
        if self.restart_noticed:
            report["restarts_noticed_s"] = [round(t, 3) for t in self.restart_noticed]
            first = min(self.restart_noticed)
            after = [x for x in stale_reads(writes, reads) if x.read.sent >= first]
            report["stale_after_restart"] = {
                "count": len(after),
                "beyond_bound": sum(1 for x in after if x.staleness > self.bound_s),
            }
        if self.fault is not None:
            report["fault"] = self.fault.summary(self)
            failures += [f"{self.fault.name}: {f}" for f in report["fault"]["failures"]]
        if report["reads"]["judged"] == 0:
            failures.append("not a single read could be judged")
            report["note"] = "not a single read could be judged"
        report["failures"] = failures
        report["ok"] = report["ok"] and not failures
        return report

    # ------------------------------------------------------------ Redis scans, stats, commit order
    async def _scan(self, final: bool = False) -> dict[str, Any] | None:
        if not (self.redis_url and self.database_url):
            return None
        pairs = [(k.split("/")[0], k.split("/")[1]) for k in self.keys]
        snap = dict(self.write_events)

        def judge(pair: tuple[str, str]) -> bool:
            k = f"{pair[0]}/{pair[1]}"
            if k in self.poisoned:
                return False  # its last write's outcome is unknown (a late commit is applied from the outbox)
            return final or (k not in self.busy and self.write_events.get(k) == snap.get(k))

        try:
            return await asyncio.wait_for(
                scan_redis(self.redis_url, self.database_url, pairs, judge=judge, at_s=self.now()), 15
            )
        except Exception as err:  # Redis restarting, a proxy cut: reported, not fatal
            return {"at_s": round(self.now(), 3), "error": f"{type(err).__name__}: {err}"}

    async def _scanner(self) -> None:
        if self.scan_every <= 0 or not (self.redis_url and self.database_url):
            return
        j = 1
        while j * self.scan_every < self.duration:
            delay = j * self.scan_every - self.now()
            if delay > 0:
                await asyncio.sleep(delay)  # the scan schedule
            got = await self._scan()
            if got is not None:
                self.scans.append(got)
            j += 1

    async def _stats(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, u in enumerate(self.urls):
            if i in self.down:
                out[u] = "down (killed by the fault)"
                continue
            try:
                async with http.get(f"{u}/v1/cache/stats") as resp:
                    doc = json.loads(await resp.read())
                sub, co = doc.get("subscriber", {}), doc.get("coherence", {})
                out[u] = {
                    "seq_gaps": int(sub.get("seq_gaps", 0)),
                    "sessions": sub.get("sessions"),
                    "reconnects": sub.get("reconnects"),
                    "received": sub.get("received"),
                    "lease_lapses": sub.get("lease_lapses"),
                    "l1_epochs": co.get("l1_epochs"),
                    "incarnation_changes": co.get("incarnation_changes"),
                    "outbox_applied": co.get("outbox_applied"),
                }
            except (TimeoutError, aiohttp.ClientError, ValueError) as err:
                out[u] = f"error:{type(err).__name__}"
        return out

    async def _by_commit_order(
        self, writes: list[Write], reads: list[Read]
    ) -> tuple[list[Write], list[Read], dict[str, Any]]:
        """Versions become commit ranks (1, 2, … in the order Postgres committed each pair's rows): the report's
        "older" then follows commit order, whatever order racing writes were sent or answered in."""
        assert self.commit_log is not None
        pairs = [(k.split("/")[0], k.split("/")[1]) for k in self.keys]
        order = await self.commit_log.order(pairs)
        rank: dict[str, dict[int, int]] = {}
        for (b, q), rates in order.items():
            ranks: dict[int, int] = {}
            for idx, r in enumerate(rates, 1):
                v = decode_version(str(r))
                if v is not None and v >= self.version_base:
                    ranks[v] = idx
            rank[f"{b}/{q}"] = ranks
        acked_missing: list[dict[str, Any]] = []
        phantom: list[dict[str, Any]] = []
        new_writes: list[Write] = []
        for w in writes:
            got = rank.get(w.key, {}).get(w.version)
            if got is None:
                if w.acked is not None:
                    acked_missing.append({"key": w.key, "version": w.version})
                got = 0
                w = Write(w.key, 0, w.sent, None, w.status + " (not committed)", w.via)
            new_writes.append(Write(w.key, got, w.sent, w.acked, w.status, w.via))

        def remap(key: str, v: int | None) -> int | None:
            if v is None or v <= 0 or v < self.version_base:
                return v if v is None or v <= 0 else 0  # 404, or a value of an earlier run: older than all
            got = rank.get(key, {}).get(v)
            if got is None:
                phantom.append({"key": key, "version": v})
                return None
            return got

        new_reads = [
            Read(r.key, r.instance, r.sent, r.recv, r.status, remap(r.key, r.version), r.xcache, r.phase, r.kind)
            for r in reads
        ]
        self.final = {k: remap(k[0], v) for k, v in self.final.items()}
        racing = 0
        by_key: dict[str, list[Write]] = {}
        for w in writes:
            by_key.setdefault(w.key, []).append(w)
        for ws in by_key.values():  # writes whose commit order differs from their send order
            committed = sorted((w for w in ws if rank.get(w.key, {}).get(w.version)), key=lambda w: w.sent)
            seq = [rank[w.key][w.version] for w in committed]
            racing += sum(1 for a, b in itertools.pairwise(seq) if b < a)
        info = {
            "committed_rows": sum(len(r) for r in rank.values()),
            "reordered_pairs_of_writes": racing,
            "acked_not_committed": acked_missing[:20],
            "phantom_reads": phantom[:20],
        }
        return new_writes, new_reads, info


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
        f"load               {rep['load_s']:.1f} s; writes {c['write_rate']:g}/s via "
        + (c["write_url"] if c.get("writers", 1) <= 1 else f"all (bursts of {c['writers']} racing PUTs per pair)")
        + "; "
        f"reads {c['read_rate']:g}/s over all; {c['keys']} pairs; B = {rep['bound_ms']:g} ms",
        f"writes             {wr['total'] - rep['setup_writes']} (+{rep['setup_writes']} set-up; "
        f"{wr['acked']} acked in all)  status {wr['status']}"
        f"  skipped {rep['skipped']['writes']}",
        f"reads              {rd['total']} (+{rd['settle']} settle; {rd['judged']} judged)  status {rd['status']}"
        f"  skipped {rep['skipped']['reads']}"
        + (
            f" (+{rep['skipped']['reads_of_down_instances']} due to instances the fault killed)"
            if rep["skipped"].get("reads_of_down_instances")
            else ""
        ),
        f"read latency       {_ms(rd['latency'])}; each pairxinstance read every {rep['sampling_interval_ms']} ms",
        "x-cache            "
        + "  ".join(f"{k} {v} ({_pct(v, rd['total'])})" for k, v in sorted(rd["x_cache"].items())),
        "  by kind          "
        + "  ".join(f"{k}: {v['total']} ({v['judged']} judged incl. settle)" for k, v in rd["by_kind"].items()),
        f"stale reads        {st['count']}  staleness {_ms(st['staleness'])}",
        f"  beyond B         {st['beyond_bound']}  by kind {st['beyond_bound_by_kind']}",
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
    lines.append(f"bad results        {rep.get('bad_results', 0)} (conversions whose result is not amount x rate)")
    scan = rep.get("redis_scan") or {}
    fin, per = scan.get("final"), scan.get("periodic") or {}
    if fin is not None:
        if "error" in fin or "discarded" in fin:
            lines.append(f"redis scan (end)   FAILED: {fin.get('error') or fin.get('discarded')}")
        else:
            lines.append(
                f"redis scan (end)   {fin['values']} values: {fin['servable']} servable, fenced by incarnation "
                f"{fin['fenced_incarnation']}, by generation {fin['fenced_generation']}; stale fills "
                f"{len(fin['stale_fills'])}, bad results {len(fin['bad_results'])}"
            )
        lines.append(
            f"redis scans (load) {per.get('scans', 0)} ({len(per.get('errors', []))} failed, "
            f"{per.get('discarded', 0)} discarded): {per.get('servable', 0)} servable values "
            f"({per.get('not_judged', 0)} not judged: a write of the pair in flight), "
            f"stale fills {len(per.get('stale_fills', []))}"
        )
        for e in (fin.get("stale_fills", []) + per.get("stale_fills", []))[:10]:
            lines.append(
                f"  STALE FILL at {e['at_s']} s: {e['key']} serves rate {e['served_rate']}, "
                f"committed {e['committed_rate']} (fresh {e['fresh']}, gens {e['gens']})"
            )
        lines.append(
            f"stale fills        {rep.get('stale_fills', 0)} distinct (key, rate) "
            f"({rep.get('stale_fill_observations', 0)} observations over all scans)"
        )
    if "seq_gaps" in rep:
        per_inst = {
            u: (st["seq_gaps"] if isinstance(st, dict) else st) for u, st in rep.get("instance_stats", {}).items()
        }
        lines.append(f"seq gaps           {rep['seq_gaps']}  {per_inst}")
    if rep.get("commit_order"):
        co = rep["commit_order"]
        lines.append(
            f"commit order       {co['committed_rows']} rows committed; {co['reordered_pairs_of_writes']} "
            f"successive writes committed out of send order; acked-not-committed {len(co['acked_not_committed'])}, "
            f"phantom reads {len(co['phantom_reads'])}"
        )
    if rep.get("fault"):
        f = rep["fault"]
        lines.append(f"fault              {f['name']}")
        for ev in f["events"]:
            extra = {k: v for k, v in ev.items() if k not in ("at_s", "what")}
            lines.append(f"  {ev['at_s']:8.2f} s  {ev['what']}" + (f"  {extra}" if extra else ""))
        for k, v in f.items():
            if k not in ("name", "events", "failures"):
                lines.append(f"  {k}: {v}")
        if "stale_after_restart" in rep:
            lines.append(f"  stale reads sent after the first restart: {rep['stale_after_restart']}")
    for fail in rep.get("failures", []):
        lines.append(f"FAILURE            {fail}")
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
    p.add_argument(
        "--fault",
        choices=sorted(FAULTS),
        default="none",
        help="local cluster: inject a fault (each but none on a redis-server of its own): snapshot-restart, "
        "writer-cut, silent-subscriber, concurrent-writes (default none)",
    )
    p.add_argument(
        "--convert-share",
        type=float,
        default=0.5,
        help="share of reads that are GET /v1/rates/convert (default 0.5)",
    )
    p.add_argument("--amounts", default=",".join(AMOUNTS), help="conversion amounts, comma-separated (canonical)")
    p.add_argument(
        "--scan-every",
        type=float,
        default=5.0,
        metavar="S",
        help="scan Redis for stale fills every S seconds during the load, and always at the end (needs the local "
        "cluster, or --redis-url and --database-url; 0 = only at the end)",
    )
    p.add_argument(
        "--writers", type=int, help="PUTs per write burst, each through another instance (concurrent-writes: 3)"
    )
    p.add_argument("--key-prefix", default="CK", help="pair names: PREFIX0/USD … (default CK)")
    p.add_argument(
        "--rewrite-share",
        type=float,
        default=0.0,
        help="share of writes followed at once (0-10 ms after the answer) by a second write of the same pair, so "
        "that loads caused by the first race the second (default 0)",
    )
    p.add_argument(
        "--tree",
        type=Path,
        help="local cluster: run the instances from this source tree (default: this repository); e.g. an older "
        "revision exported with git archive, as a negative control",
    )
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
        "convert_share": args.convert_share,
        "amounts": [a.strip() for a in args.amounts.split(",") if a.strip()],
        "scan_every": args.scan_every,
        "writers": args.writers,
        "key_prefix": args.key_prefix,
        "rewrite_share": args.rewrite_share,
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

        if args.fault != "none":
            raise SetupError("--fault needs the local cluster (no --urls)")
        await _preflight(urls)
        scan = {"redis_url": args.redis_url, "database_url": args.database_url} if args.redis_url else {}
        report = await Checker(urls, args.token, kill=kill, **scan, **common).run()
    else:
        fault = FAULTS[args.fault](OUT / "redis", args.redis_url or DEFAULT_REDIS_URL)
        await fault.start()
        try:
            cluster = Cluster(
                args.instances,
                database_url=args.database_url,
                redis_url=fault.redis_url,
                admin_token=args.token,
                # a channel of the run's own: clusters sharing a Redis do not hear each other
                env={"REDIS_CHANNEL": f"consistency-{os.getpid()}-{int(time.time())}"},
                instance_env=fault.instance_env(args.instances),
                name=f"consistency-{args.fault}",
                **({"cwd": args.tree.resolve()} if args.tree else {}),
            )
            fault.cluster = cluster
            log(f"starting {args.instances} instances (logs in {cluster.out_dir}); fault {args.fault}")
            async with cluster:
                log("cluster ready: " + ", ".join(cluster.urls))
                checker = Checker(
                    cluster.urls,
                    cluster.admin_token,
                    kill=(lambda: cluster.kill_subscribers(only_ours=not args.kill_all_pubsub))
                    if args.kill_subscribers_every > 0
                    else None,
                    fault=fault,
                    redis_url=fault.redis_url,
                    database_url=args.database_url,
                    **common,
                )
                report = await checker.run()
                exits = {i.instance_id: i.proc.returncode for i in cluster.instances if i.proc and not i.running}
                if exits:
                    report["instance_exits"] = exits
                report["logs"] = [str(i.log_path) for i in cluster.instances]
        finally:
            await fault.stop()
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
