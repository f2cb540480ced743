"""A deterministic simulation of the coherence protocol, checked on thousands of random schedules.

Like FusionCache's simulator, but driving our real code: three instances, each with the real :class:`RatesActor`
(read-through, single flight, conversions derived from the rate), the real :class:`Coherence` engine (bus session,
pings and the L1 trust lease, write fences, the outbox sweep) and the real :class:`L1`, over the in-memory shared tier
of tests/fakes.py (the semantics of the Lua scripts; the store contract suite keeps the two equal) and an in-memory
Postgres with an outbox. Every schedule runs on an event loop with a **virtual clock** (a wait advances time instead
of sleeping), so a run of several virtual seconds takes milliseconds and a seed reproduces its schedule exactly.

Each schedule draws: delivery latency with spikes, origin and commit delays (reads that finish before a commit but
answer after it, now and then hundreds of milliseconds late; writes that commit at any point inside their fence),
concurrent writes from every instance, and
faults — a subscriber killed, a connection gone silent (no error), a message lost (and then the connection closed,
as Redis does), one instance partitioned from Redis, Redis restarted empty or from an older snapshot, a commit
whose writer timed out and that lands later. Then it checks the contract of tiers/coherence:

* **G1** a read that starts more than ``B`` after a write was acknowledged returns that write's value or a newer
  one — rates and the conversions derived from them;
* **G2** a commit nobody acknowledged (a client time-out, ``invalidation-pending``) is seen everywhere within
  ``outbox_sweep + outbox_grace + B`` of the commit;
* **G3** when the run is quiet, nothing Redis would serve is older than the database (no stale fill);
* **G4** no spurious flush: a sequence gap is seen only where a message was really lost.

``AFRAMP_SIM_SCHEDULES`` (default 2000) sets how many seeds CI runs; ``AFRAMP_SIM_SEED=n`` replays one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import selectors
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest

from actors.messages import Source
from actors.rates import RatesActor
from actors.read_through import Policy
from actors.stats import Stats
from tests.fakes import FakeRedis, FakeStore, _State
from tiers import codec, keys
from tiers.coherence import Coherence, CoherenceConfig, InvalidationPending, WriteUnavailable
from tiers.errors import OriginTimeout
from tiers.keys import CacheKey, DataType
from tiers.l1 import L1

B = 0.1
SLACK = 0.005  # scheduling granularity of the virtual loop (a timer fires within it)
PAIR = ("AAA", "BBB")
AMOUNTS = ("1", "2.5", "10")


# ------------------------------------------------------------------ a virtual-time event loop
class _VirtualSelector(selectors.SelectSelector):
    """Waits nothing: a wait of ``timeout`` seconds moves the clock on by that much (no file descriptor is used).
    Every turn of the loop also costs a microsecond, as it does on a real machine (a loop polling with a wait that
    rounds to nothing must not spin at a frozen time)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise RuntimeError("simulation deadlock: every task waits and no timer is set")
        self.now += max(1e-6, timeout)
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._vsel = _VirtualSelector()
        super().__init__(self._vsel)

    def time(self) -> float:
        return self._vsel.now


# ------------------------------------------------------------------ the origin: Postgres in memory, with an outbox
class Db:
    """Rates whose value is the id of the write that made it; ``order`` is the commit order of those ids."""

    def __init__(self, rng: random.Random, loop: asyncio.AbstractEventLoop) -> None:
        self.rng = rng
        self.loop = loop
        self.value = 0
        self.order: dict[int, int] = {0: 0}  # write id -> position in commit order
        self.committed_at: dict[int, float] = {0: 0.0}
        self.rows: dict[int, tuple[list[str], float]] = {}  # outbox
        self._row = 0
        self.late: set[int] = set()  # write ids whose client gives up before the commit lands
        self.tasks: list[asyncio.Task[None]] = []

    async def _delay(self, top: float = 0.004) -> None:
        await asyncio.sleep(self.rng.uniform(0, top))  # the query in flight: a point of interleaving

    async def get_rate(self, base: str, quote: str) -> dict[str, Any] | None:
        await self._delay()
        value = self.value  # the snapshot the query reads
        # ... and the answer travelling back, perhaps past a commit; now and then slowly (a lock wait, a busy server)
        await self._delay(0.4 if self.rng.random() < 0.05 else 0.004)
        return {"base": base, "quote": quote, "rate": str(value), "source": "sim", "updated_at": "-"}

    async def list_pairs(self, limit: int) -> list[tuple[str, str]]:
        return [PAIR]

    def _commit(self, w: int, outbox: Sequence[str]) -> int:
        self.value = w
        self.order[w] = len(self.order)
        self.committed_at[w] = self.loop.time()
        self._row += 1
        self.rows[self._row] = (list(outbox), self.loop.time())
        return self._row

    async def upsert_rate(
        self, base: str, quote: str, rate: Decimal, source: str, *, outbox: Sequence[str] = ()
    ) -> tuple[dict[str, Any], int | None]:
        w = int(rate)
        await self._delay(0.3 if self.rng.random() < 0.1 else 0.01)  # the commit lands somewhere inside the fence
        if w in self.late:  # the client times out; the statement commits a little later all the same

            async def land() -> None:
                await asyncio.sleep(self.rng.uniform(0.001, 0.3))
                self._commit(w, outbox)

            self.tasks.append(asyncio.create_task(land()))
            raise OriginTimeout("postgres", "simulated client timeout")
        row = self._commit(w, outbox)
        await self._delay()  # the answer travelling back
        return {"base": base, "quote": quote, "rate": str(w)}, row

    async def delete_rate(self, base: str, quote: str, *, outbox: Sequence[str] = ()) -> tuple[bool, int | None]:
        raise NotImplementedError

    # the Outbox protocol (tiers.coherence.engine.Outbox)
    async def settle(self, ids: Sequence[int]) -> None:
        for i in ids:
            self.rows.pop(i, None)

    async def sweep(self, grace: float, apply: Callable[[list[str]], Any]) -> int:
        now = self.loop.time()
        due = [(i, k) for i, (k, at) in self.rows.items() if now - at >= grace]
        if due:
            await apply(sorted({key for _, k in due for key in k}))  # a failure keeps the rows
            for i, _ in due:
                self.rows.pop(i, None)
        return len(due)


# ------------------------------------------------------------------ one schedule
@dataclass
class Read:
    instance: int
    key: str
    start: float
    end: float
    value: int


@dataclass
class Schedule:
    seed: int
    faults: list[str] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    acks: list[tuple[int, float, int]] = field(default_factory=list)  # (write id, acknowledged at, instance)
    refused: int = 0
    unacknowledged: set[int] = field(default_factory=set)  # writes answered 5xx that may have committed
    drops: int = 0
    gaps: int = 0
    violations: list[str] = field(default_factory=list)


def _value(lookup_body: bytes) -> int:
    doc = codec.loads(lookup_body)
    assert isinstance(doc, dict)
    return int(Decimal(str(doc["rate"])))


class Instance:
    def __init__(self, n: int, server: FakeRedis, db: Db, rng: random.Random, loop: asyncio.AbstractEventLoop):
        self.n = n
        cfg = CoherenceConfig(channel="sim", instance_id=f"i{n}")
        self.l1 = L1(1000, 30, bound=cfg.lease, clock=loop.time)
        self.store = FakeStore(server, channel="sim")
        spike = rng.random() < 0.3

        def latency() -> float:
            d = rng.expovariate(1 / 0.001)
            return d + (rng.uniform(0.01, 0.08) if spike and rng.random() < 0.05 else 0.0)

        self.store.latency = latency
        self.co = Coherence(cfg, l1=self.l1, store=self.store, outbox=db, clock=loop.time)
        self.store.guard.subscribe(self.co.on_incarnation)
        ttl = dict.fromkeys(DataType, 60.0)
        policy = Policy(ttl=ttl, negative_ttl={}, max_stale={}, lease_wait=0.2)
        self.actor = RatesActor(origin=db, l1=self.l1, coherence=self.co, policy=policy, stats=Stats())
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.actor.start()
        self.tasks = [asyncio.create_task(self.co.run_bus()), asyncio.create_task(self.co.run_outbox())]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        await self.actor.stop()

    def kill_subscriptions(self) -> None:
        for sub in list(self.store.server.subscriptions):
            if sub.store is self.store:
                sub.kill()


def _read_key(rng: random.Random) -> CacheKey:
    if rng.random() < 0.4:
        return keys.rate(*PAIR)
    return keys.conversion(rng.choice(AMOUNTS), *PAIR)


async def run_schedule(seed: int, *, broken: str = "") -> Schedule:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    sch = Schedule(seed)
    server = FakeRedis(clock=loop.time)
    db = Db(rng, loop)
    insts = [Instance(n, server, db, rng, loop) for n in range(3)]
    if broken == "fill-guard":  # a deliberately broken protocol: fills ignore the generations they were read under
        for i in insts:
            real = i.store.fill

            async def unguarded(key: str, sources: Sequence[str], gens: str, *a: Any, _f: Any = real, **k: Any) -> Any:
                return await _f(key, sources, server.gens(sources), *a, **k)

            i.store.fill = unguarded  # type: ignore[method-assign]
    for i in insts:
        await i.start()
    await asyncio.wait_for(asyncio.gather(*(i.co.connected.wait() for i in insts)), 5)
    if broken == "no-lease":  # a deliberately broken protocol: L1 trusted for ever, whatever the bus says
        for i in insts:
            i.l1.trusted_until = float("inf")

    horizon = rng.uniform(0.6, 1.5)  # virtual seconds of traffic
    n_writes = rng.randint(3, 10)
    n_reads = rng.randint(40, 90)
    late = rng.random() < 0.15
    if late:
        db.late.add(rng.randint(1, n_writes))
        sch.faults.append("late-commit")
    snapshot: list[_State] = []
    events: list[tuple[float, Callable[[], None]]] = []
    at = lambda lo, hi: rng.uniform(lo, hi) * horizon  # noqa: E731

    for fault in ("kill", "stall", "drop", "partition", "calls-fail", "restart", "restore"):
        if rng.random() >= 0.2:
            continue
        sch.faults.append(fault)
        victim = rng.choice(insts)
        if fault == "kill":
            events.append((at(0, 1), victim.kill_subscriptions))
        elif fault == "stall":
            t0, length = at(0, 0.8), rng.uniform(0.05, 1.5)

            def stall(v: Instance = victim, length: float = length) -> None:
                subs = [s for s in server.subscriptions if s.store is v.store]
                for s in subs:
                    s.stall()
                loop.call_later(length, lambda: [s.resume() for s in subs])

            events.append((t0, stall))
        elif fault == "drop":
            t0 = at(0, 0.8)

            def arm(v: Instance = victim) -> None:
                armed = [True]

                def drop(_m: object) -> bool:
                    if not armed[0]:
                        return False
                    armed[0] = False
                    sch.drops += 1
                    # Redis loses a message to a subscriber only by closing its connection
                    loop.call_later(rng.uniform(0.0, 0.05), v.kill_subscriptions)
                    return True

                v.store.drop = drop

            events.append((t0, arm))
        elif fault == "partition":
            t0, length = at(0, 0.8), rng.uniform(0.02, 1.5)

            def cut(v: Instance = victim, length: float = length) -> None:
                v.store.cut = True

                def heal() -> None:
                    v.store.cut = False
                    for s in server.subscriptions:
                        if s.store is v.store:
                            s.resume()

                loop.call_later(length, heal)

            events.append((t0, cut))
        elif fault == "calls-fail":  # its requests to Redis fail (breaker open, pool exhausted); its bus still hears
            t0, length = at(0, 0.8), rng.uniform(0.05, 1.0)

            def fail(v: Instance = victim, length: float = length) -> None:
                v.store.calls_fail = True
                loop.call_later(length, lambda: setattr(v.store, "calls_fail", False))

            events.append((t0, fail))
        elif fault == "restart":
            events.append((at(0, 1), lambda: server.restart()))
        elif fault == "restore":
            events.append((at(0, 0.4), lambda: snapshot.append(server.snapshot())))
            events.append((at(0.5, 1), lambda: server.restart(snapshot[-1] if snapshot else None)))

    for when, fn in events:
        loop.call_later(when, fn)

    async def writer(w: int) -> None:
        await asyncio.sleep(rng.uniform(0, horizon))
        inst = rng.choice(insts)
        try:
            await inst.actor.put(*PAIR, Decimal(w), "sim")
        except WriteUnavailable:
            sch.refused += 1
            return
        except (OriginTimeout, InvalidationPending):  # no 2xx: the outbox owes every instance this write (G2)
            sch.unacknowledged.add(w)
            return
        sch.acks.append((w, loop.time(), inst.n))

    async def reader() -> None:
        await asyncio.sleep(rng.uniform(0, horizon + 0.3))
        inst = rng.choice(insts)
        key = _read_key(rng)
        start = loop.time()
        lookup = await inst.actor.get(key)
        assert lookup.source is not Source.STALE
        sch.reads.append(Read(inst.n, key.rendered, start, loop.time(), _value(lookup.body)))

    await asyncio.gather(*(writer(w) for w in range(1, n_writes + 1)), *(reader() for _ in range(n_reads)))
    # quiet: faults over, the outbox swept, every subscriber back; then every instance reads every key once more
    await asyncio.sleep(2.0 + insts[0].co.config.outbox_sweep + insts[0].co.config.outbox_grace)
    for t in db.tasks:
        await t
    for inst in insts:
        for key in [keys.rate(*PAIR), *(keys.conversion(a, *PAIR) for a in AMOUNTS)]:
            start = loop.time()
            lookup = await inst.actor.get(key)
            sch.reads.append(Read(inst.n, key.rendered, start, loop.time(), _value(lookup.body)))
    sch.gaps = sum(i.co.seq_gaps for i in insts)
    _check(sch, db, server, insts)
    for inst in insts:
        await inst.stop()
    return sch


def _check(sch: Schedule, db: Db, server: FakeRedis, insts: list[Instance]) -> None:
    cfg = insts[0].co.config
    order = db.order
    for r in sch.reads:
        if r.value not in order:
            sch.violations.append(f"G1 read of a value never committed: {r}")
            continue
        for w, acked, by in sch.acks:  # G1
            if order[r.value] < order[w] and r.start > acked + B + SLACK:
                sch.violations.append(
                    f"G1 {r.key} on i{r.instance} at {r.start:.4f} got write {r.value}, but write {w} (through "
                    f"i{by}) was acknowledged at {acked:.4f}"
                )
        for w in sch.unacknowledged:  # G2
            if w not in db.committed_at:
                continue
            due = db.committed_at[w] + cfg.outbox_sweep + cfg.outbox_grace + B + SLACK
            if order[r.value] < order[w] and r.start > due:
                sch.violations.append(f"G2 {r.key} on i{r.instance} at {r.start:.4f} predates unanswered commit {w}")
    # G3: what Redis would serve now is the database's current value
    for key in [keys.rate(*PAIR), *(keys.conversion(a, *PAIR) for a in AMOUNTS)]:
        sources = tuple(d.rendered for d in keys.deps_of(key)) or (key.rendered,)
        raw = server.value(key.rendered)
        got = codec.unpack(raw) if raw is not None else None
        if got is None or got.incarnation != server.incarnation:
            continue  # absent, or of another incarnation: never served
        if sources != (key.rendered,) and got.gens != server.gens(sources):
            continue  # dead with its source's generation: never served
        if _value(got.body) != db.value:
            sch.violations.append(f"G3 Redis would serve {key.rendered} = write {_value(got.body)}; db has {db.value}")
    if sch.gaps and not sch.drops:  # G4
        sch.violations.append(f"G4 {sch.gaps} sequence gap(s) with no message lost")


@contextmanager
def _quiet() -> Iterator[None]:
    root = logging.getLogger()
    old = root.level
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        root.setLevel(old)


def simulate(seeds: Sequence[int], *, broken: str = "") -> list[Schedule]:
    out = []
    with _quiet():
        for seed in seeds:
            loop = VirtualLoop()
            try:  # a schedule that cannot finish in 120 virtual seconds is a failure (a hang), not a CI time-out
                out.append(loop.run_until_complete(asyncio.wait_for(run_schedule(seed, broken=broken), 120)))
            finally:
                loop.close()
    return out


def _seeds() -> list[int]:
    one = os.environ.get("AFRAMP_SIM_SEED")
    if one:
        return [int(one)]
    return list(range(int(os.environ.get("AFRAMP_SIM_SCHEDULES", "2000"))))


def test_the_protocol_holds_on_thousands_of_random_schedules() -> None:
    runs = simulate(_seeds())
    bad = [s for s in runs if s.violations]
    faults = {f for s in runs for f in s.faults}
    reads = sum(len(s.reads) for s in runs)
    acks = sum(len(s.acks) for s in runs)
    print(f"\n{len(runs)} schedules, {reads} reads, {acks} acknowledged writes, faults drawn: {sorted(faults)}")
    assert not bad, "\n".join(f"seed {s.seed} ({', '.join(s.faults) or 'no fault'}): {s.violations[:3]}" for s in bad)
    if len(runs) >= 200:  # the draw covers every fault, and writes were refused and acknowledged
        assert faults == {"kill", "stall", "drop", "partition", "calls-fail", "restart", "restore", "late-commit"}
        assert acks > len(runs) and sum(s.refused for s in runs) > 0


@pytest.mark.parametrize("broken", ["fill-guard", "no-lease"])
def test_the_simulation_catches_a_broken_protocol(broken: str) -> None:
    """The checker can fail: with the fill guard or the L1 lease switched off, violations are found."""
    runs = simulate(range(300), broken=broken)
    assert any(s.violations for s in runs)
