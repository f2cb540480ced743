"""The actor base, the read-through actor and L1's tickets, on fakes of our own (no library is mocked).

Fast and deterministic: an in-memory shared tier (tests/fakes.py) stands in for Redis; a gated origin decides when
a load returns.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from actors.base import Actor, ActorStopped, Ask
from actors.cache_actor import CacheActor
from actors.messages import Answer, Source, Start
from actors.read_through import Policy
from actors.stats import Stats
from tests.conftest import eventually
from tests.fakes import FakeRedis, FakeStore
from tiers import codec, keys
from tiers.coherence import Coherence, CoherenceConfig, Status
from tiers.errors import OriginUnavailable
from tiers.keys import CacheKey, DataType, Namespace, rate
from tiers.l1 import L1, Entry


@dataclass(frozen=True)
class Double(Ask[int]):
    n: int


@dataclass(frozen=True)
class Boom(Ask[None]):
    pass


@dataclass(frozen=True)
class Slow(Ask[str]):
    pass


class Echo(Actor):
    name = "echo"

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    def receive(self, msg: object) -> object:
        match msg:
            case Boom():
                raise ValueError("boom")
            case Slow():
                return self.spawn(self._slow())
            case Double(n):
                return n * 2
        raise TypeError(msg)

    async def _slow(self) -> str:
        await self.release.wait()
        return "done"


async def test_ask_replies_and_failures_go_back_to_the_asker():
    a = Echo()
    await a.start()
    assert await a.ask(Double(21)) == 42
    with pytest.raises(ValueError, match="boom"):
        await a.ask(Boom())
    assert await a.ask(Double(1)) == 2  # the actor survived the failure
    await a.stop()


async def test_stop_fails_pending_asks_and_cancels_children():
    a = Echo()
    await a.start()
    pending = asyncio.create_task(a.ask(Slow()))

    async def child_running() -> bool:  # the ask reached the mailbox and its work was spawned
        return bool(a._children)

    await eventually(child_running, timeout=2)
    await a.stop()
    with pytest.raises((ActorStopped, asyncio.CancelledError)):
        await pending
    with pytest.raises(ActorStopped):
        await a.ask(Double(1))


class Gate:
    """An origin that blocks each load until the test releases it, and counts loads."""

    def __init__(self) -> None:
        self.loads = 0
        self.value = b'{"rate":"1"}'
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.fail = False


class Fake(CacheActor):
    """Rates and conversions, like the real rates actor, from a gated origin."""

    name = "fake"
    namespaces = frozenset({Namespace.RATE, Namespace.CONVERSION})

    def __init__(self, gate: Gate, **kw):
        super().__init__(**kw)
        self.gate = gate

    async def origin(self, key: CacheKey):
        if key.namespace is Namespace.CONVERSION:
            r = await self.get(rate(*key.parts[1:]))
            return Answer(b'{"from":%s}' % r.body, source=r)
        self.gate.loads += 1
        value = self.gate.value
        self.gate.started.set()
        await self.gate.gate.wait()
        if self.gate.fail:
            raise OriginUnavailable("fake", "down")
        return value


def policy() -> Policy:
    ttl = {dt: 60.0 for dt in DataType}
    return Policy(ttl=ttl, negative_ttl={}, max_stale={}, lease_wait=0.2)


def instance(server: FakeRedis | None, gate: Gate, name: str = "i") -> Fake:
    l1 = L1(100, 30, bound=0.1)
    store = FakeStore(server, channel="fake:chan") if server is not None else None
    co = Coherence(CoherenceConfig(channel="fake:chan", instance_id=name), l1=l1, store=store)
    if store is not None:
        store.guard.subscribe(co.on_incarnation)
        l1.trusted_until = float("inf")  # these tests are about tickets and fills, not the bus lease
    return Fake(gate, l1=l1, coherence=co, policy=policy(), stats=Stats())


@pytest.fixture
async def fake():
    gate = Gate()
    actor = instance(None, gate)
    await actor.start()
    yield actor, gate
    await actor.stop()


@pytest.fixture
async def pair():
    """Two instances on one fake shared tier and one open origin, started, stopped after the test."""
    server = FakeRedis()
    gate = Gate()
    gate.gate.set()
    a, b = instance(server, gate, "a"), instance(server, gate, "b")
    for x in (a, b):
        await x.start()
    yield server, gate, a, b
    for x in (a, b):
        await x.stop()


async def test_single_flight_and_l1_hit_without_mailbox(fake):
    actor, gate = fake
    key = rate("A", "B")
    waiters = [asyncio.create_task(actor.get(key)) for _ in range(20)]
    await gate.started.wait()
    gate.gate.set()
    results = await asyncio.gather(*waiters)
    assert gate.loads == 1 and {r.source for r in results} == {Source.MISS}
    # an L1 hit is answered without the actor's loop: it works even with the loop stopped
    actor._task.cancel()
    hit = await actor.get(key)
    assert hit.source is Source.L1 and hit.body == b'{"rate":"1"}'


async def test_invalidation_during_load_voids_the_install_and_new_readers_do_not_join(fake):
    """The in-process fill race, forced deterministically."""
    actor, gate = fake
    key = rate("A", "B")
    first = asyncio.create_task(actor.get(key))
    await gate.started.wait()  # the load has read v1 and is blocked
    await actor.coherence.invalidate([key])  # a write lands meanwhile (no Redis: local and synchronous)
    gate.value = b'{"rate":"2"}'
    gate.started.clear()
    second = asyncio.create_task(actor.get(key))  # began after the write: must not join the overtaken load
    await asyncio.wait_for(gate.started.wait(), 2)  # a second load started (a joiner would wait forever)
    gate.gate.set()
    assert (await first).body == b'{"rate":"1"}'  # the reader that overlapped the write may get v1 ...
    assert (await second).body == b'{"rate":"2"}'  # ... one that began after it never does
    assert gate.loads == 2
    again = await actor.get(key)
    assert again.source is Source.L1 and again.body == b'{"rate":"2"}'  # v1 was never installed


async def test_invalidating_a_rate_makes_its_conversions_unservable_at_once(fake):
    actor, gate = fake
    gate.gate.set()
    conv = keys.conversion("10", "A", "B")
    assert (await actor.get(conv)).source is Source.MISS
    assert (await actor.get(conv)).source is Source.L1
    await actor.coherence.invalidate([rate("A", "B")])  # no index of conversions exists anywhere
    gate.value = b'{"rate":"2"}'
    after = await actor.get(conv)
    assert after.source is Source.MISS and after.body == b'{"from":{"rate":"2"}}'


async def test_origin_failure_goes_to_every_waiter_and_is_not_cached(fake):
    actor, gate = fake
    gate.fail = True
    gate.gate.set()
    key = rate("A", "B")
    results = await asyncio.gather(*(actor.get(key) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, OriginUnavailable) for r in results)
    assert gate.loads == 1
    gate.fail = False
    assert (await actor.get(key)).source is Source.MISS


async def test_two_instances_one_origin_load_and_a_stale_rate_copy_cannot_fill_a_conversion(pair):
    """Finding 1 on the fake shared tier: B's L1 still holds the old rate when A's write is acknowledged; B's
    conversion from it is answered (B has not heard of the write yet) but never reaches Redis."""
    _server, gate, a, b = pair
    r = rate("A", "B")
    assert (await a.get(r)).source is Source.MISS
    assert (await b.get(r)).source is Source.L2  # one origin load for the fleet
    assert gate.loads == 1
    async with a.coherence.write([r]):  # A's write: fenced, bumped, published (B's bus is not running)
        gate.value = b'{"rate":"2"}'
    conv = keys.conversion("10", "A", "B")
    stale = await b.get(conv)
    assert stale.body == b'{"from":{"rate":"1"}}'  # from B's L1 copy, within B's bus bound
    assert b.stats.get(DataType.EXCHANGE_RATE, "fills_rejected") == 1
    fresh = await a.get(conv)  # A reads Redis: nothing stale was filled
    assert fresh.source is Source.MISS and fresh.body == b'{"from":{"rate":"2"}}'


async def test_a_load_during_a_write_fence_neither_fills_nor_installs(pair):
    _server, gate, a, b = pair
    r = rate("A", "B")
    async with a.coherence.write([r]):  # between the fence and the commit ...
        during = await b.get(r)  # ... B reads the old row from the origin
        assert during.source is Source.MISS
        gate.value = b'{"rate":"2"}'  # the commit
    assert b.l1.get(r.rendered) is None  # not installed
    assert (await b.get(r)).body == b'{"rate":"2"}'


async def test_a_rate_read_during_a_write_fence_cannot_vouch_for_a_conversion(pair):
    """Found by the stale-fill scan: a rate read while its write is fenced may predate the commit; a conversion
    computed from it must not be filled after the fence is lifted."""
    server, gate, a, b = pair
    r, conv = rate("A", "B"), keys.conversion("10", "A", "B")
    entered, read_rate, computed, fill_conv = (asyncio.Event() for _ in range(4))
    real_origin = b.origin

    async def slow_conversion(key):  # B took the conversion's lease before the write began ...
        if key.namespace is Namespace.CONVERSION:
            entered.set()
            await read_rate.wait()  # ... reads the rate while the write is fenced ...
            answer = await real_origin(key)
            computed.set()
            await fill_conv.wait()  # ... and fills after the fence is lifted
            return answer
        return await real_origin(key)

    b.read_through.origin = slow_conversion
    reader = asyncio.create_task(b.get(conv))
    await entered.wait()
    async with a.coherence.write([r]):
        read_rate.set()
        await computed.wait()  # B's rate came from the origin before the commit
        gate.value = b'{"rate":"2"}'  # the commit
    fill_conv.set()
    assert (await reader).body == b'{"from":{"rate":"1"}}'
    assert await FakeStore(server).read(conv.rendered, (r.rendered,)) is None  # nothing servable was filled
    assert (await a.get(conv)).body == b'{"from":{"rate":"2"}}'


async def test_a_lease_handed_to_a_waiting_load_fills_under_the_offerers_token():
    """A load that began TAKEN (another holder) and is handed a local reader's lease fills under that reader's token:
    the fill of a never-loaded source needs the lease, so filling under the waiter's own token was refused and every
    peer waited out ``lease_wait`` and loaded again (bench/stampede: 3 loads for 3 instances)."""
    server = FakeRedis()
    gate = Gate()
    gate.gate.set()
    a = instance(server, gate, "a")
    await a.start()
    try:
        rt, key = a.read_through, rate("A", "B")
        server.state.leases[key.rendered] = ("elsewhere", server.clock() + 60)
        taken = await rt.acquire(key, "waiter")
        assert taken is not None and taken.status is Status.TAKEN
        del server.state.leases[key.rendered]  # the other holder gave up
        won = await rt.acquire(key, "offerer")
        assert won is not None and won.status is Status.LEASE
        offer = Start(rt.ticket(key), "offerer", won)
        lookup = await rt.load(key, Start(rt.ticket(key), "waiter", taken), lambda: offer)
        assert lookup.vouched and lookup.source is Source.MISS
        assert await FakeStore(server).read(key.rendered, (key.rendered,)) is not None  # peers will hit it
        assert key.rendered not in server.state.leases  # and the lease went with the fill
        assert gate.loads == 1
    finally:
        await a.stop()


@pytest.mark.parametrize("restore", [True, False])
async def test_a_fence_lost_mid_write_is_made_good_before_the_answer(restore, pair):
    """Found by the simulation (seed 123): Redis restarted (from an older snapshot, or empty) between a write's fence
    and its commit; a peer then loaded the row as it was before the commit and filled it, and nothing invalidated it
    again: every instance served the old rate until its TTL. The writer now sees that its fence did not hold and
    invalidates again before it answers."""
    server, gate, a, b = pair
    r = rate("A", "B")
    assert (await b.get(r)).body == b'{"rate":"1"}'
    before = server.snapshot()
    async with a.coherence.write([r]):
        server.restart(before if restore else None)  # the fence and the bump are gone
        during = await b.get(r)  # B reads the row before the commit and fills it: nothing fences it now
        assert during.body == b'{"rate":"1"}'
        gate.value = b'{"rate":"2"}'  # the commit
    assert a.coherence.fences_lost == 1
    assert await FakeStore(server).read(r.rendered, (r.rendered,)) is None  # the pre-commit fill is gone
    # (B's L1 hears of it through the bus, which these tests do not run; a reader elsewhere goes to Redis)
    c = instance(server, gate, "c")
    await c.start()
    assert (await c.get(r)).body == b'{"rate":"2"}'
    await c.stop()


async def test_a_load_that_could_not_ask_redis_lives_in_l1_no_longer_than_the_bound(pair):
    """Found by the extended checker (silent-subscriber, snapshot-restart) and then by the simulation: B's requests
    to Redis failed (breaker open) while its bus still heard A's fence message; B's next read went to the origin
    before A's commit and installed the old row in L1, where the renewed lease kept it for seconds."""
    _server, gate, a, b = pair
    r = rate("A", "B")
    assert (await b.get(r)).body == b'{"rate":"1"}'
    # B's request path cannot reach Redis (its breaker is open); its subscriber still can
    b.coherence.store.calls_fail = True  # type: ignore[union-attr]
    async with a.coherence.write([r]):
        b.coherence._apply((r.rendered,), (), sent=False)  # the bus delivers A's message to B
        during = await b.get(r)  # from the origin, before the commit: nothing tells B a write is fenced
        assert during.body == b'{"rate":"1"}'
        gate.value = b'{"rate":"2"}'  # the commit
        held = b.l1.get(r.rendered)
        # the copy lives no longer than L1's bound (not its 60 s TTL), counted from before its fetch
        assert held is None or held.ttl <= b.l1.bound
        assert b.l1.last_known(r.rendered) is None  # and stale-if-error can never revive it

    async def b_serves_the_write() -> bool:
        return (await b.get(r)).body == b'{"rate":"2"}'

    await eventually(b_serves_the_write, timeout=2)  # b's lease never lapses in this test: only the cap ends it


async def test_a_new_redis_incarnation_empties_l1_and_ignores_restored_values():
    server = FakeRedis()
    gate = Gate()
    gate.gate.set()
    a = instance(server, gate, "a")
    await a.start()
    try:
        r = rate("A", "B")
        await a.get(r)
        snap = server.snapshot()  # a snapshot with v1 in it
        async with a.coherence.write([r]):
            gate.value = b'{"rate":"2"}'
        server.restart(snap)  # kill -9 and restart from the snapshot: v1 is back in "Redis"
        got = await a.get(r)  # the first call reconnects: new incarnation, new L1 epoch
        assert got.source is Source.MISS and got.body == b'{"rate":"2"}'
        assert a.l1.epochs >= 1
    finally:
        await a.stop()


def test_l1_tickets_trust_lease_and_bounds():
    now = [0.0]
    l1 = L1(3, max_ttl=10, bound=0.1, clock=lambda: now[0])

    def put(key: str, ttl: float, deps: tuple[str, ...] = ()) -> bool:
        return l1.install(l1.ticket(key, deps), Entry(b"1", 0, ttl))

    l1.trusted_until = float("inf")
    assert put("a", 5) and put("b", 60)  # b capped to 10
    now[0] = 6
    assert l1.get("a") is None and l1.get("b") is not None
    now[0] = 11
    assert l1.get("b") is None
    for k in "cdefg":
        put(k, 5)
        assert len(l1) <= 3
    # a ticket taken before an invalidation of its key (or of a source) can no longer install
    t = l1.ticket("x")
    d = l1.ticket("conv", ("src",))
    l1.invalidate(["x", "src"])
    assert not l1.install(t, Entry(b"1", 0, 5)) and not l1.install(d, Entry(b"1", 0, 5))
    # a derived entry dies with its source
    assert put("conv", 5, ("src",)) and l1.get("conv") is not None
    l1.invalidate(["src"])
    assert l1.get("conv") is None
    # the lease lapses: only entries fetched within the bound are served
    assert put("y", 5)
    l1.trusted_until = now[0]
    assert l1.get("y") is not None  # fetched just now
    now[0] += 0.2
    assert l1.get("y") is None
    l1.trusted_until = now[0] + 1  # renewed in the same session: served again
    assert l1.get("y") is not None
    # last-known values (stale-if-error) obey the lease too: a missed invalidation must not come back as STALE
    l1.trusted_until = now[0] + 1
    assert put("z1", 5) and l1.last_known("z1") is not None
    l1.trusted_until = now[0]
    now[0] += 0.2
    assert l1.last_known("z1") is None
    # a derived entry is never served on the per-fetch bound (its source may be older than itself)
    assert put("d1", 5, ("s1",))
    assert l1.get("d1") is None
    # a new epoch empties L1 and voids tickets in flight
    t = l1.ticket("z")
    l1.new_epoch()
    assert len(l1) == 0 and not l1.install(t, Entry(b"1", 0, 5))


def test_l1_invalidation_memory_is_bounded_and_forgetting_is_conservative():
    l1 = L1(10, max_ttl=10, memory=4, trusted=True)
    t = l1.ticket("k0")
    l1.invalidate(["other"])  # after the ticket
    for i in range(10):
        l1.invalidate([f"k{i + 100}"])
    assert len(l1._invalidated) <= 4
    assert not l1.install(t, Entry(b"1", 0, 5))  # forgotten ticks count as "invalidated then"
    assert l1.install(l1.ticket("k0"), Entry(b"1", 0, 5))


def test_codec_carries_incarnation_and_generations():
    packed = codec.pack(b'{"a":1}', 5, 1, incarnation="abc123", gens="17,4")
    stored = codec.unpack(packed)
    assert stored is not None and (stored.incarnation, stored.gens, stored.body) == ("abc123", "17,4", b'{"a":1}')
    head, tail = codec.pack_parts(b"null", 5, 1, incarnation="i")
    assert codec.unpack(head + b"9" + tail).short
