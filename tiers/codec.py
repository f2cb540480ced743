"""How cached values are stored in Redis: a small header, then the orjson body bytes. Never pickle.

``<kind>|<fresh_until_ms>|<loaded_at_ms>|<incarnation>|<generations>|<body>``:

* ``kind``: ``2`` a plain body, ``S`` a short answer (an absence, such as a trustline that does not exist: never
  served stale nor refreshed ahead), ``Z``/``Y`` the same zlib-compressed;
* ``fresh_until`` is the logical expiry; the Redis key lives longer (max-stale) so a last-known value can be
  served when the origin fails;
* ``incarnation``: the Redis server (run id prefix) the value was loaded under: a value from another incarnation
  (a restart, a snapshot restore, a failover) is never served (tiers.coherence);
* ``generations``: comma-separated generations of the value's sources when it was computed (tiers.coherence);
* the body is the JSON the service answers with (``null`` for a cached "does not exist"), so a hit does no JSON
  work.

Cache compression: a body of at least ``COMPRESS_MIN`` bytes (large balance documents) is stored zlib-compressed
(level 1: fast), and only kept so when that saves at least 10 %.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import orjson

NEGATIVE = b"null"
COMPRESS_MIN = 1024
_KINDS = {b"2": (False, False), b"S": (True, False), b"Z": (False, True), b"Y": (True, True)}  # kind -> short, zlib
# the Lua pattern that reads (fresh_until, incarnation, generations) from a header (tiers.coherence scripts)
LUA_HEADER = "^[2SZY]|(%d+)|%d+|(%w*)|([%d,]*)|"


@dataclass(frozen=True, slots=True)
class Stored:
    body: bytes
    fresh_until_ms: int
    loaded_at_ms: int
    short: bool = False
    incarnation: str = ""
    gens: str = ""

    @property
    def negative(self) -> bool:
        return self.body == NEGATIVE

    def fresh(self, now_ms: int) -> bool:
        return now_ms < self.fresh_until_ms


def pack_parts(
    body: bytes,
    fresh_until_ms: int,
    loaded_at_ms: int,
    *,
    short: bool = False,
    incarnation: str = "",
    compress_min: int = COMPRESS_MIN,
) -> tuple[bytes, bytes]:
    """The envelope split around its generations field: ``head + gens + tail`` is the stored value."""
    short = short or body == NEGATIVE
    kind = b"S" if short else b"2"
    if len(body) >= compress_min:
        packed = zlib.compress(body, 1)
        if len(packed) <= len(body) * 0.9:
            body, kind = packed, (b"Y" if short else b"Z")
    head = b"%s|%d|%d|%s|" % (kind, fresh_until_ms, loaded_at_ms, incarnation.encode())
    return head, b"|" + body


def pack(
    body: bytes,
    fresh_until_ms: int,
    loaded_at_ms: int,
    short: bool = False,
    *,
    incarnation: str = "",
    gens: str = "",
    compress_min: int = COMPRESS_MIN,
) -> bytes:
    head, tail = pack_parts(
        body, fresh_until_ms, loaded_at_ms, short=short, incarnation=incarnation, compress_min=compress_min
    )
    return head + gens.encode() + tail


def unpack(raw: bytes) -> Stored | None:
    """None for anything that is not a well-formed envelope (treated as a miss, never as data)."""
    try:
        kind, fresh, loaded, inc, gens, body = raw.split(b"|", 5)
        short, compressed = _KINDS[kind]
        if compressed:
            body = zlib.decompress(body)
        return Stored(body, int(fresh), int(loaded), short, inc.decode("ascii"), gens.decode("ascii"))
    except (ValueError, KeyError, UnicodeDecodeError, zlib.error):
        return None


def dumps(value: object) -> bytes:
    return orjson.dumps(value)


def loads(raw: bytes | str) -> object:
    return orjson.loads(raw)
