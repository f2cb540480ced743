"""Moved to :mod:`testsupport.redis_server` (shared with bench/); kept for importers not yet moved over."""

from testsupport.redis_server import RedisServer

__all__ = ["RedisServer"]
