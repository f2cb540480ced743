"""What the consistency checker (bench/consistency.py) needs besides HTTP: the stale-fill scan of Redis, the commit
order of racing writes from Postgres, and the faults it injects into a local cluster.

* :func:`scan_redis` reads every rate and conversion value of the checker's pairs straight from Redis, decodes the
  envelope (:mod:`tiers.codec`) and decides, as the service would, whether it is *servable*: stamped with the
  server's current incarnation and — for a conversion — carrying its rate's current generation (``S|g``). A servable
  value whose rate differs from Postgres' committed rate is a **stale fill** (a conversion whose ``result`` is not
  ``amount x rate`` is a **bad result**). A pair is judged only when Postgres answered the same rate before and after
  the scan and the caller says no write of it was in flight.
* :class:`CommitLog` installs an ``AFTER INSERT OR UPDATE`` trigger on ``exchange_rates`` in the checker's own
  database: its ``bigserial`` ids follow each row's commit order (a second writer of a row blocks on the row lock
  until the first commits), so concurrent writes can be judged against the order Postgres committed them.
* :class:`Fault` and its subclasses: ``snapshot-restart``, ``writer-cut``, ``silent-subscriber``,
  ``concurrent-writes`` (see :data:`FAULTS` and docs/COHERENCE.md, "The checker").
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import asyncpg
import orjson
import redis.asyncio as aioredis

from testsupport.redis_server import RedisServer
from testsupport.tcp_proxy import TcpProxy
from tiers import codec

if TYPE_CHECKING:
    from bench.cluster import Cluster
    from bench.consistency import Checker

QUANTUM = Decimal("0.0000001")
_EXACT = Context(prec=100)


def expected_result(amount: str, rate: str) -> Decimal:
    """amount x rate at 7 places, half-even: computed here independently of the service."""
    return _EXACT.multiply(Decimal(amount), Decimal(rate)).quantize(QUANTUM, rounding=ROUND_HALF_EVEN, context=_EXACT)


def result_ok(amount: str, rate: Any, result: Any) -> bool:
    try:
        return Decimal(str(result)) == expected_result(amount, str(rate))
    except (InvalidOperation, ValueError, TypeError):
        return False


# ---------------------------------------------------------------- the stale-fill scan


async def redis_incarnation(client: aioredis.Redis) -> str:
    """The service's incarnation of this server (tiers.coherence.redis_store.IncarnationGuard)."""
    server = await client.info("server")
    repl = await client.info("replication")
    return str(server.get("run_id", ""))[:8] + str(repl.get("master_replid", ""))[:8]


async def committed_rates(dsn: str, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Decimal]:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT base, quote, rate::text AS rate FROM exchange_rates WHERE (base, quote) IN "
            "(SELECT * FROM unnest($1::text[], $2::text[]))",
            [b for b, _ in pairs],
            [q for _, q in pairs],
        )
    finally:
        await conn.close()
    return {(r["base"], r["quote"]): Decimal(r["rate"]) for r in rows}


_V1_KINDS = {b"1": False, b"s": False, b"z": True, b"y": True}  # protocol v1's envelope: kind -> zlib


def unpack_any(raw: bytes) -> tuple[codec.Stored, bool] | None:
    """(the value, whether it is protocol v1's envelope ``<kind>|<fresh>|<loaded>|<body>``). A v1 value has neither
    incarnation nor generations: v1 served whatever was present, so the scan treats it as servable (this lets the
    checker run against a v1 tree, ``--tree``, as a negative control)."""
    stored = codec.unpack(raw)
    if stored is not None:
        return stored, False
    try:
        kind, fresh, loaded, body = raw.split(b"|", 3)
        if _V1_KINDS[kind]:
            body = zlib.decompress(body)
        return codec.Stored(body, int(fresh), int(loaded), kind in (b"s", b"y")), True
    except (ValueError, KeyError, zlib.error):
        return None


def _parse_key(key: str) -> tuple[str, str | None, str, str] | None:
    """(kind, amount, base, quote) of ``v1:rate:B:Q`` / ``v1:rate:convert:A:B:Q``; None for anything else."""
    parts = key.split(":")
    if len(parts) == 4 and parts[:2] == ["v1", "rate"]:
        return ("rate", None, parts[2], parts[3])
    if len(parts) == 6 and parts[:3] == ["v1", "rate", "convert"]:
        return ("convert", parts[3], parts[4], parts[5])
    return None


async def scan_redis(
    redis_url: str,
    dsn: str,
    pairs: Sequence[tuple[str, str]],
    *,
    judge: Callable[[tuple[str, str]], bool] = lambda _p: True,
    at_s: float = 0.0,
) -> dict[str, Any]:
    """One scan of the pairs' rate and conversion keys (see the module docstring)."""
    wanted = set(pairs)
    before = await committed_rates(dsn, pairs)
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    out: dict[str, Any] = {
        "at_s": round(at_s, 3),
        "values": 0,
        "servable": 0,
        "fenced_incarnation": 0,
        "fenced_generation": 0,
        "fenced_superseded": 0,  # fenced values (either way) whose rate is not Postgres' committed one
        "malformed": 0,
        "v1_envelopes": 0,
        "not_judged": 0,
        "stale_fills": [],
        "bad_results": [],
    }
    try:
        inc = await redis_incarnation(client)
        found: list[tuple[str, tuple[str, str | None, str, str]]] = []
        async for raw_key in client.scan_iter(match="v1:rate:*", count=1000):
            key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
            if "|" in key:
                continue  # the protocol's own keys (generations, fences, leases, moved-aside values)
            parsed = _parse_key(key)
            if parsed is not None and (parsed[2], parsed[3]) in wanted:
                found.append((key, parsed))
        gen_keys = sorted({f"v1:rate:{b}:{q}|g" for _, (_, _, b, q) in found})
        gens: dict[str, str | None] = {}
        if gen_keys:
            got = await client.mget(gen_keys)
            gens = {k: (g.decode() if isinstance(g, bytes) else None) for k, g in zip(gen_keys, got, strict=True)}
        raws = await client.mget([k for k, _ in found]) if found else []
        inc_after = await redis_incarnation(client)
    finally:
        await client.aclose()
    after = await committed_rates(dsn, pairs)
    if inc_after != inc:
        out["discarded"] = f"redis incarnation changed during the scan ({inc} -> {inc_after})"
        return out
    now_ms = int(time.time() * 1000)
    for (key, (kind, amount, base, quote)), raw in zip(found, raws, strict=True):
        if not isinstance(raw, bytes):
            continue  # expired or deleted between SCAN and MGET
        out["values"] += 1
        unpacked = unpack_any(raw)
        if unpacked is None:
            out["malformed"] += 1
            continue
        stored, v1 = unpacked
        out["v1_envelopes"] += v1
        pair = (base, quote)
        committed = after.get(pair)
        body = None if stored.negative else orjson.loads(stored.body)
        rate = None if body is None else body.get("rate")
        try:
            served = None if rate is None else Decimal(str(rate))
        except InvalidOperation:
            served = None
        fenced = "incarnation" if stored.incarnation != inc and not v1 else None
        if fenced is None and not v1 and kind == "convert" and stored.gens != gens.get(f"v1:rate:{base}:{quote}|g"):
            fenced = "generation"
        if fenced is not None:
            out[f"fenced_{fenced}"] += 1
            if served != committed and before.get(pair) == committed:
                out["fenced_superseded"] += 1
            continue
        out["servable"] += 1
        if not judge(pair) or before.get(pair) != after.get(pair):
            out["not_judged"] += 1
            continue
        entry = {
            "at_s": out["at_s"],
            "key": key,
            "kind": kind,
            "served_rate": rate,
            "committed_rate": None if committed is None else str(committed),
            "fresh": stored.fresh(now_ms),
            "loaded_at_ms": stored.loaded_at_ms,
            "gens": stored.gens,
        }
        if served != committed:
            out["stale_fills"].append(entry)
        elif kind == "convert" and body is not None and not result_ok(amount or "", rate, body.get("result")):
            out["bad_results"].append({**entry, "result": body.get("result")})
    return out


# ---------------------------------------------------------------- commit order from Postgres


class CommitLog:
    """Per-row commit order of the checker's writes, recorded by a trigger in the checker's own database."""

    TABLE = "consistency_commits"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def install(self) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=5)
        try:
            await conn.execute(
                f"""
                CREATE TABLE IF NOT EXISTS {self.TABLE} (
                    id bigserial PRIMARY KEY, base text NOT NULL, quote text NOT NULL, rate text NOT NULL);
                CREATE OR REPLACE FUNCTION {self.TABLE}_log() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    INSERT INTO {self.TABLE} (base, quote, rate) VALUES (NEW.base, NEW.quote, NEW.rate::text);
                    RETURN NULL;
                END $$;
                DROP TRIGGER IF EXISTS {self.TABLE}_log ON exchange_rates;
                CREATE TRIGGER {self.TABLE}_log AFTER INSERT OR UPDATE ON exchange_rates
                    FOR EACH ROW EXECUTE FUNCTION {self.TABLE}_log();
                """
            )
        finally:
            await conn.close()

    async def order(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[Decimal]]:
        """The rates each pair was committed with, in commit order."""
        conn = await asyncpg.connect(self.dsn, timeout=5)
        try:
            rows = await conn.fetch(
                f"SELECT base, quote, rate FROM {self.TABLE} WHERE (base, quote) IN "
                "(SELECT * FROM unnest($1::text[], $2::text[])) ORDER BY id",
                [b for b, _ in pairs],
                [q for _, q in pairs],
            )
        finally:
            await conn.close()
        out: dict[tuple[str, str], list[Decimal]] = {}
        for r in rows:
            out.setdefault((r["base"], r["quote"]), []).append(Decimal(r["rate"]))
        return out

    async def uninstall(self) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=5)
        try:
            await conn.execute(f"DROP TRIGGER IF EXISTS {self.TABLE}_log ON exchange_rates")
        finally:
            await conn.close()


# ---------------------------------------------------------------- faults


class Fault:
    """No fault: the cluster uses ``redis_url`` as given. Subclasses start their own redis-server (and proxies)."""

    name: ClassVar[str] = "none"
    own_redis: ClassVar[bool] = False
    writers: ClassVar[int] = 1  # writes per burst, each through another instance

    def __init__(self, workdir: Path, redis_url: str, *, own_redis: bool | None = None) -> None:
        if own_redis is not None:
            self.own_redis = own_redis  # type: ignore[misc]  # e.g. no fault, on a redis-server of its own
        self.workdir = workdir
        self.redis_url = redis_url  # the Redis the scan reads (and the instances use unless proxied)
        self.server: RedisServer | None = None
        self.cluster: Cluster | None = None
        self.events: list[dict[str, Any]] = []
        self.failures: list[str] = []

    async def start(self) -> None:
        if self.own_redis:
            self.server = await RedisServer(self.workdir / f"redis-{self.name}-{secrets.token_hex(3)}").start()
            self.redis_url = self.server.url

    def instance_env(self, n: int) -> list[dict[str, str]]:
        return [{} for _ in range(n)]

    async def run(self, checker: Checker) -> None:
        """The fault schedule, run alongside the load (times on the checker's clock)."""

    async def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def note(self, checker: Checker, what: str, **extra: Any) -> None:
        self.events.append({"at_s": round(checker.now(), 3), "what": what, **extra})
        checker.log(f"fault {self.name}: {what} at {checker.now():.2f} s {extra or ''}")

    def summary(self, checker: Checker) -> dict[str, Any]:
        return {"name": self.name, "events": self.events, "failures": self.failures}

    @staticmethod
    async def until(checker: Checker, t: float) -> None:
        delay = t - checker.now()
        if delay > 0:
            await asyncio.sleep(delay)  # the fault schedule


class SnapshotRestart(Fault):
    """BGSAVE, writes, then kill -9 and restart from the snapshot (twice): values restored from the snapshot must be
    fenced by the incarnation check, so no read is stale beyond B and no restored value is servable."""

    name = "snapshot-restart"
    own_redis = True
    restored: list[dict[str, Any]]

    async def start(self) -> None:
        self.restored = []
        await super().start()

    after_snapshot = 3.0  # seconds of writes between the snapshot and the crash (at most a tenth of the load)

    async def run(self, checker: Checker) -> None:
        assert self.server is not None
        for frac in (0.25, 0.6):
            await self.until(checker, checker.duration * frac)
            client = aioredis.Redis.from_url(self.server.url, socket_timeout=5)
            try:
                before = int((await client.info("persistence")).get("rdb_changes_since_last_save", 0))
                await client.bgsave()
                while True:
                    info = await client.info("persistence")
                    if not int(info.get("rdb_bgsave_in_progress", 0)):
                        break
                    await asyncio.sleep(0.02)  # polling a background save
                status = info.get("rdb_last_bgsave_status")
            finally:
                await client.aclose()
            self.note(checker, "BGSAVE done", status=status, changes_saved=before)
            writes_before = checker.acked_writes()
            # writes go on: the snapshot now holds superseded values
            await asyncio.sleep(min(self.after_snapshot, checker.duration / 10))
            self.server.kill9()
            self.note(checker, "redis kill -9", acked_writes_since_snapshot=checker.acked_writes() - writes_before)
            await self.server.start()
            checker.restart_noticed.append(checker.now())
            self.note(checker, "redis restarted from the snapshot (answers PING)")
            scan = await checker._scan()  # what the snapshot brought back, before the instances replace it
            if scan is not None and "error" not in scan:
                self.restored.append(scan)
                self.note(
                    checker,
                    "restored from the snapshot",
                    values=scan["values"],
                    fenced_by_incarnation=scan["fenced_incarnation"],
                    of_them_superseded=scan["fenced_superseded"],
                    servable=scan["servable"],
                    stale_fills=len(scan["stale_fills"]),
                )

    def summary(self, checker: Checker) -> dict[str, Any]:
        if self.restored and not any(sc["fenced_superseded"] for sc in self.restored):
            self.note(checker, "note: no superseded value was restored from a snapshot (nothing was tested)")
        return {
            **super().summary(checker),
            "restored_stale_fills": sum(len(sc["stale_fills"]) for sc in self.restored),
        }


class WriterCut(Fault):
    """The writing instance (0) reaches Redis through a TCP proxy that is cut (connections closed, new ones
    refused): its writes must answer 503, never 2xx; then it is SIGKILLed and the writes move to instance 1."""

    name = "writer-cut"
    own_redis = True
    cut_for = 4.0  # at most 15 % of the load

    def __init__(self, workdir: Path, redis_url: str, *, own_redis: bool | None = None) -> None:
        super().__init__(workdir, redis_url, own_redis=own_redis)
        self.proxy: TcpProxy | None = None
        self.cut_at: float | None = None
        self.killed_at: float | None = None

    async def start(self) -> None:
        await super().start()
        assert self.server is not None
        self.proxy = await TcpProxy("127.0.0.1", self.server.port).start()

    def instance_env(self, n: int) -> list[dict[str, str]]:
        assert self.proxy is not None
        return [{"REDIS_URL": f"redis://127.0.0.1:{self.proxy.port}/0"}] + [{} for _ in range(n - 1)]

    async def run(self, checker: Checker) -> None:
        assert self.proxy is not None and self.cluster is not None
        await self.until(checker, checker.duration / 3)
        await self.proxy.down()
        self.cut_at = checker.now()
        self.note(checker, "writer 0 cut from redis (proxy down)")
        # writes go on through the cut writer: each must answer 503
        await asyncio.sleep(min(self.cut_for, checker.duration * 0.15))
        self.killed_at = checker.now()
        checker.down.add(0)
        checker.writer = 1
        code = await self.cluster.kill9(0)
        self.note(checker, "writer 0 SIGKILLed; writes now through instance 1", exit_code=code)

    async def stop(self) -> None:
        if self.proxy is not None:
            await self.proxy.close()
        await super().stop()

    def summary(self, checker: Checker) -> dict[str, Any]:
        cut = [
            w
            for w in checker.writes
            if w.via == 0 and self.cut_at is not None and w.sent >= self.cut_at
            and (self.killed_at is None or w.sent < self.killed_at)
        ]  # fmt: skip
        ok = [w for w in cut if w.status.startswith("2")]
        refused = [w for w in cut if w.status == "503 refused"]
        if not cut:
            self.failures.append("no write was sent while the writer was cut")
        if ok:
            self.failures.append(f"{len(ok)} write(s) answered 2xx while the writer was cut")
        return {
            **super().summary(checker),
            "writes_while_cut": len(cut),
            "refused_503_while_cut": len(refused),
            "ok_2xx_while_cut": len(ok),
            "status_while_cut": dict(Counter(w.status for w in cut)),
        }


class SilentSubscriber(Fault):
    """The last instance's Redis connections go through a proxy that black-holes (stops forwarding, keeps the
    sockets open) for ``silent_for`` seconds, twice: it must stop serving from L1 within B."""

    name = "silent-subscriber"
    own_redis = True
    silent_for = 5.0  # at most 15 % of the load, each time

    def __init__(self, workdir: Path, redis_url: str, *, own_redis: bool | None = None) -> None:
        super().__init__(workdir, redis_url, own_redis=own_redis)
        self.proxy: TcpProxy | None = None
        self.windows: list[tuple[float, float]] = []

    async def start(self) -> None:
        await super().start()
        assert self.server is not None
        self.proxy = await TcpProxy("127.0.0.1", self.server.port).start()

    def instance_env(self, n: int) -> list[dict[str, str]]:
        assert self.proxy is not None
        return [{} for _ in range(n - 1)] + [{"REDIS_URL": f"redis://127.0.0.1:{self.proxy.port}/0"}]

    async def run(self, checker: Checker) -> None:
        assert self.proxy is not None
        for frac in (0.25, 0.6):
            await self.until(checker, checker.duration * frac)
            self.proxy.blackhole()
            start = checker.now()
            self.note(checker, f"instance {len(checker.urls) - 1}'s redis connections black-holed")
            await asyncio.sleep(min(self.silent_for, checker.duration * 0.15))
            self.proxy.resume()
            self.windows.append((start, checker.now()))
            self.note(checker, "forwarding again")

    async def stop(self) -> None:
        if self.proxy is not None:
            await self.proxy.close()
        await super().stop()

    def summary(self, checker: Checker) -> dict[str, Any]:
        inst = len(checker.urls) - 1
        during = [r for r in checker.reads if r.instance == inst and any(a <= r.sent < b for a, b in self.windows)]
        return {
            **super().summary(checker),
            "silent_instance": checker.urls[inst],
            "reads_on_it_while_silent": len(during),
            "status_while_silent": dict(Counter(r.status for r in during)),
            "x_cache_while_silent": dict(Counter(r.xcache or "-" for r in during)),
        }


class ConcurrentWrites(Fault):
    """Every write is a burst of one PUT per instance to the same pair, all in flight at once; reads are judged
    against the order Postgres committed them (:class:`CommitLog`)."""

    name = "concurrent-writes"
    own_redis = True
    writers = 3


FAULTS: dict[str, type[Fault]] = {
    f.name: f for f in (Fault, SnapshotRestart, WriterCut, SilentSubscriber, ConcurrentWrites)
}


@contextlib.asynccontextmanager
async def started(fault: Fault) -> Any:
    try:
        await fault.start()
        yield fault
    finally:
        await fault.stop()
