"""The coherence protocol's shared tier on Redis: Lua scripts (one round trip each, atomic) and pub/sub.

Redis keys, per source ``S`` (a key whose value comes from an origin) and derived key ``D`` (see
:mod:`tiers.coherence` for what each guarantees):

* ``S`` / ``D`` — the value (:mod:`tiers.codec` envelope: incarnation and generations in its header);
* ``S|g`` — the source's generation, a number that only grows (``max(g + 1, Redis time in µs)``), bumped by every
  invalidation of ``S``; it expires ``gen_ttl`` after its last bump (longer than any value guarded by it lives);
* ``S|w`` — write fences: a sorted set of writer tokens scored by their expiry (ms); while one is live, nothing
  guarded by ``S`` can be filled;
* ``S|lease`` / ``D|lease`` — the load lease (one origin load per key across the fleet);
* ``S|pre`` — the value a fenced write moved aside: never served; deleted when the write commits, put back when it
  fails (unless another write fences the key), deleted by any later unfenced invalidation;
* ``{channel}|seq`` — the channel's message counter: every message is published as ``<seq>|<json>`` by the same
  script that increments it, so subscribers see consecutive numbers and detect a real gap exactly.

The incarnation: every new connection (request pool and subscriber alike) reads the server's ``run_id`` and
``master_replid`` before its first command (:class:`IncarnationGuard`). A value stamped with another incarnation is
never served, and a changed incarnation (restart, snapshot restore, failover, failback) starts a new L1 epoch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

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

# KEYS: key, key|lease, n generation keys, n fence keys. ARGV: token, lease_ms, now_ms (for freshness, the
# instance's clock like fresh_until), incarnation, n, refresh ("1": do not answer a fresh value, only the lease),
# own ("1": a source key). Besides the status it answers the key's own valid value past its freshness, for
# stale-if-error. A hit on a source key costs one GET: a source value present is current (every bump deletes it).
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
if not keep then cur = gens_of(3, n) end
if fenced(3 + n, n) then return {4, keep, cur} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, keep, cur} end
return {3, keep, cur}
"""
)

# KEYS: key, key|lease, n generation keys, n fence keys. ARGV: token, head, tail, px, expected generations, n,
# own ("1": a source key, guarded by its own generation), gen_px (how long a generation created here lives: as long as
# the longest value that may depend on it). The value stored is head .. generations .. tail; the generations are
# returned (nil: refused).
# * A source never loaded before has no generation: the fill creates one, and is accepted only while the filler still
#   holds the key's lease (an invalidation or a purge deletes it), so a cold load racing a purge cannot refill.
# * A derived value is refused unless every source has a generation: no stored value ever carries 0, so a missing
#   generation key always means "invalid".
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
    if redis.call('GET', KEYS[2]) ~= ARGV[1] then return false end
    gens = num(now_us)
    redis.call('SET', KEYS[3], gens, 'PX', ARGV[8])
  elseif redis.call('PTTL', KEYS[3]) < tonumber(ARGV[8]) then
    redis.call('PEXPIRE', KEYS[3], ARGV[8])
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

_BUMP = """
local function bump(k)
  local g = tonumber(redis.call('GET', k) or '0')
  redis.call('SET', k, num(math.max(g + 1, now_us)), 'PX', ARGV[4])
end
"""

# KEYS: per source S: S, S|lease, S|g, S|w, S|pre; then the seq key. ARGV: n, fence_ms (0: no fence), fence token,
# gen_px, channel, message. Returns the message's sequence number.
# A fenced write (its commit is still to come) moves the current value aside to S|pre: it is never served; if the
# write fails it is put back (see _UNFENCE). An unfenced invalidation (an event, a commit from the outbox) deletes it.
_INVALIDATE = (
    _PRELUDE
    + _BUMP
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
  bump(KEYS[b + 3])
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

# KEYS: per source: S, S|g, S|w, S|pre (4 each). ARGV: token, n, committed ("1"). Lifts this writer's fence and
# answers how many of its n fences were still there (fewer: Redis lost them mid-write — a restart, a restore from an
# older snapshot, a failover — and the engine invalidates again after the commit).
# Committed: the moved-aside values are superseded: deleted. Not committed (the write failed): when no other writer
# still fences S and S was not refilled, the moved-aside value is the truth again: put back, under the current
# generation.
_UNFENCE = (
    _PRELUDE
    + """
local n = tonumber(ARGV[2])
local held = 0
for i = 0, n - 1 do
  local b = i * 4
  local w = KEYS[b + 3]
  local score = redis.call('ZSCORE', w, ARGV[1])
  if score and tonumber(score) > now_ms then held = held + 1 end
  redis.call('ZREM', w, ARGV[1])
  if ARGV[3] == '1' then
    redis.call('UNLINK', KEYS[b + 4])
  elseif not fenced(b + 3, 1) and redis.call('EXISTS', KEYS[b + 1]) == 0 then
    local p = redis.call('GET', KEYS[b + 4])
    local ttl = redis.call('PTTL', KEYS[b + 4])
    if p and ttl > 0 then
      local head, tail = string.match(p, '^([2SZY]|%d+|%d+|%w*|)[%d,]*(|.*)$')
      local g = redis.call('GET', KEYS[b + 2])
      if head and g then redis.call('SET', KEYS[b + 1], head .. g .. tail, 'PX', ttl) end
    end
    redis.call('UNLINK', KEYS[b + 4])
  end
end
return held
"""
)

# KEYS: key, key|lease, n generation keys of its sources, then per invalidated source I: I, I|lease, I|g, I|w, I|pre;
# then the seq key. ARGV: head, tail, px, gen_px, channel, message, n, m (invalidated sources), own ("1": key is a
# source). Invalidates the m sources first, then installs head .. generations .. tail as the key's value: a source key
# under its own new generation; a derived key under its sources' current generations (which must all exist).
_REPLACE = (
    _PRELUDE
    + _BUMP
    + """
local n = tonumber(ARGV[7])
local m = tonumber(ARGV[8])
for i = 0, m - 1 do
  local b = 2 + n + i * 5
  redis.call('UNLINK', KEYS[b + 1], KEYS[b + 2], KEYS[b + 5])
  bump(KEYS[b + 3])
end
local gens
if ARGV[9] == '1' then
  bump(KEYS[3])
  gens = redis.call('GET', KEYS[3])
else
  gens = gens_of(3, n)
  for g in string.gmatch(gens, '[^,]+') do
    if g == '0' then gens = nil end
  end
end
if gens then
  redis.call('SET', KEYS[1], ARGV[1] .. gens .. ARGV[2], 'PX', ARGV[3])
else
  redis.call('UNLINK', KEYS[1])
end
redis.call('UNLINK', KEYS[2])
local seq = redis.call('INCR', KEYS[3 + n + m * 5])
redis.call('PUBLISH', ARGV[5], seq .. '|' .. ARGV[6])
return seq
"""
)

# KEYS: generation keys of sources a purge matched. ARGV: -, -, -, gen_px.
_BUMP_ALL = (
    _PRELUDE
    + _BUMP
    + """
for _, k in ipairs(KEYS) do bump(k) end
return #KEYS
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
    """Runs on every new Redis connection, before its first command: the default handshake, then ``INFO server``
    and ``INFO replication``.

    The incarnation is the server's ``run_id`` (new with every restart, also from a snapshot) joined with its
    ``master_replid`` (new whenever a replica is promoted, so a failover and a later failback to the old master —
    whose ``run_id`` did not change while its data was replaced — are both seen). ``observe`` tells the listeners
    when it changes.
    """

    def __init__(self) -> None:
        self.incarnation = ""
        self.changes = 0
        self._listeners: list[Callable[[str, str], None]] = []
        self._no_info_logged = False

    def subscribe(self, listener: Callable[[str, str], None]) -> None:
        self._listeners.append(listener)

    async def on_connect(self, conn: Any) -> None:
        await conn.on_connect()
        fields: dict[str, str] = {}
        for section in ("server", "replication"):
            await conn.send_command("INFO", section)
            try:
                info = await conn.read_response()
            except ResponseError as err:  # INFO renamed or forbidden (a proxy, an ACL): restarts go unseen
                if not self._no_info_logged:
                    self._no_info_logged = True
                    log.error(
                        "redis INFO %s is not available (%s): restarts, snapshot restores and failovers cannot be "
                        "detected; give this client INFO (see docs/COHERENCE.md, operational requirements)",
                        section,
                        err,
                        extra={"event": "redis_no_info"},
                    )
                continue
            text = info.decode() if isinstance(info, bytes) else str(info)
            for line in text.splitlines():
                name, sep, value = line.partition(":")
                if sep:
                    fields[name] = value.strip()
        self.observe(fields.get("run_id", "")[:8] + fields.get("master_replid", "")[:8])

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
        self._bump_all = client.register_script(_BUMP_ALL)
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
        keys = [key, key + LEASE, *(s + GEN for s in sources), *(s + FENCE for s in sources)]
        own = "1" if tuple(sources) == (key,) else "0"
        async with self.cache.guard("EVALSHA acquire"):
            status, raw, gens = await self._acquire(
                keys=keys,
                args=[token, lease_ms, now_ms, incarnation, len(sources), "1" if refresh else "0", own],
            )
        if incarnation and self.guard.incarnation != incarnation:
            # the call reconnected to another incarnation: the script compared values with the old one
            raise CacheUnavailable("redis incarnation changed during the call")
        gens_s = gens.decode() if isinstance(gens, bytes) else str(gens)
        stored = codec.unpack(raw) if raw else None
        return Acquired(Status(int(status)), stored, gens_s, incarnation)

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
        keys = [key, key + LEASE, *(s + GEN for s in sources), *(s + FENCE for s in sources)]
        own = "1" if tuple(sources) == (key,) else "0"
        async with self.cache.guard("EVALSHA fill"):
            stored = await self._fill(keys=keys, args=[token, head, tail, px, gens, len(sources), own, max(gen_px, px)])
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

    async def unfence(self, sources: Sequence[str], token: str, *, committed: bool) -> int:
        keys = [k for s in sources for k in (s, s + GEN, s + FENCE, s + PRE)]
        async with self.cache.guard("EVALSHA unfence"):
            return int(await self._unfence(keys=keys, args=[token, len(sources), "1" if committed else "0"]))

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
        keys = [key, key + LEASE, *(s + GEN for s in sources)]
        for s in invalidate:
            keys += [s, s + LEASE, s + GEN, s + FENCE, s + PRE]
        keys.append(self.seq_key)
        own = "1" if tuple(sources) == (key,) else "0"
        args: list[str | int | bytes] = [
            head,
            tail,
            px,
            self.gen_px,
            self.channel,
            message,
            len(sources),
            len(invalidate),
            own,
        ]
        async with self.cache.guard("EVALSHA replace"):
            return int(await self._replace(keys=keys, args=args))

    async def delete_pattern(self, pattern: str, message: bytes) -> int:
        """SCAN + UNLINK in batches (never KEYS), then one message. The matching sources' generations are bumped,
        so whatever was derived from them (even under keys the pattern does not match) and every load racing the
        purge is void; the protocol's own generation and fence keys stay. Returns value keys deleted."""
        deleted = 0
        async for batch in self.cache.scan(pattern):
            values = [k for k in batch if "|" not in k and fnmatchcase(k, pattern)]
            base = [(k, k.rsplit("|", 1)) for k in batch if "|" in k]
            companions = [k for k, (b, suffix) in base if "|" + suffix in (LEASE, PRE) and fnmatchcase(b, pattern)]
            gens = [k for k, (b, suffix) in base if "|" + suffix == GEN and fnmatchcase(b, pattern)]
            if gens:
                async with self.cache.guard("EVALSHA bump"):
                    await self._bump_all(keys=gens, args=["", "", "", self.gen_px])
            if companions:
                await self.cache.delete(*companions)
            if values:
                deleted += await self.cache.delete(*values)
        async with self.cache.guard("EVALSHA publish"):
            await self._publish(keys=[self.seq_key], args=[self.channel, message])
        return deleted

    async def eviction_policy(self) -> str | None:
        """Redis' ``maxmemory-policy`` (None when CONFIG is not allowed): the protocol needs ``noeviction``."""
        try:
            async with self.cache.guard("CONFIG GET"):
                got = await self.cache.client.config_get("maxmemory-policy")
        except CacheUnavailable:
            return None
        value = got.get("maxmemory-policy") if isinstance(got, dict) else None
        return value.decode() if isinstance(value, bytes) else value

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
