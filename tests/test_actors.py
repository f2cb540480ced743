"""The actor base and the read-through actor, with a fake origin of our own (no library is mocked)."""

from __future__ import annotations

import asyncio

import pytest

from actors.base import Actor, ActorStopped
from actors.cache_actor import CacheActor, Invalidate, Policy, Source
from actors.stats import Stats
from tests.conftest import eventually
from tiers.errors import OriginUnavailable
from tiers.keys import DataType, Namespace, rate
from tiers.l1 import L1


class Echo(Actor):
    name = "echo"

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    def receive(self, msg):
        if msg == "boom":
            raise ValueError("boom")
        if msg == "slow":
            return self.spawn(self._slow())
        return msg * 2

    async def _slow(self):
        await self.release.wait()
        return "done"


async def test_ask_replies_and_failures_go_back_to_the_asker():
    a = Echo()
    await a.start()
    assert await a.ask(21) == 42
    with pytest.raises(ValueError, match="boom"):
        await a.ask("boom")
    assert await a.ask(1) == 2  # the actor survived the failure
    await a.stop()


async def test_stop_fails_pending_asks_and_cancels_children():
    a = Echo()
    await a.start()
    pending = asyncio.create_task(a.ask("slow"))

    async def child_running() -> bool:  # the ask reached the mailbox and its work was spawned
        return bool(a._children)

    await eventually(child_running, timeout=2)
    await a.stop()
    with pytest.raises((ActorStopped, asyncio.CancelledError)):
        await pending
    with pytest.raises(ActorStopped):
        await a.ask(1)


class Gate:
    """An origin that blocks each load until the test releases it, and counts loads."""

    def __init__(self) -> None:
        self.loads = 0
        self.value = b'{"v":1}'
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.fail = False


class Fake(CacheActor):
    name = "fake"
    namespaces = frozenset({Namespace.RATE})

    def __init__(self, gate: Gate, **kw):
        super().__init__(**kw)
        self.gate = gate

    async def origin(self, key):
        self.gate.loads += 1
        value = self.gate.value
        self.gate.started.set()
        await self.gate.gate.wait()
        if self.gate.fail:
            raise OriginUnavailable("fake", "down")
        return value


def policy() -> Policy:
    ttl = {dt: 60.0 for dt in DataType}
    return Policy(ttl=ttl, negative_ttl={}, max_stale={})


@pytest.fixture
async def fake():
    gate = Gate()
    actor = Fake(gate, l1=L1(100, 30), l2=None, policy=policy(), stats=Stats())
    await actor.start()
    yield actor, gate
    await actor.stop()


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
    assert hit.source is Source.L1 and hit.body == b'{"v":1}'


async def test_invalidation_during_load_voids_the_fill_token(fake):
    """The in-process fill race, forced deterministically."""
    actor, gate = fake
    key = rate("A", "B")
    first = asyncio.create_task(actor.get(key))
    await gate.started.wait()  # the load has read v1 and is blocked
    dropped = await actor.ask(Invalidate((key.render(),), ()))  # a write lands meanwhile
    assert dropped == 0
    gate.value = b'{"v":2}'
    gate.started.clear()
    gate.gate.set()
    answered = await first
    assert answered.body == b'{"v":1}'  # the waiting request may get the loaded value ...
    assert actor.l1.get(key.render()) is None  # ... but it is never installed
    assert actor.stats.get(DataType.EXCHANGE_RATE, "fills_rejected") == 1
    again = await actor.get(key)  # the next request loads afresh
    assert again.source is Source.MISS and again.body == b'{"v":2}'
    assert gate.loads == 2


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


async def test_l1_bounded_per_entry_ttl_and_cap():
    now = [0.0]
    l1 = L1(3, max_ttl=10, timer=lambda: now[0])
    from tiers.l1 import Entry

    l1.put("a", Entry(b"1", 0, 5))
    l1.put("b", Entry(b"1", 0, 60))  # capped to 10
    now[0] = 6
    assert l1.get("a") is None and l1.get("b") is not None
    now[0] = 11
    assert l1.get("b") is None
    for k in "cdefg":
        l1.put(k, Entry(b"1", 0, 5))
        assert len(l1) <= 3
    l1.set_mode("off")
    assert len(l1) == 0 and l1.get("g") is None and not l1.put("x", Entry(b"1", 0, 5))
    l1.set_mode("normal")
    assert l1.put("x", Entry(b"1", 0, 5)) and l1.get("x") is not None
