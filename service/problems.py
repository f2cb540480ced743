"""RFC 9457 problem documents, and :func:`guarded`, which turns every failure into one (each route's wrapper,
:func:`service.observed.observed`, runs it)."""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from actors.base import ActorStopped
from tiers.coherence import InvalidationPending, WriteUnavailable
from tiers.errors import Conflict, OriginError

log = logging.getLogger(__name__)

PROBLEM_TYPE = "urn:aframp:problem:"
CONTENT_TYPE = "application/problem+json"


class Problem(Exception):
    def __init__(self, status: int, slug: str, title: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = headers or {}


def bad_request(detail: str, slug: str = "invalid-request") -> Problem:
    return Problem(400, slug, "Invalid request", detail)


def not_found(detail: str) -> Problem:
    return Problem(404, "not-found", "Not found", detail)


def problem_response(
    status: int, slug: str, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    body = {"type": PROBLEM_TYPE + slug, "title": title, "status": status, "detail": detail, **extra}
    return web.Response(status=status, body=orjson.dumps(body), content_type=CONTENT_TYPE, headers=headers)


def from_problem(p: Problem) -> web.Response:
    return problem_response(p.status, p.slug, p.title, p.detail, p.headers)


def from_origin_error(err: OriginError) -> web.Response:
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    slug = {502: "origin-bad-gateway", 503: "origin-unavailable", 504: "origin-timeout"}.get(err.status, "origin")
    return problem_response(err.status, slug, err.title, f"{err.origin}: {err.detail}", headers)


_HTTP_SLUGS = {404: "not-found", 405: "method-not-allowed", 413: "payload-too-large", 415: "unsupported-media-type"}


async def guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Run a handler; turn every failure into an RFC 9457 problem."""
    try:
        return await handler(request)
    except Exception as exc:
        return answer_failure(request, exc)


def answer_failure(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The problem document for a failure (re-raises what is not one: a redirect). Never a bare 500 page."""
    try:
        raise exc
    except Problem as p:
        return from_problem(p)
    except OriginError as err:
        route = request.match_info.route.resource
        log.warning(
            "origin error on %s %s: %s",
            request.method,
            route.canonical if route else "?",
            err,
            extra={"event": "origin_error", "origin": err.origin, "status": err.status},
        )
        return from_origin_error(err)
    except Conflict as err:
        return problem_response(409, "conflict", "Conflict", str(err))
    except WriteUnavailable as err:
        log.warning("write refused: %s", err, extra={"event": "write_refused"})
        return problem_response(
            503,
            "invalidation-unavailable",
            "Invalidation unavailable",
            "nothing was changed: this instance cannot reach Redis to invalidate every instance's copy first; "
            "retry (another instance, or shortly)",
            {"Retry-After": "1"},
        )
    except InvalidationPending as err:
        log.warning("write committed, invalidation pending: %s", err, extra={"event": "invalidation_pending"})
        return problem_response(
            503,
            "invalidation-pending",
            "Invalidation pending",
            "the write was committed, but Redis failed while it was in progress and the invalidation could not be "
            "confirmed: every instance drops the old value once Redis answers again (the outbox, within seconds); "
            "retrying the same write is safe",
            {"Retry-After": "1"},
        )
    except ActorStopped:
        return problem_response(503, "draining", "Shutting down", "this instance is stopping; retry another")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}
        detail = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        if exc.status == 404:
            detail = f"no resource at {request.path}; see the API in the README"
        return problem_response(exc.status, _HTTP_SLUGS.get(exc.status, "http-error"), exc.reason, detail, headers)
    except Exception:  # a bug of ours: logged with its traceback, answered without internals
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem_response(500, "internal", "Internal error", "unexpected error; it has been logged")
