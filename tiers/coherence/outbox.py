"""The outbox: one Postgres row per write, committed in the same statement as the write itself.

A writer invalidates before it commits (tiers.coherence), so an acknowledged write needs nothing more. The row is
for the commit whose outcome its writer never learnt: a statement that timed out on the client but committed on
the server later, a writer that died between commit and answer. Its writer deletes the row once it has settled
(batched); a row older than ``grace`` is claimed by whichever instance sweeps first (``FOR UPDATE SKIP LOCKED``),
invalidated everywhere, and deleted — in one transaction, so a row is never lost.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from tiers.postgres import translate


class PgOutbox:
    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout: float = 5.0, batch: int = 100) -> None:
        self.pool = pool
        self.acquire_timeout = acquire_timeout
        self.batch = batch

    async def settle(self, ids: Sequence[int]) -> None:
        async with translate("outbox settle"):
            async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
                await conn.execute("DELETE FROM cache_outbox WHERE id = ANY($1::bigint[])", list(ids))

    async def sweep(self, grace: float, apply: Callable[[list[str]], Awaitable[None]]) -> int:
        async with translate("outbox sweep"):
            async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
                async with conn.transaction():
                    rows = await conn.fetch(
                        """SELECT id, keys FROM cache_outbox
                           WHERE created_at < now() - make_interval(secs => $1)
                           ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED""",
                        grace,
                        self.batch,
                    )
                    if not rows:
                        return 0
                    await apply(sorted({k for r in rows for k in r["keys"]}))
                    await conn.execute("DELETE FROM cache_outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows])
        return len(rows)
