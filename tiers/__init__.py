"""Tiers: keys, the in-process L1, Redis (L2), the origins and the invalidation bus.

Nothing here imports from ``actors`` or ``service``.
"""
