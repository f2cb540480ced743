"""Cache keys are values: typed builders, rendered as ``v1:{namespace}:{identifier}`` in exactly one place.

An identifier segment may hold only ``[A-Za-z0-9._-]`` (plus ``+``/``=`` for token digests), so no segment can
smuggle a ``:`` separator, a glob character (``* ? [ ] \\``) or whitespace into a key or a pattern.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from functools import lru_cache

VERSION = "v1"

_SEGMENT = re.compile(r"[A-Za-z0-9._+=-]{1,128}")


class DataType(enum.StrEnum):
    """The seed's TTL table. The value is the config.toml name."""

    EXCHANGE_RATE = "exchange_rate"
    WALLET_BALANCE = "wallet_balance"
    TRUSTLINE = "trustline"
    FEE_STRUCTURE = "fee_structure"
    USER_SESSION = "user_session"
    TRANSACTION_STATUS = "transaction_status"
    RECENT_TRANSACTIONS = "recent_transactions"
    JWT_VALIDATION = "jwt_validation"
    RATE_LIMIT = "rate_limit"
    BILL_PROVIDER = "bill_provider"


class InvalidKey(ValueError):
    """An identifier that cannot be part of a key."""


class Namespace(enum.Enum):
    """Every namespace the service knows: (rendered prefix, data type)."""

    RATE = ("rate", DataType.EXCHANGE_RATE)
    CONVERSION = ("rate:convert", DataType.EXCHANGE_RATE)
    BALANCE = ("wallet:balance", DataType.WALLET_BALANCE)
    TRUSTLINE = ("wallet:trustline", DataType.TRUSTLINE)
    FEE = ("fee:structure", DataType.FEE_STRUCTURE)
    SESSION = ("auth:session", DataType.USER_SESSION)
    JWT = ("auth:jwt", DataType.JWT_VALIDATION)
    RATE_LIMIT = ("auth:rate_limit", DataType.RATE_LIMIT)
    TX_STATUS = ("tx:status", DataType.TRANSACTION_STATUS)
    RECENT_TX = ("tx:recent", DataType.RECENT_TRANSACTIONS)
    BILL_PROVIDER = ("bill:provider", DataType.BILL_PROVIDER)

    @property
    def prefix(self) -> str:
        return self.value[0]

    @property
    def data_type(self) -> DataType:
        return self.value[1]


def segment(value: str) -> str:
    """Validate one identifier segment."""
    if not isinstance(value, str) or not _SEGMENT.fullmatch(value):
        raise InvalidKey(f"not a valid key segment: {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class CacheKey:
    namespace: Namespace
    parts: tuple[str, ...]
    # derived once (keys are values: reused on every hit without re-rendering)
    rendered: str = field(init=False, repr=False, compare=False, hash=False)
    data_type: DataType = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.parts:
            raise InvalidKey("a key needs at least one identifier segment")
        for p in self.parts:
            segment(p)
        object.__setattr__(self, "rendered", render(self.namespace, self.parts))
        object.__setattr__(self, "data_type", self.namespace.data_type)

    def render(self) -> str:
        return self.rendered

    def __str__(self) -> str:
        return self.render()


def render(namespace: Namespace, parts: tuple[str, ...]) -> str:
    """The one place a key string is built."""
    return ":".join((VERSION, namespace.prefix, *parts))


# ---------------------------------------------------------------- builders (one per data type)


@lru_cache(maxsize=8192)
def rate(base: str, quote: str) -> CacheKey:
    return CacheKey(Namespace.RATE, (base, quote))


@lru_cache(maxsize=8192)
def conversion(amount: str, from_: str, to: str) -> CacheKey:
    """``amount`` must already be canonical (see service.validation.canonical_amount)."""
    return CacheKey(Namespace.CONVERSION, (amount, from_, to))


@lru_cache(maxsize=8192)
def balance(account_id: str) -> CacheKey:
    return CacheKey(Namespace.BALANCE, (account_id,))


@lru_cache(maxsize=8192)
def trustline(account_id: str, asset_code: str, asset_issuer: str) -> CacheKey:
    return CacheKey(Namespace.TRUSTLINE, (account_id, asset_code, asset_issuer))


def trustlines_of(account_id: str) -> str:
    segment(account_id)
    return ":".join((VERSION, Namespace.TRUSTLINE.prefix, account_id, "*"))


@lru_cache(maxsize=8192)
def fee_structure(fee_type: str) -> CacheKey:
    return CacheKey(Namespace.FEE, (fee_type,))


def session(session_id: str) -> CacheKey:
    return CacheKey(Namespace.SESSION, (session_id,))


def jwt_validation(token_digest: str) -> CacheKey:
    """Keyed by a digest of the token, never the token itself."""
    return CacheKey(Namespace.JWT, (token_digest,))


def rate_limit(user_id: str, action: str) -> CacheKey:
    return CacheKey(Namespace.RATE_LIMIT, (user_id, action))


def transaction_status(transaction_id: str) -> CacheKey:
    return CacheKey(Namespace.TX_STATUS, (transaction_id,))


def recent_transactions(user_id: str) -> CacheKey:
    return CacheKey(Namespace.RECENT_TX, (user_id,))


def bill_provider(provider_id: str) -> CacheKey:
    return CacheKey(Namespace.BILL_PROVIDER, (provider_id,))


# ---------------------------------------------------------------- patterns

_PATTERN_SEGMENT = re.compile(r"[A-Za-z0-9._+=*-]{1,128}")


def validate_pattern(pattern: str) -> str:
    """A pattern for DELETE /v1/cache: ``v1:`` + a known namespace, then segments of key characters or ``*``.

    ``?``, ``[...]`` and backslashes are refused so a pattern means the same in Redis and in L1.
    Returns the pattern; raises InvalidKey with a reason.
    """
    if not pattern.startswith(VERSION + ":"):
        raise InvalidKey("pattern must start with 'v1:'")
    rest = pattern[len(VERSION) + 1 :]
    # longest prefix first so that "rate:convert" wins over "rate"
    for ns in sorted(Namespace, key=lambda n: -len(n.prefix)):
        p = ns.prefix
        if rest == p or rest.startswith(p + ":"):
            tail = rest[len(p) + 1 :] if rest != p else ""
            if not tail:
                raise InvalidKey(f"pattern needs an identifier part after 'v1:{p}:' (use '*' for all)")
            for seg in tail.split(":"):
                if not _PATTERN_SEGMENT.fullmatch(seg):
                    raise InvalidKey(f"pattern segment {seg!r} may hold only letters, digits, '._+=-' and '*'")
            return pattern
    known = ", ".join(sorted({"v1:" + n.prefix + ":" for n in Namespace}))
    raise InvalidKey(f"pattern must start with a known namespace: {known}")


def namespace_of(rendered: str) -> Namespace | None:
    if not rendered.startswith(VERSION + ":"):
        return None
    rest = rendered[len(VERSION) + 1 :]
    for ns in sorted(Namespace, key=lambda n: -len(n.prefix)):
        if rest.startswith(ns.prefix + ":"):
            return ns
    return None


# ---------------------------------------------------------------- sources of derived keys
#
# A derived key's value is computed from other cached values, its sources: a conversion from its pair's rate, a
# trustline answer from its account's balances document. The coherence protocol (tiers.coherence) keeps a generation
# per source; a derived value is valid only while the generations it was computed under are current, so invalidating
# a rate (a balance) costs O(1) whatever was derived from it.

DERIVED_FROM: dict[Namespace, tuple[Namespace, ...]] = {
    Namespace.RATE: (Namespace.CONVERSION,),
    Namespace.BALANCE: (Namespace.TRUSTLINE,),
}


def deps_of(key: CacheKey) -> tuple[CacheKey, ...]:
    """The sources a derived key was computed from; () for a key loaded from an origin itself."""
    if key.namespace is Namespace.CONVERSION:
        _, from_, to = key.parts
        return (rate(from_, to),)
    if key.namespace is Namespace.TRUSTLINE:
        return (balance(key.parts[0]),)
    return ()
