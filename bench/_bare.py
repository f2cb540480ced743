"""The baseline of the HTTP hot path: a bare aiohttp app answering fixed bytes with the service's headers.

``python -m bench._bare --port P --body-file F`` (uvloop when installed, like the service; no access log).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aiohttp import web


def make_app(body: bytes, routes: str = "one") -> web.Application:
    """``routes="full"``: the service's whole route table (and its catch-all), every route answering the bytes,
    to measure what aiohttp's resolver costs with that table before any service code runs."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json", headers={"X-Cache": "L1"})

    app = web.Application()
    if routes == "full":
        from service.routes import ROUTES

        for method, path, _ in ROUTES:
            if method == "GET":
                app.router.add_get(path, handler)
            else:
                app.router.add_route(method, path, handler)
        app.router.add_route("*", "/{tail:.*}", handler)
    else:
        app.router.add_get("/v1/rates/{base}/{quote}", handler)
        app.router.add_get("/health/live", handler)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--body-file", required=True)
    p.add_argument("--routes", choices=("one", "full"), default="one")
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        uvloop = None
    web.run_app(
        make_app(Path(args.body_file).read_bytes(), args.routes),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop() if uvloop else None,
    )


if __name__ == "__main__":
    main()
