"""Logs: JSON lines in production, human-readable lines on a terminal; trace_id/span_id inside a span; no secrets.

``LOG_FORMAT=json|text`` chooses (default: text when stderr is a terminal, else JSON); ``LOG_LEVEL`` the level
(default info). Third-party start-up noise (pgserver's initdb and pg_ctl output, library warnings) is demoted
to debug: visible with ``LOG_LEVEL=debug``, never on an operator's screen otherwise.

Secrets: every value registered with :func:`register_secret` (the admin token, the Postgres and Redis passwords
— the composition root registers them) is replaced by ``***`` in the whole rendered line, and so is the password
of any ``scheme://user:password@host`` URL, whatever logged it (messages, extra fields, tracebacks, access log).
"""

from __future__ import annotations

import datetime
import logging
import re
import sys
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import unquote, urlsplit

import orjson
from opentelemetry import trace

if TYPE_CHECKING:
    from service.config import Settings

_SECRETS: set[str] = set()
_URL_PASSWORD = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s\"']*:)(?P<pw>[^@\s\"'/]+)(?P<at>@)")

# LogRecord attributes that are not "extra" fields
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def register_secret(value: str | None) -> None:
    if value and len(value) >= 4:
        _SECRETS.add(value)


def register_url(url: str | None) -> None:
    if not url:
        return
    try:
        password = urlsplit(url).password
    except ValueError:
        return
    if password:
        register_secret(password)
        register_secret(unquote(password))


def scrub(text: str) -> str:
    text = _URL_PASSWORD.sub(r"\g<pre>***\g<at>", text)
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or "log",
            "message": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = format(ctx.trace_id, "032x")
            out["span_id"] = format(ctx.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        line = orjson.dumps(out, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        return scrub(line)


class TextFormatter(logging.Formatter):
    """``12:00:01.234 INFO  message`` (+ the exception); the logger name only for other libraries' lines."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        name = "" if record.name.split(".")[0] in _OURS else f"{record.name}: "
        line = f"{ts} {record.levelname:<7} {name}{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return scrub(line)


_OURS = {"service", "actors", "tiers", "aframp"}
# loggers whose INFO/WARNING lines are start-up noise for an operator: logged at debug
NOISY = ("pgserver", "py.warnings")
LOG_FORMATS = ("json", "text")


class Demote(logging.Filter):
    """Rewrites the records of :data:`NOISY` loggers below ERROR to DEBUG, then applies the handler's level."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and record.name.split(".")[0] in NOISY:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return record.levelno >= self.level


def json_handler(stream: TextIO | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    return handler


def default_format(stream: TextIO | None = None) -> str:
    """text on a terminal, json otherwise."""
    stream = stream or sys.stderr
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def setup_logging(level: int = logging.INFO, stream: TextIO | None = None, fmt: str | None = None) -> logging.Handler:
    """Replace the root handlers with one handler, JSON or text (called by ``aframp-cache``)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = fmt or default_format(stream)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    handler.addFilter(Demote(level))
    root.addHandler(handler)
    # the demoted loggers are let through to the handler, which decides (their INFO lines count as debug)
    root.setLevel(min(level, logging.INFO))
    logging.captureWarnings(True)
    return handler


_SECRET_OTEL = re.compile(r"HEADERS|PASSWORD|TOKEN|KEY", re.IGNORECASE)


def public_settings(settings: Settings) -> dict[str, Any]:
    """The effective settings for the start-up log: URLs without passwords, the admin token only as set/unset."""
    import dataclasses

    from service.config import redact_url

    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if hasattr(obj, "items"):
            return {str(k): plain(v) for k, v in obj.items()}
        if isinstance(obj, str | int | float | bool) or obj is None:
            return obj
        return str(obj)

    out: dict[str, Any] = plain(settings)
    out["server"]["admin_token"] = "set" if settings.server.admin_token else "unset"
    out["postgres"]["url"] = redact_url(settings.postgres.url) if settings.postgres.url else "embedded"
    r = settings.redis.url
    out["redis"]["url"] = redact_url(r) if r not in ("", "none") else ("embedded" if r == "" else "none")
    out["otel"] = {k: ("***" if _SECRET_OTEL.search(k) else v) for k, v in settings.otel.items()}
    return out
