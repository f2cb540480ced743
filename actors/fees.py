"""Fee structures (Postgres; key v1:fee:structure:{fee_type}, TTL 1 h)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from actors.cache_actor import CacheActor, WriteResult
from actors.invalidation import Invalidator
from tiers import codec, keys
from tiers.keys import CacheKey, Namespace
from tiers.postgres import FeesOrigin


@dataclass(frozen=True, slots=True)
class PutFee:
    fee_type: str
    rate_bps: int
    flat: Decimal
    min: Decimal
    max: Decimal
    currency: str


class FeesActor(CacheActor):
    name = "fees"
    namespaces = frozenset({Namespace.FEE})

    def __init__(self, *, origin: FeesOrigin, invalidator: Invalidator, **kw: Any) -> None:
        super().__init__(**kw)
        self._origin = origin
        self._invalidator = invalidator

    async def origin(self, key: CacheKey) -> bytes | None:
        row = await self._origin.get_fee(key.parts[0])
        return codec.dumps(row) if row is not None else None

    async def warm_all(self, limit: int) -> int:
        """Cache warming: every fee structure (there are few)."""
        return await self.warm([keys.fee_structure(t) for t in await self._origin.list_fee_types(limit)])

    def receive_other(self, msg: Any) -> Any:
        if isinstance(msg, PutFee):
            return self.spawn(self._put(msg), name="fees:put")
        return super().receive_other(msg)

    async def _put(self, msg: PutFee) -> WriteResult:
        row = await self._origin.upsert_fee(
            msg.fee_type,
            {"rate_bps": msg.rate_bps, "flat": msg.flat, "min": msg.min, "max": msg.max, "currency": msg.currency},
        )
        outcome = await self._invalidator.invalidate(keys=[keys.fee_structure(msg.fee_type).render()])
        return WriteResult(row, outcome)
