"""HTTP handlers. They validate, then talk to actors only (never to Redis, Postgres or Horizon)."""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from actors.fees import Fee
from actors.messages import Lookup, Source
from actors.wallets import EventResult
from service import appkeys as K
from service import validation as v
from service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from service.observed import observed
from service.problems import Problem, bad_request, not_found
from service.snapshot import snapshot
from tiers import keys
from tiers.keys import InvalidKey

JSON = "application/json"


def cached(lookup: Lookup, what: Callable[[], str]) -> web.Response:
    """The answer of a cached read; ``what`` describes a missing thing (built only when it is missing)."""
    if lookup.negative:
        raise not_found(what())
    if lookup.source is Source.STALE:
        return web.Response(body=lookup.body, content_type=JSON, headers={"X-Cache": "STALE", "Age": str(lookup.age())})
    return web.Response(body=lookup.body, content_type=JSON, headers=_X_CACHE[lookup.source])


_X_CACHE = {src: {"X-Cache": src.value} for src in Source}


def require_admin(request: web.Request) -> None:
    token = request.app[K.SETTINGS].server.admin_token
    if not token:
        raise Problem(403, "admin-disabled", "Admin endpoints closed", "no ADMIN_TOKEN is configured on this instance")
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    # aiohttp keeps bytes that are not UTF-8 as surrogates: encode them back, never fail on them (a 401, not a 500)
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, token.encode()):
        raise Problem(
            401,
            "unauthorized",
            "Unauthorized",
            "send Authorization: Bearer <ADMIN_TOKEN>",
            headers={"WWW-Authenticate": 'Bearer realm="aframp-cache"'},
        )


# ---------------------------------------------------------------- rates


async def get_rate(request: web.Request) -> web.Response:
    base = v.currency(request.match_info["base"], "base")
    quote = v.currency(request.match_info["quote"], "quote")
    lookup = await request.app[K.RATES].get(keys.rate(base, quote))
    return cached(lookup, lambda: f"no exchange rate for {base}/{quote}")


async def convert(request: web.Request) -> web.Response:
    q = request.query
    unknown = set(q) - {"amount", "from", "to"}
    if unknown:
        raise bad_request(f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    for name in ("from", "to"):
        if name not in q:
            raise bad_request(f"{name}: required query parameter", "invalid-currency")
    amount_text = q.get("amount")
    _, canonical = v.amount(amount_text)
    from_ = v.currency(q["from"], "from")
    to = v.currency(q["to"], "to")
    lookup = await request.app[K.RATES].conversion(canonical, from_, to)
    if lookup.negative:
        raise not_found(f"no exchange rate for {from_}/{to}")
    body = orjson.loads(lookup.body)
    answer = {"amount": amount_text, "from": from_, "to": to, "rate": body["rate"], "result": body["result"]}
    headers = {"X-Cache": lookup.source.value}
    if lookup.source is Source.STALE:
        headers["Age"] = str(lookup.age())
    return web.Response(body=orjson.dumps(answer), content_type=JSON, headers=headers)


async def put_rate(request: web.Request) -> web.Response:
    require_admin(request)
    base = v.currency(request.match_info["base"], "base")
    quote = v.currency(request.match_info["quote"], "quote")
    body = await v.json_object(request, allowed={"rate", "source"}, required={"rate"})
    rate = v.positive_decimal(body["rate"], "rate")
    source = v.source(body.get("source"))
    row = await request.app[K.RATES].put(base, quote, rate, source)
    return web.Response(body=orjson.dumps(row), content_type=JSON)


async def delete_rate(request: web.Request) -> web.Response:
    require_admin(request)
    base = v.currency(request.match_info["base"], "base")
    quote = v.currency(request.match_info["quote"], "quote")
    if not await request.app[K.RATES].delete(base, quote):
        raise not_found(f"no exchange rate for {base}/{quote}")
    return web.Response(status=204)


# ---------------------------------------------------------------- fees


async def get_fee(request: web.Request) -> web.Response:
    fee_type = v.fee_type(request.match_info["fee_type"])
    lookup = await request.app[K.FEES].get(keys.fee_structure(fee_type))
    return cached(lookup, lambda: f"no fee structure {fee_type!r}")


async def put_fee(request: web.Request) -> web.Response:
    require_admin(request)
    fee_type = v.fee_type(request.match_info["fee_type"])
    fields = {"rate_bps", "flat", "min", "max", "currency"}
    body = await v.json_object(request, allowed=fields, required=fields)
    fee = Fee(
        fee_type=fee_type,
        rate_bps=v.rate_bps(body["rate_bps"]),
        flat=v.non_negative_decimal(body["flat"], "flat"),
        min=v.non_negative_decimal(body["min"], "min"),
        max=v.non_negative_decimal(body["max"], "max"),
        currency=v.currency(body["currency"] if isinstance(body["currency"], str) else "", "currency"),
    )
    if fee.min > fee.max:
        raise bad_request("min: must not exceed max", "invalid-body")
    row = await request.app[K.FEES].put(fee)
    return web.Response(body=orjson.dumps(row), content_type=JSON)


# ---------------------------------------------------------------- wallets


async def get_balances(request: web.Request) -> web.Response:
    account = v.account_id(request.match_info["account_id"])
    lookup = await request.app[K.BALANCES].get(keys.balance(account))
    return cached(lookup, lambda: f"account {account} is not on the ledger (unfunded or merged)")


async def get_trustline(request: web.Request) -> web.Response:
    account = v.account_id(request.match_info["account_id"])
    code = v.asset_code(request.match_info["asset_code"])
    issuer = v.asset_issuer(request.match_info["asset_issuer"])
    lookup = await request.app[K.TRUSTLINES].get(keys.trustline(account, code, issuer))
    return cached(lookup, lambda: f"account {account} is not on the ledger (unfunded or merged)")


# ---------------------------------------------------------------- events


def event_response(result: EventResult) -> web.Response:
    body: dict[str, Any] = {"invalidated": list(result.invalidated)}
    if result.cached:
        body["cached"] = list(result.cached)
    return web.Response(body=orjson.dumps(body), content_type=JSON)


async def transaction_completed(request: web.Request) -> web.Response:
    require_admin(request)
    fields = {"transaction_id", "sender", "receiver"}
    body = await v.json_object(request, allowed=fields, required=fields)
    v.transaction_id(body["transaction_id"])
    sender = v.account_id(body["sender"], "sender")
    receiver = v.account_id(body["receiver"], "receiver")
    return event_response(await request.app[K.BALANCES].invalidate(sender, receiver))


async def balance_updated(request: web.Request) -> web.Response:
    require_admin(request)
    body = await v.json_object(request, allowed={"account_id"}, required={"account_id"})
    account = v.account_id(body["account_id"])
    return event_response(await request.app[K.BALANCES].invalidate(account))


async def trustline_created(request: web.Request) -> web.Response:
    require_admin(request)
    required = {"account_id", "asset_code", "asset_issuer"}
    body = await v.json_object(request, allowed={*required, "authorized"}, required=required)
    result = await request.app[K.TRUSTLINES].created(
        v.account_id(body["account_id"]),
        v.asset_code(body["asset_code"]),
        v.asset_issuer(body["asset_issuer"]),
        v.optional_bool(body.get("authorized"), "authorized"),
    )
    return event_response(result)


# ---------------------------------------------------------------- cache administration


async def delete_cache(request: web.Request) -> web.Response:
    require_admin(request)
    pattern = request.query.get("pattern")
    if not pattern:
        raise bad_request("pattern: required query parameter, e.g. pattern=v1:wallet:balance:*", "invalid-pattern")
    try:
        keys.validate_pattern(pattern)
    except InvalidKey as err:
        raise bad_request(f"pattern: {err}", "invalid-pattern") from None
    deleted = await request.app[K.COHERENCE].invalidate_pattern(pattern)
    return web.Response(body=orjson.dumps({"deleted": deleted}), content_type=JSON)


async def cache_stats(request: web.Request) -> web.Response:
    """Counters per data type (with hit ratio), latency percentiles per tier, L1, Redis pool, breaker, subscriber.

    The same snapshot feeds /metrics, so the two always agree."""
    return web.Response(body=orjson.dumps(snapshot(request.app)), content_type=JSON)


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[K.METRICS].render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def dashboard(request: web.Request) -> web.Response:
    return web.Response(
        body=_dashboard_html(), content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-cache"}
    )


@functools.cache
def _dashboard_html() -> bytes:
    return (Path(__file__).resolve().parent / "dashboard.html").read_bytes()


OPENAPI_PATH = Path(__file__).resolve().parent / "openapi.yaml"  # package data; docs/openapi.yaml is a copy


async def openapi_document(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this API (application/yaml, RFC 9512)."""
    return web.Response(body=_openapi_yaml(), content_type="application/yaml", charset="utf-8")


@functools.cache
def _openapi_yaml() -> bytes:
    return OPENAPI_PATH.read_bytes()


# ---------------------------------------------------------------- health


async def live(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"alive"}', content_type=JSON)


async def ready(request: web.Request) -> web.Response:
    app = request.app
    phase = app[K.LIFECYCLE].phase
    has_redis = app[K.REDIS].cache is not None
    checks = await app[K.HEALTH].checks()
    if phase is K.Phase.READY:
        if not has_redis:  # REDIS_URL=none: one instance, L1 only, by configuration
            healthy = checks["postgres"] == "up"
        else:
            healthy = all(v in ("up", "subscribed") for v in checks.values())
        status, code = ("ok" if healthy else "degraded"), 200
    else:
        status, code = phase.value, 503
    body: dict[str, Any] = {"status": status, "checks": checks}
    if not has_redis:
        body["redis_mode"] = "disabled"
    return web.Response(status=code, body=orjson.dumps(body), content_type=JSON)


ROUTES = (
    ("GET", "/v1/rates/convert", convert),
    ("GET", "/v1/rates/{base}/{quote}", get_rate),
    ("PUT", "/v1/rates/{base}/{quote}", put_rate),
    ("DELETE", "/v1/rates/{base}/{quote}", delete_rate),
    ("GET", "/v1/fees/{fee_type}", get_fee),
    ("PUT", "/v1/fees/{fee_type}", put_fee),
    ("GET", "/v1/wallets/{account_id}/balances", get_balances),
    ("GET", "/v1/wallets/{account_id}/trustlines/{asset_code}/{asset_issuer}", get_trustline),
    ("POST", "/v1/events/transaction-completed", transaction_completed),
    ("POST", "/v1/events/trustline-created", trustline_created),
    ("POST", "/v1/events/balance-updated", balance_updated),
    ("DELETE", "/v1/cache", delete_cache),
    ("GET", "/v1/cache/stats", cache_stats),
    ("GET", "/health/live", live),
    ("GET", "/health/ready", ready),
    ("GET", "/metrics", metrics_handler),
    ("GET", "/dashboard", dashboard),
    ("GET", "/openapi.yaml", openapi_document),
)


async def no_route(request: web.Request) -> web.Response:
    """The catch-all route: 405 (with Allow) when the path exists for other methods, else 404; as problems."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is request.match_info.route.resource:
            continue
        _, methods = await resource.resolve(request)
        allowed |= methods
    if allowed:
        raise Problem(
            405,
            "method-not-allowed",
            "Method Not Allowed",
            f"{request.method} is not allowed on {request.path}; allowed: {', '.join(sorted(allowed))}",
            headers={"Allow": ",".join(sorted(allowed))},
        )
    raise Problem(404, "not-found", "Not Found", f"no resource at {request.path}; see the API in the README")


def setup_routes(app: web.Application) -> None:
    for method, path, handler in ROUTES:
        if method == "GET":
            app.router.add_get(path, observed(handler, path))  # and HEAD
        else:
            app.router.add_route(method, path, observed(handler, path))
    app.router.add_route("*", "/{tail:.*}", observed(no_route, "unmatched"))  # last: problems, not text
