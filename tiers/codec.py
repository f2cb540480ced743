"""How cached values are stored in Redis: a tiny header, then the orjson body bytes. Never pickle.

``1|<fresh_until_ms>|<loaded_at_ms>|<body>``: the body is the JSON the service answers with (``null`` for a
cached "does not exist"), so an L2 hit does no JSON work. ``s|...`` marks a short answer (an absence, such as a
trustline that does not exist), never served stale nor refreshed ahead. ``fresh_until`` is the logical expiry;
the Redis key lives longer (max-stale) so a last-known value can be served when the origin fails.

Cache compression: a body of at least ``COMPRESS_MIN`` bytes (large balance documents) is stored zlib-compressed
(level 1: fast), marked ``z|`` (``y|`` when short), and only kept so when that saves at least 10 %.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import orjson

NEGATIVE = b"null"
COMPRESS_MIN = 1024
_PLAIN = {b"1": False, b"s": True}  # version byte -> short
_ZLIB = {b"z": False, b"y": True}


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


def pack(
    body: bytes, fresh_until_ms: int, loaded_at_ms: int, short: bool = False, compress_min: int = COMPRESS_MIN
) -> bytes:
    short = short or body == NEGATIVE
    version = b"s" if short else b"1"
    if len(body) >= compress_min:
        packed = zlib.compress(body, 1)
        if len(packed) <= len(body) * 0.9:
            body, version = packed, (b"y" if short else b"z")
    return b"%s|%d|%d|%s" % (version, fresh_until_ms, loaded_at_ms, body)


def unpack(raw: bytes) -> Stored | None:
    """None for anything that is not a well-formed envelope (treated as a miss, never as data)."""
    try:
        version, fresh, loaded, body = raw.split(b"|", 3)
        if version in _PLAIN:
            return Stored(body, int(fresh), int(loaded), _PLAIN[version])
        if version in _ZLIB:
            return Stored(zlib.decompress(body), int(fresh), int(loaded), _ZLIB[version])
        return None
    except (ValueError, zlib.error):
        return None


def dumps(value: object) -> bytes:
    return orjson.dumps(value)


def loads(raw: bytes | str) -> object:
    return orjson.loads(raw)
