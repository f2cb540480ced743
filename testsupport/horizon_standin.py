"""A Horizon stand-in for the tests: a small aiohttp app on 127.0.0.1 (random port) serving ``GET /accounts/{id}``
in Horizon's real JSON shape, driven by the service through the real stellar-sdk client.

It counts calls per account and can change an account's balances, hold requests until released, add latency,
answer 5xx, rate-limit (429 with Retry-After) or drop the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

import orjson
from aiohttp import web
from stellar_sdk import StrKey

MAX_LIMIT = "922337203685.4775807"
HORIZON_ERRORS = "https://stellar.org/horizon-errors/"


# ---------------------------------------------------------------- balance entries, as Horizon writes them


def credit(
    code: str,
    issuer: str,
    balance: str = "0.0000000",
    *,
    limit: str = MAX_LIMIT,
    authorized: bool = True,
    ledger: int = 1_234_567,
) -> dict[str, Any]:
    return {
        "balance": balance,
        "limit": limit,
        "buying_liabilities": "0.0000000",
        "selling_liabilities": "0.0000000",
        "last_modified_ledger": ledger,
        "is_authorized": authorized,
        "is_authorized_to_maintain_liabilities": authorized,
        "asset_type": "credit_alphanum4" if len(code) <= 4 else "credit_alphanum12",
        "asset_code": code,
        "asset_issuer": issuer,
    }


def pool_share(pool_id: str, balance: str = "10.0000000") -> dict[str, Any]:
    return {
        "balance": balance,
        "liquidity_pool_id": pool_id,
        "limit": MAX_LIMIT,
        "last_modified_ledger": 1_234_568,
        "is_authorized": False,
        "is_authorized_to_maintain_liabilities": False,
        "asset_type": "liquidity_pool_shares",
    }


def native(balance: str) -> dict[str, Any]:
    return {
        "balance": balance,
        "buying_liabilities": "0.0000000",
        "selling_liabilities": "0.0000000",
        "asset_type": "native",
    }


def problem(status: int, slug: str, title: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": HORIZON_ERRORS + slug, "title": title, "status": status, "detail": detail}
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/problem+json", headers=headers
    )


class HorizonStandin:
    def __init__(self) -> None:
        self.accounts: dict[str, list[dict[str, Any]]] = {}  # account -> balances (native last, as Horizon)
        self.calls: Counter[str] = Counter()  # GET /accounts/{id} per id, every answer counted
        self.last_headers: dict[str, str] = {}  # request headers of the latest GET /accounts/{id}
        self.mode: str | None = None  # None | "fail" | "rate_limit" | "drop"
        self.fail_status = 500
        self.retry_after = "7"
        self.latency = 0.0
        self.in_flight = 0
        self._gate: asyncio.Event | None = None
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ---- driving it
    def fund(self, account: str, *credits: dict[str, Any], xlm: str = "9.8765432") -> None:
        """Create or replace an account: its credit (and pool share) entries, then native last."""
        self.accounts[account] = [*credits, native(xlm)]

    def hold(self) -> None:
        """Requests wait (after being counted) until release()."""
        self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
        self._gate = None

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    # ---- lifecycle
    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/accounts/{account_id}", self._account)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        self._closing.set()
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    # ---- GET /accounts/{id}
    async def _account(self, request: web.Request) -> web.StreamResponse:
        account = request.match_info["account_id"]
        self.calls[account] += 1
        self.last_headers = dict(request.headers)
        self.in_flight += 1
        try:
            if self._gate is not None:
                gate = self._gate
                await asyncio.wait(
                    [asyncio.ensure_future(gate.wait()), asyncio.ensure_future(self._closing.wait())],
                    return_when=asyncio.FIRST_COMPLETED,
                )
            if self.latency:
                await self._pause(self.latency)
            return self._answer(request, account)
        finally:
            self.in_flight -= 1

    def _answer(self, request: web.Request, account: str) -> web.StreamResponse:
        if self.mode == "drop":
            assert request.transport is not None
            request.transport.abort()  # connection reset: no status line at all
            raise web.HTTPInternalServerError()  # never written
        if self.mode == "rate_limit":
            return problem(
                429,
                "rate_limit_exceeded",
                "Rate Limit Exceeded",
                "The rate limit for the requesting IP address is over its alloted limit.",
                headers={
                    "Retry-After": self.retry_after,
                    "X-Ratelimit-Limit": "3600",
                    "X-Ratelimit-Remaining": "0",
                    "X-Ratelimit-Reset": self.retry_after,
                },
            )
        if self.mode == "fail":
            return problem(
                self.fail_status,
                "server_error",
                "Internal Server Error",
                "An error occurred while processing this request.",
            )
        if not StrKey.is_valid_ed25519_public_key(account):
            return problem(400, "bad_request", "Bad Request", "The request you sent was invalid in some way.")
        balances = self.accounts.get(account)
        if balances is None:
            return problem(404, "not_found", "Resource Missing", "The resource at the url requested was not found.")
        return web.Response(body=orjson.dumps(self._document(account, balances)), content_type="application/hal+json")

    def _document(self, account: str, balances: list[dict[str, Any]]) -> dict[str, Any]:
        base = f"{self.url}/accounts/{account}"
        return {
            "_links": {
                "self": {"href": base},
                "transactions": {"href": base + "/transactions{?cursor,limit,order}", "templated": True},
                "operations": {"href": base + "/operations{?cursor,limit,order}", "templated": True},
                "payments": {"href": base + "/payments{?cursor,limit,order}", "templated": True},
                "effects": {"href": base + "/effects{?cursor,limit,order}", "templated": True},
                "offers": {"href": base + "/offers{?cursor,limit,order}", "templated": True},
                "trades": {"href": base + "/trades{?cursor,limit,order}", "templated": True},
                "data": {"href": base + "/data/{key}", "templated": True},
            },
            "id": account,
            "account_id": account,
            "sequence": "4294967296",
            "subentry_count": sum(1 for b in balances if b["asset_type"] != "native"),
            "last_modified_ledger": 1_234_569,
            "thresholds": {"low_threshold": 0, "med_threshold": 0, "high_threshold": 0},
            "flags": {
                "auth_required": False,
                "auth_revocable": False,
                "auth_immutable": False,
                "auth_clawback_enabled": False,
            },
            "balances": balances,
            "signers": [{"weight": 1, "key": account, "type": "ed25519_public_key"}],
            "data": {},
            "num_sponsoring": 0,
            "num_sponsored": 0,
            "paging_token": account,
        }
