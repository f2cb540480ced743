"""Exchange rates and conversions: one actor, because a conversion is derived from its pair's rate.

A conversion is computed from the rate as the rates actor reads it (L1, Redis or Postgres) and carries that rate
value's generations: the coherence protocol never lets it outlive the rate (tiers.coherence, rule 1).
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Any

from actors.cache_actor import CacheActor
from actors.messages import Answer, Lookup
from tiers import codec, keys
from tiers.keys import CacheKey, Namespace
from tiers.postgres import RatesOrigin, decimal_str

STELLAR_QUANTUM = Decimal("0.0000001")  # 7 decimal places
_EXACT = Context(prec=100)  # wide enough that amount x rate is never rounded before the final quantize


def convert(amount: Decimal, rate: Decimal) -> Decimal:
    """amount x rate, quantised to Stellar's 7 places with ROUND_HALF_EVEN (never float)."""
    return _EXACT.multiply(amount, rate).quantize(STELLAR_QUANTUM, rounding=ROUND_HALF_EVEN, context=_EXACT)


class RatesActor(CacheActor):
    name = "rates"
    namespaces = frozenset({Namespace.RATE, Namespace.CONVERSION})

    def __init__(self, *, origin: RatesOrigin, **kw: Any) -> None:
        super().__init__(**kw)
        self._origin = origin

    async def origin(self, key: CacheKey) -> bytes | Answer | None:
        if key.namespace is Namespace.RATE:
            row = await self._origin.get_rate(*key.parts)
            return codec.dumps(row) if row is not None else None
        # a conversion is computed from the pair's rate, read through the tiers like any rate
        amount, from_, to = key.parts
        rate = await self.get(keys.rate(from_, to))
        if rate.negative:
            return Answer(codec.NEGATIVE, short=True, source=rate)
        value = Decimal(codec.loads(rate.body)["rate"])  # type: ignore[index]
        body = {
            "from": from_,
            "to": to,
            "rate": decimal_str(value),
            "result": decimal_str(convert(Decimal(amount), value)),
        }
        return Answer(codec.dumps(body), source=rate)

    async def warm_all(self, limit: int) -> int:
        """Cache warming: the most recently updated pairs."""
        return await self.warm([keys.rate(b, q) for b, q in await self._origin.list_pairs(limit)])

    async def conversion(self, amount: str, from_: str, to: str) -> Lookup:
        return await self.get(keys.conversion(amount, from_, to))

    # ---- writes: no actor state is involved (the coherence engine fences, Postgres commits), so no mailbox hop
    async def put(self, base: str, quote: str, rate: Decimal, source: str) -> dict[str, Any]:
        async with self.coherence.write([keys.rate(base, quote)]) as w:
            row, w.outbox_id = await self._origin.upsert_rate(base, quote, rate, source, outbox=w.keys)
        return row

    async def delete(self, base: str, quote: str) -> bool:
        """True if the pair existed (and is now gone everywhere)."""
        async with self.coherence.write([keys.rate(base, quote)]) as w:
            deleted, w.outbox_id = await self._origin.delete_rate(base, quote, outbox=w.keys)
        return deleted
