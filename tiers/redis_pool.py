"""A redis.asyncio connection pool on which every REDIS_* setting of the seed takes effect.

redis-py gives us a bounded, blocking pool (REDIS_MAX_CONNECTIONS, acquire wait REDIS_CONNECTION_TIMEOUT) and
the per-connection idle PING (REDIS_HEALTH_CHECK_INTERVAL). It has no minimum idle count, no maximum lifetime
and no idle timeout, so this pool adds them: a connection older than ``max_lifetime`` is closed when released,
and :meth:`ManagedPool.maintain` (run periodically by the owner) closes connections idle longer than
``idle_timeout`` and opens connections until ``min_idle`` are connected and idle.
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import AbstractConnection, Connection, UnixDomainSocketConnection


class _Stamped(AbstractConnection):
    """Mixed in before a concrete connection class: when it connected and when it was last released."""

    born: float = 0.0
    last_used: float = 0.0

    async def _connect(self) -> None:
        # the concrete class after this mixin in the MRO (TCP or Unix socket) provides _connect, unannotated
        await super()._connect()  # type: ignore[safe-super, no-untyped-call]
        self.born = time.monotonic()


class StampedConnection(_Stamped, Connection):
    pass


class StampedUnixConnection(_Stamped, UnixDomainSocketConnection):
    pass


class ManagedPool(BlockingConnectionPool):
    def __init__(self, *, min_idle: int, max_lifetime: float, idle_timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_idle = min_idle
        self.max_lifetime = max_lifetime
        self.idle_timeout = idle_timeout
        self.recycled = 0  # connections closed for age or idleness

    @classmethod
    def for_url(cls, url: str, **kwargs: Any) -> ManagedPool:
        pool = cls.from_url(url, **kwargs)
        pool.connection_class = (
            StampedUnixConnection if pool.connection_class is UnixDomainSocketConnection else StampedConnection
        )
        return pool

    async def release(self, connection: AbstractConnection) -> None:
        if isinstance(connection, _Stamped):
            if connection.born and time.monotonic() - connection.born > self.max_lifetime:
                await connection.disconnect()
                connection.born = 0.0
                self.recycled += 1
            connection.last_used = time.monotonic()
        await super().release(connection)

    # ---- stats
    @property
    def in_use(self) -> int:
        return len(self._in_use_connections)

    @property
    def idle(self) -> int:
        return sum(1 for c in self._available_connections if c.is_connected)

    async def maintain(self) -> None:
        """Close idle-too-long connections, then top up to ``min_idle`` connected idle ones."""
        now = time.monotonic()
        for conn in list(self._available_connections):
            if not conn.is_connected or not isinstance(conn, _Stamped):
                continue
            idle_for = now - (conn.last_used or conn.born)
            aged = now - conn.born > self.max_lifetime
            if idle_for > self.idle_timeout or aged:
                await conn.disconnect()
                conn.born = 0.0
                self.recycled += 1
        if self.idle >= self.min_idle:
            return
        room = self.max_connections - len(self._in_use_connections)
        warm: list[AbstractConnection] = []
        try:
            # hold min_idle connections at once, so each is a distinct, connected one when released
            for _ in range(max(0, min(self.min_idle, room))):
                # redis-py leaves BlockingConnectionPool.get_connection unannotated (it returns AbstractConnection)
                warm.append(await self.get_connection())  # type: ignore[no-untyped-call]
        finally:
            for conn in warm:
                await super().release(conn)
                if isinstance(conn, _Stamped):
                    conn.last_used = time.monotonic()
