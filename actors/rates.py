"""Exchange rates and conversions: one actor, because a rate write must void every conversion of its pair."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Any

from actors.cache_actor import CacheActor, Lookup, Outcome, WriteResult
from actors.invalidation import Invalidator
from tiers import codec, keys
from tiers.keys import CacheKey, Namespace
from tiers.postgres import RatesOrigin, decimal_str

STELLAR_QUANTUM = Decimal("0.0000001")  # 7 decimal places
_EXACT = Context(prec=100)  # wide enough that amount x rate is never rounded before the final quantize


def convert(amount: Decimal, rate: Decimal) -> Decimal:
    """amount x rate, quantised to Stellar's 7 places with ROUND_HALF_EVEN (never float)."""
    return _EXACT.multiply(amount, rate).quantize(STELLAR_QUANTUM, rounding=ROUND_HALF_EVEN, context=_EXACT)


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class PutRate:
    base: str
    quote: str
    rate: Decimal
    source: str


@dataclass(frozen=True, slots=True)
class DeleteRate:
    base: str
    quote: str


class RatesActor(CacheActor):
    name = "rates"
    namespaces = frozenset({Namespace.RATE, Namespace.CONVERSION})

    def __init__(self, *, origin: RatesOrigin, invalidator: Invalidator, **kw: Any) -> None:
        super().__init__(**kw)
        self._origin = origin
        self._invalidator = invalidator

    async def origin(self, key: CacheKey) -> bytes | None:
        if key.namespace is Namespace.RATE:
            row = await self._origin.get_rate(*key.parts)
            return codec.dumps(row) if row is not None else None
        # a conversion is computed from the pair's rate, read through the tiers like any rate
        amount, from_, to = key.parts
        rate = await self.get(keys.rate(from_, to))
        if rate.negative:
            return None
        value = Decimal(codec.loads(rate.body)["rate"])  # type: ignore[index]
        return codec.dumps(
            {
                "from": from_,
                "to": to,
                "rate": decimal_str(value),
                "result": decimal_str(convert(Decimal(amount), value)),
            }
        )

    async def warm_all(self, limit: int) -> int:
        """Cache warming: the most recently updated pairs."""
        return await self.warm([keys.rate(b, q) for b, q in await self._origin.list_pairs(limit)])

    async def conversion(self, amount: str, from_: str, to: str) -> Lookup:
        return await self.get(keys.conversion(amount, from_, to))

    def receive_other(self, msg: Any) -> Any:
        match msg:
            case PutRate():
                return self.spawn(self._put(msg), name="rates:put")
            case DeleteRate():
                return self.spawn(self._delete(msg), name="rates:delete")
        return super().receive_other(msg)

    async def _put(self, msg: PutRate) -> WriteResult:
        row = await self._origin.upsert_rate(msg.base, msg.quote, msg.rate, msg.source)
        return WriteResult(row, await self._invalidate_pair(msg.base, msg.quote))

    async def _delete(self, msg: DeleteRate) -> WriteResult:
        if not await self._origin.delete_rate(msg.base, msg.quote):
            return WriteResult(None, None)
        return WriteResult({}, await self._invalidate_pair(msg.base, msg.quote))

    async def _invalidate_pair(self, base: str, quote: str) -> Outcome:
        return await self._invalidator.invalidate(
            keys=[keys.rate(base, quote).render()], patterns=[keys.conversions_of(base, quote)]
        )
