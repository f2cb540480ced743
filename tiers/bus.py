"""The invalidation bus: one Redis pub/sub channel, orjson messages ``{instance, seq, keys, patterns}``.

The subscriber is a long-running task (owned by the composition root) that never trusts L1 across a gap:

* when the subscription is lost (connection error, ``CLIENT KILL TYPE pubsub``, or a heartbeat that does not
  come back), ``on_gap`` runs at once, so L1 stops serving and is cleared;
* after it has subscribed again, ``on_subscribed`` runs, so L1 is cleared again and serves again.

Heartbeat: every ``heartbeat`` seconds the subscriber publishes a ping carrying its own id on the channel and
expects to receive it back within the next interval; a subscriber that silently stopped receiving is detected
within about two intervals.

Each bus has a unique id (instance id + random suffix): its own echoes are skipped by id, never by key, so a
peer's invalidation of the same key is always applied.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tiers.errors import CacheUnavailable

log = logging.getLogger(__name__)

OnMessage = Callable[[tuple[str, ...], tuple[str, ...], dict[str, Any]], Awaitable[None]]
OnEvent = Callable[[], Awaitable[None]]


class InvalidationBus:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        subscriber: aioredis.Redis | None = None,
        channel: str,
        instance_id: str,
        on_message: OnMessage,
        on_gap: OnEvent,
        on_subscribed: OnEvent,
        heartbeat: float = 1.0,
        reconnect_max: float = 2.0,
        publish_timeout: float = 0.5,
    ) -> None:
        self.client = client  # publishes (pooled connections)
        self.subscriber = subscriber or client  # its own connection for SUBSCRIBE
        self.channel = channel
        self.id = f"{instance_id}/{secrets.token_hex(4)}"
        self.on_message = on_message
        self.on_gap = on_gap
        self.on_subscribed = on_subscribed
        self.heartbeat = heartbeat
        self.reconnect_max = reconnect_max
        self.publish_timeout = publish_timeout
        self.subscribed = False
        self.seq = 0
        self.received = 0
        self.echoes_skipped = 0
        self.reconnects = 0
        self.gaps = 0
        self.seq_gaps = 0
        self._last_seq: dict[str, int] = {}
        self.last_heartbeat_ok = 0.0
        self._pubsub: Any = None
        self.connected_event = asyncio.Event()

    # ------------------------------------------------------------ publishing
    def message(self, keys: Sequence[str], patterns: Sequence[str], **extra: Any) -> bytes:
        """The next message of this bus (its ``seq`` taken now: one that is never sent shows as a gap)."""
        self.seq += 1
        msg = {"instance": self.id, "seq": self.seq, "keys": list(keys), "patterns": list(patterns), **extra}
        return orjson.dumps(msg)

    async def publish(self, keys: Sequence[str], patterns: Sequence[str], **extra: Any) -> None:
        message = self.message(keys, patterns, **extra)
        try:
            async with asyncio.timeout(self.publish_timeout):
                await self.client.publish(self.channel, message)
        except (RedisError, OSError, TimeoutError) as err:
            raise CacheUnavailable(f"redis PUBLISH: {type(err).__name__}: {err}") from err

    # ------------------------------------------------------------ subscribing
    async def run(self) -> None:
        """Subscribe, apply, detect gaps, resubscribe with back-off; until cancelled."""
        delay = 0.05
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                await self._close()
                raise
            except (RedisError, OSError, TimeoutError, _HeartbeatLost) as err:
                log.warning(
                    "invalidation subscriber lost: %s: %s",
                    type(err).__name__,
                    err,
                    extra={"event": "subscriber_lost", "reconnects": self.reconnects, "gaps": self.gaps},
                )
            except Exception:  # e.g. applying a message failed: L1 cannot be trusted, start over
                log.exception("invalidation subscriber failed", extra={"event": "subscriber_failed"})
            if self.subscribed:
                delay = 0.05  # it had been working: reconnect promptly, the back-off starts afresh
            await self._lost()
            await self._close()
            await asyncio.sleep(delay)  # back-off between reconnect attempts, not a wait for an event
            delay = min(delay * 2, self.reconnect_max)
            self.reconnects += 1

    async def _lost(self) -> None:
        if self.subscribed:
            self.subscribed = False
            self.gaps += 1
            self.connected_event.clear()
            await self.on_gap()

    async def _close(self) -> None:
        ps, self._pubsub = self._pubsub, None
        if ps is not None:
            try:
                async with asyncio.timeout(1.0):  # a black-holed socket must not hold up a reconnect or shutdown
                    await ps.aclose()
            except (RedisError, OSError, TimeoutError):
                pass

    async def _session(self) -> None:
        ps = self.subscriber.pubsub()
        self._pubsub = ps
        await ps.subscribe(self.channel)
        # wait for the subscribe confirmation before declaring the gap closed
        deadline = time.monotonic() + max(self.heartbeat, 1.0) * 2
        while True:
            msg = await ps.get_message(timeout=max(0.01, deadline - time.monotonic()))
            if msg is not None and msg.get("type") == "subscribe":
                break
            if time.monotonic() >= deadline:
                raise _HeartbeatLost("no subscribe confirmation")
        self._last_seq.clear()  # sequences restart being tracked from this subscription on
        await self.on_subscribed()
        self.subscribed = True
        self.connected_event.set()
        log.info(
            "invalidation subscriber on %s as %s",
            self.channel,
            self.id,
            extra={"event": "subscriber_subscribed", "reconnects": self.reconnects, "gaps": self.gaps},
        )

        ping_seq = 0
        awaiting: tuple[int, float] | None = None  # (ping number, deadline)
        next_ping = time.monotonic() + self.heartbeat
        while True:
            now = time.monotonic()
            if awaiting is not None and now > awaiting[1]:
                raise _HeartbeatLost(f"heartbeat {awaiting[0]} not received within {self.heartbeat}s")
            if awaiting is None and now >= next_ping:
                ping_seq += 1
                awaiting = (ping_seq, now + self.heartbeat)
                async with asyncio.timeout(self.heartbeat):
                    await self.client.publish(self.channel, orjson.dumps({"instance": self.id, "ping": ping_seq}))
            until = awaiting[1] if awaiting is not None else next_ping
            msg = await ps.get_message(ignore_subscribe_messages=True, timeout=max(0.005, until - now))
            if msg is None or msg.get("type") != "message":
                continue
            try:
                data = orjson.loads(msg["data"])
            except orjson.JSONDecodeError:
                log.warning("invalidation bus: ignoring a message that is not JSON")
                continue
            if not isinstance(data, dict):
                continue
            if "ping" in data:
                if data.get("instance") == self.id and awaiting and data.get("ping") == awaiting[0]:
                    awaiting = None
                    self.last_heartbeat_ok = time.time()
                    next_ping = time.monotonic() + self.heartbeat
                continue
            sender = data.get("instance")
            if sender == self.id:
                self.echoes_skipped += 1  # applied synchronously before this instance answered the write
                continue
            seq = data.get("seq")
            if isinstance(sender, str) and isinstance(seq, int):
                last = self._last_seq.get(sender)
                self._last_seq[sender] = seq
                if last is not None and seq != last + 1:
                    # a message from this peer went missing: nothing in L1 can be trusted any more
                    self.seq_gaps += 1
                    log.warning(
                        "invalidation bus: %s jumped from seq %d to %d; clearing L1",
                        sender,
                        last,
                        seq,
                        extra={"event": "subscriber_seq_gap"},
                    )
                    await self.on_gap()
                    await self.on_subscribed()
            keys = tuple(k for k in data.get("keys", ()) if isinstance(k, str))
            patterns = tuple(p for p in data.get("patterns", ()) if isinstance(p, str))
            self.received += 1
            await self.on_message(keys, patterns, data)


class _HeartbeatLost(Exception):
    pass
