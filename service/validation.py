"""Input validation. Everything here runs before any tier or origin is touched; failures are 400 problems."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from aiohttp import web

from service.problems import bad_request

_CURRENCY = re.compile(r"[A-Za-z0-9]{1,12}")
_FEE_TYPE = re.compile(r"[a-z0-9_]{1,32}")
_AMOUNT = re.compile(r"[0-9]{1,12}(\.[0-9]{1,7})?")
_DECIMAL = re.compile(r"[0-9]{1,20}(\.[0-9]{1,18})?")
_SOURCE = re.compile(r"[A-Za-z0-9 ._:/-]{1,64}")

MAX_AMOUNT = Decimal("922337203685.4775807")  # Stellar's int64 stroops


def currency(value: str, field: str = "currency") -> str:
    if not _CURRENCY.fullmatch(value or ""):
        raise bad_request(f"{field}: expected 1-12 ASCII letters or digits, got {value!r}", "invalid-currency")
    return value.upper()


def fee_type(value: str) -> str:
    if not _FEE_TYPE.fullmatch(value or ""):
        raise bad_request(f"fee_type: expected 1-32 of a-z, 0-9 and _, got {value!r}", "invalid-fee-type")
    return value


def amount(value: str | None) -> tuple[Decimal, str]:
    """A positive decimal with at most 7 fractional digits and at most 922337203685.4775807.

    Returns the value and its canonical text (no trailing zeros: ``100.50`` → ``100.5``).
    """
    if value is None:
        raise bad_request("amount: required query parameter", "invalid-amount")
    if not _AMOUNT.fullmatch(value):
        raise bad_request(
            f"amount: expected a positive decimal like 100.50 with at most 7 fractional digits, got {value!r}",
            "invalid-amount",
        )
    d = Decimal(value)
    if d <= 0:
        raise bad_request("amount: must be greater than 0", "invalid-amount")
    if d > MAX_AMOUNT:
        raise bad_request(f"amount: must be at most {MAX_AMOUNT}", "invalid-amount")
    return d, canonical(d)


def canonical(d: Decimal) -> str:
    text = format(d.normalize(), "f")
    return text


def positive_decimal(value: Any, field: str) -> Decimal:
    d = non_negative_decimal(value, field)
    if d <= 0:
        raise bad_request(f"{field}: must be greater than 0", "invalid-body")
    return d


def non_negative_decimal(value: Any, field: str) -> Decimal:
    if not isinstance(value, str):
        raise bad_request(
            f'{field}: expected a decimal string such as "0.00066", not a JSON {_kind(value)}', "invalid-body"
        )
    if not _DECIMAL.fullmatch(value):
        raise bad_request(
            f"{field}: expected a decimal string with at most 18 fractional digits, got {value!r}", "invalid-body"
        )
    try:
        return Decimal(value)
    except InvalidOperation:  # unreachable after the regex, kept as a guard
        raise bad_request(f"{field}: not a decimal: {value!r}", "invalid-body") from None


def _kind(value: Any) -> str:
    return {bool: "boolean", int: "number", float: "number", dict: "object", list: "array"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


async def json_object(request: web.Request, allowed: set[str], required: set[str]) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("body: not valid JSON", "invalid-body") from None
    if not isinstance(body, dict):
        raise bad_request(f"body: expected a JSON object, got a JSON {_kind(body)}", "invalid-body")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad_request(
            f"body: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}", "invalid-body"
        )
    missing = sorted(required - set(body))
    if missing:
        raise bad_request(f"body: missing field(s) {', '.join(missing)}", "invalid-body")
    return body


def source(value: Any) -> str:
    if value is None:
        return "manual"
    if not isinstance(value, str) or not _SOURCE.fullmatch(value):
        raise bad_request("source: expected 1-64 of letters, digits, space and ._:/-", "invalid-body")
    return value


def rate_bps(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10000:
        raise bad_request(f"rate_bps: expected an integer from 0 to 10000, got {value!r}", "invalid-body")
    return value
