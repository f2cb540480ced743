"""The coherence engine: the one object that runs the protocol stated in :mod:`tiers.coherence`.

Built by the composition root, passed to the actors through their constructors. It owns the bus subscriber, the
L1's trust lease, the incarnation fence, the write fences and generations (through its :class:`Store`) and the
outbox sweeper. The read-through (actors) asks it to acquire and fill; writers wrap their commit in
:meth:`Coherence.write`; events call :meth:`Coherence.invalidate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from tiers import codec
from tiers.coherence.store import Acquired, Message, Pong, Store, Subscription
from tiers.errors import CacheUnavailable, OriginError, OriginTimeout, TierError
from tiers.keys import CacheKey, DataType, namespace_of
from tiers.l1 import L1

log = logging.getLogger(__name__)


class WriteUnavailable(TierError):
    """The invalidation of a write could not be made certain (Redis unreachable): nothing was changed."""


class InvalidationPending(TierError):
    """The write was committed, but Redis lost its fence mid-write (a restart, a restore, a failover) or could not be
    asked afterwards, and the invalidation after the commit failed: the outbox row stays, and the sweep of any
    instance that can reach Redis applies it (``outbox_sweep + outbox_grace`` after Redis answers again)."""


@dataclass(frozen=True, slots=True)
class CoherenceConfig:
    channel: str
    instance_id: str
    bound: float = 0.1  # B: the staleness bound after an acknowledged write
    join_window: float = 0.025  # a load in flight may be joined only this long after it began (see `lease`)
    ping_interval: float = 0.025  # the bus' lease is renewed this often (B/4)
    dead_after: float = 1.0  # no pong for this long: the subscriber connection is dropped and reopened
    fence_ttl: float = 30.0  # a write fence outlives any write (Postgres aborts a statement long before)
    lease_ttl: float = 5.0  # a load lease outlives any origin call
    gen_ttl: float = 90_000.0  # generation keys outlive every value they guard
    reconnect_max: float = 2.0
    outbox_sweep: float = 1.0  # how often leftover outbox rows are looked for
    outbox_grace: float = 2.0  # a row this old was not settled by its writer: apply it

    @property
    def lease(self) -> float:
        """How long L1 may trust what it holds after a proof of hearing the bus (or after a fetch): B minus the
        join window, because a reader that joins a load in flight gets a value fetched up to that much earlier."""
        return self.bound - self.join_window


@dataclass(slots=True)
class WriteScope:
    """What :meth:`Coherence.write` yields: the rendered keys (for the outbox row) and the row's id, set by the
    writer once committed, so the engine deletes the row only when the invalidation is complete."""

    keys: tuple[str, ...]
    outbox_id: int | None = None


class Outbox(Protocol):
    """Postgres rows written with each write's commit (tiers.coherence.outbox)."""

    async def settle(self, ids: Sequence[int]) -> None: ...
    async def sweep(self, grace: float, apply: Callable[[list[str]], Any]) -> int: ...


class TraceHooks(Protocol):
    def inject(self) -> dict[str, Any]: ...
    def eviction_span(
        self, msg: Mapping[str, Any], keys: Sequence[str], patterns: Sequence[str]
    ) -> contextlib.AbstractContextManager[None]: ...


Counter = Callable[[DataType, str], None]


def _no_count(_dt: DataType, _name: str) -> None:
    return None


class Coherence:
    def __init__(
        self,
        config: CoherenceConfig,
        *,
        l1: L1,
        store: Store | None,
        outbox: Outbox | None = None,
        clock: Callable[[], float] = time.monotonic,
        count: Counter = _no_count,
        trace: TraceHooks | None = None,
    ) -> None:
        self.config = config
        self.l1 = l1
        self.store = store
        self.outbox = outbox
        self.clock = clock
        self.count = count
        self.trace = trace
        self.bus_id = f"{config.instance_id}/{secrets.token_hex(4)}"
        if store is None:  # one instance, no bus: every invalidation is local and synchronous
            l1.trusted_until = float("inf")
        # subscriber state (read by health and stats)
        self.subscribed = False
        self.connected = asyncio.Event()
        self.sessions = 0
        self.reconnects = 0
        self.seq_gaps = 0
        self.received = 0
        self.echoes_skipped = 0
        self.lease_lapses = 0
        self.outbox_applied = 0
        self.fences_lost = 0  # writes whose fence Redis lost mid-write (invalidated again after the commit)
        self.on_session: Callable[[], None] | None = None  # told when a subscriber session starts (breaker probe)
        self._last_seq: int | None = None
        self._settled: list[int] = []

    # ------------------------------------------------------------ incarnation (called by the store's guard)
    def on_incarnation(self, old: str, new: str) -> None:
        if old and old != new:
            self.l1.new_epoch()  # nothing this instance holds was checked against the new server

    # ------------------------------------------------------------ reads (the read-through calls these)
    def sources(self, key: CacheKey, deps: tuple[CacheKey, ...]) -> tuple[str, ...]:
        return tuple(d.rendered for d in deps) if deps else (key.rendered,)

    async def acquire(self, key: CacheKey, sources: tuple[str, ...], token: str, *, refresh: bool = False) -> Acquired:
        assert self.store is not None
        return await self.store.acquire(
            key.rendered, sources, token, int(self.config.lease_ttl * 1000), int(time.time() * 1000), refresh=refresh
        )

    async def fill(
        self,
        key: CacheKey,
        sources: tuple[str, ...],
        acquired: Acquired,
        gens: str,
        token: str,
        body: bytes,
        *,
        fresh_until: float,
        loaded_at: float,
        short: bool,
        px: int,
        gen_px: int,
    ) -> str | None:
        """Install a loaded value in Redis unless it was overtaken (rule 1); the generations stored with it."""
        assert self.store is not None
        head, tail = codec.pack_parts(
            body, int(fresh_until * 1000), int(loaded_at * 1000), short=short, incarnation=acquired.incarnation
        )
        return await self.store.fill(key.rendered, sources, gens, token, head, tail, px, gen_px=gen_px)

    async def release(self, key: CacheKey, token: str) -> None:
        if self.store is not None:
            with contextlib.suppress(CacheUnavailable):
                await self.store.release(key.rendered, token)

    @property
    def incarnation(self) -> str:
        return self.store.incarnation if self.store is not None else ""

    # ------------------------------------------------------------ writes
    @contextlib.asynccontextmanager
    async def write(self, keys: Sequence[CacheKey]) -> AsyncIterator[WriteScope]:
        """Wrap the commit of a write to the source of truth (the body records its outbox row in the scope).

        Before the body runs: every source key is fenced, its generation bumped and its value moved aside (kept for
        stale-if-error only) in Redis, and the invalidation published, in one script; then this instance's L1 drops
        them. If that fails the body never runs: :class:`WriteUnavailable` (503, nothing changed). After the body:
        L1 drops them again and the fence is lifted (best effort: it expires by itself); when the body committed,
        the moved-aside values are deleted (when it failed they may still be the truth: stale-if-error keeps them).
        """
        names = tuple(k.rendered for k in keys)
        token = secrets.token_hex(8)
        fenced_in = ""
        if self.store is not None:
            try:
                await self.store.invalidate(
                    names, self._message(names, ()), fence=token, fence_ms=int(self.config.fence_ttl * 1000)
                )
            except CacheUnavailable as err:
                raise WriteUnavailable(f"cannot invalidate {len(names)} key(s): {err}") from err
            fenced_in = self.store.incarnation
        self._apply(names, (), sent=True)
        scope = WriteScope(names)
        committed = False
        try:
            # the body must end well before the fence expires (a commit after that could be overtaken by a fill)
            async with asyncio.timeout(self.config.fence_ttl / 3):
                yield scope
            committed = True
        except TimeoutError as err:
            raise OriginTimeout("postgres", "the write did not finish in time; it may still commit") from err
        finally:
            self.l1.invalidate(names)  # loads this instance began before the commit never fill L1
            settled = self.store is None
            pending: CacheUnavailable | None = None
            if self.store is not None:
                lost = False
                try:
                    held = await self.store.unfence(names, token, committed=committed)
                    settled = True
                    # the fence must have held from before the commit until now; if Redis lost it (a restart, an
                    # older snapshot, a failover), a load may have filled the row as it was before the commit
                    lost = committed and (held < len(names) or self.store.incarnation != fenced_in)
                except CacheUnavailable as err:
                    lost = committed  # whether the fence held cannot be known: invalidate again, or do not answer
                    log.info("write fence not lifted: %s", err, extra={"event": "fence_left"})
                if lost:
                    self.fences_lost += 1
                    try:
                        await self.store.invalidate(names, self._message(names, ()))
                        self._apply(names, (), sent=True)
                        settled = True
                    except CacheUnavailable as err:
                        settled, pending = False, err  # the outbox row stays: the sweep applies it
            if settled and scope.outbox_id is not None:
                self._settled.append(scope.outbox_id)  # deleted in batches by the sweeper
            if pending is not None:
                raise InvalidationPending(
                    f"committed, but the invalidation of {len(names)} key(s) could not be confirmed: {pending}"
                ) from pending

    async def invalidate(self, keys: Sequence[CacheKey]) -> None:
        """An event (no row of ours changed): invalidate everywhere before answering, or raise WriteUnavailable."""
        names = tuple(k.rendered for k in keys)
        if self.store is not None:
            try:
                await self.store.invalidate(names, self._message(names, ()))
            except CacheUnavailable as err:
                raise WriteUnavailable(f"cannot invalidate {len(names)} key(s): {err}") from err
        self._apply(names, (), sent=True)

    async def replace(
        self,
        key: CacheKey,
        deps: Sequence[CacheKey],
        body: bytes,
        *,
        ttl: float,
        px: int,
        invalidate: Sequence[CacheKey] = (),
    ) -> None:
        """Make ``body`` the value of ``key`` everywhere (a fact the platform just told us, e.g. trustline-created),
        invalidating ``invalidate`` in the same script: all of it happens, or (503) none of it."""
        name = key.rendered
        others = tuple(k.rendered for k in invalidate)
        if self.store is not None:
            now = time.time()
            head, tail = codec.pack_parts(
                body, int((now + ttl) * 1000), int(now * 1000), incarnation=self.store.incarnation
            )
            sources = tuple(d.rendered for d in deps) or (name,)
            try:
                await self.store.replace(
                    name, sources, head, tail, px, self._message((name, *others), ()), invalidate=others
                )
            except CacheUnavailable as err:
                raise WriteUnavailable(f"cannot replace {name}: {err}") from err
        self._apply((name, *others), (), sent=True)

    async def invalidate_pattern(self, pattern: str) -> int:
        """Cache administration (not a data change): delete matching keys in Redis and every L1."""
        deleted = 0
        if self.store is not None:
            try:
                deleted = await self.store.delete_pattern(pattern, self._message((), (pattern,)))
            except CacheUnavailable as err:
                raise WriteUnavailable(f"cannot delete {pattern}: {err}") from err
        self._apply((), (pattern,), sent=True)
        return deleted

    def _message(self, keys: Sequence[str], patterns: Sequence[str]) -> bytes:
        msg: dict[str, Any] = {"i": self.bus_id, "k": list(keys), "p": list(patterns)}
        if self.trace is not None:
            extra = self.trace.inject()
            if extra:
                msg.update(extra)
        return orjson.dumps(msg)

    def _apply(self, keys: Sequence[str], patterns: Sequence[str], *, sent: bool) -> None:
        """Apply an invalidation to this instance's L1 (synchronous: tickets make racing fills void)."""
        if keys:
            self.l1.invalidate(keys)
        for p in patterns:
            self.l1.invalidate_pattern(p)
        name = "invalidations_sent" if sent else "invalidations_received"
        for k in (*keys, *patterns):
            ns = namespace_of(k)
            if ns is not None:
                self.count(ns.data_type, name)

    # ------------------------------------------------------------ the bus
    async def run_bus(self) -> None:
        """Subscriber sessions, one after the other, until cancelled (a task owned by the composition root)."""
        if self.store is None:
            return
        delay = 0.02
        while True:
            try:
                await self._session()
            except (CacheUnavailable, _BusLost) as err:
                log.warning(
                    "invalidation subscriber lost: %s",
                    err,
                    extra={"event": "subscriber_lost", "reconnects": self.reconnects},
                )
            except Exception:  # a bug of ours while applying: L1 cannot be trusted; start a new session
                log.exception("invalidation subscriber failed", extra={"event": "subscriber_failed"})
            if self._session_up:
                delay = 0.02  # it had been working: reconnect promptly, the back-off starts afresh
            await asyncio.sleep(delay)  # back-off between reconnect attempts, not a wait for an event
            delay = min(delay * 2, self.config.reconnect_max)
            self.reconnects += 1

    _session_up = False

    @property
    def listening(self) -> bool:
        """Subscribed and the lease holds: this instance provably hears every invalidation (health, stats)."""
        return self.subscribed and self.l1.serving

    async def _session(self) -> None:
        assert self.store is not None
        self._session_up = False
        sub = await self.store.subscribe()
        try:
            # messages published before this point may be lost: nothing L1 holds (or is loading) is trusted
            self.l1.new_epoch()
            self._last_seq = None
            self.sessions += 1
            self.subscribed = True
            self._session_up = True
            if self.on_session is not None:
                self.on_session()
            log.info(
                "invalidation subscriber on %s as %s",
                self.config.channel,
                self.bus_id,
                extra={"event": "subscriber_subscribed", "reconnects": self.reconnects},
            )
            await self._listen(sub)
        finally:
            self.subscribed = False
            self.connected.clear()
            await sub.close()

    async def _listen(self, sub: Subscription) -> None:
        cfg, l1 = self.config, self.l1
        pings: deque[tuple[int, float]] = deque()  # (token, sent at), oldest first
        token = 0
        next_ping = self.clock()
        while True:
            now = self.clock()
            if now >= next_ping:
                token += 1
                pings.append((token, now))
                try:
                    async with asyncio.timeout(cfg.dead_after):  # a socket that takes no more bytes is dead too
                        await sub.ping(token)
                except TimeoutError:
                    raise _BusLost("a PING could not be sent") from None
                next_ping = now + cfg.ping_interval
            if pings and now - pings[0][1] > cfg.dead_after:
                raise _BusLost(f"no pong for {now - pings[0][1]:.3f}s")
            wait = next_ping - now
            if pings:
                wait = min(wait, pings[0][1] + cfg.dead_after - now)
            event = await sub.next(max(0.0, wait))
            if event is None:
                continue
            if isinstance(event, Pong):
                sent_at = None
                while pings and pings[0][0] <= event.token:
                    sent_at = pings.popleft()[1]
                if sent_at is not None:
                    # everything published before this ping was sent has been received and applied
                    until = sent_at + cfg.lease
                    if until > l1.trusted_until:
                        if l1.trusted_until < self.clock() and self.connected.is_set():
                            self.lease_lapses += 1
                        l1.trusted_until = until
                    self.connected.set()  # this session has proved it hears the bus
                continue
            self._on_message(event)

    def _on_message(self, msg: Message) -> None:
        if msg.seq is not None:
            last, self._last_seq = self._last_seq, msg.seq
            if last is not None and msg.seq != last + 1:
                self.seq_gaps += 1
                log.warning(
                    "invalidation bus: sequence jumped from %d to %d; starting a new L1 epoch",
                    last,
                    msg.seq,
                    extra={"event": "subscriber_seq_gap"},
                )
                self.l1.new_epoch()
        try:
            data = orjson.loads(msg.payload)
        except orjson.JSONDecodeError:
            log.warning("invalidation bus: ignoring a message that is not JSON")
            return
        if not isinstance(data, dict):
            return
        if data.get("i") == self.bus_id:
            self.echoes_skipped += 1  # applied synchronously before this instance answered the write
            return
        keys = tuple(k for k in data.get("k", ()) if isinstance(k, str))
        patterns = tuple(p for p in data.get("p", ()) if isinstance(p, str))
        self.received += 1
        with self._eviction_span(data, keys, patterns):
            self._apply(keys, patterns, sent=False)

    @contextlib.contextmanager
    def _eviction_span(self, data: Mapping[str, Any], keys: Sequence[str], patterns: Sequence[str]) -> Iterator[None]:
        if self.trace is None:
            yield
            return
        with self.trace.eviction_span(data, keys, patterns):
            yield

    # ------------------------------------------------------------ the outbox
    async def run_outbox(self) -> None:
        """Delete settled outbox rows; apply rows no writer settled (a commit whose writer gave up or died)."""
        if self.outbox is None:
            return
        while True:
            await asyncio.sleep(self.config.outbox_sweep)  # a periodic job, not a wait for an event
            await self.sweep_once()

    async def sweep_once(self) -> int:
        if self.outbox is None or (self.store is not None and not self.subscribed):
            return 0  # cut off from Redis: leave the rows to an instance that can apply them
        settled, self._settled = self._settled, []
        try:
            if settled:
                await self.outbox.settle(settled)
            n = await self.outbox.sweep(self.config.outbox_grace, self._apply_leftover)
        except (OriginError, CacheUnavailable) as err:
            self._settled[:0] = settled
            log.info("outbox sweep postponed: %s", err, extra={"event": "outbox_postponed"})
            return 0
        if n:
            self.outbox_applied += n
            log.warning("applied %d outbox row(s) left by writers", n, extra={"event": "outbox_applied"})
        return n

    async def flush_settled(self) -> int:
        """Delete the rows of settled writes not yet deleted by a sweep (at shutdown: otherwise the next sweep of any
        instance would take them for commits nobody answered for and apply them once more). Returns rows deleted."""
        settled, self._settled = self._settled, []
        if not settled or self.outbox is None:
            return 0
        try:
            await self.outbox.settle(settled)
        except OriginError as err:
            log.info("outbox rows left to the sweep: %s", err, extra={"event": "outbox_postponed"})
            return 0
        return len(settled)

    async def _apply_leftover(self, names: list[str]) -> None:
        if self.store is not None:
            await self.store.invalidate(names, self._message(names, ()))
        self._apply(names, (), sent=True)


class _BusLost(Exception):
    pass
