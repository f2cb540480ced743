"""The OpenAPI document (service/openapi.yaml): valid OpenAPI 3.1, in step with the app's routes, and describing
what real apps answer (real Postgres, Redis and the Horizon stand-in through stellar-sdk; no mocks)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import yaml
from aiohttp import web
from openapi_spec_validator import OpenAPIV31SpecValidator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from stellar_sdk import Keypair, MuxedAccount

from service import appkeys as K
from service.app import _draining, create_app
from service.routes import OPENAPI_PATH
from tests.conftest import AUTH, ROOT, eventually
from testsupport.horizon_standin import credit
from tiers.keys import DataType

DOC_BYTES = OPENAPI_PATH.read_bytes()
DOC: dict[str, Any] = yaml.safe_load(DOC_BYTES)
DOC_URI = "urn:aframp:openapi"
REGISTRY = Registry().with_resource(DOC_URI, Resource.from_contents(DOC, default_specification=DRAFT202012))
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
CACHE_HEADERS = ("X-Cache", "Age", "Retry-After", "WWW-Authenticate")


# ---------------------------------------------------------------- helpers


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _deref(node: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Follow a local $ref (a Response or Header object); returns the object and its JSON pointer."""
    pointer = ""
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        pointer = ref[1:]
        node = DOC
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node, pointer


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def documented_operations() -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in DOC["paths"].items() for m in item if m in METHODS}


def app_operations(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every route; aiohttp's automatic HEAD of a GET route is left out, and so is the
    catch-all route that answers unknown paths with a 404 (or 405) problem."""
    ops = set()
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource.canonical == "/{tail}":
            continue
        ops.add((route.method, route.resource.canonical))
    return ops


def template_of(app: web.Application, method: str, path: str) -> str:
    for resource in app.router.resources():
        info = resource.get_info()
        pattern = info.get("pattern")
        if pattern is not None and pattern.fullmatch(path):
            return resource.canonical
        if info.get("path") == path:
            return resource.canonical
    raise AssertionError(f"no route for {method} {path}")


class Checked:
    """Every (method, template, status) seen conforming, to assert coverage per test."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str, int]] = set()


async def conforms(client: Any, method: str, path: str, seen: Checked | None = None, **kw: Any) -> Any:
    """Send a request and check the answer against the document; returns (response, parsed JSON or text)."""
    r = await client.request(method, path, **kw)
    raw = await r.read()
    app = client.server.app
    template = template_of(app, method, path.split("?", 1)[0])
    operation = DOC["paths"][template][method.lower()]
    responses = operation["responses"]
    assert str(r.status) in responses, f"{method} {template} answered {r.status}, not documented: {raw[:300]!r}"
    response, response_ptr = _deref(responses[str(r.status)])
    if not response_ptr:
        response_ptr = "/" + _pointer("paths", template, method.lower(), "responses", str(r.status))
    # headers: required ones present, present ones valid, and every header of ours documented
    documented = {name.lower(): h for name, h in (response.get("headers") or {}).items()}
    for name, h in documented.items():
        header, _ = _deref(h)
        value = r.headers.get(name)
        if header.get("required"):
            assert value is not None, f"{method} {template} {r.status}: header {name} missing"
        if value is not None:
            jsonschema.validate(value, header["schema"])
    for name in CACHE_HEADERS:
        if name in r.headers:
            assert name.lower() in documented, f"{method} {template} {r.status}: header {name} not documented"
    # body
    content = response.get("content")
    if not content:
        assert raw == b"", f"{method} {template} {r.status}: a body where none is documented"
        body: Any = None
    else:
        media = _media_type(r.headers.get("Content-Type", ""))
        assert media in content, f"{method} {template} {r.status}: {media} not documented ({list(content)})"
        if media.endswith("json"):
            body = orjson.loads(raw)
            schema_ptr = response_ptr + "/" + _pointer("content", media, "schema")
            validator = jsonschema.Draft202012Validator(
                {"$ref": DOC_URI + "#" + schema_ptr},
                registry=REGISTRY,
                format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
            )
            errors = sorted(validator.iter_errors(body), key=lambda e: e.path)
            assert not errors, f"{method} {template} {r.status}: {body}\n" + "\n".join(
                f"  {list(e.path)}: {e.message}" for e in errors
            )
        else:
            body = raw.decode()
    if seen is not None:
        seen.seen.add((method, template, r.status))
    return r, body


def G() -> str:
    return Keypair.random().public_key


# ---------------------------------------------------------------- the document itself


def test_document_is_valid_openapi_31():
    assert DOC["openapi"].startswith("3.1.")
    OpenAPIV31SpecValidator(DOC).validate()  # raises on the first error
    errors = [str(e) for e in OpenAPIV31SpecValidator(DOC).iter_errors()]
    assert not errors


def test_every_schema_is_a_valid_json_schema():
    """Each component schema is a valid 2020-12 schema; every pattern in the document compiles."""
    for schema in DOC["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    for pattern in _patterns(DOC):
        re.compile(pattern)


def _patterns(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
        for v in node.values():
            out += _patterns(v)
        return out
    if isinstance(node, list):
        return [p for v in node for p in _patterns(v)]
    return []


def test_docs_copy_is_identical():
    """service/openapi.yaml is the source of truth (package data); docs/openapi.yaml is a copy for readers."""
    assert (ROOT / "docs" / "openapi.yaml").read_bytes() == DOC_BYTES, "run: cp service/openapi.yaml docs/"


def test_document_ships_as_package_data():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["service"]
    assert OPENAPI_PATH.parent == Path(__import__("service").__file__).resolve().parent


def test_every_route_is_documented_and_every_operation_exists(settings_factory):
    app = create_app(settings_factory())  # routes are registered at construction; nothing is started
    in_app = app_operations(app)
    in_doc = documented_operations()
    assert in_app - in_doc == set(), "routes missing from the document"
    assert in_doc - in_app == set(), "documented operations the app does not have"


def test_document_patterns_agree_with_validation():
    """The parameter patterns are validation.py's own regular expressions."""
    from service import validation as v

    schemas = DOC["components"]["schemas"]
    assert schemas["CurrencyCode"]["pattern"] == f"^{v._CURRENCY.pattern}$"
    assert schemas["AssetCode"]["pattern"] == f"^{v._ASSET_CODE.pattern}$"
    assert DOC["components"]["parameters"]["FeeType"]["schema"]["pattern"] == f"^{v._FEE_TYPE.pattern}$"
    assert schemas["RateWrite"]["properties"]["rate"]["pattern"] == f"^{v._DECIMAL.pattern}$"
    assert schemas["DecimalInput"]["pattern"] == f"^{v._DECIMAL.pattern}$"
    assert schemas["RateWrite"]["properties"]["source"]["pattern"] == f"^{v._SOURCE.pattern}$"
    convert = DOC["paths"]["/v1/rates/convert"]["get"]["parameters"]
    assert next(p for p in convert if p["name"] == "amount")["schema"]["pattern"] == f"^{v._AMOUNT.pattern}$"
    event = DOC["paths"]["/v1/events/transaction-completed"]["post"]["requestBody"]["content"]["application/json"]
    assert event["schema"]["properties"]["transaction_id"]["pattern"] == f"^{v._TRANSACTION_ID.pattern}$"


def test_cache_pattern_schema_agrees_with_keys():
    from tiers.keys import InvalidKey, validate_pattern

    pattern = re.compile(
        next(p for p in DOC["paths"]["/v1/cache"]["delete"]["parameters"] if p["name"] == "pattern")["schema"][
            "pattern"
        ]
    )
    samples = [
        "v1:wallet:balance:*",
        "v1:rate:*",
        "v1:rate:CNGN:USD",
        "v1:rate:convert",
        "v1:rate:convert:*",
        "v1:rate:convert:*:CNGN:USD",
        "v1:fee:structure:onramp",
        "v1:auth:rate_limit:*",
        "v1:wallet:balance",
        "v1:wallet:*",
        "v1:rate::x",
        "v1:rate:a?b",
        "v1:rate:[ab]",
        "v2:rate:*",
        "rate:*",
        "v1:tx:recent:u1:*",
        "v1:bill:provider:x=+.-_",
    ]
    for s in samples:
        try:
            validate_pattern(s)
            ok = True
        except InvalidKey:
            ok = False
        assert bool(pattern.fullmatch(s)) is ok, s


async def test_served_document(make_client):
    client = await make_client()
    r = await client.get("/openapi.yaml")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("application/yaml")
    assert await r.read() == DOC_BYTES
    await conforms(client, "GET", "/openapi.yaml")


# ---------------------------------------------------------------- conformance: rates and fees


async def test_rates_conform(make_client):
    client = await make_client()
    seen = Checked()
    r, body = await conforms(client, "GET", "/v1/rates/cngn/usd", seen)
    assert r.status == 200 and r.headers["X-Cache"] == "MISS" and body["base"] == "CNGN"
    r, _ = await conforms(client, "GET", "/v1/rates/CNGN/USD", seen)
    assert r.headers["X-Cache"] == "L1"
    r, body = await conforms(client, "GET", "/v1/rates/CNGN/EUR", seen)
    assert r.status == 404 and body["type"] == "urn:aframp:problem:not-found"
    r, _ = await conforms(client, "GET", "/v1/rates/C-NGN/USD", seen)
    assert r.status == 400
    r, _ = await conforms(client, "GET", "/v1/rates/ABCDEFGHIJKLM/USD", seen)
    assert r.status == 400

    r, body = await conforms(client, "GET", "/v1/rates/convert?amount=100.50&from=CNGN&to=USD", seen)
    assert r.status == 200 and body == {
        "amount": "100.50",
        "from": "CNGN",
        "to": "USD",
        "rate": "0.00065",
        "result": "0.0653250",
    }
    assert r.headers["X-Cache"] == "MISS"
    r, _ = await conforms(client, "GET", "/v1/rates/convert?amount=100.5&from=cngn&to=usd", seen)
    assert r.headers["X-Cache"] == "L1"  # canonical amount: one key
    for bad in (
        "amount=0&from=CNGN&to=USD",
        "amount=1e3&from=CNGN&to=USD",
        "amount=1.12345678&from=CNGN&to=USD",
        "amount=922337203685.4775808&from=CNGN&to=USD",
        "from=CNGN&to=USD",
        "amount=1&to=USD",
        "amount=1&from=CNGN&to=USD&x=1",
    ):
        r, _ = await conforms(client, "GET", f"/v1/rates/convert?{bad}", seen)
        assert r.status == 400, bad
    r, _ = await conforms(client, "GET", "/v1/rates/convert?amount=1&from=CNGN&to=EUR", seen)
    assert r.status == 404

    # writes
    r, body = await conforms(
        client, "PUT", "/v1/rates/cngn/eur", seen, json={"rate": "0.00061", "source": "manual"}, headers=AUTH
    )
    assert r.status == 200 and body["base"] == "CNGN" and body["rate"] == "0.00061"
    r, body = await conforms(client, "PUT", "/v1/rates/CNGN/EUR", seen, json={"rate": "0.00062"}, headers=AUTH)
    assert r.status == 200 and body["source"] == "manual"
    for bad in ({"rate": 0.00062}, {"rate": "0"}, {"rtae": "1"}, {"rate": "1", "source": "x" * 65}, []):
        r, body = await conforms(client, "PUT", "/v1/rates/CNGN/EUR", seen, json=bad, headers=AUTH)
        assert r.status == 400 and body["type"] == "urn:aframp:problem:invalid-body", bad
    r, _ = await conforms(client, "PUT", "/v1/rates/CNGN/EUR", seen, data=b"{not json", headers=AUTH)
    assert r.status == 400
    r, _ = await conforms(client, "PUT", "/v1/rates/CNGN/EUR", seen, json={"rate": "1"})
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    r, _ = await conforms(
        client, "PUT", "/v1/rates/CNGN/EUR", seen, json={"rate": "1"}, headers={"Authorization": "Bearer nope"}
    )
    assert r.status == 401
    r, _ = await conforms(client, "PUT", "/v1/rates/CNGN/EUR", seen, data=b"x" * 70_000, headers=AUTH)
    assert r.status == 413
    r, _ = await conforms(client, "DELETE", "/v1/rates/CNGN/EUR", seen, headers=AUTH)
    assert r.status == 204
    r, _ = await conforms(client, "DELETE", "/v1/rates/CNGN/EUR", seen, headers=AUTH)
    assert r.status == 404
    r, _ = await conforms(client, "DELETE", "/v1/rates/CNGN/EUR", seen)
    assert r.status == 401
    r, _ = await conforms(client, "DELETE", "/v1/rates/CNGN!/EUR", seen, headers=AUTH)
    assert r.status == 400

    assert {s for (_, _, s) in seen.seen} >= {200, 204, 400, 401, 404, 413}


async def test_fees_conform(make_client):
    client = await make_client()
    r, body = await conforms(client, "GET", "/v1/fees/onramp")
    assert r.status == 200 and r.headers["X-Cache"] == "MISS" and body["rate_bps"] == 150
    r, _ = await conforms(client, "GET", "/v1/fees/onramp")
    assert r.headers["X-Cache"] == "L1"
    r, _ = await conforms(client, "GET", "/v1/fees/nope")
    assert r.status == 404
    r, _ = await conforms(client, "GET", "/v1/fees/OnRamp")
    assert r.status == 400
    fee = {"rate_bps": 120, "flat": "10", "min": "10", "max": "2000.50", "currency": "ngn"}
    r, body = await conforms(client, "PUT", "/v1/fees/weekend", json=fee, headers=AUTH)
    assert r.status == 200 and body == {**fee, "fee_type": "weekend", "currency": "NGN"}
    for bad in (
        {**fee, "rate_bps": 10001},
        {**fee, "rate_bps": "120"},
        {**fee, "min": "3000"},
        {**fee, "flat": 10},
        {k: v for k, v in fee.items() if k != "currency"},
        {**fee, "fee_type": "weekend"},
    ):
        r, _ = await conforms(client, "PUT", "/v1/fees/weekend", json=bad, headers=AUTH)
        assert r.status == 400, bad
    r, _ = await conforms(client, "PUT", "/v1/fees/weekend", json=fee)
    assert r.status == 401


async def test_admin_closed_conforms(make_client, settings_factory):
    """No ADMIN_TOKEN: every admin operation answers 403, token or not."""
    client = await make_client(settings_factory(env={"ADMIN_TOKEN": ""}))
    a = G()
    calls = [
        ("PUT", "/v1/rates/CNGN/USD", {"rate": "1"}),
        ("DELETE", "/v1/rates/CNGN/USD", None),
        ("PUT", "/v1/fees/onramp", {"rate_bps": 1, "flat": "0", "min": "0", "max": "1", "currency": "NGN"}),
        ("POST", "/v1/events/transaction-completed", {"transaction_id": "t1", "sender": a, "receiver": a}),
        ("POST", "/v1/events/trustline-created", {"account_id": a, "asset_code": "USDC", "asset_issuer": a}),
        ("POST", "/v1/events/balance-updated", {"account_id": a}),
        ("DELETE", "/v1/cache?pattern=v1:rate:*", None),
    ]
    for method, path, body in calls:
        for headers in ({}, AUTH):
            r, problem = await conforms(client, method, path, json=body, headers=headers)
            assert r.status == 403, (method, path)
            assert problem["type"] == "urn:aframp:problem:admin-disabled"


# ---------------------------------------------------------------- conformance: events, cache admin, operations


async def test_events_and_cache_admin_conform(make_client):
    client = await make_client()
    a, b, issuer = G(), G(), G()
    muxed = MuxedAccount(a, 7).account_muxed
    r, body = await conforms(
        client,
        "POST",
        "/v1/events/transaction-completed",
        json={"transaction_id": "tx-1", "sender": muxed, "receiver": b},
        headers=AUTH,
    )
    assert r.status == 200 and body == {"invalidated": [f"v1:wallet:balance:{a}", f"v1:wallet:balance:{b}"]}
    r, body = await conforms(
        client,
        "POST",
        "/v1/events/trustline-created",
        json={"account_id": a, "asset_code": "USDC", "asset_issuer": issuer, "authorized": True},
        headers=AUTH,
    )
    assert r.status == 200 and body["cached"] == [f"v1:wallet:trustline:{a}:USDC:{issuer}"]
    r, body = await conforms(client, "POST", "/v1/events/balance-updated", json={"account_id": a}, headers=AUTH)
    assert r.status == 200 and body == {"invalidated": [f"v1:wallet:balance:{a}"]}
    for path, bad in (
        ("/v1/events/balance-updated", {"account_id": "GABC"}),
        ("/v1/events/balance-updated", {"account_id": a, "extra": 1}),
        ("/v1/events/transaction-completed", {"transaction_id": "", "sender": a, "receiver": b}),
        ("/v1/events/trustline-created", {"account_id": a, "asset_code": "US-DC", "asset_issuer": issuer}),
        ("/v1/events/trustline-created", {"account_id": a, "asset_code": "USDC", "asset_issuer": muxed}),
        (
            "/v1/events/trustline-created",
            {"account_id": a, "asset_code": "USDC", "asset_issuer": issuer, "authorized": 1},
        ),
    ):
        r, _ = await conforms(client, "POST", path, json=bad, headers=AUTH)
        assert r.status == 400, bad
    r, _ = await conforms(client, "POST", "/v1/events/balance-updated", json={"account_id": a})
    assert r.status == 401

    await client.get("/v1/rates/CNGN/USD")
    r, body = await conforms(client, "DELETE", "/v1/cache?pattern=v1:rate:*", headers=AUTH)
    assert r.status == 200 and body["deleted"] >= 1
    for bad in ("", "?pattern=", "?pattern=*", "?pattern=v1:nope:*", "?pattern=v1:rate:a?b", "?pattern=v1:rate"):
        r, body = await conforms(client, "DELETE", f"/v1/cache{bad}", headers=AUTH)
        assert r.status == 400 and body["type"] == "urn:aframp:problem:invalid-pattern", bad
    r, _ = await conforms(client, "DELETE", "/v1/cache?pattern=v1:rate:*")
    assert r.status == 401


async def test_operations_conform(make_client):
    client = await make_client()
    await client.get("/v1/rates/CNGN/USD")
    await client.get("/v1/rates/CNGN/USD")
    r, body = await conforms(client, "GET", "/v1/cache/stats")
    assert r.status == 200 and body["types"]["exchange_rate"]["l1_hits"] >= 1
    r, body = await conforms(client, "GET", "/health/live")
    assert r.status == 200
    r, body = await conforms(client, "GET", "/health/ready")
    assert r.status == 200 and body["status"] == "ok"
    r, text = await conforms(client, "GET", "/metrics")
    assert r.status == 200 and "aframp_cache_hits_total" in text
    r, text = await conforms(client, "GET", "/dashboard")
    assert r.status == 200 and "<html" in text.lower()
    # draining (what on_shutdown does): readiness 503
    await _draining(client.server.app)
    r, body = await conforms(client, "GET", "/health/ready")
    assert r.status == 503 and body["status"] == "draining"


async def test_ready_without_redis_conforms(make_client, settings_factory):
    client = await make_client(settings_factory(env={"REDIS_URL": "none"}))
    r, body = await conforms(client, "GET", "/health/ready")
    assert r.status == 200 and body["redis_mode"] == "disabled" and body["checks"]["redis"] == "down"
    r, body = await conforms(client, "GET", "/v1/cache/stats")
    assert body["redis"]["enabled"] is False
    r, body = await conforms(client, "DELETE", "/v1/cache?pattern=v1:rate:*", headers=AUTH)
    assert r.status == 200 and body["deleted"] == 0


# ---------------------------------------------------------------- conformance: wallets (Horizon stand-in)


async def test_wallets_conform(wallet_client, horizon):
    client = await wallet_client({"HORIZON_TIMEOUT": "0.5"})
    account, issuer, unknown = G(), G(), G()
    horizon.fund(account, credit("USDC", issuer, "125.5000000"), credit("NGNT1234", issuer, "1.0000000"))
    r, body = await conforms(client, "GET", f"/v1/wallets/{account}/balances")
    assert r.status == 200 and r.headers["X-Cache"] == "MISS"
    assert [b["asset_code"] for b in body["balances"]] == ["XLM", "USDC", "NGNT1234"]
    muxed = MuxedAccount(account, 42).account_muxed
    r, body = await conforms(client, "GET", f"/v1/wallets/{muxed}/balances")
    assert r.headers["X-Cache"] == "L1" and body["account_id"] == account
    r, body = await conforms(client, "GET", f"/v1/wallets/{account}/trustlines/USDC/{issuer}")
    assert r.status == 200 and body["exists"] is True and body["authorized"] is True
    r, body = await conforms(client, "GET", f"/v1/wallets/{account}/trustlines/usdc/{issuer}")
    assert r.status == 200 and body["exists"] is False and body["authorized"] is None
    r, _ = await conforms(client, "GET", f"/v1/wallets/{unknown}/balances")
    assert r.status == 404
    r, _ = await conforms(client, "GET", f"/v1/wallets/{unknown}/trustlines/USDC/{issuer}")
    assert r.status == 404
    bad_checksum = account[:-1] + ("A" if account[-1] != "A" else "B")
    for path in (
        f"/v1/wallets/{bad_checksum}/balances",
        "/v1/wallets/GABC/balances",
        f"/v1/wallets/{account}/trustlines/US-DC/{issuer}",
        f"/v1/wallets/{account}/trustlines/USDC/{muxed}",
        f"/v1/wallets/{account}/trustlines/ABCDEFGHIJKLM/{issuer}",
    ):
        r, _ = await conforms(client, "GET", path)
        assert r.status == 400, path

    # origin failures with nothing cached for these accounts
    horizon.mode = "drop"
    r, body = await conforms(client, "GET", f"/v1/wallets/{G()}/balances")
    assert r.status == 503 and body["type"] == "urn:aframp:problem:origin-unavailable"
    horizon.mode = "fail"
    r, body = await conforms(client, "GET", f"/v1/wallets/{G()}/balances")
    assert r.status == 502 and body["type"] == "urn:aframp:problem:origin-bad-gateway"
    horizon.mode = None
    horizon.latency = 2.0
    r, body = await conforms(client, "GET", f"/v1/wallets/{G()}/trustlines/USDC/{issuer}")
    assert r.status == 504 and body["type"] == "urn:aframp:problem:origin-timeout"
    horizon.latency = 0.0
    horizon.mode = "rate_limit"
    r, body = await conforms(client, "GET", f"/v1/wallets/{G()}/balances")
    assert r.status == 503 and r.headers["Retry-After"] == "7"


async def test_stale_balance_conforms(make_client, settings_factory, horizon):
    """Past its TTL and Horizon failing: the balance is served STALE with Age, as documented."""
    s = settings_factory(env={"HORIZON_URL": horizon.url})
    s = s.with_overrides(ttl={**s.ttl, DataType.WALLET_BALANCE: 0.3})
    client = await make_client(s)
    account = G()
    horizon.fund(account)
    r, _ = await conforms(client, "GET", f"/v1/wallets/{account}/balances")
    assert r.headers["X-Cache"] == "MISS"
    l1 = client.app[K.L1_CACHE]

    async def expired() -> bool:
        return l1.get(f"v1:wallet:balance:{account}") is None

    await eventually(expired, timeout=3)
    horizon.mode = "fail"
    r, body = await conforms(client, "GET", f"/v1/wallets/{account}/balances")
    assert r.status == 200 and r.headers["X-Cache"] == "STALE" and "Age" in r.headers
    assert body["balances"][0]["asset_code"] == "XLM"


# ---------------------------------------------------------------- schemathesis (bounded) on the read endpoints

SCHEMATHESIS_OPERATIONS = [
    ("/v1/rates/{base}/{quote}", "GET"),
    ("/v1/rates/convert", "GET"),
    ("/v1/fees/{fee_type}", "GET"),
    ("/v1/wallets/{account_id}/balances", "GET"),
    ("/v1/wallets/{account_id}/trustlines/{asset_code}/{asset_issuer}", "GET"),
]


def _anchors(account: str, issuer: str) -> dict[str, dict[str, Any]]:
    """Known-good values for some parameters, so that generated requests also reach 200 answers
    (random keys almost never have a valid checksum, random pairs almost never exist)."""
    return {
        "/v1/rates/{base}/{quote}": {"path_parameters": {"base": "cngn", "quote": "USD"}},
        "/v1/rates/convert": {"query": {"from": "CNGN", "to": "usd"}},
        "/v1/fees/{fee_type}": {"path_parameters": {"fee_type": "offramp"}},
        "/v1/wallets/{account_id}/balances": {"path_parameters": {"account_id": account}},
        "/v1/wallets/{account_id}/trustlines/{asset_code}/{asset_issuer}": {
            "path_parameters": {"account_id": account, "asset_issuer": issuer}
        },
    }


def _schemathesis_run(base_url: str, max_examples: int, account: str, issuer: str) -> list[str]:
    import hypothesis
    import requests
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_dict(DOC)
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    failures: list[str] = []
    session = requests.Session()
    anchors = _anchors(account, issuer)
    statuses: list[int] = []
    for path, method in SCHEMATHESIS_OPERATIONS:
        operation = schema[path][method]
        runs = [(GenerationMode.POSITIVE, {}), (GenerationMode.NEGATIVE, {}), (GenerationMode.POSITIVE, anchors[path])]
        for mode, fixed in runs:

            @hypothesis.settings(
                max_examples=max_examples,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(hypothesis.HealthCheck),
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            )
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode, **fixed))
            def run(case: Any) -> None:
                response = case.call(base_url=base_url, session=session, timeout=10)
                statuses.append(response.status_code)
                case.validate_response(response, checks=checks)

            try:
                run()
            except Exception as err:  # a FailureGroup names the failing case and how to reproduce it
                failures.append(f"{method} {path} ({mode.value}, fixed {sorted(fixed)}): {err}")
    session.close()
    if not failures and not {200, 400, 404} <= set(statuses):
        failures.append(f"generated requests reached only the statuses {sorted(set(statuses))}")
    return failures


async def test_schemathesis_read_endpoints(wallet_client, horizon):
    """Generated requests (positive and negative) against a live app: no 5xx, every answer as documented."""
    client = await wallet_client()
    account, issuer = G(), G()
    horizon.fund(account, credit("USDC", issuer, "1.0000000"), credit("A1", issuer, "2.0000000"))
    base_url = str(client.make_url("")).rstrip("/")
    failures = await asyncio.to_thread(_schemathesis_run, base_url, 15, account, issuer)
    assert not failures, "\n\n".join(failures)
    assert client.server.app[K.LIFECYCLE].phase is K.Phase.READY
