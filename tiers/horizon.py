"""The Horizon origin: stellar-sdk's ServerAsync over its AiohttpClient, behind a narrow Protocol.

Every stellar-sdk (and socket) failure is translated here into tiers.errors:

* connection refused / reset / dropped (``stellar_sdk.exceptions.ConnectionError``) → OriginUnavailable (503);
* no answer within ``timeout`` (the builtin ``TimeoutError``, or a ConnectionError caused by one) → OriginTimeout (504);
* 429 → OriginRateLimited (503) with Horizon's ``Retry-After`` (or ``X-Ratelimit-Reset``);
* 5xx, other 4xx, a body that is not an account document → OriginBadGateway (502).

An account that is not on the ledger (Horizon 404) is ``None``. ``asyncio.CancelledError`` is never caught.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol

import aiohttp
from stellar_sdk import StrKey
from stellar_sdk.client.aiohttp_client import AiohttpClient
from stellar_sdk.exceptions import BadRequestError, BadResponseError, BaseHorizonError, NotFoundError
from stellar_sdk.exceptions import ConnectionError as SdkConnectionError
from stellar_sdk.server_async import ServerAsync

from tiers.errors import OriginBadGateway, OriginRateLimited, OriginTimeout, OriginUnavailable

ORIGIN = "horizon"


class AccountsOrigin(Protocol):
    async def account(self, account_id: str) -> dict[str, Any] | None:
        """Horizon's account document for a ``G...`` key, or None if the account is not on the ledger."""
        ...


def create_server(url: str, *, timeout: float, trace_configs: list[aiohttp.TraceConfig] | None = None) -> ServerAsync:
    """ServerAsync over one AiohttpClient.

    AiohttpClient owns one aiohttp ClientSession (it has no public way to adopt an existing one): created on the
    first request, shared by every later one, closed by ``ServerAsync.close()``. ``request_timeout`` is that
    session's total timeout for a GET (connect + headers + body).
    """
    # extra keyword arguments reach the aiohttp.ClientSession: trace_configs give client spans + traceparent
    return ServerAsync(url, client=AiohttpClient(request_timeout=timeout, trace_configs=trace_configs or []))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lname = name.lower()
    for k, v in headers.items():
        if k.lower() == lname:
            return v
    return None


def retry_after(err: BaseHorizonError) -> float | None:
    """Seconds from Retry-After (delta-seconds) or X-Ratelimit-Reset; None when absent or unreadable."""
    response = err.args[0] if err.args else None
    headers = getattr(response, "headers", None) or {}
    for name in ("Retry-After", "X-Ratelimit-Reset"):
        raw = _header(headers, name)
        if raw is None:
            continue
        try:
            value = float(raw.strip())
        except ValueError:
            continue  # an HTTP date: not worth parsing, fall through
        if math.isfinite(value) and value >= 0:
            return value
    return None


@asynccontextmanager
async def translate(op: str) -> AsyncIterator[None]:
    try:
        yield
    except TimeoutError as err:
        raise OriginTimeout(ORIGIN, f"{op}: no answer in time") from err
    except SdkConnectionError as err:
        if isinstance(err.__cause__, TimeoutError):  # aiohttp's connect/read timeouts are ClientErrors too
            raise OriginTimeout(ORIGIN, f"{op}: no answer in time") from err
        raise OriginUnavailable(ORIGIN, f"{op}: cannot reach Horizon ({type(err.__cause__).__name__})") from err
    except BadRequestError as err:
        if err.status == 429:
            raise OriginRateLimited(ORIGIN, f"{op}: rate limit reached", retry_after=retry_after(err)) from err
        raise OriginBadGateway(ORIGIN, f"{op}: Horizon answered {err.status} ({err.title or 'client error'})") from err
    except BadResponseError as err:
        raise OriginBadGateway(ORIGIN, f"{op}: Horizon answered {err.status} ({err.title or 'server error'})") from err
    except BaseHorizonError as err:  # UnknownRequestError: a status outside 2xx-5xx
        raise OriginBadGateway(ORIGIN, f"{op}: Horizon answered {err.status}") from err
    except ValueError as err:  # a 2xx whose body is not JSON (json.JSONDecodeError)
        raise OriginBadGateway(ORIGIN, f"{op}: Horizon's answer is not JSON") from err
    except OSError as err:
        raise OriginUnavailable(ORIGIN, f"{op}: {type(err).__name__}") from err


class HorizonOrigin:
    """Polite to Horizon: at most ``max_concurrency`` requests in flight, and after a 429 no request at all
    until its ``Retry-After`` has passed (callers get OriginRateLimited at once, with the time left)."""

    def __init__(
        self,
        server: ServerAsync,
        *,
        max_concurrency: int = 8,
        default_backoff: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = server
        self.loads = 0  # account requests issued, for stats and tests
        self.refused_while_limited = 0
        self._slots = asyncio.Semaphore(max_concurrency)
        self._limited_until = 0.0
        self._default_backoff = default_backoff
        self._clock = clock

    def _check_backoff(self, op: str) -> None:
        left = self._limited_until - self._clock()
        if left > 0:
            self.refused_while_limited += 1
            raise OriginRateLimited(ORIGIN, f"{op}: rate limited by Horizon, not asking again yet", retry_after=left)

    async def account(self, account_id: str) -> dict[str, Any] | None:
        # The SDK formats the URL with no validation: a caller's bug must never become a request to another path.
        if not StrKey.is_valid_ed25519_public_key(account_id):
            raise ValueError(f"not a G... account id: {account_id!r}")
        op = f"account {account_id}"
        self._check_backoff(op)
        async with self._slots:
            self._check_backoff(op)  # a 429 may have arrived while this call waited for a slot
            self.loads += 1
            try:
                async with translate(op):
                    try:
                        doc = await self.server.accounts().account_id(account_id).call()
                    except NotFoundError:
                        return None
            except OriginRateLimited as err:
                wait = err.retry_after if err.retry_after is not None else self._default_backoff
                self._limited_until = max(self._limited_until, self._clock() + wait)
                raise
        if not isinstance(doc, dict) or not isinstance(doc.get("balances"), list):
            raise OriginBadGateway(ORIGIN, f"{op}: Horizon's answer is not an account document")
        return doc

    async def close(self) -> None:
        await self.server.close()
