"""Found by an adversarial review of the read path's cap on loads that could not ask Redis; deterministic, on the
simulation's virtual loop and fakes. An instance's requests to Redis fail (breaker open) while its bus is healthy,
and it loads a rate after a write's fence message but before its commit (a read that overlapped the write):

1. a conversion computed from that L1 rate at the end of the rate's capped life was capped from its *own* ticket,
   so it was served up to ~2L after the rate's fetch: past the write's ack + B. Now a value derived from a source
   nothing vouches for is never cached;
2. the same rate was kept as L1's last-known value, and stale-if-error served it (``STALE``) seconds after the write
   that replaced it was acknowledged. Now an unvouched value is never kept as last-known.
"""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from typing import Any

from actors.messages import Source
from actors.read_through import Policy
from tests.fakes import FakeRedis
from tests.test_simulation import PAIR, SLACK, B, Db, Instance, VirtualLoop, _value
from tiers import keys
from tiers.errors import OriginError
from tiers.keys import DataType


class ScriptedDb(Db):
    """Origin with fixed delays: reads answer at once, commits land ``commit_delay`` after the call."""

    commit_delay = 0.004
    failing = False

    async def get_rate(self, base: str, quote: str) -> dict[str, Any] | None:
        if self.failing:
            raise OriginError("postgres", "simulated outage")
        await asyncio.sleep(0.0005)
        return {"base": base, "quote": quote, "rate": str(self.value), "source": "sim", "updated_at": "-"}

    async def upsert_rate(self, base, quote, rate, source, *, outbox=()):  # type: ignore[no-untyped-def]
        await asyncio.sleep(self.commit_delay)
        row = self._commit(int(rate), outbox)
        return {"base": base, "quote": quote, "rate": str(int(rate))}, row


async def _setup(max_stale: float = 0.0) -> tuple[FakeRedis, ScriptedDb, list[Instance]]:
    loop = asyncio.get_running_loop()
    rng = random.Random(1)
    server = FakeRedis(clock=loop.time)
    db = ScriptedDb(rng, loop)
    insts = [Instance(n, server, db, rng, loop) for n in range(2)]
    for i in insts:
        i.store.latency = lambda: 0.0005
        if max_stale:
            i.actor.policy = i.actor.read_through.policy = Policy(
                ttl=dict.fromkeys(DataType, 60.0), negative_ttl={}, max_stale=dict.fromkeys(DataType, max_stale),
                lease_wait=0.2,
            )  # fmt: skip
        await i.start()
    await asyncio.wait_for(asyncio.gather(*(i.co.connected.wait() for i in insts)), 5)
    await asyncio.sleep(0.2)
    return server, db, insts


async def _conversion_scenario() -> tuple[float, float, int, int]:
    loop = asyncio.get_running_loop()
    _server, db, (writer, victim) = await _setup()
    victim.store.calls_fail = True  # its request path to Redis fails (breaker open); its subscriber is healthy
    t0 = loop.time()
    put = asyncio.create_task(writer.actor.put(*PAIR, Decimal(1), "sim"))  # fence + message at once
    await asyncio.sleep(0.002)  # the message has reached the victim
    rate = await victim.actor.get(keys.rate(*PAIR))  # ticket after the message, origin read before the commit
    await put
    acked = loop.time()
    assert db.value == 1 and _value(rate.body) == 0
    await asyncio.sleep(t0 + 0.070 - loop.time())  # still within the rate entry's L1 life (ticket + L)
    await victim.actor.get(keys.conversion("2.5", *PAIR))  # computed from the L1 rate; lives until now + L
    await asyncio.sleep(acked + B + SLACK + 0.02 - loop.time())
    start = loop.time()
    late = await victim.actor.get(keys.conversion("2.5", *PAIR))
    for i in (writer, victim):
        await i.stop()
    return acked, start, _value(late.body), db.value


async def _stale_scenario() -> tuple[float, float, Source, int, int]:
    loop = asyncio.get_running_loop()
    _server, db, (writer, victim) = await _setup(max_stale=600.0)
    victim.store.calls_fail = True
    put = asyncio.create_task(writer.actor.put(*PAIR, Decimal(1), "sim"))
    await asyncio.sleep(0.002)
    await victim.actor.get(keys.rate(*PAIR))  # the old value, kept as last-known
    await put
    acked = loop.time()
    await asyncio.sleep(2.0)  # long after the ack; the victim's bus lease is renewed all along
    db.failing = True  # a Postgres blip
    start = loop.time()
    try:
        got = await victim.actor.get(keys.rate(*PAIR))
    except OriginError:
        return acked, start, None, None, db.value  # nothing servable: a clear error, not a superseded value
    finally:
        for i in (writer, victim):
            await i.stop()
    return acked, start, got.source, _value(got.body), db.value


def _run(coro: Any) -> Any:
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, 60))
    finally:
        loop.close()


def test_a_conversion_from_an_unvouched_l1_rate_never_outlives_the_bound() -> None:
    acked, start, got, db_value = _run(_conversion_scenario())
    assert start > acked + B
    assert db_value == 1 and got == 1  # a read started more than B after the ack sees the write


def test_stale_if_error_never_revives_a_value_superseded_before_the_ack() -> None:
    acked, start, source, got, db_value = _run(_stale_scenario())
    assert start > acked + 1.0 and db_value == 1
    assert (source, got) != (Source.STALE, 0)  # the superseded rate is not served, stale or otherwise
    assert got in (None, 1)
