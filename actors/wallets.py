"""Wallet balances and trustlines (origin: Stellar Horizon through tiers.horizon).

One Horizon call per account serves both domains. ``BalancesActor`` loads the account document
(``GET /accounts/{G}``) and caches it, in the contract's balances shape, under ``v1:wallet:balance:{G}``.
``TrustlinesActor`` never calls Horizon itself: its origin reads the account's balances through the balances
actor's read path (L1 → Redis → lease → Horizon), so concurrent balance and trustline reads of one account
coalesce into one Horizon call, and a fresh balance entry answers trustline questions without any call.

Balances (the contract's shape, Horizon's strings kept as they are):

* the native balance comes first, as ``asset_type "native"``, ``asset_code "XLM"``, ``asset_issuer null``,
  ``limit null``, ``is_authorized null`` (Horizon lists it last);
* credit balances (``credit_alphanum4`` / ``credit_alphanum12``) follow in Horizon's order;
* ``liquidity_pool_shares`` entries are **omitted**: they have no asset code or issuer (only a pool id), a client
  reading ``asset_code``/``asset_issuer`` to find an asset would misread them, and the platform does not deal in
  pool shares. Any asset type Horizon may add later is omitted for the same reason.

Trustlines: a trustline exists iff the account's balances hold an entry with that ``asset_code`` and
``asset_issuer`` (a zero balance still counts; pool shares never match). ``exists: false`` is a 200 answer cached
with the short ``negative_ttl.trustline``; an account that is not on the ledger answers 404 for both domains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.cache_actor import CacheActor
from actors.messages import Answer, Source
from tiers import codec, keys
from tiers.errors import OriginUnavailable
from tiers.horizon import AccountsOrigin
from tiers.keys import CacheKey, Namespace

CREDIT_TYPES = ("credit_alphanum4", "credit_alphanum12")


# ---------------------------------------------------------------- documents


def balances_document(account_id: str, account: dict[str, Any]) -> dict[str, Any]:
    """The contract's balances answer from Horizon's account document (see the module docstring)."""
    native: list[dict[str, Any]] = []
    credits: list[dict[str, Any]] = []
    for b in account.get("balances", ()):
        if not isinstance(b, dict):
            continue
        kind = b.get("asset_type")
        if kind == "native":
            native.append(
                {
                    "asset_type": "native",
                    "asset_code": "XLM",
                    "asset_issuer": None,
                    "balance": b.get("balance"),
                    "limit": None,
                    "is_authorized": None,
                }
            )
        elif kind in CREDIT_TYPES:
            authorized = b.get("is_authorized")
            credits.append(
                {
                    "asset_type": kind,
                    "asset_code": b.get("asset_code"),
                    "asset_issuer": b.get("asset_issuer"),
                    "balance": b.get("balance"),
                    "limit": b.get("limit"),
                    "is_authorized": authorized if isinstance(authorized, bool) else None,
                }
            )
    return {"account_id": account_id, "balances": native + credits}


def trustline_document(balances: dict[str, Any], account_id: str, code: str, issuer: str) -> dict[str, Any]:
    """The contract's trustline answer, derived from a balances document."""
    for b in balances.get("balances", ()):
        if b.get("asset_type") in CREDIT_TYPES and b.get("asset_code") == code and b.get("asset_issuer") == issuer:
            return trustline_body(account_id, code, issuer, exists=True, authorized=b.get("is_authorized"))
    return trustline_body(account_id, code, issuer, exists=False, authorized=None)


def trustline_body(account_id: str, code: str, issuer: str, *, exists: bool, authorized: bool | None) -> dict[str, Any]:
    return {
        "account_id": account_id,
        "asset_code": code,
        "asset_issuer": issuer,
        "exists": exists,
        "authorized": authorized if exists else None,
    }


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class EventResult:
    invalidated: tuple[str, ...]  # keys invalidated in Redis and every L1
    cached: tuple[str, ...] = ()  # keys whose new value was written to Redis and announced to every instance


# ---------------------------------------------------------------- actors
#
# Events touch no actor state: each is one coherence operation, answered once it is certain (no mailbox hop).


class BalancesActor(CacheActor):
    name = "balances"
    namespaces = frozenset({Namespace.BALANCE})

    def __init__(self, *, origin: AccountsOrigin, **kw: Any) -> None:
        super().__init__(**kw)
        self._origin = origin

    async def origin(self, key: CacheKey) -> bytes | None:
        account_id = key.parts[0]
        account = await self._origin.account(account_id)
        if account is None:
            return None
        return codec.dumps(balances_document(account_id, account))

    async def invalidate(self, *accounts: str) -> EventResult:
        """transaction-completed (sender and receiver), balance-updated (one account)."""
        doomed = [keys.balance(a) for a in dict.fromkeys(accounts)]
        await self.coherence.invalidate(doomed)
        return EventResult(tuple(k.rendered for k in doomed))


class TrustlinesActor(CacheActor):
    name = "trustlines"
    namespaces = frozenset({Namespace.TRUSTLINE})

    def __init__(self, *, balances: BalancesActor, **kw: Any) -> None:
        super().__init__(**kw)
        self._balances = balances

    async def origin(self, key: CacheKey) -> Answer | None:
        account_id, code, issuer = key.parts
        lookup = await self._balances.get(keys.balance(account_id))
        if lookup.source is Source.STALE:
            # Horizon failed and the balance was served past its TTL: an answer derived from it must not be
            # cached for an hour. The trustline's own last-known value (if any) is served stale instead.
            raise OriginUnavailable("horizon", f"account {account_id}: Horizon unavailable (balance served stale)")
        if lookup.negative:
            return Answer(codec.NEGATIVE, short=True, source=lookup)  # the account is not on the ledger: 404
        body = trustline_document(codec.loads(lookup.body), account_id, code, issuer)  # type: ignore[arg-type]
        # derived from the balances document: it dies with the balance's generation (an event, a write)
        return Answer(codec.dumps(body), short=not body["exists"], source=lookup)

    async def created(
        self, account_id: str, asset_code: str, asset_issuer: str, authorized: bool | None = None
    ) -> EventResult:
        """trustline-created: ``exists: true`` cached everywhere at once, the account's balance invalidated."""
        key = keys.trustline(account_id, asset_code, asset_issuer)
        body = trustline_body(account_id, asset_code, asset_issuer, exists=True, authorized=authorized)
        dt = key.data_type
        balance = keys.balance(account_id)
        # one script: the balance is invalidated (its generation moves on) and the trustline installed under the
        # new generation, so the told answer lives until the balance changes again, and all of it happens or none
        await self.coherence.replace(
            key,
            keys.deps_of(key),
            codec.dumps(body),
            ttl=self.policy.ttl_for(dt, False),
            px=self.policy.px(dt, False),
            invalidate=[balance],
        )
        return EventResult((balance.rendered,), (key.rendered,))
