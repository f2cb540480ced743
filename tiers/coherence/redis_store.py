"""The coherence protocol's shared tier on Redis: Lua scripts (one round trip each, atomic) and pub/sub.

Redis keys, per source ``S`` (a key whose value comes from an origin) and derived key ``D`` (see
:mod:`tiers.coherence` for what each guarantees):

* ``S`` / ``D`` — the value (:mod:`tiers.codec` envelope: incarnation and generations in its header);
* ``S|g`` — the source's generation, a number that only grows (``max(g + 1, Redis time in µs)``), bumped by every
  invalidation of ``S``; it expires ``gen_ttl`` after its last bump (longer than any value guarded by it lives);
* ``S|w`` — write fences: a sorted set of writer tokens scored by their expiry (ms); while one is live, nothing
  guarded by ``S`` can be filled;
* ``S|lease`` / ``D|lease`` — the load lease (one origin load per key across the fleet);
* ``S|pre`` — the value a fenced write moved aside: served only as a stale-if-error answer, deleted when the write
  commits (or by any later unfenced invalidation);
* ``{channel}|seq`` — the channel's message counter: every message is published as ``<seq>|<json>`` by the same
  script that increments it, so subscribers see consecutive numbers and detect a real gap exactly.

The incarnation: every new connection (request pool and subscriber alike) reads the server's ``run_id`` before
its first command (:class:`IncarnationGuard`). A value stamped with another incarnation is never served, and a
changed ``run_id`` (restart, snapshot restore, failover) tells the protocol to start a new L1 epoch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tiers import codec
from tiers.codec import Stored
from tiers.coherence.store import Acquired, Message, Pong, Status
from tiers.errors import CacheUnavailable
from tiers.l2 import RedisCache

log = logging.getLogger(__name__)

LEASE, GEN, FENCE, PRE = "|lease", "|g", "|w", "|pre"

_PRELUDE = """
redis.replicate_commands()
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function num(x) return string.format('%.0f', x) end
local function gens_of(first, n)
  local gens = {}
  for i = 1, n do gens[i] = redis.call('GET', KEYS[first + i - 1]) or '0' end
  return table.concat(gens, ',')
end
local function fenced(first, n)
  for i = 1, n do
    if redis.call('ZCOUNT', KEYS[first + i - 1], '(' .. num(now_ms), '+inf') > 0 then return true end
  end
  return false
end
"""

# KEYS: key, key|lease, n generation keys, n fence keys, key|pre. ARGV: token, lease_ms, now_ms (for freshness,
# the instance's clock like fresh_until), incarnation, n, refresh ("1": do not answer a fresh value, only the lease),
# own ("1": a source key). Besides the status it answers a stale value for stale-if-error: the key's own (valid) value
# past its freshness, or else the value a write in progress (or one that failed) moved aside (key|pre): never served
# as fresh. A hit on a source key costs one GET: a source value present is current (every bump deletes it).
_ACQUIRE = (
    _PRELUDE
    + """
local n = tonumber(ARGV[5])
local v = redis.call('GET', KEYS[1])
local keep = false
local cur = nil
if v then
  local fu, inc, g = string.match(v, '"""
    + codec.LUA_HEADER
    + """')
  if fu and inc == ARGV[4] then
    if ARGV[7] == '1' then cur = g else cur = gens_of(3, n) end
    if g == cur then
      if ARGV[6] ~= '1' and tonumber(fu) > tonumber(ARGV[3]) then return {1, v, cur} end
      keep = v
    end
  end
end
if not cur or not keep then cur = gens_of(3, n) end
if not keep then
  local p = redis.call('GET', KEYS[3 + 2 * n])
  if p then
    local fu, inc = string.match(p, '"""
    + codec.LUA_HEADER
    + """')
    if fu and inc == ARGV[4] then keep = p end
  end
end
if fenced(3 + n, n) then return {4, keep, cur} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, keep, cur} end
return {3, keep, cur}
"""
)

# KEYS: key, key|lease, n generation keys, n fence keys. ARGV: token, head, tail, px, expected generations, n,
# own ("1": a source key, guarded by its own generation). The value stored is head .. generations .. tail; the
# generations are returned (nil: refused). A source loaded while it had no generation gets one now, living exactly
# as long as the value (a read never leaves state behind its answer); a derived value is refused unless every
# source has a generation, so no stored value ever carries 0 and a missing generation key always means "invalid".
_FILL = (
    _PRELUDE
    + """
local n = tonumber(ARGV[6])
local cur = gens_of(3, n)
if cur ~= ARGV[5] then return false end
if fenced(3 + n, n) then return false end
local gens = cur
if ARGV[7] == '1' then
  if cur == '0' then
    gens = num(now_us)
    redis.call('SET', KEYS[3], gens, 'PX', ARGV[4])
  elseif redis.call('PTTL', KEYS[3]) < tonumber(ARGV[4]) then
    redis.call('PEXPIRE', KEYS[3], ARGV[4])
  end
else
  for g in string.gmatch(cur, '[^,]+') do
    if g == '0' then return false end
  end
end
redis.call('SET', KEYS[1], ARGV[2] .. gens .. ARGV[3], 'PX', ARGV[4])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return gens
"""
)

# KEYS: per source S: S, S|lease, S|g, S|w, S|pre; then the seq key. ARGV: n, fence_ms (0: no fence), fence token,
# gen_px, channel, message. Returns the message's sequence number.
# A fenced write (its commit is still to come) moves the current value aside to S|pre, kept only for
# stale-if-error (the write may fail: then it is still the truth); an unfenced invalidation (an event, a commit
# applied from the outbox) deletes S|pre too.
_INVALIDATE = (
    _PRELUDE
    + """
local n = tonumber(ARGV[1])
local fence = tonumber(ARGV[2])
for i = 0, n - 1 do
  local b = i * 5
  if fence > 0 then
    if redis.call('EXISTS', KEYS[b + 1]) == 1 then redis.call('RENAME', KEYS[b + 1], KEYS[b + 5]) end
  else
    redis.call('UNLINK', KEYS[b + 5])
  end
  redis.call('UNLINK', KEYS[b + 1], KEYS[b + 2])
  local g = tonumber(redis.call('GET', KEYS[b + 3]) or '0')
  redis.call('SET', KEYS[b + 3], num(math.max(g + 1, now_us)), 'PX', ARGV[4])
  if fence > 0 then
    local w = KEYS[b + 4]
    redis.call('ZREMRANGEBYSCORE', w, '-inf', num(now_ms))
    redis.call('ZADD', w, num(now_ms + fence), ARGV[3])
    if redis.call('PTTL', w) < fence then redis.call('PEXPIRE', w, fence) end
  end
end
local seq = redis.call('INCR', KEYS[n * 5 + 1])
redis.call('PUBLISH', ARGV[5], seq .. '|' .. ARGV[6])
return seq
"""
)

# KEYS: n fence keys, then n S|pre keys. ARGV: token, n, committed ("1": the moved-aside values are superseded).
_UNFENCE = """
local n = tonumber(ARGV[2])
for i = 1, n do
  redis.call('ZREM', KEYS[i], ARGV[1])
  if ARGV[3] == '1' then redis.call('UNLINK', KEYS[n + i]) end
end
return 1
"""

# KEYS: S, S|lease, S|g, seq. ARGV: head, tail, px, gen_px, channel, message. The new value carries the new
# generation (head .. gen .. tail).
_REPLACE = (
    _PRELUDE
    + """
local g = tonumber(redis.call('GET', KEYS[3]) or '0')
local ng = num(math.max(g + 1, now_us))
redis.call('SET', KEYS[3], ng, 'PX', ARGV[4])
redis.call('SET', KEYS[1], ARGV[1] .. ng .. ARGV[2], 'PX', ARGV[3])
redis.call('UNLINK', KEYS[2])
local seq = redis.call('INCR', KEYS[4])
redis.call('PUBLISH', ARGV[5], seq .. '|' .. ARGV[6])
return seq
"""
)

# KEYS: seq. ARGV: channel, message.
_PUBLISH = """
local seq = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], seq .. '|' .. ARGV[2])
return seq
"""

# KEYS: lease. ARGV: token. Give a lease back (the load failed), only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class IncarnationGuard:
    """Runs on every new Redis connection, before its first command: the default handshake, then ``INFO server``.

    The server's ``run_id`` changes with every restart (including a restart from a snapshot) and differs between
    a master and the replica promoted in its place. ``observe`` tells the listeners when it changes.
    """

    def __init__(self) -> None:
        self.incarnation = ""
        self.changes = 0
        self._listeners: list[Callable[[str, str], None]] = []

    def subscribe(self, listener: Callable[[str, str], None]) -> None:
        self._listeners.append(listener)

    async def on_connect(self, conn: Any) -> None:
        await conn.on_connect()
        await conn.send_command("INFO", "server")
        info = await conn.read_response()
        text = info.decode() if isinstance(info, bytes) else str(info)
        run_id = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("run_id:")), "")
        self.observe(run_id[:12])

    def observe(self, incarnation: str) -> None:
        old = self.incarnation
        if incarnation == old:
            return
        self.incarnation = incarnation
        if old:
            self.changes += 1
            log.warning(
                "redis incarnation changed (%s -> %s): a restart, snapshot restore or failover; values from "
                "before are ignored",
                old,
                incarnation,
                extra={"event": "redis_incarnation", "from": old, "to": incarnation},
            )
        for listener in self._listeners:
            listener(old, incarnation)


class RedisStore:
    """:class:`tiers.coherence.store.Store` on Redis (standalone), through the guarded RedisCache client."""

    def __init__(
        self,
        cache: RedisCache,
        guard: IncarnationGuard,
        *,
        channel: str,
        subscriber: aioredis.Redis,
        gen_ttl: float,
        confirm_timeout: float = 2.0,
    ) -> None:
        self.cache = cache
        self.guard = guard
        self.channel = channel
        self.seq_key = channel + "|seq"
        self.subscriber = subscriber
        self.gen_px = int(gen_ttl * 1000)
        self.confirm_timeout = confirm_timeout
        client = cache.client
        self._acquire = client.register_script(_ACQUIRE)
        self._fill = client.register_script(_FILL)
        self._invalidate = client.register_script(_INVALIDATE)
        self._unfence = client.register_script(_UNFENCE)
        self._replace = client.register_script(_REPLACE)
        self._publish = client.register_script(_PUBLISH)
        self._release = client.register_script(_RELEASE)

    @property
    def incarnation(self) -> str:
        return self.guard.incarnation

    def _valid(self, raw: bytes | str | None, gens: str | None) -> Stored | None:
        if not isinstance(raw, bytes):  # None, or a str only if a client decoded responses (ours never do)
            return None
        stored = codec.unpack(raw)
        if stored is None or stored.incarnation != self.guard.incarnation:
            return None
        if gens is not None and stored.gens != gens:
            return None
        return stored

    async def read(self, key: str, sources: Sequence[str]) -> Stored | None:
        if tuple(sources) == (key,):  # a source value present in Redis is current (every bump deletes it)
            async with self.cache.guard("GET"):
                raw = await self.cache.client.get(key)
            return self._valid(raw, None)
        async with self.cache.guard("MGET"):
            raw, *gens = await self.cache.client.mget([key, *(s + GEN for s in sources)])
        current = ",".join((g.decode() if isinstance(g, bytes) else "0") for g in gens)
        return self._valid(raw, current)

    async def acquire(
        self, key: str, sources: Sequence[str], token: str, lease_ms: int, now_ms: int, *, refresh: bool = False
    ) -> Acquired:
        incarnation = self.guard.incarnation
        keys = [key, key + LEASE, *(s + GEN for s in sources), *(s + FENCE for s in sources), key + PRE]
        async with self.cache.guard("EVALSHA acquire"):
            status, raw, gens = await self._acquire(
                keys=keys,
                args=[
                    token,
                    lease_ms,
                    now_ms,
                    incarnation,
                    len(sources),
                    "1" if refresh else "0",
                    "1" if tuple(sources) == (key,) else "0",
                ],
            )
        gens_s = gens.decode() if isinstance(gens, bytes) else str(gens)
        stored = codec.unpack(raw) if raw else None
        return Acquired(Status(int(status)), stored, gens_s, incarnation)

    async def fill(
        self, key: str, sources: Sequence[str], gens: str, token: str, head: bytes, tail: bytes, px: int
    ) -> str | None:
        keys = [key, key + LEASE, *(s + GEN for s in sources), *(s + FENCE for s in sources)]
        own = "1" if tuple(sources) == (key,) else "0"
        async with self.cache.guard("EVALSHA fill"):
            stored = await self._fill(keys=keys, args=[token, head, tail, px, gens, len(sources), own])
        if stored is None:
            return None
        return stored.decode() if isinstance(stored, bytes) else str(stored)

    async def release(self, key: str, token: str) -> None:
        async with self.cache.guard("EVALSHA release"):
            await self._release(keys=[key + LEASE], args=[token])

    async def invalidate(
        self, sources: Sequence[str], message: bytes, *, fence: str | None = None, fence_ms: int = 0
    ) -> int:
        keys: list[str] = []
        for s in sources:
            keys += [s, s + LEASE, s + GEN, s + FENCE, s + PRE]
        keys.append(self.seq_key)
        args: list[str | int | bytes] = [
            len(sources),
            fence_ms if fence else 0,
            fence or "",
            self.gen_px,
            self.channel,
            message,
        ]
        async with self.cache.guard("EVALSHA invalidate"):
            return int(await self._invalidate(keys=keys, args=args))

    async def unfence(self, sources: Sequence[str], token: str, *, committed: bool) -> None:
        keys = [*(s + FENCE for s in sources), *(s + PRE for s in sources)]
        async with self.cache.guard("EVALSHA unfence"):
            await self._unfence(keys=keys, args=[token, len(sources), "1" if committed else "0"])

    async def replace(self, key: str, head: bytes, tail: bytes, px: int, message: bytes) -> int:
        keys = [key, key + LEASE, key + GEN, self.seq_key]
        async with self.cache.guard("EVALSHA replace"):
            return int(await self._replace(keys=keys, args=[head, tail, px, self.gen_px, self.channel, message]))

    async def delete_pattern(self, pattern: str, message: bytes) -> int:
        """SCAN + UNLINK in batches (never KEYS), then one message. Not a data change: generations stay."""
        deleted = await self.cache.delete_pattern(pattern)
        async with self.cache.guard("EVALSHA publish"):
            await self._publish(keys=[self.seq_key], args=[self.channel, message])
        return deleted

    async def subscribe(self) -> RedisSubscription:
        return await RedisSubscription.open(self.subscriber, self.channel, self.confirm_timeout)


class RedisSubscription:
    """One pub/sub session on its own connection. Nothing reconnects behind our back: the subscriber client is
    built without retries, so every loss surfaces as :class:`CacheUnavailable` and ends the session."""

    def __init__(self, pubsub: Any) -> None:
        self.ps = pubsub

    @classmethod
    async def open(cls, client: aioredis.Redis, channel: str, confirm_timeout: float) -> RedisSubscription:
        ps = client.pubsub()
        self = cls(ps)
        try:
            async with asyncio.timeout(confirm_timeout):
                await ps.subscribe(channel)
                while True:  # the subscription counts from Redis' confirmation on
                    msg = await ps.get_message(timeout=confirm_timeout)
                    if msg is not None and msg.get("type") == "subscribe":
                        break
        except (RedisError, OSError, TimeoutError) as err:
            await self.close()
            raise CacheUnavailable(f"redis SUBSCRIBE: {type(err).__name__}: {err}") from err
        return self

    async def next(self, wait: float) -> Message | Pong | None:
        try:
            msg = await self.ps.get_message(timeout=max(0.0, wait))
        except (RedisError, OSError, TimeoutError) as err:
            raise CacheUnavailable(f"redis pub/sub: {type(err).__name__}: {err}") from err
        if msg is None:
            return None
        kind = msg.get("type")
        data = msg.get("data")
        if kind == "pong":
            try:
                return Pong(int(data))
            except (TypeError, ValueError):
                return None
        if kind != "message" or not isinstance(data, bytes):
            return None
        head, sep, rest = data.partition(b"|")
        if sep and head.isdigit():
            return Message(int(head), rest)
        return Message(None, data)

    async def ping(self, token: int) -> None:
        try:
            await self.ps.ping(str(token))
        except (RedisError, OSError, TimeoutError) as err:
            raise CacheUnavailable(f"redis pub/sub PING: {type(err).__name__}: {err}") from err

    async def close(self) -> None:
        try:
            async with asyncio.timeout(1.0):  # a black-holed socket must not hold up a reconnect or shutdown
                await self.ps.aclose()
        except (RedisError, OSError, TimeoutError):
            pass
