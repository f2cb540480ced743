"""The baseline of the HTTP hot path: a bare aiohttp app answering fixed bytes with the service's headers.

``python -m bench._bare --port P --body-file F`` (uvloop when installed, like the service; no access log).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aiohttp import web


def make_app(body: bytes) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json", headers={"X-Cache": "L1"})

    app = web.Application()
    app.router.add_get("/v1/rates/{base}/{quote}", handler)
    app.router.add_get("/health/live", handler)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--body-file", required=True)
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        uvloop = None
    web.run_app(
        make_app(Path(args.body_file).read_bytes()),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop() if uvloop else None,
    )


if __name__ == "__main__":
    main()
