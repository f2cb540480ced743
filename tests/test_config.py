"""Configuration: defaults from config.toml, environment overrides, one clear line on a bad value."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib

import pytest

from service import config
from service.config import ConfigError, load_settings, settings_from
from tests.conftest import ROOT
from tiers.keys import DataType

CFG = ROOT / "config.toml"


def test_defaults_hold_the_seed_ttl_table():
    s = load_settings(CFG, {})
    assert dict(s.ttl) == {
        DataType.EXCHANGE_RATE: 90,
        DataType.WALLET_BALANCE: 45,
        DataType.TRUSTLINE: 3600,
        DataType.FEE_STRUCTURE: 3600,
        DataType.USER_SESSION: 1800,
        DataType.TRANSACTION_STATUS: 300,
        DataType.RECENT_TRANSACTIONS: 600,
        DataType.JWT_VALIDATION: 900,
        DataType.RATE_LIMIT: 60,
        DataType.BILL_PROVIDER: 1800,
    }
    assert s.redis.max_connections == 20 and s.redis.min_idle == 5
    assert s.redis.connection_timeout == 5 and s.redis.max_lifetime == 300
    assert s.redis.idle_timeout == 60 and s.redis.health_check_interval == 30
    assert s.postgres.embedded and s.redis.embedded
    assert s.horizon.url.startswith("https://horizon-testnet")
    assert s.server.admin_token == ""


def test_environment_overrides():
    env = {
        "DATABASE_URL": "postgresql://u:p@db:5432/x",
        "REDIS_URL": "redis://cache:6380/2",
        "REDIS_MAX_CONNECTIONS": "7",
        "REDIS_MIN_IDLE": "3",
        "REDIS_CONNECTION_TIMEOUT": "1.5",
        "REDIS_MAX_LIFETIME": "120",
        "REDIS_IDLE_TIMEOUT": "30",
        "REDIS_HEALTH_CHECK_INTERVAL": "10",
        "HORIZON_URL": "https://horizon.stellar.org",
        "ADMIN_TOKEN": "a-very-secret-token",
        "HOST": "0.0.0.0",
        "PORT": "9000",
        "INSTANCE_ID": "node-a",
        "OTEL_SERVICE_NAME": "cache",
        "REDIS_CHANNEL": "fleet-b:invalidations",
    }
    s = load_settings(CFG, env)
    assert s.postgres.url == env["DATABASE_URL"] and not s.postgres.embedded
    assert s.redis.url == env["REDIS_URL"]
    assert (s.redis.max_connections, s.redis.min_idle) == (7, 3)
    assert (s.redis.connection_timeout, s.redis.max_lifetime, s.redis.idle_timeout) == (1.5, 120, 30)
    assert s.redis.health_check_interval == 10
    assert s.horizon.url == env["HORIZON_URL"]
    assert s.server.admin_token == env["ADMIN_TOKEN"]
    assert (s.server.host, s.server.port, s.server.instance_id) == ("0.0.0.0", 9000, "node-a")
    assert s.otel["OTEL_SERVICE_NAME"] == "cache"
    assert s.redis.channel == "fleet-b:invalidations"
    assert load_settings(CFG, {"REDIS_URL": "none"}).redis.disabled


def test_settings_are_frozen():
    s = load_settings(CFG, {})
    with pytest.raises(AttributeError):
        s.redis.max_connections = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.ttl[DataType.EXCHANGE_RATE] = 1  # type: ignore[index]


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"REDIS_MAX_CONNECTIONS": "abc"}, "REDIS_MAX_CONNECTIONS"),
        ({"REDIS_MAX_CONNECTIONS": "0"}, "REDIS_MAX_CONNECTIONS"),
        ({"REDIS_MIN_IDLE": "-1"}, "REDIS_MIN_IDLE"),
        ({"REDIS_MIN_IDLE": "50"}, "REDIS_MIN_IDLE"),
        ({"REDIS_CONNECTION_TIMEOUT": "soon"}, "REDIS_CONNECTION_TIMEOUT"),
        ({"REDIS_MAX_LIFETIME": "0"}, "REDIS_MAX_LIFETIME"),
        ({"REDIS_IDLE_TIMEOUT": "nan"}, "REDIS_IDLE_TIMEOUT"),
        ({"REDIS_HEALTH_CHECK_INTERVAL": "-5"}, "REDIS_HEALTH_CHECK_INTERVAL"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({"HORIZON_URL": "ftp://x"}, "HORIZON_URL"),
        ({"PORT": "70000"}, "PORT"),
        ({"PORT": "http"}, "PORT"),
        ({"ADMIN_TOKEN": "short"}, "ADMIN_TOKEN"),
        ({"INSTANCE_ID": "a b"}, "INSTANCE_ID"),
        ({"L1_MAX_ENTRIES": "0"}, "L1_MAX_ENTRIES"),
        ({"L1_MAX_TTL": "forever"}, "L1_MAX_TTL"),
        ({"AFRAMP_WARM_LIMIT": "-1"}, "AFRAMP_WARM_LIMIT"),
        ({"HORIZON_TIMEOUT": "0"}, "HORIZON_TIMEOUT"),
        ({"REDIS_OP_TIMEOUT": "inf"}, "REDIS_OP_TIMEOUT"),
        ({"REDIS_COMMAND_TIMEOUT": "true"}, "REDIS_COMMAND_TIMEOUT"),
    ],
)
def test_bad_values_name_the_setting(env, names):
    with pytest.raises(ConfigError) as err:
        load_settings(CFG, env)
    text = str(err.value)
    assert text.startswith(names) and "\n" not in text


def test_bad_config_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(CFG.read_text().replace("exchange_rate = 90", "exchange_rate = -1"))
    with pytest.raises(ConfigError, match=r"^ttl.exchange_rate"):
        load_settings(p, {})
    p.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(p, {})


def test_cli_prints_one_line_and_exits_2_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--config", str(CFG)],
        env={"REDIS_MAX_CONNECTIONS": "lots", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "REDIS_MAX_CONNECTIONS" in lines[0] and "Traceback" not in proc.stderr


def test_cli_unreachable_postgres_is_one_clear_line_not_a_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--config", str(CFG), "--port", "0"],
        env={"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x", "REDIS_URL": "none", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 1
    assert "aframp-cache: cannot start: postgres" in proc.stderr and "Traceback" not in proc.stderr


def _doc() -> dict:
    return tomllib.loads(CFG.read_text())


SECTIONS = {
    "server": config.ServerSettings,
    "postgres": config.PostgresSettings,
    "redis": config.RedisSettings,
    "horizon": config.HorizonSettings,
    "l1": config.L1Settings,
    "coherence": config.CoherenceSettings,
}
REQUIRED = [
    f"{section}.{f.name}"
    for section, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
    if f.metadata["aframp.setting"].required
]


@pytest.mark.parametrize("path", REQUIRED)
def test_a_missing_config_key_names_itself(path):
    section, key = path.split(".")
    doc = _doc()
    del doc[section][key]
    with pytest.raises(ConfigError) as err:
        settings_from(doc, {})
    assert str(err.value) == f"{path}: missing from the config file"


def test_the_environment_stands_in_for_a_missing_config_key():
    doc = _doc()
    del doc["redis"]["max_connections"]
    assert settings_from(doc, {"REDIS_MAX_CONNECTIONS": "9"}).redis.max_connections == 9


def test_every_setting_of_the_config_file_is_read():
    doc = _doc()
    for section, cls in SECTIONS.items():
        assert set(doc[section]) == {f.name for f in dataclasses.fields(cls)}, section


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("server", "port", "http", "server.port: expected an integer"),
        ("redis", "max_connections", 0, "redis.max_connections: must be >= 1"),
        ("redis", "breaker_failures", "many", "redis.breaker_failures: expected an integer"),
        ("server", "access_log", "maybe", "server.access_log: expected true or false"),
        ("coherence", "bound", -1, "coherence.bound: must be > 0"),
        ("horizon", "network_passphrase", ["x"], "horizon.network_passphrase: expected a string"),
        ("coherence", "join_window", 0.05, "coherence.join_window: must be below half of coherence.bound"),
        ("coherence", "ping_interval", 0.08, "coherence.ping_interval: must be below coherence.bound"),
        ("coherence", "fence_ttl", 29.0, "coherence.fence_ttl: must be at least 3 x"),
    ],
)
def test_a_bad_config_value_names_its_config_key(section, key, value, message):
    doc = _doc()
    doc[section][key] = value
    with pytest.raises(ConfigError) as err:
        settings_from(doc, {})
    assert str(err.value).startswith(message), str(err.value)


def test_a_check_across_settings_names_each_where_it_came_from():
    with pytest.raises(ConfigError, match=r"^redis.min_idle: 21 exceeds REDIS_MAX_CONNECTIONS \(20\)$"):
        doc = _doc()
        doc["redis"]["min_idle"] = 21
        settings_from(doc, {"REDIS_MAX_CONNECTIONS": "20"})


def test_join_window_is_read():
    assert load_settings(CFG, {}).coherence.join_window == 0.025


def test_the_packaged_config_is_the_one_at_the_root(tmp_path):
    from service.config import DEFAULT_CONFIG, find_config

    assert DEFAULT_CONFIG == ROOT / "service" / "config.toml"
    assert DEFAULT_CONFIG.read_bytes() == CFG.read_bytes(), "cp service/config.toml config.toml"
    assert find_config(None, {}) == DEFAULT_CONFIG
    assert find_config(None, {"AFRAMP_CONFIG": str(tmp_path / "a.toml")}) == tmp_path / "a.toml"
    assert find_config(tmp_path / "b.toml", {"AFRAMP_CONFIG": str(tmp_path / "a.toml")}) == tmp_path / "b.toml"


def test_cli_version_and_help_show_defaults_and_the_environment(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    run = [sys.executable, "-m", "service"]
    version = subprocess.run([*run, "--version"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("aframp-cache ")
    helped = subprocess.run([*run, "serve", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0
    for text in ("127.0.0.1", "8080", "AFRAMP_CONFIG", "AFRAMP_DATA_DIR", "DATABASE_URL", "REDIS_URL", "LOG_FORMAT"):
        assert text in helped.stdout, text
    assert "HORIZON_TIMEOUT" in helped.stdout and "default:" in helped.stdout


def test_cli_bad_log_format_is_a_configuration_error():
    proc = subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        env={"LOG_FORMAT": "xml", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "aframp-cache: configuration error: LOG_FORMAT: expected json or text, got 'xml'"
    )


PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]


def test_the_wheel_holds_every_package_and_the_default_config(tmp_path):
    """A non-editable install must run from any folder: every subpackage and the package data are in the wheel."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md", "service", "actors", "tiers"):
        src.mkdir(exist_ok=True)
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    proc = subprocess.run(
        [*PIP_WHEEL, "-w", str(tmp_path / "wheel"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(ROOT).as_posix() for top in ("service", "actors", "tiers")
                for p in (ROOT / top).rglob("__init__.py")}  # fmt: skip
    assert {f"{p}/__init__.py" for p in packages} <= names
    assert {"service/config.toml", "service/openapi.yaml", "service/dashboard.html"} <= names
    assert any(n.startswith("tiers/migrations/") and n.endswith(".sql") for n in names)
