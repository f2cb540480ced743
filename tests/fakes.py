"""Fakes of our own Protocols (never of a library): an in-memory shared tier for the coherence protocol.

:class:`FakeRedis` is one "server" (values, generations, fences, leases, channel counters, subscribers) with the
semantics of the Lua scripts in tiers/coherence/redis_store.py; :class:`FakeStore` is one instance's view of it
(a :class:`tiers.coherence.store.Store`). The store contract suite (tests/test_store_contract.py) runs the same
tests against this fake and against real Redis, so the two cannot drift apart.

Faults the simulation drives: ``down`` (every call fails), ``restart`` (a new incarnation; empty, or restored from
a ``snapshot``), per-store ``cut`` (one instance partitioned from Redis: its calls fail, its subscription goes
silent and delivers what it held, in order, if the partition heals before the connection is given up — as TCP
does), per-store ``latency`` (delivery in order, late) and ``drop`` (a message that never reaches one subscriber:
Redis does that only when it closes the connection, e.g. at its output-buffer limit, so whoever sets ``drop`` also
kills that subscription soon after), per-subscription ``stall``/``resume`` (a connection that goes silent without
an error) and ``kill`` (it drops).
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tiers import codec
from tiers.codec import Stored
from tiers.coherence.redis_store import IncarnationGuard
from tiers.coherence.store import Acquired, Message, Pong, Status
from tiers.errors import CacheUnavailable


@dataclass
class _State:
    values: dict[str, tuple[bytes, float]] = field(default_factory=dict)  # key -> (value, expires at, s)
    pre: dict[str, tuple[bytes, float]] = field(default_factory=dict)  # S -> value a fenced write moved aside
    gens: dict[str, tuple[int, float]] = field(default_factory=dict)  # source -> (generation, expires at)
    fences: dict[str, dict[str, float]] = field(default_factory=dict)  # source -> token -> expires at
    leases: dict[str, tuple[str, float]] = field(default_factory=dict)  # key -> (token, expires at)
    seq: dict[str, int] = field(default_factory=dict)  # channel -> last sequence number


class FakeRedis:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock  # Redis' own clock (TIME), seconds
        self.state = _State()
        self.incarnation = "inc0001"
        self._restarts = 1
        self.down = False
        self.subscriptions: list[FakeSubscription] = []
        self.calls = 0

    # ---- faults
    def snapshot(self) -> _State:
        return copy.deepcopy(self.state)

    def restart(self, snapshot: _State | None = None) -> None:
        """A restart: a new run id; the data is lost, or restored from ``snapshot``; every connection drops."""
        self._restarts += 1
        self.incarnation = f"inc{self._restarts:04d}"
        self.state = copy.deepcopy(snapshot) if snapshot is not None else _State()
        for sub in list(self.subscriptions):
            sub.kill()

    # ---- helpers with the scripts' semantics
    def _now(self) -> float:
        return self.clock()

    def _live(self, table: dict[str, Any], key: str) -> Any:
        item = table.get(key)
        if item is None:
            return None
        if item[1] <= self._now():
            del table[key]
            return None
        return item

    def value(self, key: str) -> bytes | None:
        item = self._live(self.state.values, key)
        return item[0] if item is not None else None

    def gen(self, source: str) -> int:
        item = self._live(self.state.gens, source)
        return item[0] if item is not None else 0

    def gens(self, sources: Sequence[str]) -> str:
        return ",".join(str(self.gen(s)) for s in sources)

    def fenced(self, sources: Sequence[str]) -> bool:
        now = self._now()
        return any(exp > now for s in sources for exp in self.state.fences.get(s, {}).values())

    def bump(self, source: str, gen_px: int) -> int:
        new = max(self.gen(source) + 1, int(self._now() * 1_000_000))
        self.state.gens[source] = (new, self._now() + gen_px / 1000)
        return new

    def publish(self, channel: str, payload: bytes) -> int:
        seq = self.state.seq.get(channel, 0) + 1
        self.state.seq[channel] = seq
        for sub in list(self.subscriptions):
            if sub.channel == channel:
                sub.deliver(Message(seq, payload))
        return seq


class FakeStore:
    """One instance's connection to a :class:`FakeRedis` (a :class:`tiers.coherence.store.Store`)."""

    def __init__(self, server: FakeRedis, *, channel: str = "fake:chan", gen_ttl: float = 3600.0) -> None:
        self.server = server
        self.guard = IncarnationGuard()
        self.channel = channel
        self.gen_px = int(gen_ttl * 1000)
        self._connected_to = ""
        self.latency: Callable[[], float] = lambda: 0.0  # delivery delay of this instance's subscriptions
        self.drop: Callable[[Message], bool] = lambda _m: False  # True: this message never reaches this instance
        self.cut = False  # partitioned from Redis: calls fail, the subscription delivers nothing until it heals
        self.calls_fail = False  # only the request path fails (a full pool, an open breaker): the subscription lives

    @property
    def incarnation(self) -> str:
        return self.guard.incarnation

    def _call(self) -> FakeRedis:
        s = self.server
        if s.down or self.cut or self.calls_fail:
            raise CacheUnavailable("fake redis: down" if s.down else "fake redis: unreachable from this instance")
        s.calls += 1
        if self._connected_to != s.incarnation:  # a (re)connection: the handshake reads the run id
            self._connected_to = s.incarnation
            self.guard.observe(s.incarnation)
        return s

    def _valid(self, raw: bytes | None, gens: str | None) -> Stored | None:
        if raw is None:
            return None
        stored = codec.unpack(raw)
        if stored is None or stored.incarnation != self.guard.incarnation:
            return None
        if gens is not None and stored.gens != gens:
            return None
        return stored

    async def read(self, key: str, sources: Sequence[str]) -> Stored | None:
        s = self._call()
        raw = s.value(key)
        return self._valid(raw, None if tuple(sources) == (key,) else s.gens(sources))

    async def acquire(
        self,
        key: str,
        sources: Sequence[str],
        token: str,
        lease_ms: int,
        now_ms: int,
        *,
        refresh: bool = False,
    ) -> Acquired:
        incarnation = self.guard.incarnation  # the script's argument, taken before the call (re)connects
        s = self._call()
        cur = s.gens(sources)
        raw = s.value(key)
        keep = None
        if raw is not None:
            stored = codec.unpack(raw)
            if stored is not None and stored.incarnation == incarnation and stored.gens == cur:
                if not refresh and stored.fresh_until_ms > now_ms:
                    if incarnation and self.guard.incarnation != incarnation:
                        raise CacheUnavailable("fake redis: incarnation changed during the call")
                    return Acquired(Status.HIT, stored, cur, incarnation)
                keep = stored
        if s.fenced(sources):
            status = Status.FENCED
        elif s._live(s.state.leases, key) is None:
            s.state.leases[key] = (token, s._now() + lease_ms / 1000)
            status = Status.LEASE
        else:
            status = Status.TAKEN
        if incarnation and self.guard.incarnation != incarnation:
            raise CacheUnavailable("fake redis: incarnation changed during the call")
        return Acquired(status, keep, cur, incarnation)

    async def fill(
        self,
        key: str,
        sources: Sequence[str],
        gens: str,
        token: str,
        head: bytes,
        tail: bytes,
        px: int,
        *,
        gen_px: int,
    ) -> str | None:
        s = self._call()
        cur = s.gens(sources)
        if cur != gens or s.fenced(sources):
            return None
        now = s._now()
        keep = max(gen_px, px) / 1000
        if tuple(sources) == (key,):
            item = s._live(s.state.gens, key)
            if item is None:
                lease = s._live(s.state.leases, key)
                if lease is None or lease[0] != token:  # a cold fill needs the lease (a purge deletes it)
                    return None
                cur = str(int(now * 1_000_000))
                s.state.gens[key] = (int(cur), now + keep)
            elif item[1] < now + keep:
                s.state.gens[key] = (item[0], now + keep)
        elif "0" in cur.split(","):
            return None
        s.state.values[key] = (head + cur.encode() + tail, now + px / 1000)
        lease = s._live(s.state.leases, key)
        if lease is not None and lease[0] == token:
            del s.state.leases[key]
        return cur

    async def release(self, key: str, token: str) -> None:
        s = self._call()
        lease = s._live(s.state.leases, key)
        if lease is not None and lease[0] == token:
            del s.state.leases[key]

    async def invalidate(
        self, sources: Sequence[str], message: bytes, *, fence: str | None = None, fence_ms: int = 0
    ) -> int:
        s = self._call()
        now = s._now()
        for src in sources:
            if fence and fence_ms > 0:
                if s._live(s.state.values, src) is not None:
                    s.state.pre[src] = s.state.values[src]
            else:
                s.state.pre.pop(src, None)
            s.state.values.pop(src, None)
            s.state.leases.pop(src, None)
            s.bump(src, self.gen_px)
            if fence and fence_ms > 0:
                tokens = {t: e for t, e in s.state.fences.get(src, {}).items() if e > now}
                tokens[fence] = now + fence_ms / 1000
                s.state.fences[src] = tokens
        return s.publish(self.channel, message)

    async def unfence(self, sources: Sequence[str], token: str, *, committed: bool) -> int:
        s = self._call()
        held = 0
        for src in sources:
            exp = s.state.fences.get(src, {}).pop(token, None)
            held += exp is not None and exp > s._now()
            if committed:
                s.state.pre.pop(src, None)
                continue
            if s.fenced([src]) or s._live(s.state.values, src) is not None:
                continue  # another writer still fences it (it decides), or the key was refilled
            pre = s.state.pre.pop(src, None)
            stored = codec.unpack(pre[0]) if pre is not None and pre[1] > s._now() else None
            if stored is not None and s.gen(src):  # the write failed: the value is the truth again
                head, tail = codec.pack_parts(
                    stored.body, stored.fresh_until_ms, stored.loaded_at_ms, short=stored.short,
                    incarnation=stored.incarnation,
                )  # fmt: skip
                s.state.values[src] = (head + str(s.gen(src)).encode() + tail, pre[1])
        return held

    async def replace(
        self,
        key: str,
        sources: Sequence[str],
        head: bytes,
        tail: bytes,
        px: int,
        message: bytes,
        *,
        invalidate: Sequence[str] = (),
    ) -> int:
        s = self._call()
        for src in invalidate:
            for table in (s.state.values, s.state.leases, s.state.pre):
                table.pop(src, None)
            s.bump(src, self.gen_px)
        if tuple(sources) == (key,):
            gens: str | None = str(s.bump(key, self.gen_px))
        else:
            gens = s.gens(sources)
            if "0" in gens.split(","):
                gens = None
        if gens is not None:
            s.state.values[key] = (head + gens.encode() + tail, s._now() + px / 1000)
        else:
            s.state.values.pop(key, None)
        s.state.leases.pop(key, None)
        return s.publish(self.channel, message)

    async def delete_pattern(self, pattern: str, message: bytes) -> int:
        from fnmatch import fnmatchcase

        s = self._call()
        for src in [k for k in s.state.gens if fnmatchcase(k, pattern)]:
            s.bump(src, self.gen_px)
        doomed = [k for k in s.state.values if fnmatchcase(k, pattern)]
        for k in doomed:
            del s.state.values[k]
        for k in [k for k in s.state.pre if fnmatchcase(k, pattern)]:
            del s.state.pre[k]
        for k in [k for k in s.state.leases if fnmatchcase(k, pattern)]:
            del s.state.leases[k]
        s.publish(self.channel, message)
        return len(doomed)

    async def subscribe(self) -> FakeSubscription:
        s = self._call()
        sub = FakeSubscription(s, self.channel, self.latency, store=self)
        s.subscriptions.append(sub)
        return sub


class FakeSubscription:
    """Delivers in order; ``latency`` delays delivery (never reorders); a stalled one delivers nothing."""

    def __init__(
        self, server: FakeRedis, channel: str, latency: Callable[[], float], *, store: FakeStore | None = None
    ) -> None:
        self.server = server
        self.channel = channel
        self.latency = latency
        self.store = store
        self._queue: deque[tuple[float, Message | Pong]] = deque()
        self._changed = asyncio.Event()
        self._last_visible = 0.0
        self.killed = False
        self.stalled = False

    def deliver(self, event: Message | Pong) -> None:
        if self.store is not None and isinstance(event, Message) and self.store.drop(event):
            return  # lost on the way
        loop = asyncio.get_running_loop()
        visible = max(self._last_visible, loop.time() + self.latency())
        self._last_visible = visible
        self._queue.append((visible, event))
        self._changed.set()

    def kill(self) -> None:
        self.killed = True
        self._changed.set()
        if self in self.server.subscriptions:
            self.server.subscriptions.remove(self)

    def stall(self) -> None:
        self.stalled = True

    def resume(self) -> None:
        self.stalled = False
        self._changed.set()

    async def next(self, wait: float) -> Message | Pong | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            if self.killed:
                raise CacheUnavailable("fake redis: subscription dropped")
            now = loop.time()
            silent = self.stalled or (self.store is not None and self.store.cut)
            if not silent and self._queue and self._queue[0][0] <= now:
                return self._queue.popleft()[1]
            if now >= deadline:
                return None
            wake = deadline
            if not silent and self._queue:
                wake = min(wake, self._queue[0][0])
            self._changed.clear()
            try:
                async with asyncio.timeout(max(0.0, wake - now)):
                    await self._changed.wait()
            except TimeoutError:
                pass

    async def ping(self, token: int) -> None:
        if self.killed:
            raise CacheUnavailable("fake redis: subscription dropped")
        if self.server.down:
            return  # the PING is lost with the connection: no pong will come
        self.deliver(Pong(token))

    async def close(self) -> None:
        self.kill()
