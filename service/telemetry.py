"""Tracing: one OpenTelemetry TracerProvider per app, configured from ``Settings.otel`` (the OTEL_* environment).

Modes (``Telemetry.mode``):

* ``off`` — no OTEL_* variable at all, or ``OTEL_SDK_DISABLED=true``: no provider, no instrumentation, no spans.
  The request path pays one attribute test.
* ``none`` — OTEL_* variables present but ``OTEL_TRACES_EXPORTER`` unset or ``none``: the provider is built (the
  settings are validated, the resource is known) with the ALWAYS_OFF sampler, but no instrumentation is installed
  and no span is created: nothing could be exported, and the aiohttp-server middleware alone costs more than half
  of the L1-hit throughput (docs/OBSERVABILITY.md), so this mode costs what ``off`` costs.
* ``record`` — ``OTEL_TRACES_EXPORTER=otlp|console`` (or a span processor handed in by a test or benchmark
  through ``app[K.SPAN_PROCESSOR]``): spans are sampled by ``OTEL_TRACES_SAMPLER`` (+ ``_ARG``; default
  ``parentbased_always_on``) and exported in batches.

Library spans come from the maintained instrumentations: aiohttp-server (a per-app middleware bound to this
app's provider), redis (``instrument_client`` on this app's clients), aiohttp-client (``trace_configs`` for
outgoing sessions) and asyncpg (process-wide, instrumented once; its spans are routed to the provider of the app
whose request is running, through a context variable). Client-library spans are only ever *children*: a Redis
heartbeat or a pool check outside any trace opens no root span.

URL attributes that would carry a Stellar account id (``G…``/``M…``) are redacted when a span starts, and the cache's
own spans never carry a wallet or auth key (see ``key_attributes``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes, AttributeValue

if TYPE_CHECKING:  # the SDK and the instrumentations are imported only when tracing is on
    import aiohttp
    import redis.asyncio
    from aiohttp.typedefs import Middleware
    from opentelemetry.sdk.trace import Span as SdkSpan
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.sampling import Sampler

from actors.tracing import key_attributes  # noqa: F401 - re-exported for callers of service.telemetry

log = logging.getLogger(__name__)

TRACER_NAME = "aframp.cache"
W3C = TraceContextTextMapPropagator()

_ACCOUNT = re.compile(r"\b(?:G[A-Z2-7]{55}|M[A-Z2-7]{68})\b")
_URL_ATTRIBUTES = ("http.target", "http.url", "url.full", "url.path", "url.query", "http.route")


class ConfigError(ValueError):
    pass


# ---------------------------------------------------------------- attributes


def redact(text: str) -> str:
    return _ACCOUNT.sub("{account_id}", text)


# ---------------------------------------------------------------- routing of process-wide instrumentation

_ACTIVE: contextvars.ContextVar[Telemetry | None] = contextvars.ContextVar("aframp_telemetry", default=None)


class _ChildOnlyTracer(Tracer):
    """Delegates to a real tracer, but only under a valid parent span; otherwise a non-recording no-op span.

    ``target`` is a fixed tracer, or None to use the tracer of the app whose work is running (``_ACTIVE``).
    """

    def __init__(self, name: str, version: str | None, schema_url: str | None, target: Tracer | None = None) -> None:
        self._args = (name, version, schema_url)
        self._fixed = target

    def _resolve(self) -> Tracer | None:
        if self._fixed is not None:
            return self._fixed
        active = _ACTIVE.get()
        if active is None or not active.enabled:
            return None
        return active.library_tracer(*self._args)

    def start_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Span:
        if not trace.get_current_span(context).get_span_context().is_valid:
            return trace.INVALID_SPAN
        target = self._resolve()
        if target is None:
            return trace.INVALID_SPAN
        return target.start_span(
            name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception
        )

    # Tracer declares this with its private _agnosticcontextmanager (sync and async use); contextlib's manager
    # serves the sync use every caller of a library tracer makes.
    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[Span]:
        span = self.start_span(
            name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception
        )
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as s:
            yield s


class _ChildOnlyProvider(trace.TracerProvider):
    def __init__(self, provider: trace.TracerProvider | None = None) -> None:
        self._provider = provider

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes = None,
    ) -> Tracer:
        name, version = instrumenting_module_name, instrumenting_library_version
        target = self._provider.get_tracer(name, version, schema_url) if self._provider is not None else None
        return _ChildOnlyTracer(name, version, schema_url, target)


_process_wide_done = False


def _instrument_process_wide() -> None:
    """asyncpg's instrumentation patches the driver for the whole process: do it once, routed per app."""
    global _process_wide_done
    if _process_wide_done:
        return
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    inst = AsyncPGInstrumentor()
    if not inst.is_instrumented_by_opentelemetry:
        inst.instrument(tracer_provider=_ChildOnlyProvider())
    # the aiohttp-server middleware reads module globals that only instrument() sets; set them once, then put
    # web.Application back (each route's wrapper, service.observed, calls the middleware bound to its app's provider)
    from opentelemetry.instrumentation import aiohttp_server

    if aiohttp_server._excluded_urls is None:
        server = aiohttp_server.AioHttpServerInstrumentor()
        if not server.is_instrumented_by_opentelemetry:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # its Application subclass, undone at once
                server.instrument()
                server.uninstrument()
    _process_wide_done = True


# ---------------------------------------------------------------- configuration

_SAMPLERS = {
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
}
_EXPORTERS = {"otlp", "console", "none"}


def _sampler(name: str, arg: str | None) -> Sampler:
    from opentelemetry.sdk.trace import sampling as s

    if name not in _SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER: expected one of {', '.join(sorted(_SAMPLERS))}, got {name!r}")
    ratio = 1.0
    if name.endswith("traceidratio"):
        try:
            ratio = float(arg) if arg not in (None, "") else 1.0
        except ValueError:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: expected a number between 0 and 1, got {arg!r}") from None
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: expected a number between 0 and 1, got {arg!r}")
    root: dict[str, Sampler] = {
        "always_on": s.ALWAYS_ON,
        "always_off": s.ALWAYS_OFF,
        "traceidratio": s.TraceIdRatioBased(ratio),
    }
    if name.startswith("parentbased_"):
        return s.ParentBased(root[name.removeprefix("parentbased_")])
    return root[name]


def _resource_attributes(otel: Mapping[str, str], instance_id: str) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for item in otel.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        k, sep, v = item.partition("=")
        if sep and k.strip():
            from urllib.parse import unquote

            attrs[k.strip()] = unquote(v.strip())
    if otel.get("OTEL_SERVICE_NAME"):
        attrs["service.name"] = otel["OTEL_SERVICE_NAME"]
    attrs.setdefault("service.name", "aframp-cache")
    attrs.setdefault("service.instance.id", instance_id)
    return attrs


@dataclass(frozen=True)
class TraceConfig:
    mode: str  # off | none | record
    exporter: str  # otlp | console | none
    sampler: str
    sampler_arg: str | None
    endpoint: str | None
    resource: Mapping[str, str] = field(default_factory=dict)


def parse(otel: Mapping[str, str], instance_id: str, *, has_processor: bool = False) -> TraceConfig:
    disabled = otel.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    exporter = (otel.get("OTEL_TRACES_EXPORTER") or "none").strip().lower().split(",")[0].strip()
    if exporter not in _EXPORTERS:
        raise ConfigError(f"OTEL_TRACES_EXPORTER: expected otlp, console or none, got {exporter!r}")
    sampler = (otel.get("OTEL_TRACES_SAMPLER") or "parentbased_always_on").strip().lower()
    arg = otel.get("OTEL_TRACES_SAMPLER_ARG")
    _sampler(sampler, arg)  # validate
    endpoint = otel.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not endpoint and otel.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        endpoint = otel["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/traces"
    if disabled or (not otel and not has_processor):
        mode = "off"
    elif exporter == "none" and not has_processor:
        mode = "none"
    else:
        mode = "record"
    return TraceConfig(mode, exporter, sampler, arg, endpoint, _resource_attributes(otel, instance_id))


# ---------------------------------------------------------------- the per-app telemetry


class Telemetry:
    """What the telemetry cleanup context built for one app."""

    def __init__(self, config: TraceConfig, provider: SdkTracerProvider | None = None) -> None:
        self.config = config
        self.provider = provider  # an SDK TracerProvider, or None when off
        self.tracer: Tracer | None = None  # the cache's own spans; None unless recording
        self.server_middleware: Middleware | None = None  # the aiohttp-server instrumentation bound to this provider
        # parentbased_traceidratio < 1: the share of root requests traced. The others skip the instrumentation
        # middleware entirely (it costs per request even for spans it does not record) and run under an
        # unsampled parent, so no span below them is recorded either.
        self.head_ratio: float | None = None
        self._library_tracers: dict[tuple[str, str | None, str | None], Tracer] = {}
        if provider is not None and config.mode == "record":
            self.tracer = provider.get_tracer(TRACER_NAME)
            from opentelemetry.instrumentation.aiohttp_server import create_aiohttp_middleware

            self.server_middleware = create_aiohttp_middleware(tracer_provider=provider)

    def unsampled(self) -> otel_context.Context:
        """A context whose current span is valid but not sampled: every span started under it is dropped."""
        ctx = trace.SpanContext(
            trace_id=random.getrandbits(128) or 1,
            span_id=random.getrandbits(64) or 1,
            is_remote=False,
            trace_flags=trace.TraceFlags(trace.TraceFlags.DEFAULT),
        )
        return trace.set_span_in_context(trace.NonRecordingSpan(ctx))

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def enabled(self) -> bool:
        """Spans are recorded (and the instrumentations installed)."""
        return self.tracer is not None

    def library_tracer(self, name: str, version: str | None, schema_url: str | None) -> Tracer:
        if self.provider is None:  # off: nothing to route library spans to
            return trace.NoOpTracer()
        key = (name, version, schema_url)
        tracer = self._library_tracers.get(key)
        if tracer is None:
            tracer = self._library_tracers[key] = self.provider.get_tracer(name, version, schema_url)
        return tracer

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Route process-wide instrumentation (asyncpg) to this app's provider for the work inside."""
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    # ---- instrumentation of this app's clients
    def instrument_redis(self, client: redis.asyncio.Redis) -> None:
        if not self.enabled:
            return
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        if not getattr(client, "_is_instrumented_by_opentelemetry", False):
            RedisInstrumentor.instrument_client(client, tracer_provider=_ChildOnlyProvider(self.provider))

    def client_trace_configs(self) -> list[aiohttp.TraceConfig]:
        """``trace_configs`` for an outgoing ``aiohttp.ClientSession`` (Horizon): client spans + traceparent."""
        if not self.enabled:
            return []
        from opentelemetry.instrumentation.aiohttp_client import create_trace_config

        return [create_trace_config(tracer_provider=_ChildOnlyProvider(self.provider))]

    # ---- invalidation messages
    def inject(self) -> dict[str, dict[str, str]]:
        """Fields to add to a bus message: the W3C context of the current span, if any."""
        if not self.enabled:
            return {}
        carrier: dict[str, str] = {}
        W3C.inject(carrier)
        return {"trace": carrier} if carrier else {}

    @contextlib.contextmanager
    def eviction_span(self, msg: Mapping[str, object], keys: Sequence[str], patterns: Sequence[str]) -> Iterator[None]:
        """A new root span for applying a peer's invalidation, LINKED to the writer's span."""
        if self.tracer is None:
            yield
            return
        links = []
        carrier = msg.get("trace")
        if isinstance(carrier, dict):
            remote = trace.get_current_span(W3C.extract({str(k): str(v) for k, v in carrier.items()}))
            ctx = remote.get_span_context()
            if ctx.is_valid:
                links.append(Link(ctx))
        namespaces = sorted({_namespace_prefix(n) for n in (*keys, *patterns)} - {""})
        attrs: dict[str, AttributeValue] = {
            "messaging.system": "redis",
            "messaging.operation": "receive",
            "cache.keys": len(keys),
            "cache.patterns": len(patterns),
            "cache.namespaces": namespaces,
            "cache.sender": str(msg.get("i", "")),
        }
        with (
            self.active(),
            self.tracer.start_as_current_span(
                "cache.evict", context=otel_context.Context(), kind=SpanKind.CONSUMER, links=links, attributes=attrs
            ),
        ):
            yield

    async def shutdown(self) -> None:
        if self.provider is not None:
            import asyncio

            await asyncio.to_thread(self.provider.shutdown)


def _namespace_prefix(key: str) -> str:
    from tiers.keys import namespace_of

    ns = namespace_of(key)
    return ns.prefix if ns is not None else ""


def _redacting_processor() -> SpanProcessor:
    from opentelemetry.sdk.trace import SpanProcessor

    class RedactingProcessor(SpanProcessor):
        """Runs first: takes account ids out of URL attributes before any exporter sees the span."""

        def on_start(self, span: SdkSpan, parent_context: otel_context.Context | None = None) -> None:
            attrs = span.attributes or {}
            for name in _URL_ATTRIBUTES:
                value = attrs.get(name)
                if isinstance(value, str) and _ACCOUNT.search(value):
                    span.set_attribute(name, redact(value))

    return RedactingProcessor()


def build(otel: Mapping[str, str], instance_id: str, processor: SpanProcessor | None = None) -> Telemetry:
    """Build the provider (no network I/O; an exporter connects lazily). ``processor``: tests and benchmarks."""
    config = parse(otel, instance_id, has_processor=processor is not None)
    if config.mode == "off":
        return Telemetry(config)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace import sampling as s
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    sampler = s.ALWAYS_OFF if config.mode == "none" else _sampler(config.sampler, config.sampler_arg)
    head_ratio = None
    if config.mode == "record" and config.sampler == "parentbased_traceidratio":
        ratio = float(config.sampler_arg) if config.sampler_arg not in (None, "") else 1.0
        if ratio < 1.0:
            # Head sampling at the edge (see Telemetry.head_ratio): a request without a caller's traceparent is
            # admitted with this ratio before any instrumentation runs; admitted roots are then always sampled.
            head_ratio = ratio
            sampler = s.ParentBased(s.ALWAYS_ON)
    provider = TracerProvider(sampler=sampler, resource=Resource(dict(config.resource)), shutdown_on_exit=False)
    if config.mode == "record":
        provider.add_span_processor(_redacting_processor())
        if processor is not None:
            provider.add_span_processor(processor)
        elif config.exporter == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif config.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=config.endpoint) if config.endpoint else OTLPSpanExporter()
            provider.add_span_processor(BatchSpanProcessor(exporter))
        _instrument_process_wide()
    telemetry = Telemetry(config, provider)
    telemetry.head_ratio = head_ratio
    return telemetry
