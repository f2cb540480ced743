"""Span helpers for the actors and tiers' own spans (the TracerProvider is built in service.telemetry).

Keys are put on spans only outside the wallet and auth namespaces: those keys hold account ids or credentials,
so for them the key is omitted (not hashed: account ids are public and enumerable, a hash would be reversible).
"""

from __future__ import annotations

from opentelemetry.trace import Tracer

from tiers.keys import CacheKey, Namespace

# namespaces whose keys hold an account id or a credential: their key is never put on a span
SENSITIVE = frozenset({Namespace.BALANCE, Namespace.TRUSTLINE, Namespace.SESSION, Namespace.JWT, Namespace.RATE_LIMIT})

# span attribute names of the cache's own spans
A_DATA_TYPE = "cache.data_type"
A_TIER = "cache.tier"
A_OUTCOME = "cache.outcome"
A_NAMESPACE = "cache.namespace"
A_KEY = "cache.key"


def key_attributes(key: CacheKey, tier: str | None = None, outcome: str | None = None) -> dict[str, str]:
    """Span attributes of a cache key: data type, namespace and (outside wallet/auth namespaces) the key."""
    attrs = {A_DATA_TYPE: key.namespace.data_type.value, A_NAMESPACE: key.namespace.prefix}
    if key.namespace not in SENSITIVE:
        attrs[A_KEY] = key.render()
    if tier is not None:
        attrs[A_TIER] = tier
    if outcome is not None:
        attrs[A_OUTCOME] = outcome
    return attrs


def l1_span(tracer: Tracer, key: CacheKey, outcome: str) -> None:
    """The L1 lookup is a dictionary read: record it as an instantaneous span with its outcome."""
    tracer.start_span("cache.l1", attributes=key_attributes(key, "l1", outcome)).end()
