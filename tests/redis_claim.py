"""A Redis logical database of this test session's own, on a Redis that other sessions (other checkouts, other
engineers' runs) may be using at the same time.

A session claims database N by ``SET aframp:test:db-claim:N <owner> NX EX 30`` in db 0 and refreshes the claim
every 10 s from a thread while it runs; at the end it deletes the claim if it is still its own. A session that
dies leaves a claim that expires within 30 s. Database 0 (a default deployment's) and 13 (what older checkouts of
this suite flush without asking) are never claimed unless ``TEST_REDIS_DB`` asks for them.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from types import TracebackType

import redis

CLAIM_TTL = 30
REFRESH_EVERY = 10
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_REFRESH = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end return 0"


class DbClaim:
    def __init__(self, host: str, port: int, wanted: str | None = None) -> None:
        self.client = redis.Redis(host=host, port=port, db=0, socket_timeout=5)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.wanted = int(wanted) if wanted else None
        self.db = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _key(self, db: int) -> str:
        return f"aframp:test:db-claim:{db}"

    def _candidates(self) -> list[int]:
        if self.wanted is not None:
            return [self.wanted]
        try:
            count = int(self.client.config_get("databases").get("databases", 16))
        except (redis.RedisError, ValueError):
            count = 16
        return [n for n in range(1, count) if n != 13]

    def __enter__(self) -> int:
        for db in self._candidates():
            if self.client.set(self._key(db), self.owner, nx=True, ex=CLAIM_TTL):
                self.db = db
                break
        else:
            raise RuntimeError(
                "every Redis database of 127.0.0.1:6379 is claimed by another test session; wait or set TEST_REDIS_DB"
            )
        self._thread = threading.Thread(target=self._refresh, name="redis-db-claim", daemon=True)
        self._thread.start()
        return self.db

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):  # a periodic job, not a wait for an event
            try:
                self.client.eval(_REFRESH, 1, self._key(self.db), self.owner, CLAIM_TTL)
            except redis.RedisError:
                pass

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self.client.eval(_RELEASE, 1, self._key(self.db), self.owner)
        except redis.RedisError:
            pass
        self.client.close()
