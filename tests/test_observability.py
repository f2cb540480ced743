"""Traces, metrics, /v1/cache/stats and logs, on real apps (real Postgres and Redis)."""

from __future__ import annotations

import io
import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from actors import tracing
from service import appkeys as K
from service import logs, telemetry
from tests.conftest import ADMIN, AUTH, eventually
from tiers import keys

RATE = "/v1/rates/CNGN/USD"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
ACCOUNT = "GAAZI4TCR3TY5OJHCTJC2A4QSY6CJWJH5IAJTGKIN2ER7LBNVKOCCWN7"


def recorder() -> tuple[InMemorySpanExporter, SimpleSpanProcessor]:
    exporter = InMemorySpanExporter()
    return exporter, SimpleSpanProcessor(exporter)


def by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = by_name(spans, name)
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def parent_of(span: ReadableSpan, spans: list[ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None, span.name
    return next(s for s in spans if s.context.span_id == span.parent.span_id)


def db_spans(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if s.attributes.get("db.system") == "postgresql"]


def redis_spans(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if s.attributes.get("db.system") == "redis"]


async def test_span_trees_of_a_miss_an_l1_hit_and_an_l2_hit(make_client: Any) -> None:
    exp_a, proc_a = recorder()
    exp_b, proc_b = recorder()
    a = await make_client(span_processor=proc_a)
    b = await make_client(span_processor=proc_b)
    exp_a.clear()
    exp_b.clear()

    # 1. the miss: HTTP server span -> cache.load -> cache.l2 -> redis / cache.origin -> asyncpg / cache.fill
    r = await a.get(RATE)
    assert r.headers["X-Cache"] == "MISS"
    spans = list(exp_a.get_finished_spans())
    assert len({s.context.trace_id for s in spans}) == 1, "one request, one trace"
    server = one(spans, "GET /v1/rates/{base}/{quote}")
    assert server.kind is SpanKind.SERVER and server.parent is None
    load = one(spans, "cache.load")
    assert parent_of(load, spans) is server
    assert load.attributes["cache.source"] == "MISS"
    assert load.attributes["cache.key"] == "v1:rate:CNGN:USD"
    l1 = one(spans, "cache.l1")
    assert parent_of(l1, spans) is server
    assert (l1.attributes["cache.tier"], l1.attributes["cache.outcome"]) == ("l1", "miss")
    # one Redis lookup per miss: the acquire script (a fresh value, or the lease)
    l2s = by_name(spans, "cache.l2")
    assert len(l2s) == 1
    for l2 in l2s:
        assert parent_of(l2, spans) is load
        assert dict(l2.attributes) == {
            "cache.data_type": "exchange_rate",
            "cache.namespace": "rate",
            "cache.key": "v1:rate:CNGN:USD",
            "cache.tier": "l2",
            "cache.outcome": "miss",
        }
    assert redis_spans(spans) and all(
        parent_of(s, spans).name in ("cache.l2", "cache.load", "cache.fill") for s in redis_spans(spans)
    )
    origin = one(spans, "cache.origin")
    assert parent_of(origin, spans) is load
    assert (origin.attributes["cache.tier"], origin.attributes["cache.outcome"]) == ("origin", "miss")
    # the query (and asyncpg's connection reset on release) are children of the origin step
    assert db_spans(spans) and all(parent_of(s, spans) is origin for s in db_spans(spans))
    (db,) = [s for s in db_spans(spans) if "exchange_rates" in s.attributes.get("db.statement", "")]
    assert db.kind is SpanKind.CLIENT and db.name == "SELECT"
    fill = one(spans, "cache.fill")
    assert parent_of(fill, spans) is load
    assert any(parent_of(s, spans) is fill for s in redis_spans(spans))

    # 2. the L1 hit: the server span and one cache.l1 span, nothing else
    exp_a.clear()
    r = await a.get(RATE)
    assert r.headers["X-Cache"] == "L1"
    spans = list(exp_a.get_finished_spans())
    assert sorted(s.name for s in spans) == ["GET /v1/rates/{base}/{quote}", "cache.l1"]
    assert one(spans, "cache.l1").attributes["cache.outcome"] == "hit"
    assert len({s.context.trace_id for s in spans}) == 1

    # 3. the L2 hit on a second instance: no origin span, no asyncpg span
    r = await b.get(RATE)
    assert r.headers["X-Cache"] == "L2"
    spans = list(exp_b.get_finished_spans())
    assert len({s.context.trace_id for s in spans}) == 1
    l2 = one(spans, "cache.l2")
    assert l2.attributes["cache.outcome"] == "hit"
    assert parent_of(l2, spans) is one(spans, "cache.load")
    assert not by_name(spans, "cache.origin") and not db_spans(spans)
    assert parent_of(one(spans, "cache.load"), spans) is one(spans, "GET /v1/rates/{base}/{quote}")


async def test_span_tree_of_a_horizon_miss(make_client: Any, settings_factory: Any, horizon: Any) -> None:
    from tests.test_wallets_http import new_account

    g = new_account()
    horizon.fund(g)
    exp, proc = recorder()
    client = await make_client(settings_factory(env={"HORIZON_URL": horizon.url}), span_processor=proc)
    exp.clear()
    r = await client.get(f"/v1/wallets/{g}/balances")
    assert r.status == 200 and r.headers["X-Cache"] == "MISS"
    spans = list(exp.get_finished_spans())
    assert len({s.context.trace_id for s in spans}) == 1, "one request, one trace, down to Horizon"
    server = next(s for s in spans if s.kind is SpanKind.SERVER)
    origin = one(spans, "cache.origin")
    assert parent_of(parent_of(origin, spans), spans) is server  # server -> cache.load -> cache.origin
    (call,) = [
        s
        for s in spans
        if s.kind is SpanKind.CLIENT
        and s.attributes.get("http.method", "GET") == "GET"
        and parent_of(s, spans) is origin
    ]
    assert g not in str(dict(call.attributes)) and g not in call.name  # account ids never reach a span
    # the Horizon call carried the trace context
    assert horizon.last_headers["traceparent"].split("-")[1] == format(server.context.trace_id, "032x")


async def test_incoming_traceparent_is_continued(make_client: Any) -> None:
    exp, proc = recorder()
    a = await make_client(span_processor=proc)
    exp.clear()
    r = await a.get("/v1/fees/onramp", headers={"traceparent": TRACEPARENT})
    assert r.status == 200
    spans = list(exp.get_finished_spans())
    assert {format(s.context.trace_id, "032x") for s in spans} == {TRACE_ID}
    server = one(spans, "GET /v1/fees/{fee_type}")
    assert server.parent is not None and format(server.parent.span_id, "016x") == PARENT_ID
    assert server.parent.is_remote
    assert db_spans(spans), "the Postgres load is in the caller's trace"


async def test_invalidation_carries_the_writers_trace_to_the_peer(make_client: Any) -> None:
    exp_a, proc_a = recorder()
    exp_b, proc_b = recorder()
    a = await make_client(span_processor=proc_a)
    b = await make_client(span_processor=proc_b)
    assert (await b.get(RATE)).status == 200
    assert (await b.get(RATE)).headers["X-Cache"] == "L1"
    exp_b.clear()

    r = await a.put(RATE, json={"rate": "0.00070"}, headers={**AUTH, "traceparent": TRACEPARENT})
    assert r.status == 200
    write_spans = list(exp_a.get_finished_spans())
    # Redis is cleared and the message published by one script: its span is part of the write's trace
    assert any(s.name == "EVALSHA" and format(s.context.trace_id, "032x") == TRACE_ID for s in write_spans), (
        "the invalidate-and-publish script is part of the write's trace"
    )

    async def evicted() -> bool:
        return bool(by_name(list(exp_b.get_finished_spans()), "cache.evict"))

    await eventually(evicted)
    evict = one(list(exp_b.get_finished_spans()), "cache.evict")
    assert evict.kind is SpanKind.CONSUMER
    assert evict.parent is None, "a new trace on the receiving side ..."
    assert format(evict.context.trace_id, "032x") != TRACE_ID
    (link,) = evict.links  # ... linked to the writer's span
    assert format(link.context.trace_id, "032x") == TRACE_ID
    writer_ids = {s.context.span_id for s in write_spans if format(s.context.trace_id, "032x") == TRACE_ID}
    assert link.context.span_id in writer_ids
    assert evict.attributes["cache.sender"].startswith(a.app[K.SETTINGS].server.instance_id)
    assert "rate" in evict.attributes["cache.namespaces"]
    r = await b.get(RATE)
    assert r.headers["X-Cache"] != "L1" and (await r.json())["rate"] == "0.00070"


async def test_outgoing_aiohttp_client_calls_are_traced_and_propagate(make_client: Any) -> None:
    exp_a, proc_a = recorder()
    exp_b, proc_b = recorder()
    a = await make_client(span_processor=proc_a)
    b = await make_client(span_processor=proc_b)
    tel = a.app[K.TELEMETRY]
    tracer = tel.provider.get_tracer("test")
    exp_b.clear()
    async with aiohttp.ClientSession(trace_configs=tel.client_trace_configs()) as session:
        with tracer.start_as_current_span("caller") as caller:
            async with session.get(b.make_url("/health/live")) as resp:
                assert resp.status == 200
    client_span = next(s for s in exp_a.get_finished_spans() if s.kind is SpanKind.CLIENT and s.name.startswith("GET"))
    assert client_span.parent.span_id == caller.get_span_context().span_id
    server = one(list(exp_b.get_finished_spans()), "GET /health/live")
    assert server.context.trace_id == caller.get_span_context().trace_id
    assert server.parent.span_id == client_span.context.span_id


async def test_account_ids_never_reach_a_span(make_client: Any) -> None:
    exp, proc = recorder()
    a = await make_client(span_processor=proc)
    exp.clear()
    await a.get(f"/v1/wallets/{ACCOUNT}/balances?x={ACCOUNT}")
    spans = list(exp.get_finished_spans())
    assert spans
    for s in spans:
        assert ACCOUNT not in repr(dict(s.attributes)) and ACCOUNT not in s.name
    attrs = tracing.key_attributes(keys.balance(ACCOUNT), "l1", "hit")
    assert attrs == {
        "cache.data_type": "wallet_balance",
        "cache.namespace": "wallet:balance",
        "cache.tier": "l1",
        "cache.outcome": "hit",
    }


async def test_tracing_modes_from_otel_settings(make_client: Any) -> None:
    off = await make_client()
    assert off.app[K.TELEMETRY].mode == "off" and off.app[K.TELEMETRY].provider is None
    assert off.app[K.RATES].tracer is None and off.app[K.TELEMETRY].server_middleware is None

    quiet = await make_client(env={"OTEL_SERVICE_NAME": "aframp-test", "OTEL_TRACES_EXPORTER": "none"})
    tel = quiet.app[K.TELEMETRY]
    assert tel.mode == "none" and tel.provider is not None
    assert quiet.app[K.RATES].tracer is None, "no cache spans when nothing would export them"
    assert tel.server_middleware is None and tel.client_trace_configs() == [], "no instrumentation either"
    assert tel.provider.resource.attributes["service.name"] == "aframp-test"
    assert (await quiet.get(RATE, headers={"traceparent": TRACEPARENT})).status == 200

    cfg = telemetry.parse(
        {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=staging",
        },
        "i-1",
    )
    assert (cfg.mode, cfg.endpoint) == ("record", "http://collector:4318/v1/traces")
    assert cfg.resource == {
        "deployment.environment": "staging",
        "service.name": "aframp-cache",
        "service.instance.id": "i-1",
    }
    for bad in (
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_SAMPLER": "sometimes"},
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
    ):
        with pytest.raises(telemetry.ConfigError):
            telemetry.parse(bad, "i")
    assert telemetry.parse({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, "i").mode == "off"


# ---------------------------------------------------------------- metrics and stats


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(m: dict[Any, float], name: str, **labels: str) -> float:
    return m[(name, tuple(sorted(labels.items())))]


async def test_metrics_and_stats_agree_and_are_exact(make_client: Any) -> None:
    a = await make_client()
    b = await make_client()
    assert (await a.get(RATE)).headers["X-Cache"] == "MISS"
    assert (await a.get(RATE)).headers["X-Cache"] == "L1"
    assert (await a.get(RATE)).headers["X-Cache"] == "L1"
    assert (await b.get(RATE)).headers["X-Cache"] == "L2"
    assert (await a.get("/v1/rates/NOPE/USD")).status == 404  # a negative answer: a second miss and load

    stats_a = await (await a.get("/v1/cache/stats")).json()
    stats_b = await (await b.get("/v1/cache/stats")).json()
    m_a = samples(await (await a.get("/metrics")).text())
    m_b = samples(await (await b.get("/metrics")).text())

    row = stats_a["types"]["exchange_rate"]
    assert {k: row[k] for k in ("l1_hits", "l2_hits", "misses", "origin_loads", "load_errors", "stale_served")} == {
        "l1_hits": 2,
        "l2_hits": 0,
        "misses": 2,
        "origin_loads": 2,
        "load_errors": 0,
        "stale_served": 0,
    }
    assert row["hit_ratio"] == 0.5
    row_b = stats_b["types"]["exchange_rate"]
    assert (row_b["l1_hits"], row_b["l2_hits"], row_b["misses"], row_b["hit_ratio"]) == (0, 1, 0, 1.0)
    assert stats_a["types"]["fee_structure"]["hit_ratio"] is None

    er = {"data_type": "exchange_rate"}
    assert sample(m_a, "aframp_cache_hits_total", tier="l1", **er) == 2
    assert sample(m_a, "aframp_cache_hits_total", tier="l2", **er) == 0
    assert sample(m_a, "aframp_cache_misses_total", **er) == 2
    assert sample(m_a, "aframp_origin_loads_total", **er) == 2
    assert sample(m_a, "aframp_origin_errors_total", **er) == 0
    assert sample(m_a, "aframp_stale_served_total", **er) == 0
    assert sample(m_b, "aframp_cache_hits_total", tier="l2", **er) == 1
    assert sample(m_b, "aframp_cache_misses_total", **er) == 0
    # latency histograms of the tiers: cumulative buckets, counts equal to the stats' counts
    assert sample(m_a, "aframp_cache_lookup_duration_seconds_count", tier="origin", **er) == 2
    assert sample(m_a, "aframp_cache_lookup_duration_seconds_count", tier="l2", **er) == 2  # one per miss
    assert sample(m_a, "aframp_cache_lookup_duration_seconds_bucket", tier="origin", le="+Inf", **er) == 2
    assert stats_a["latency_seconds"]["origin"]["count"] == 2
    assert stats_a["latency_seconds"]["origin"]["p50"] is not None
    assert stats_a["types"]["exchange_rate"]["latency_seconds"]["l2"]["count"] == 2
    assert stats_b["latency_seconds"]["l2"]["count"] == 1
    buckets = [
        v
        for (n, lbl), v in m_a.items()
        if n == "aframp_cache_lookup_duration_seconds_bucket" and ("tier", "origin") in lbl
    ]
    assert buckets == sorted(buckets)
    # per endpoint: route template, method, status class (the stats/metrics requests themselves come after)
    route = {"route": "/v1/rates/{base}/{quote}", "method": "GET"}
    assert sample(m_a, "aframp_http_request_duration_seconds_count", status_class="2xx", **route) == 3
    assert sample(m_a, "aframp_http_request_duration_seconds_count", status_class="4xx", **route) == 1
    # L1, pool, breaker, subscriber
    assert (
        stats_a["l1"]["size"]
        == sample(
            m_a,
            "aframp_l1_entries",
        )
        == 2
    )
    assert stats_a["l1"]["approx_bytes"] == sample(m_a, "aframp_l1_bytes") > 0
    assert stats_a["redis"]["enabled"] is True
    assert sample(m_a, "aframp_redis_pool_max_connections") == stats_a["redis"]["pool_max"]
    assert stats_a["breaker"]["state"] == "closed"
    assert sample(m_a, "aframp_redis_breaker_state", state="closed") == 1
    assert sample(m_a, "aframp_redis_breaker_state", state="open") == 0
    assert sample(m_a, "aframp_redis_breaker_present") == 1
    assert stats_a["subscriber"]["subscribed"] is True
    assert sample(m_a, "aframp_invalidation_subscriber_up") == 1
    assert sample(m_a, "aframp_invalidation_subscriber_reconnects_total") == stats_a["subscriber"]["reconnects"] == 0

    # invalidations: sent on the writer, received on the peer; both views agree
    assert (await a.put(RATE, json={"rate": "0.00071"}, headers=AUTH)).status == 200

    async def received() -> bool:
        s = await (await b.get("/v1/cache/stats")).json()
        return s["types"]["exchange_rate"]["invalidations_received"] >= 1

    await eventually(received)
    stats_a = await (await a.get("/v1/cache/stats")).json()
    m_a = samples(await (await a.get("/metrics")).text())
    m_b = samples(await (await b.get("/metrics")).text())
    # the pair's key only: its conversions die with its generation, no pattern is sent
    assert stats_a["types"]["exchange_rate"]["invalidations_sent"] == 1
    assert sample(m_a, "aframp_invalidations_sent_total", **er) == 1
    assert sample(m_b, "aframp_invalidations_received_total", **er) == 1
    assert sample(m_b, "aframp_invalidation_messages_received_total") == 1


async def test_breaker_state_reaches_stats_and_metrics(make_client: Any) -> None:
    a = await make_client()
    breaker = a.app[K.REDIS].breaker
    breaker.reset_after = 3600.0  # stays open for the test however slow the machine (no probe lets it close)
    for _ in range(breaker.failure_threshold):  # what failed Redis calls do
        breaker.failure()
    stats = await (await a.get("/v1/cache/stats")).json()
    m = samples(await (await a.get("/metrics")).text())
    assert stats["breaker"] == {"state": "open"}
    assert sample(m, "aframp_redis_breaker_state", state="open") == 1
    assert sample(m, "aframp_redis_breaker_state", state="closed") == 0
    assert sample(m, "aframp_redis_breaker_present") == 1


async def test_each_app_has_its_own_registry(make_client: Any) -> None:
    a = await make_client()
    b = await make_client()
    assert a.app[K.METRICS].registry is not b.app[K.METRICS].registry
    await a.get(RATE)
    m_b = samples(await (await b.get("/metrics")).text())
    assert sample(m_b, "aframp_cache_misses_total", data_type="exchange_rate") == 0


# ---------------------------------------------------------------- logs


async def test_logs_are_json_with_trace_ids_and_never_hold_secrets(make_client: Any, pg_dsn: str) -> None:
    import orjson

    pg_password = "pg-Pa55word-never-logged"
    redis_password = "redis-Pa55word-never-logged"
    u = urlsplit(pg_dsn)  # any DSN form: user@host:port, or user:@ with ?host=<socket dir> (pgserver)
    dsn = urlunsplit(u._replace(netloc=f"{u.username or 'postgres'}:{pg_password}@{u.netloc.rsplit('@', 1)[-1]}"))
    assert pg_password in dsn
    buf = io.StringIO()
    handler = logs.json_handler(buf)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # the effective settings are logged at debug
    try:
        _, proc = recorder()
        a = await make_client(span_processor=proc, env={"DATABASE_URL": dsn})
        await a.get(RATE, headers={"traceparent": TRACEPARENT})
        await a.get(f"/v1/rates/CNGN/USD?token={ADMIN}&url=redis://u:{redis_password}@h:6379/0")
        await a.put(RATE, json={"rate": "0.0007"}, headers=AUTH)
        await a.put(RATE, json={"rate": "0.0007"}, headers={"Authorization": f"Bearer {ADMIN}x"})
        # a Redis URL with a password (the test server's default user is "nopass": any password is accepted)
        redis_url = a.app[K.SETTINGS].redis.url.replace("redis://", f"redis://default:{redis_password}@")
        b = await make_client(env={"DATABASE_URL": dsn, "REDIS_URL": redis_url})
        assert (await b.get(RATE)).status == 200
        logging.getLogger("test").info("a message with %s", f"postgresql://x:{pg_password}@h/db")
        tracer = a.app[K.TELEMETRY].provider.get_tracer("test")
        with tracer.start_as_current_span("inside") as span:
            logging.getLogger("test").warning("inside a span", extra={"event": "test_event"})
        await b.close()
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = buf.getvalue()
    for secret in (ADMIN, pg_password, redis_password):
        assert secret not in text
    lines = [orjson.loads(line) for line in text.splitlines()]
    assert len([e for e in lines if e["event"] == "startup"]) == 2
    startup = [e for e in lines if e["event"] == "settings"]
    assert len(startup) == 2 and all(e["level"] == "debug" for e in startup)
    st = startup[0]["settings"]
    assert st["server"]["admin_token"] == "set"
    assert st["postgres"]["url"].startswith("postgresql://postgres:***@")
    assert any(":***@" in e["settings"]["redis"]["url"] for e in startup)
    assert any(e["event"] == "subscriber_subscribed" for e in lines)
    assert any(e["message"].startswith("redis at redis://default:***@") for e in lines)
    (inside,) = [e for e in lines if e["event"] == "test_event"]
    assert inside["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert inside["span_id"] == format(span.get_span_context().span_id, "016x")
    assert all({"ts", "level", "logger", "message", "event"} <= set(e) for e in lines)


async def test_grafana_dashboard_uses_only_exported_metrics(make_client: Any) -> None:
    import json
    import re

    from tests.conftest import ROOT

    a = await make_client()
    await a.get(RATE)
    await a.get("/metrics")
    names = {fam.name for fam in text_string_to_metric_families(await (await a.get("/metrics")).text())}
    names |= {f"{n}_total" for n in names} | {f"{n}_{s}" for n in names for s in ("bucket", "count", "sum")}
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    used = {m for p in dashboard["panels"] for t in p["targets"] for m in re.findall(r"aframp_\w+", t["expr"])}
    assert used and used <= names, used - names


async def test_head_sampling_skips_sampled_out_requests_but_honours_a_callers_trace(
    make_client: Any, settings_factory: Any
) -> None:
    exp, proc = recorder()
    s = settings_factory(env={"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"})
    client = await make_client(s, span_processor=proc)
    assert client.app[K.TELEMETRY].head_ratio == 0.0
    exp.clear()
    for _ in range(3):  # a miss (Redis, Postgres) and hits: nothing at all is recorded for them
        assert (await client.get(RATE)).status == 200
    assert (await client.get("/v1/rates/NOPE/USD")).status == 404
    assert list(exp.get_finished_spans()) == []
    # a caller's sampled trace is continued whatever the ratio
    r = await client.get("/v1/fees/onramp", headers={"traceparent": TRACEPARENT})
    assert r.status == 200
    spans = list(exp.get_finished_spans())
    assert spans and {format(sp.context.trace_id, "032x") for sp in spans} == {TRACE_ID}
    assert by_name(spans, "cache.origin") and db_spans(spans)


def test_text_logs_for_a_terminal_demote_third_party_noise_and_hold_no_secrets() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        for level in (logging.INFO, logging.DEBUG):
            buf = io.StringIO()
            logs.setup_logging(level, buf, fmt="text")
            logs.register_secret(ADMIN)
            logging.getLogger("service.app").info("listening, token %s, db postgresql://u:pw-secret-1@h/x", ADMIN)
            logging.getLogger("pgserver").info("Running commandline: initdb ...")
            out = buf.getvalue()
            assert "INFO    listening, token ***, db postgresql://u:***@h/x" in out
            assert ADMIN not in out and "pw-secret-1" not in out and not out.lstrip().startswith("{")
            if level == logging.INFO:
                assert "initdb" not in out
            else:
                assert "DEBUG   pgserver: Running commandline: initdb" in out
        assert logs.default_format(io.StringIO()) == "json"  # not a terminal
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        logging.captureWarnings(False)
