"""Moved to :mod:`testsupport.horizon_standin` (shared with bench/); kept for importers not yet moved over."""

from testsupport.horizon_standin import MAX_LIMIT, HorizonStandin, credit, pool_share

__all__ = ["MAX_LIMIT", "HorizonStandin", "credit", "pool_share"]
