"""The read-through actor every domain builds on.

* ``get`` reads L1 directly: a hit is a dictionary read and a clock read, no mailbox hop.
* A miss joins the load this actor already has in flight for the key (awaiting it, no Redis call), or makes the
  read's one Redis round trip itself (:meth:`ReadThrough.first`): a fresh value is installed and answered there.
* Otherwise it asks the actor (:class:`Load`): the actor keeps one load per key in flight (single-flight in this
  process) and runs it in an owned child task (:meth:`ReadThrough.load`). A reader that won the fleet lease while a
  load of the key was already waiting on another instance hands its lease to that load.
* A hit close to its expiry tells the actor to :class:`Refresh` the key in the background.

Coherence (which loads may fill, and when L1 may serve) is the coherence engine's (tiers.coherence); this actor only
decides who loads.
"""

from __future__ import annotations

import asyncio
import secrets

from opentelemetry.trace import Tracer

from actors.base import Actor, ActorStopped
from actors.messages import Answer, Landed, Load, Lookup, Refresh, Start
from actors.read_through import Policy, ReadThrough
from actors.stats import Stats
from actors.tracing import key_attributes, l1_span
from tiers.coherence import Coherence, Status
from tiers.errors import OriginError
from tiers.keys import CacheKey, Namespace, namespace_of
from tiers.l1 import L1


class _Flight:
    __slots__ = ("future", "joined", "key", "offer", "start")

    def __init__(self, key: CacheKey, start: Start) -> None:
        self.key = key
        self.start = start
        self.future: asyncio.Future[Landed] = asyncio.get_running_loop().create_future()
        self.future.add_done_callback(_consume)
        self.offer: Start | None = None  # a lease another local reader won (with its token), handed to this load
        self.joined = 0  # readers that joined it after it began

    def take_offer(self) -> Start | None:
        offer, self.offer = self.offer, None
        return offer

    @property
    def waiting(self) -> bool:
        return self.start.acquired is not None and self.start.acquired.status is Status.TAKEN


def _consume(fut: asyncio.Future[Landed]) -> None:
    """Mark a shared load's outcome as retrieved even if every asker went away."""
    if not fut.cancelled():
        fut.exception()


class CacheActor(Actor):
    """Subclasses set ``namespaces`` and implement ``origin(key)`` → body bytes (or an :class:`Answer`), or None
    when it does not exist."""

    namespaces: frozenset[Namespace] = frozenset()

    def __init__(
        self, *, l1: L1, coherence: Coherence, policy: Policy, stats: Stats, tracer: Tracer | None = None
    ) -> None:
        super().__init__()
        self.l1 = l1
        self.coherence = coherence
        self.policy = policy
        self.stats = stats
        self.tracer = tracer  # None unless spans are recorded: the L1-hit path then makes none
        self.read_through = ReadThrough(
            l1=l1, coherence=coherence, policy=policy, stats=stats, origin=self.origin, tracer=tracer
        )
        self._flights: dict[str, _Flight] = {}
        self._refreshing: set[str] = set()

    # ------------------------------------------------------------ hot path
    async def get(self, key: CacheKey) -> Lookup:
        rendered = key.rendered
        entry = self.l1.get(rendered)
        if entry is not None:  # the hot path: a dictionary read, a counter, the answer built at fill time
            self.stats.rows[key.data_type].l1_hits += 1
            if entry.refresh_at is not None and rendered not in self._refreshing:
                if self.l1.clock() >= entry.refresh_at:
                    self._refreshing.add(rendered)
                    self.tell(Refresh(key))
            if self.tracer is not None:
                l1_span(self.tracer, key, "hit")
            hit: Lookup = entry.hit
            return hit
        if self.tracer is None:
            return await self._miss(key)
        l1_span(self.tracer, key, "miss")
        with self.tracer.start_as_current_span("cache.load", attributes=key_attributes(key)) as span:
            lookup = await self._miss(key)
            span.set_attributes({"cache.source": lookup.source.value, "cache.negative": lookup.negative})
            return lookup

    async def _miss(self, key: CacheKey) -> Lookup:
        arrived = self.l1.clock()
        flight = self._flights.get(key.rendered)
        if flight is not None and self.l1.valid(flight.start.ticket):
            flight.joined += 1
            landed = await asyncio.shield(flight.future)  # joined: no Redis call, no mailbox hop
        else:
            started = await self._first(key)
            if isinstance(started, Lookup):
                return started
            landed = await self.ask(Load(key, started))
        if landed.lookup.vouched or arrived - landed.fetched <= self.coherence.config.join_window:
            return landed.lookup
        # This reader joined a load begun before it arrived, whose value nothing vouches for (read while a write was
        # fenced, so maybe before that write's commit; no message follows a commit): read again, alone.
        self.stats.inc(key.data_type, "rereads")
        return await self._alone(key)

    async def _alone(self, key: CacheKey) -> Lookup:
        started = await self._first(key)
        if isinstance(started, Lookup):
            return started
        return await self.read_through.load(key, started, lambda: None)

    async def _first(self, key: CacheKey) -> Lookup | Start:
        """The miss' one Redis round trip, under a ticket taken before it: a fresh value, or how the load starts."""
        rt = self.read_through
        ticket = rt.ticket(key)
        token = secrets.token_hex(8)
        first = await rt.first(key, ticket, token)
        if isinstance(first, Lookup):
            return first
        return Start(ticket, token, first)

    async def warm(self, keys_: list[CacheKey], concurrency: int = 8) -> int:
        """Read ``keys_`` through the normal path (so warming is coherent and single-flight); returns how many
        answered. Failures are counted, not raised: warming is best effort."""
        slots = asyncio.Semaphore(concurrency)
        done = 0

        async def one(key: CacheKey) -> None:
            nonlocal done
            async with slots:
                try:
                    await self.get(key)
                    done += 1
                except (OriginError, ActorStopped):
                    pass

        await asyncio.gather(*(one(k) for k in keys_))
        return done

    # ------------------------------------------------------------ subclass API
    async def origin(self, key: CacheKey) -> bytes | Answer | None:
        raise NotImplementedError

    def owns(self, rendered: str) -> bool:
        ns = namespace_of(rendered)
        return ns is not None and ns in self.namespaces

    # ------------------------------------------------------------ mailbox
    def receive(self, msg: object) -> object:
        match msg:
            case Load(key, start):
                return self._on_load(key, start)
            case Refresh(key):
                self._on_refresh(key)
                return None
        raise TypeError(f"{self.name}: unexpected message {type(msg).__name__}")

    def _on_load(self, key: CacheKey, start: Start) -> asyncio.Future[Landed]:
        rendered = key.rendered
        flight = self._flights.get(rendered)
        if flight is not None and not flight.future.done() and self.l1.valid(flight.start.ticket):
            won = start.acquired is not None and start.acquired.status is Status.LEASE
            if won and flight.waiting and flight.offer is None:
                flight.offer = start  # the waiting load may go to the origin at once, under this lease
            elif won:
                self.spawn(self.coherence.release(key, start.token), name=f"{self.name}:release")
            flight.joined += 1
            return flight.future
        flight = _Flight(key, start)
        self._flights[rendered] = flight
        self.spawn(self._fly(flight), name=f"{self.name}:load")
        return flight.future

    async def _fly(self, flight: _Flight) -> None:
        try:
            lookup = await self.read_through.load(flight.key, flight.start, flight.take_offer)
        except asyncio.CancelledError:
            if not flight.future.done():
                flight.future.set_exception(ActorStopped(f"{self.name} stopped"))
            raise
        except Exception as err:  # the load's failure goes to every reader waiting on it
            if not flight.future.done():
                flight.future.set_exception(err)
        else:
            if not flight.future.done():
                flight.future.set_result(Landed(lookup, flight.start.ticket.fetched))
        finally:
            if self._flights.get(flight.key.rendered) is flight:
                del self._flights[flight.key.rendered]

    def _on_refresh(self, key: CacheKey) -> None:
        if key.rendered in self._flights:
            self._refreshing.discard(key.rendered)
            return
        self.spawn(self._refresh(key), name=f"{self.name}:refresh")

    async def _refresh(self, key: CacheKey) -> None:
        try:
            await self.read_through.refresh(key, secrets.token_hex(8))
        except OriginError:
            pass  # counted by the read-through; the entry lives on until its TTL
        finally:
            self._refreshing.discard(key.rendered)

    async def on_stopped(self) -> None:
        for flight in self._flights.values():
            if not flight.future.done():
                flight.future.set_exception(ActorStopped(f"{self.name} stopped"))
        self._flights.clear()
