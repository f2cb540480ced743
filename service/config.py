"""Settings: config.toml defaults, overridden by the environment, validated into one frozen object.

Every failure raises :class:`ConfigError` whose message is one line naming the setting; the CLI prints it
and exits 2 without a traceback.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, is_dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from stellar_sdk import StrKey

from tiers.keys import DataType


class ConfigError(Exception):
    """A setting is missing or malformed. str(err) is one line naming the setting."""


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str
    port: int
    instance_id: str
    admin_token: str  # "" means: admin endpoints closed (403)
    data_dir: Path
    shutdown_grace: float
    access_log: bool
    warm_limit: int = 1000
    warm_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    url: str  # "" means: embedded
    min_size: int
    max_size: int
    command_timeout: float
    connect_timeout: float

    @property
    def embedded(self) -> bool:
        return self.url == ""


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str  # "" embedded, "none" disabled
    max_connections: int
    min_idle: int
    connection_timeout: float
    max_lifetime: float
    idle_timeout: float
    health_check_interval: float
    command_timeout: float
    op_timeout: float
    breaker_failures: int
    breaker_reset: float
    breaker_reset_max: float
    channel: str

    @property
    def disabled(self) -> bool:
        return self.url == "none"

    @property
    def embedded(self) -> bool:
        return self.url == ""


@dataclass(frozen=True, slots=True)
class PlatformAsset:
    """One of the platform's own Stellar assets (e.g. cNGN). ``issuer`` "" means: not known yet."""

    code: str
    issuer: str


@dataclass(frozen=True, slots=True)
class HorizonSettings:
    url: str
    timeout: float
    network_passphrase: str
    max_concurrency: int = 8
    assets: tuple[PlatformAsset, ...] = ()


@dataclass(frozen=True, slots=True)
class L1Settings:
    max_entries: int
    max_ttl: float


@dataclass(frozen=True, slots=True)
class CoherenceSettings:
    bound: float
    ping_interval: float
    dead_after: float
    fence_ttl: float
    lease_ttl: float
    lease_wait: float
    refresh_ahead: float
    outbox_sweep: float
    outbox_grace: float


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings
    postgres: PostgresSettings
    redis: RedisSettings
    horizon: HorizonSettings
    l1: L1Settings
    ttl: Mapping[DataType, float]
    negative_ttl: Mapping[DataType, float]
    max_stale: Mapping[DataType, float]
    coherence: CoherenceSettings
    otel: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def with_overrides(self, **sections: Any) -> Settings:
        """A copy with whole sections or fields replaced, e.g. ``redis={"url": "none"}`` (tests, CLI flags)."""
        changes: dict[str, Any] = {}
        for name, value in sections.items():
            current = getattr(self, name)
            if isinstance(value, dict) and is_dataclass(current):
                changes[name] = replace(current, **value)
            elif isinstance(value, dict):
                changes[name] = MappingProxyType({**current, **value})
            else:
                changes[name] = value
        return replace(self, **changes)


# ---------------------------------------------------------------- parsing helpers


def _int(name: str, raw: Any, *, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(raw, bool):
        raise ConfigError(f"{name}: expected an integer, got {raw!r}")
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{name}: must be {bound}, got {value}")
    return value


def _float(name: str, raw: Any, *, positive: bool = True) -> float:
    if isinstance(raw, bool):
        raise ConfigError(f"{name}: expected a number of seconds, got {raw!r}")
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{name}: expected a number of seconds, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name}: must be finite, got {raw!r}")
    if positive and value <= 0:
        raise ConfigError(f"{name}: must be > 0, got {raw!r}")
    return value


def _bool(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def _url(name: str, raw: Any, schemes: tuple[str, ...], *, allow: tuple[str, ...] = ("",)) -> str:
    text = str(raw).strip()
    if text in allow:
        return text
    parts = urlsplit(text)
    if parts.scheme not in schemes:
        raise ConfigError(f"{name}: expected a URL starting with {' or '.join(s + '://' for s in schemes)}")
    if parts.scheme not in ("unix",) and not parts.hostname and "host=" not in parts.query:
        raise ConfigError(f"{name}: URL has no host")
    return text


def _str(name: str, raw: Any) -> str:
    if not isinstance(raw, str | int | float):
        raise ConfigError(f"{name}: expected a string, got {type(raw).__name__}")
    return str(raw)


def _section(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}]: expected a table in the config file")
    return value


def _pick(section: dict[str, Any], key: str, env: Mapping[str, str], env_name: str | None, label: str) -> Any:
    if env_name and env.get(env_name) not in (None,):
        return env[env_name]
    if key not in section:
        raise ConfigError(f"{label}: missing from the config file")
    return section[key]


# package data: found wherever the command runs, installed or not (config.toml at the repository root is a
# byte-identical copy for readers; tests/test_config.py fails when they differ)
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.toml"


def find_config(path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path:
    """``--config``, else ``AFRAMP_CONFIG``, else the packaged default (never an implicit ./config.toml)."""
    if path:
        return Path(path)
    if env.get("AFRAMP_CONFIG"):
        return Path(env["AFRAMP_CONFIG"])
    return DEFAULT_CONFIG


def load_settings(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read config.toml, apply the environment, validate. Raises ConfigError with one clear line."""
    env = os.environ if env is None else env
    cfg_path = find_config(path, env)
    try:
        with open(cfg_path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {cfg_path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config: {cfg_path} is not valid TOML ({err})") from None
    return settings_from(doc, env)


def settings_from(doc: Mapping[str, Any], env: Mapping[str, str]) -> Settings:
    s, p, r = _section(doc, "server"), _section(doc, "postgres"), _section(doc, "redis")
    h, l1, ttl_doc, neg_doc = (
        _section(doc, "horizon"),
        _section(doc, "l1"),
        _section(doc, "ttl"),
        _section(doc, "negative_ttl"),
    )

    instance_id = _str("INSTANCE_ID", _pick(s, "instance_id", env, "INSTANCE_ID", "server.instance_id"))
    if not instance_id:
        instance_id = f"{socket.gethostname()}-{os.getpid()}"
    if len(instance_id) > 128 or any(c.isspace() for c in instance_id):
        raise ConfigError("INSTANCE_ID: at most 128 characters, no whitespace")

    server = ServerSettings(
        host=_str("HOST", _pick(s, "host", env, "HOST", "server.host")).strip() or "127.0.0.1",
        port=_int("PORT", _pick(s, "port", env, "PORT", "server.port"), minimum=0, maximum=65535),
        instance_id=instance_id,
        admin_token=_str("ADMIN_TOKEN", _pick(s, "admin_token", env, "ADMIN_TOKEN", "server.admin_token")),
        data_dir=Path(_str("AFRAMP_DATA_DIR", _pick(s, "data_dir", env, "AFRAMP_DATA_DIR", "server.data_dir"))),
        shutdown_grace=_float("server.shutdown_grace", _pick(s, "shutdown_grace", env, None, "server.shutdown_grace")),
        access_log=_bool("server.access_log", _pick(s, "access_log", env, None, "server.access_log")),
        warm_limit=_int(
            "AFRAMP_WARM_LIMIT", _pick(s, "warm_limit", env, "AFRAMP_WARM_LIMIT", "server.warm_limit"), minimum=0
        ),
        warm_timeout=_float("server.warm_timeout", _pick(s, "warm_timeout", env, None, "server.warm_timeout")),
    )
    if server.admin_token and len(server.admin_token) < 16:
        raise ConfigError("ADMIN_TOKEN: must be at least 16 characters (or empty to close admin endpoints)")

    pg_min = _int("postgres.min_size", _pick(p, "min_size", env, None, "postgres.min_size"), minimum=0)
    pg_max = _int("postgres.max_size", _pick(p, "max_size", env, None, "postgres.max_size"), minimum=1)
    if pg_min > pg_max:
        raise ConfigError("postgres.min_size: must not exceed postgres.max_size")
    postgres = PostgresSettings(
        url=_url("DATABASE_URL", _pick(p, "url", env, "DATABASE_URL", "postgres.url"), ("postgres", "postgresql")),
        min_size=pg_min,
        max_size=pg_max,
        command_timeout=_float(
            "postgres.command_timeout", _pick(p, "command_timeout", env, None, "postgres.command_timeout")
        ),
        connect_timeout=_float(
            "postgres.connect_timeout", _pick(p, "connect_timeout", env, None, "postgres.connect_timeout")
        ),
    )

    def rv(key: str, env_name: str | None) -> Any:
        return _pick(r, key, env, env_name, f"redis.{key}")

    max_conn = _int("REDIS_MAX_CONNECTIONS", rv("max_connections", "REDIS_MAX_CONNECTIONS"), minimum=1)
    min_idle = _int("REDIS_MIN_IDLE", rv("min_idle", "REDIS_MIN_IDLE"), minimum=0)
    if min_idle > max_conn:
        raise ConfigError(f"REDIS_MIN_IDLE: {min_idle} exceeds REDIS_MAX_CONNECTIONS ({max_conn})")
    redis = RedisSettings(
        url=_url("REDIS_URL", rv("url", "REDIS_URL"), ("redis", "rediss", "unix"), allow=("", "none")),
        max_connections=max_conn,
        min_idle=min_idle,
        connection_timeout=_float("REDIS_CONNECTION_TIMEOUT", rv("connection_timeout", "REDIS_CONNECTION_TIMEOUT")),
        max_lifetime=_float("REDIS_MAX_LIFETIME", rv("max_lifetime", "REDIS_MAX_LIFETIME")),
        idle_timeout=_float("REDIS_IDLE_TIMEOUT", rv("idle_timeout", "REDIS_IDLE_TIMEOUT")),
        health_check_interval=_float(
            "REDIS_HEALTH_CHECK_INTERVAL", rv("health_check_interval", "REDIS_HEALTH_CHECK_INTERVAL")
        ),
        command_timeout=_float("REDIS_COMMAND_TIMEOUT", rv("command_timeout", "REDIS_COMMAND_TIMEOUT")),
        op_timeout=_float("REDIS_OP_TIMEOUT", rv("op_timeout", "REDIS_OP_TIMEOUT")),
        breaker_failures=_int("redis.breaker_failures", rv("breaker_failures", None), minimum=1),
        breaker_reset=_float("redis.breaker_reset", rv("breaker_reset", None)),
        breaker_reset_max=_float("redis.breaker_reset_max", rv("breaker_reset_max", None)),
        channel=_str("REDIS_CHANNEL", rv("channel", "REDIS_CHANNEL")) or "aframp:v2:invalidations",
    )

    horizon = HorizonSettings(
        url=_url("HORIZON_URL", _pick(h, "url", env, "HORIZON_URL", "horizon.url"), ("http", "https"), allow=()),
        timeout=_float("HORIZON_TIMEOUT", _pick(h, "timeout", env, "HORIZON_TIMEOUT", "horizon.timeout")),
        network_passphrase=_str(
            "horizon.network_passphrase", _pick(h, "network_passphrase", env, None, "horizon.network_passphrase")
        ),
        max_concurrency=_int(
            "horizon.max_concurrency", _pick(h, "max_concurrency", env, None, "horizon.max_concurrency"), minimum=1
        ),
        assets=_assets(h.get("assets", [])),
    )

    l1s = L1Settings(
        max_entries=_int(
            "L1_MAX_ENTRIES", _pick(l1, "max_entries", env, "L1_MAX_ENTRIES", "l1.max_entries"), minimum=1
        ),
        max_ttl=_float("L1_MAX_TTL", _pick(l1, "max_ttl", env, "L1_MAX_TTL", "l1.max_ttl")),
    )

    ttl: dict[DataType, float] = {}
    for dt in DataType:
        if dt.value not in ttl_doc:
            raise ConfigError(f"ttl.{dt.value}: missing from the config file")
        ttl[dt] = _float(f"ttl.{dt.value}", ttl_doc[dt.value])
    unknown = set(ttl_doc) - {dt.value for dt in DataType}
    if unknown:
        raise ConfigError(f"ttl.{sorted(unknown)[0]}: unknown data type")
    negative = _per_type("negative_ttl", neg_doc)
    max_stale = _per_type("max_stale", _section(doc, "max_stale"), positive=False)
    c = _section(doc, "coherence")

    def cv(key: str, *, positive: bool = True) -> float:
        return _float(f"coherence.{key}", _pick(c, key, env, None, f"coherence.{key}"), positive=positive)

    coherence = CoherenceSettings(
        bound=cv("bound"),
        ping_interval=cv("ping_interval"),
        dead_after=cv("dead_after"),
        fence_ttl=cv("fence_ttl"),
        lease_ttl=cv("lease_ttl"),
        lease_wait=cv("lease_wait"),
        refresh_ahead=cv("refresh_ahead", positive=False),
        outbox_sweep=cv("outbox_sweep"),
        outbox_grace=cv("outbox_grace"),
    )
    if coherence.ping_interval >= coherence.bound:
        raise ConfigError("coherence.ping_interval: must be below coherence.bound (the lease is renewed by pings)")
    if coherence.fence_ttl < 3 * postgres.command_timeout:
        raise ConfigError(
            "coherence.fence_ttl: must be at least 3 x postgres.command_timeout (a fence outlives any write)"
        )

    otel = {k: v for k, v in env.items() if k.startswith("OTEL_")}
    return Settings(
        server=server,
        postgres=postgres,
        redis=redis,
        horizon=horizon,
        l1=l1s,
        ttl=MappingProxyType(ttl),
        negative_ttl=MappingProxyType(negative),
        max_stale=MappingProxyType(max_stale),
        coherence=coherence,
        otel=MappingProxyType(otel),
    )


def _per_type(section: str, doc: dict[str, Any], *, positive: bool = True) -> dict[DataType, float]:
    out: dict[DataType, float] = {}
    for name, raw in doc.items():
        try:
            dt = DataType(name)
        except ValueError:
            raise ConfigError(f"{section}.{name}: unknown data type") from None
        out[dt] = _float(f"{section}.{name}", raw, positive=positive)
        if out[dt] < 0:
            raise ConfigError(f"{section}.{name}: must be >= 0")
    return out


_ASSET_CODE = re.compile(r"[A-Za-z0-9]{1,12}")


def _assets(raw: Any) -> tuple[PlatformAsset, ...]:
    """``[[horizon.assets]]``: a list of ``{code, issuer}``; code 1-12 ASCII letters/digits, issuer a G... key or ""."""
    if not isinstance(raw, list):
        raise ConfigError("horizon.assets: expected a list of tables ([[horizon.assets]] with code and issuer)")
    out: list[PlatformAsset] = []
    for i, item in enumerate(raw):
        label = f"horizon.assets[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{label}: expected a table with code and issuer")
        unknown = sorted(set(item) - {"code", "issuer"})
        if unknown:
            raise ConfigError(f"{label}.{unknown[0]}: unknown field (allowed: code, issuer)")
        code, issuer = item.get("code"), item.get("issuer", "")
        if not isinstance(code, str) or not _ASSET_CODE.fullmatch(code):
            raise ConfigError(f"{label}.code: expected 1-12 ASCII letters or digits, got {code!r}")
        if not isinstance(issuer, str) or (issuer and not StrKey.is_valid_ed25519_public_key(issuer)):
            raise ConfigError(f'{label}.issuer: expected a Stellar G... public key or "" (unknown), got {issuer!r}')
        asset = PlatformAsset(code, issuer)
        if asset in out:
            raise ConfigError(f"{label}: duplicate of an earlier asset {code}:{issuer or '(no issuer)'}")
        out.append(asset)
    return tuple(out)


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()
