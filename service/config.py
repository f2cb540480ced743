"""Settings: config.toml defaults, overridden by the environment, validated into one frozen object.

Each setting is declared once, as a field of its section's dataclass: its metadata (:func:`setting`) says how
to parse it and which environment variable, if any, overrides ``[section] field`` in the config file. A failure
raises :class:`ConfigError` whose message is one line naming the setting where its value came from (the
environment variable, or ``section.field`` of the config file); the CLI prints it and exits 2 without a traceback.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Generic, Protocol, TypeVar
from urllib.parse import urlsplit

from stellar_sdk import StrKey

from tiers.keys import DataType

T = TypeVar("T")
Parser = Callable[[str, object], T]  # (the name the value came under, the raw value) -> the value


class ConfigError(Exception):
    """A setting is missing or malformed. str(err) is one line naming the setting."""


# ---------------------------------------------------------------- parsers (name: where the raw value came from)


def _int(*, minimum: int = 0, maximum: int | None = None) -> Parser[int]:
    def parse(name: str, raw: object) -> int:
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

    return parse


def _float(*, positive: bool = True) -> Parser[float]:
    def parse(name: str, raw: object) -> float:
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

    return parse


def _bool(name: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def _str(name: str, raw: object) -> str:
    if not isinstance(raw, str | int | float):
        raise ConfigError(f"{name}: expected a string, got {type(raw).__name__}")
    return str(raw)


def _url(*schemes: str, allow: tuple[str, ...] = ("",)) -> Parser[str]:
    def parse(name: str, raw: object) -> str:
        text = _str(name, raw).strip()
        if text in allow:
            return text
        parts = urlsplit(text)
        if parts.scheme not in schemes:
            raise ConfigError(f"{name}: expected a URL starting with {' or '.join(s + '://' for s in schemes)}")
        if parts.scheme not in ("unix",) and not parts.hostname and "host=" not in parts.query:
            raise ConfigError(f"{name}: URL has no host")
        return text

    return parse


def _or(default: str, *, strip: bool = False) -> Parser[str]:
    """A string (stripped of surrounding spaces if ``strip``); empty means ``default``."""

    def parse(name: str, raw: object) -> str:
        text = _str(name, raw)
        return (text.strip() if strip else text) or default

    return parse


def _path(name: str, raw: object) -> Path:
    return Path(_str(name, raw))


def _instance_id(name: str, raw: object) -> str:
    value = _str(name, raw) or f"{socket.gethostname()}-{os.getpid()}"
    if len(value) > 128 or any(c.isspace() for c in value):
        raise ConfigError(f"{name}: at most 128 characters, no whitespace")
    return value


def _admin_token(name: str, raw: object) -> str:
    value = _str(name, raw)
    if value and len(value) < 16:
        raise ConfigError(f"{name}: must be at least 16 characters (or empty to close admin endpoints)")
    return value


_ASSET_CODE = re.compile(r"[A-Za-z0-9]{1,12}")


def _assets(name: str, raw: object) -> tuple[PlatformAsset, ...]:
    """``[[horizon.assets]]``: a list of ``{code, issuer}``; code 1-12 ASCII letters/digits, issuer a G... key or ""."""
    if not isinstance(raw, list):
        raise ConfigError(f"{name}: expected a list of tables ([[horizon.assets]] with code and issuer)")
    out: list[PlatformAsset] = []
    for i, item in enumerate(raw):
        label = f"{name}[{i}]"
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


# ---------------------------------------------------------------- the settings, each field declared once


@dataclass(frozen=True, slots=True)
class Spec(Generic[T]):
    """How one field is read: its parser, the environment variable that overrides the config file (if any), and
    whether the config file must name it (else the field's default stands)."""

    parse: Parser[T]
    env: str | None = None
    required: bool = True


_SPEC = "aframp.setting"


def setting(parse: Parser[T], *, env: str | None = None, required: bool = True) -> Mapping[str, Spec[T]]:
    """A field's metadata: ``port: int = field(metadata=setting(_int(), env="PORT"))``."""
    return MappingProxyType({_SPEC: Spec(parse, env, required)})


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = field(metadata=setting(_or("127.0.0.1", strip=True), env="HOST"))
    port: int = field(metadata=setting(_int(minimum=0, maximum=65535), env="PORT"))
    instance_id: str = field(metadata=setting(_instance_id, env="INSTANCE_ID"))  # "" in the file: hostname-pid
    admin_token: str = field(metadata=setting(_admin_token, env="ADMIN_TOKEN"))  # "": admin endpoints closed (403)
    data_dir: Path = field(metadata=setting(_path, env="AFRAMP_DATA_DIR"))
    shutdown_grace: float = field(metadata=setting(_float()))
    access_log: bool = field(metadata=setting(_bool))
    warm_limit: int = field(default=1000, metadata=setting(_int(minimum=0), env="AFRAMP_WARM_LIMIT"))
    warm_timeout: float = field(default=10.0, metadata=setting(_float()))


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    url: str = field(metadata=setting(_url("postgres", "postgresql"), env="DATABASE_URL"))  # "" means: embedded
    min_size: int = field(metadata=setting(_int(minimum=0)))
    max_size: int = field(metadata=setting(_int(minimum=1)))
    command_timeout: float = field(metadata=setting(_float()))
    connect_timeout: float = field(metadata=setting(_float()))

    @property
    def embedded(self) -> bool:
        return self.url == ""


@dataclass(frozen=True, slots=True)
class RedisSettings:
    # "" embedded, "none" disabled
    url: str = field(metadata=setting(_url("redis", "rediss", "unix", allow=("", "none")), env="REDIS_URL"))
    max_connections: int = field(metadata=setting(_int(minimum=1), env="REDIS_MAX_CONNECTIONS"))
    min_idle: int = field(metadata=setting(_int(minimum=0), env="REDIS_MIN_IDLE"))
    connection_timeout: float = field(metadata=setting(_float(), env="REDIS_CONNECTION_TIMEOUT"))
    max_lifetime: float = field(metadata=setting(_float(), env="REDIS_MAX_LIFETIME"))
    idle_timeout: float = field(metadata=setting(_float(), env="REDIS_IDLE_TIMEOUT"))
    health_check_interval: float = field(metadata=setting(_float(), env="REDIS_HEALTH_CHECK_INTERVAL"))
    command_timeout: float = field(metadata=setting(_float(), env="REDIS_COMMAND_TIMEOUT"))
    op_timeout: float = field(metadata=setting(_float(), env="REDIS_OP_TIMEOUT"))
    breaker_failures: int = field(metadata=setting(_int(minimum=1)))
    breaker_reset: float = field(metadata=setting(_float()))
    breaker_reset_max: float = field(metadata=setting(_float()))
    channel: str = field(metadata=setting(_or("aframp:v2:invalidations"), env="REDIS_CHANNEL"))

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
    url: str = field(metadata=setting(_url("http", "https", allow=()), env="HORIZON_URL"))
    timeout: float = field(metadata=setting(_float(), env="HORIZON_TIMEOUT"))
    network_passphrase: str = field(metadata=setting(_str))
    max_concurrency: int = field(default=8, metadata=setting(_int(minimum=1)))
    assets: tuple[PlatformAsset, ...] = field(default=(), metadata=setting(_assets, required=False))


@dataclass(frozen=True, slots=True)
class L1Settings:
    max_entries: int = field(metadata=setting(_int(minimum=1), env="L1_MAX_ENTRIES"))
    max_ttl: float = field(metadata=setting(_float(), env="L1_MAX_TTL"))


@dataclass(frozen=True, slots=True)
class CoherenceSettings:
    bound: float = field(metadata=setting(_float()))
    join_window: float = field(metadata=setting(_float()))
    ping_interval: float = field(metadata=setting(_float()))
    dead_after: float = field(metadata=setting(_float()))
    fence_ttl: float = field(metadata=setting(_float()))
    lease_ttl: float = field(metadata=setting(_float()))
    lease_wait: float = field(metadata=setting(_float()))
    refresh_ahead: float = field(metadata=setting(_float(positive=False)))
    outbox_sweep: float = field(metadata=setting(_float()))
    outbox_grace: float = field(metadata=setting(_float()))


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
            if isinstance(value, dict) and is_dataclass(current) and not isinstance(current, type):
                changes[name] = replace(current, **value)
            elif isinstance(value, dict):
                changes[name] = MappingProxyType({**current, **value})
            else:
                changes[name] = value
        return replace(self, **changes)


# ---------------------------------------------------------------- reading


def _table(doc: Mapping[str, object], name: str) -> dict[str, object]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}]: expected a table in the config file")
    return value


class _Section(Protocol):
    """A settings dataclass (what ``dataclasses.fields`` reads)."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]


S = TypeVar("S", bound=_Section)


def _spec(f: Field[Any]) -> Spec[object]:
    spec = f.metadata.get(_SPEC)
    if not isinstance(spec, Spec):
        raise TypeError(f"settings field {f.name} has no setting() metadata")
    return spec


class _Reader:
    """Reads sections of one config document under one environment; remembers the name each value came under
    (``names["redis.min_idle"]`` is ``REDIS_MIN_IDLE`` when the environment set it), for checks across fields."""

    def __init__(self, doc: Mapping[str, object], env: Mapping[str, str]) -> None:
        self.doc = doc
        self.env = env
        self.names: dict[str, str] = {}

    def section(self, cls: type[S], section: str) -> S:
        table = _table(self.doc, section)
        values: dict[str, object] = {}
        for f in fields(cls):
            spec, label = _spec(f), f"{section}.{f.name}"
            raw: object
            if spec.env is not None and spec.env in self.env:
                name, raw = spec.env, self.env[spec.env]
            elif f.name in table:
                name, raw = label, table[f.name]
            elif spec.required:
                raise ConfigError(f"{label}: missing from the config file")
            else:
                continue  # the field's default
            self.names[label] = name
            values[f.name] = spec.parse(name, raw)
        return cls(**values)

    def name(self, label: str) -> str:
        return self.names.get(label, label)


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


def settings_from(doc: Mapping[str, object], env: Mapping[str, str]) -> Settings:
    read = _Reader(doc, env)
    server = read.section(ServerSettings, "server")
    postgres = read.section(PostgresSettings, "postgres")
    if postgres.min_size > postgres.max_size:
        raise ConfigError("postgres.min_size: must not exceed postgres.max_size")
    redis = read.section(RedisSettings, "redis")
    if redis.min_idle > redis.max_connections:
        raise ConfigError(
            f"{read.name('redis.min_idle')}: {redis.min_idle} exceeds "
            f"{read.name('redis.max_connections')} ({redis.max_connections})"
        )
    horizon = read.section(HorizonSettings, "horizon")
    l1 = read.section(L1Settings, "l1")

    ttl_doc = _table(doc, "ttl")
    ttl: dict[DataType, float] = {}
    for dt in DataType:
        if dt.value not in ttl_doc:
            raise ConfigError(f"ttl.{dt.value}: missing from the config file")
        ttl[dt] = _float()(f"ttl.{dt.value}", ttl_doc[dt.value])
    unknown = set(ttl_doc) - {dt.value for dt in DataType}
    if unknown:
        raise ConfigError(f"ttl.{sorted(unknown)[0]}: unknown data type")
    negative = _per_type("negative_ttl", _table(doc, "negative_ttl"))
    max_stale = _per_type("max_stale", _table(doc, "max_stale"), positive=False)

    coherence = read.section(CoherenceSettings, "coherence")
    if coherence.join_window >= coherence.bound / 2:
        raise ConfigError("coherence.join_window: must be below half of coherence.bound")
    if coherence.ping_interval >= coherence.bound - coherence.join_window:
        raise ConfigError(
            "coherence.ping_interval: must be below coherence.bound - coherence.join_window (the lease pings renew)"
        )
    if coherence.fence_ttl < 3 * (postgres.command_timeout + postgres.connect_timeout):
        raise ConfigError(
            "coherence.fence_ttl: must be at least 3 x (postgres.command_timeout + postgres.connect_timeout): a fence "
            "outlives any write"
        )

    otel = {k: v for k, v in env.items() if k.startswith("OTEL_")}
    return Settings(
        server=server,
        postgres=postgres,
        redis=redis,
        horizon=horizon,
        l1=l1,
        ttl=MappingProxyType(ttl),
        negative_ttl=MappingProxyType(negative),
        max_stale=MappingProxyType(max_stale),
        coherence=coherence,
        otel=MappingProxyType(otel),
    )


def _per_type(section: str, doc: dict[str, object], *, positive: bool = True) -> dict[DataType, float]:
    out: dict[DataType, float] = {}
    for name, raw in doc.items():
        try:
            dt = DataType(name)
        except ValueError:
            raise ConfigError(f"{section}.{name}: unknown data type") from None
        out[dt] = _float(positive=positive)(f"{section}.{name}", raw)
        if out[dt] < 0:
            raise ConfigError(f"{section}.{name}: must be >= 0")
    return out


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()
