"""``aframp-cache serve | migrate`` (also ``python -m service``)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from service import telemetry
from service.config import DEFAULT_CONFIG, ConfigError, Settings, load_settings
from service.logs import LOG_FORMATS, setup_logging

log = logging.getLogger("service")

# the environment variables the service reads (config.toml holds the defaults of those it overrides)
ENVIRONMENT = [
    ("AFRAMP_CONFIG", "path of the config file (--config wins)", "the packaged config.toml"),
    ("AFRAMP_DATA_DIR", "directory of the embedded Postgres and Redis", "./data"),
    ("DATABASE_URL", "postgresql://... ; unset: embedded Postgres with demo data", "unset"),
    ("REDIS_URL", "redis://, rediss://, unix:// ; unset: embedded Redis; none: no Redis", "unset"),
    ("REDIS_MAX_CONNECTIONS", "Redis pool size", "20"),
    ("REDIS_MIN_IDLE", "idle Redis connections kept warm", "5"),
    ("REDIS_CONNECTION_TIMEOUT", "connect and pool-acquire timeout, s", "5"),
    ("REDIS_MAX_LIFETIME", "a Redis connection older than this is closed on release, s", "300"),
    ("REDIS_IDLE_TIMEOUT", "an idle Redis connection unused this long is closed, s", "60"),
    ("REDIS_HEALTH_CHECK_INTERVAL", "PING a connection idle this long before reuse, s", "30"),
    ("REDIS_COMMAND_TIMEOUT", "per-command socket timeout, s", "0.25"),
    ("REDIS_OP_TIMEOUT", "budget of one cache operation on the request path, s", "0.5"),
    ("REDIS_CHANNEL", "invalidation pub/sub channel", "aframp:v2:invalidations"),
    ("HORIZON_URL", "Horizon base URL", "https://horizon-testnet.stellar.org"),
    ("HORIZON_TIMEOUT", "total seconds of one Horizon request (then 504)", "5"),
    ("ADMIN_TOKEN", "bearer token of the write/event/admin endpoints (>= 16 chars)", "unset: they answer 403"),
    ("HOST, PORT", "listen address (--host/--port win)", "127.0.0.1, 8080"),
    ("INSTANCE_ID", "this instance's name in stats and bus messages", "hostname-pid"),
    ("L1_MAX_ENTRIES, L1_MAX_TTL", "L1 size and lifetime cap", "config.toml"),
    ("AFRAMP_WARM_LIMIT", "rates warmed at start-up (0: off)", "1000"),
    ("LOG_FORMAT", "json or text", "text on a terminal, else json"),
    ("LOG_LEVEL", "debug, info, warning, error", "info"),
    ("OTEL_*", "standard OpenTelemetry variables (tracing is off without them)", "unset"),
]


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("aframp-cache")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "0+unknown"


def _epilog() -> str:
    width = max(len(name) for name, _, _ in ENVIRONMENT)
    rows = [f"  {name:<{width}}  {what} (default: {default})" for name, what, default in ENVIRONMENT]
    return "environment variables (they override config.toml):\n" + "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aframp-cache", description="Aframp two-tier cache service")
    p.add_argument("--version", action="version", version=f"aframp-cache {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    cfg_help = f"path to config.toml (default: $AFRAMP_CONFIG, else the packaged {DEFAULT_CONFIG.name})"
    serve = sub.add_parser(
        "serve", help="run one instance", description="Run one instance.", epilog=_epilog(), formatter_class=fmt
    )
    serve.add_argument("--host", help="listen address (default: $HOST, else server.host of the config: 127.0.0.1)")
    serve.add_argument("--port", help="listen port; 0 picks a free one (default: $PORT, else server.port: 8080)")
    serve.add_argument("--config", help=cfg_help)
    mig = sub.add_parser(
        "migrate",
        help="apply pending schema migrations and exit",
        description="Apply pending schema migrations and exit.",
        epilog=_epilog(),
        formatter_class=fmt,
    )
    mig.add_argument("--config", help=cfg_help)
    return p


def _settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    env = dict(environ)
    if getattr(args, "host", None):
        env["HOST"] = args.host
    if getattr(args, "port", None):
        env["PORT"] = args.port
    return load_settings(args.config, env)


def _log_options(env: Mapping[str, str]) -> tuple[str | None, int]:
    fmt = env.get("LOG_FORMAT", "").strip().lower() or None
    if fmt is not None and fmt not in LOG_FORMATS:
        raise ConfigError(f"LOG_FORMAT: expected json or text, got {env['LOG_FORMAT']!r}")
    raw = env.get("LOG_LEVEL", "").strip().upper() or "INFO"
    level = logging.getLevelNamesMapping().get(raw)
    if raw not in ("DEBUG", "INFO", "WARNING", "ERROR") or level is None:
        raise ConfigError(f"LOG_LEVEL: expected debug, info, warning or error, got {env['LOG_LEVEL']!r}")
    return fmt, level


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        fmt, level = _log_options(os.environ)
        setup_logging(level, fmt=fmt)  # secrets scrubbed (service.logs)
        settings = _settings(args, os.environ)
        telemetry.parse(settings.otel, settings.server.instance_id)  # a bad OTEL_* value stops start-up too
    except (ConfigError, telemetry.ConfigError) as err:
        print(f"aframp-cache: configuration error: {err}", file=sys.stderr)
        return 2
    if args.command == "migrate":
        return asyncio.run(_migrate(settings))
    return _serve(settings)


async def _migrate(settings: Settings) -> int:
    from service.embedded import EmbeddedError, EmbeddedPostgres
    from tiers import postgres
    from tiers.errors import OriginError

    embedded = EmbeddedPostgres(settings.server.data_dir) if settings.postgres.embedded else None
    try:
        dsn = await asyncio.to_thread(embedded.start) if embedded else settings.postgres.url
        pool = await postgres.create_pool(
            dsn, min_size=1, max_size=1, command_timeout=30, connect_timeout=settings.postgres.connect_timeout
        )
        try:
            applied = await postgres.migrate(pool)
        finally:
            await pool.close()
    except (OriginError, EmbeddedError) as err:
        print(f"aframp-cache: migrate failed: {err}", file=sys.stderr)
        return 1
    finally:
        if embedded:
            await asyncio.to_thread(embedded.stop)
    print("applied: " + (", ".join(applied) if applied else "nothing (schema is current)"))
    return 0


def listen_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket before anything starts, so a taken port fails at once (OSError)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _serve(settings: Settings) -> int:
    from aiohttp import web

    from service import appkeys as K
    from service.app import create_app
    from service.embedded import EmbeddedError

    try:
        import uvloop  # optional: faster event loop
    except ImportError:
        uvloop = None  # type: ignore[assignment]  # absent: asyncio's own event loop
    from tiers.errors import TierError

    try:
        sock = listen_socket(settings.server.host, settings.server.port)
    except OSError as err:  # e.g. the port is taken: one line, before anything started
        where = f"{settings.server.host}:{settings.server.port}"
        print(f"aframp-cache: cannot start: cannot listen on {where}: {err.strerror or err}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    app = create_app(settings)

    def started(_msg: str) -> None:
        # one line a person reads first: where it listens, what it started, where its data lives
        embedded = app[K.EMBEDDED]
        data = Path(settings.server.data_dir).resolve()
        servers = f"embedded {', '.join(embedded)} in {data}" if embedded else "no embedded servers"
        log.info(
            "aframp-cache %s listening on http://%s:%d (%s); Ctrl-C stops it",
            version(),
            shown,
            port,
            servers,
            extra={"event": "listening", "host": host, "port": port, "data_dir": str(data), "embedded": embedded},
        )

    try:
        web.run_app(
            app,
            sock=sock,
            shutdown_timeout=settings.server.shutdown_grace,
            access_log=logging.getLogger("aiohttp.access") if settings.server.access_log else None,
            loop=uvloop.new_event_loop() if uvloop is not None else None,
            print=started,
        )
    except (TierError, EmbeddedError) as err:  # e.g. Postgres unreachable at start-up: one clear line
        print(f"aframp-cache: cannot start: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"aframp-cache: cannot start: {err}", file=sys.stderr)
        return 1
    finally:
        sock.close()
    log.info("stopped")
    # the interpreter's last garbage collection walks every object the libraries made (about 1 s here): nothing
    # is left to finalize that matters, so the survivors are frozen out of it and the process exits at once
    gc.freeze()
    return 0
