"""The per-route request wrapper: traces (when on), the route's latency histogram, failures as problem documents.

A wrapper per route instead of an app middleware: aiohttp runs every middleware layer (and one of its own) on every
request, a quarter of the hot path's time.
"""

from __future__ import annotations

import time
from functools import partial
from random import random

from aiohttp import web
from aiohttp.typedefs import Handler
from opentelemetry import context as otel_context

from service import appkeys as K
from service.problems import answer_failure, guarded


def observed(handler: Handler, route: str) -> Handler:
    """Wrap one route's handler: traces (when on), its latency histogram, and every failure turned into a
    problem document (service.problems.guarded). A wrapper per route instead of an app middleware: aiohttp runs
    every middleware layer (and one of its own) on every request, a quarter of the hot path's time."""

    async def endpoint(request: web.Request) -> web.StreamResponse:
        app = request.app
        t0 = time.perf_counter()
        status = 500
        try:
            telemetry = app[K.TELEMETRY]
            if telemetry.server_middleware is not None and (
                telemetry.head_ratio is None or "traceparent" in request.headers or random() < telemetry.head_ratio
            ):  # a traced request: the maintained aiohttp instrumentation
                with telemetry.active():
                    resp = await telemetry.server_middleware(request, partial(guarded, handler=handler))
            elif telemetry.server_middleware is not None:  # sampled out at the edge: no instrumentation at all
                token = otel_context.attach(telemetry.unsampled())
                try:
                    resp = await guarded(request, handler)
                finally:
                    otel_context.detach(token)
            else:
                try:
                    resp = await handler(request)
                except Exception as exc:  # one coroutine layer less than calling guarded()
                    resp = answer_failure(request, exc)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            app[K.METRICS].observe_http(route, request.method, status, time.perf_counter() - t0)

    endpoint.__name__ = getattr(handler, "__name__", "endpoint")
    endpoint.__doc__ = getattr(handler, "__doc__", None)
    return endpoint
