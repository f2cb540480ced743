"""The service's own errors. Infrastructure exceptions are translated into these at the tier boundary."""

from __future__ import annotations


class TierError(Exception):
    """Base of every error a tier raises."""


class CacheUnavailable(TierError):
    """Redis could not answer (down, timed out, breaker open). Callers fall back to the origin."""


class OriginError(TierError):
    """The source of truth failed. ``status`` is the HTTP status the service answers with."""

    status = 503
    title = "Origin unavailable"

    def __init__(self, origin: str, detail: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{origin}: {detail}")
        self.origin = origin
        self.detail = detail
        self.retry_after = retry_after


class OriginUnavailable(OriginError):
    status = 503
    title = "Origin unavailable"


class OriginTimeout(OriginError):
    status = 504
    title = "Origin timed out"


class OriginBadGateway(OriginError):
    status = 502
    title = "Origin answered with an error"


class OriginRateLimited(OriginError):
    status = 503
    title = "Origin rate limit reached"


class Conflict(TierError):
    """A write that violates a constraint of the source of truth (answered 409/422 by the service)."""
