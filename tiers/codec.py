"""How cached values are stored in Redis: a tiny header, then the orjson body bytes. Never pickle.

``1|<fresh_until_ms>|<loaded_at_ms>|<body>``: the body is the JSON the service answers with (``null`` for a
cached "does not exist"), so an L2 hit does no JSON work. ``s|...`` marks a short answer (an absence, such as a
trustline that does not exist), never served stale nor refreshed ahead. ``fresh_until`` is the logical expiry;
the Redis key lives longer (max-stale) so a last-known value can be served when the origin fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

NEGATIVE = b"null"


@dataclass(frozen=True, slots=True)
class Stored:
    body: bytes
    fresh_until_ms: int
    loaded_at_ms: int
    short: bool = False

    @property
    def negative(self) -> bool:
        return self.body == NEGATIVE

    def fresh(self, now_ms: int) -> bool:
        return now_ms < self.fresh_until_ms


def pack(body: bytes, fresh_until_ms: int, loaded_at_ms: int, short: bool = False) -> bytes:
    return b"%s|%d|%d|%s" % (b"s" if short or body == NEGATIVE else b"1", fresh_until_ms, loaded_at_ms, body)


def unpack(raw: bytes) -> Stored | None:
    """None for anything that is not a well-formed envelope (treated as a miss, never as data)."""
    try:
        version, fresh, loaded, body = raw.split(b"|", 3)
        if version not in (b"1", b"s"):
            return None
        return Stored(body, int(fresh), int(loaded), version == b"s")
    except ValueError:
        return None


def dumps(value: object) -> bytes:
    return orjson.dumps(value)


def loads(raw: bytes | str) -> object:
    return orjson.loads(raw)
