"""Fee structures (Postgres; key v1:fee:structure:{fee_type}, TTL 1 h)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from actors.cache_actor import CacheActor
from tiers import codec, keys
from tiers.keys import CacheKey, Namespace
from tiers.postgres import FeesOrigin


@dataclass(frozen=True, slots=True)
class Fee:
    fee_type: str
    rate_bps: int
    flat: Decimal
    min: Decimal
    max: Decimal
    currency: str


class FeesActor(CacheActor):
    name = "fees"
    namespaces = frozenset({Namespace.FEE})

    def __init__(self, *, origin: FeesOrigin, **kw: Any) -> None:
        super().__init__(**kw)
        self._origin = origin

    async def origin(self, key: CacheKey) -> bytes | None:
        row = await self._origin.get_fee(key.parts[0])
        return codec.dumps(row) if row is not None else None

    async def warm_all(self, limit: int) -> int:
        """Cache warming: every fee structure (there are few)."""
        return await self.warm([keys.fee_structure(t) for t in await self._origin.list_fee_types(limit)])

    async def put(self, fee: Fee) -> dict[str, Any]:
        """Upsert (no actor state is involved, so no mailbox hop: the coherence engine fences, Postgres commits)."""
        values = {"rate_bps": fee.rate_bps, "flat": fee.flat, "min": fee.min, "max": fee.max, "currency": fee.currency}
        async with self.coherence.write([keys.fee_structure(fee.fee_type)]) as w:
            row, w.outbox_id = await self._origin.upsert_fee(fee.fee_type, values, outbox=w.keys)
        return row
