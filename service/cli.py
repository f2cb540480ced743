"""``aframp-cache serve | migrate`` (also ``python -m service``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from service import telemetry
from service.config import ConfigError, Settings, load_settings
from service.logs import setup_logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aframp-cache", description="Aframp two-tier cache service")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one instance")
    serve.add_argument("--host")
    serve.add_argument("--port")
    serve.add_argument("--config", help="path to config.toml (default: ./config.toml)")
    mig = sub.add_parser("migrate", help="apply pending schema migrations and exit")
    mig.add_argument("--config")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    env = dict(__import__("os").environ)
    if getattr(args, "host", None):
        env["HOST"] = args.host
    if getattr(args, "port", None):
        env["PORT"] = args.port
    return load_settings(args.config, env)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(logging.INFO)  # one JSON line per event, secrets scrubbed (service.logs)
    try:
        settings = _settings(args)
        telemetry.parse(settings.otel, settings.server.instance_id)  # a bad OTEL_* value stops start-up too
    except (ConfigError, telemetry.ConfigError) as err:
        print(f"aframp-cache: configuration error: {err}", file=sys.stderr)
        return 2
    if args.command == "migrate":
        return asyncio.run(_migrate(settings))
    return _serve(settings)


async def _migrate(settings: Settings) -> int:
    from service.embedded import EmbeddedPostgres
    from tiers import postgres
    from tiers.errors import OriginError

    embedded = EmbeddedPostgres(settings.server.data_dir) if settings.postgres.embedded else None
    dsn = embedded.start() if embedded else settings.postgres.url
    try:
        pool = await postgres.create_pool(
            dsn, min_size=1, max_size=1, command_timeout=30, connect_timeout=settings.postgres.connect_timeout
        )
        try:
            applied = await postgres.migrate(pool)
        finally:
            await pool.close()
    except OriginError as err:
        print(f"aframp-cache: migrate failed: {err}", file=sys.stderr)
        return 1
    finally:
        if embedded:
            embedded.stop()
    print("applied: " + (", ".join(applied) if applied else "nothing (schema is current)"))
    return 0


def _serve(settings: Settings) -> int:
    from aiohttp import web

    from service.app import create_app

    try:
        import uvloop  # optional: faster event loop
    except ImportError:
        uvloop = None  # type: ignore[assignment]  # absent: asyncio's own event loop
    from tiers.errors import TierError

    app = create_app(settings)
    try:
        web.run_app(
            app,
            host=settings.server.host,
            port=settings.server.port,
            shutdown_timeout=settings.server.shutdown_grace,
            access_log=logging.getLogger("aiohttp.access") if settings.server.access_log else None,
            loop=uvloop.new_event_loop() if uvloop is not None else None,
            print=lambda msg: logging.getLogger("service").info(msg.strip()),
        )
    except TierError as err:  # e.g. Postgres unreachable at start-up: one clear line, no traceback
        print(f"aframp-cache: cannot start: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. the port is taken
        print(f"aframp-cache: cannot start: {err}", file=sys.stderr)
        return 1
    return 0
