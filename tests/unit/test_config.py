"""kvtornado/config.py: defaults, every SPEC §3 key, one-line refusals naming the key, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtornado.config import (
    AuthConfig,
    CacheConfig,
    Config,
    LimitsConfig,
    MetricsConfig,
    ServerConfig,
    StorageConfig,
    load_config,
)
from kvtornado.errors import ConfigError


def write(folder: Path, text: str, name: str = "config.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    return message


# --- defaults --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty-file"),
        pytest.param("# only a comment\n", id="only-comment"),
        pytest.param("server:\nauth:\nstorage:\ncache:\nlimits:\nmetrics:\n", id="empty-sections"),
    ],
)
def test_empty_file_gives_every_default(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)

    cfg = load_config(path)

    assert cfg.server == ServerConfig()
    assert cfg.server == ServerConfig(
        host="127.0.0.1", port=8888, max_body_bytes=2097152, idle_timeout_s=120, body_timeout_s=60,
        max_connections=10000,
    )
    assert cfg.cache == CacheConfig(
        max_entries=100000, max_bytes=268435456, flush_interval_ms=100, flush_batch_size=5000, max_dirty=100000,
        max_dirty_bytes=268435456, writes_while_failing="refuse", durable_timeout_ms=5000, shutdown_timeout_s=30,
    )
    assert cfg.limits == LimitsConfig(max_key_bytes=512, max_value_bytes=1048576)
    assert cfg.auth == AuthConfig(
        secret_file=tmp_path.resolve() / ".secrets" / "kv.keys", max_skew_s=300, max_nonces=1000000, public_host=None
    )
    assert cfg.storage == StorageConfig(path=tmp_path.resolve() / "data" / "kv.sqlite3", synchronous="FULL")
    assert cfg.metrics == MetricsConfig(port=None)
    assert cfg.source == path.resolve()


def test_missing_sections_keep_their_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 9000\nstorage:\n  synchronous: OFF\n")

    cfg = load_config(path)

    assert cfg.server == ServerConfig(port=9000)
    assert cfg.storage.synchronous == "OFF"
    # a section given without its path key still gets the default path, resolved against the file's folder
    assert cfg.storage.path == tmp_path.resolve() / "data" / "kv.sqlite3"
    assert cfg.auth.secret_file == tmp_path.resolve() / ".secrets" / "kv.keys"
    assert cfg.cache == CacheConfig()
    assert cfg.limits == LimitsConfig()


def test_every_spec_key_is_accepted(tmp_path: Path) -> None:
    keys = tmp_path / "abs" / "my.keys"
    path = write(
        tmp_path,
        f"""
server:
  host: 0.0.0.0
  port: 0
  max_body_bytes: 4096
  idle_timeout_s: 5
  body_timeout_s: 6
  max_connections: 7
auth:
  secret_file: {keys}
  max_skew_s: 60
  max_nonces: 10
  public_host: KV.Example.com:443
storage:
  path: db/kv.db
  synchronous: normal
cache:
  max_entries: 7
  max_bytes: 1000
  flush_interval_ms: 1
  flush_batch_size: 3
  max_dirty: 9
  max_dirty_bytes: 2000
  writes_while_failing: accept
  durable_timeout_ms: 250
  shutdown_timeout_s: 2
limits:
  max_key_bytes: 16
  max_value_bytes: 1024
metrics:
  port: 9100
""",
    )

    cfg = load_config(path)

    assert cfg == Config(
        server=ServerConfig(host="0.0.0.0", port=0, max_body_bytes=4096,  # noqa: S104
                            idle_timeout_s=5, body_timeout_s=6, max_connections=7),
        auth=AuthConfig(secret_file=keys, max_skew_s=60, max_nonces=10, public_host="kv.example.com:443"),
        storage=StorageConfig(path=tmp_path.resolve() / "db" / "kv.db", synchronous="NORMAL"),
        cache=CacheConfig(
            max_entries=7, max_bytes=1000, flush_interval_ms=1, flush_batch_size=3, max_dirty=9,
            max_dirty_bytes=2000, writes_while_failing="accept", durable_timeout_ms=250, shutdown_timeout_s=2,
        ),
        limits=LimitsConfig(max_key_bytes=16, max_value_bytes=1024),
        metrics=MetricsConfig(port=9100),
        source=path.resolve(),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("server:\n  port: 65535\n", 65535, id="port-max"),
        pytest.param("server:\n  port: 0\n", 0, id="port-ephemeral"),
    ],
)
def test_port_bounds_are_inclusive(tmp_path: Path, text: str, expected: int) -> None:
    assert load_config(write(tmp_path, text)).server.port == expected


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        # A bare OFF is the boolean false in YAML 1.1; it still means OFF, as SPEC §3 documents it.
        pytest.param("OFF", "OFF", id="bare-OFF"),
        pytest.param("off", "OFF", id="bare-off"),
        pytest.param("'OFF'", "OFF", id="quoted-OFF"),
        pytest.param("NORMAL", "NORMAL", id="NORMAL"),
        pytest.param("Normal", "NORMAL", id="Normal"),
        pytest.param("FULL", "FULL", id="FULL"),
        pytest.param("full", "FULL", id="full"),
    ],
)
def test_synchronous_modes_are_normalised(tmp_path: Path, written: str, expected: str) -> None:
    cfg = load_config(write(tmp_path, f"storage:\n  synchronous: {written}\n"))
    assert cfg.storage.synchronous == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("metrics:\n  port: null\n", None, id="null"),
        pytest.param("metrics:\n  port: 1\n", 1, id="min"),
        pytest.param("metrics:\n  port: 65535\n", 65535, id="max"),
    ],
)
def test_metrics_port_is_null_or_a_port(tmp_path: Path, text: str, expected: int | None) -> None:
    assert load_config(write(tmp_path, text)).metrics.port == expected


def test_public_host_null_is_accepted(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "auth:\n  public_host: null\n")).auth.public_host is None


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "cache:\n  flush_interval_ms: fast\n",
            'config.yaml: cache.flush_interval_ms must be an integer >= 1, got "fast"',
            id="string-for-int",
        ),
        pytest.param(
            "nope:\n  x: 1\n",
            'config.yaml: unknown key "nope"; expected one of server, auth, storage, cache, limits, metrics',
            id="unknown-top-level-key",
        ),
        pytest.param(
            "cache:\n  flush_interval: 5\n",
            'config.yaml: unknown key "cache.flush_interval"; expected one of cache.backend, cache.redis_url, '
            "cache.reclaim_idle_ms, cache.max_entries, cache.max_bytes, "
            "cache.flush_interval_ms, cache.flush_batch_size, cache.max_dirty, cache.max_dirty_bytes, "
            "cache.writes_while_failing, cache.durable_timeout_ms, cache.shutdown_timeout_s",
            id="unknown-nested-key",
        ),
        pytest.param(
            "cache:\n  writes_while_failing: ignore\n",
            'config.yaml: cache.writes_while_failing must be one of refuse | accept, got "ignore"',
            id="bad-writes-while-failing",
        ),
        pytest.param(
            "server:\n  max_connections: 0\n",
            "config.yaml: server.max_connections must be an integer >= 1, got 0",
            id="zero-max-connections",
        ),
        pytest.param(
            "cache:\n  max_dirty_bytes: -1\n",
            "config.yaml: cache.max_dirty_bytes must be an integer >= 1, got -1",
            id="negative-max-dirty-bytes",
        ),
        pytest.param(
            "server:\n  port: true\n",
            "config.yaml: server.port must be an integer between 0 and 65535, got true",
            id="bool-for-int",
        ),
        pytest.param(
            "limits:\n  max_key_bytes: 12.5\n",
            "config.yaml: limits.max_key_bytes must be an integer >= 1, got 12.5",
            id="float-for-int",
        ),
        pytest.param(
            "cache:\n  - 1\n  - 2\n",
            "config.yaml: cache must be a mapping, got [1, 2]",
            id="list-for-section",
        ),
        pytest.param(
            "server: 8888\n",
            "config.yaml: server must be a mapping, got 8888",
            id="int-for-section",
        ),
        pytest.param(
            "server:\n  port: 70000\n",
            "config.yaml: server.port must be an integer between 0 and 65535, got 70000",
            id="port-out-of-range",
        ),
        pytest.param(
            "server:\n  port: -1\n",
            "config.yaml: server.port must be an integer between 0 and 65535, got -1",
            id="port-negative",
        ),
        pytest.param(
            "cache:\n  flush_interval_ms: 0\n",
            "config.yaml: cache.flush_interval_ms must be an integer >= 1, got 0",
            id="flush-interval-zero",
        ),
        pytest.param(
            "auth:\n  max_skew_s: 0\n",
            "config.yaml: auth.max_skew_s must be an integer >= 1, got 0",
            id="max-skew-zero",
        ),
        pytest.param(
            "storage:\n  synchronous: EXTRA\n",
            'config.yaml: storage.synchronous must be one of OFF | NORMAL | FULL, got "EXTRA"',
            id="bad-synchronous",
        ),
        pytest.param(
            "storage:\n  synchronous: on\n",
            "config.yaml: storage.synchronous must be one of OFF | NORMAL | FULL, got true",
            id="synchronous-on",
        ),
        pytest.param(
            "storage:\n  synchronous: 2\n",
            "config.yaml: storage.synchronous must be one of OFF | NORMAL | FULL, got 2",
            id="numeric-synchronous",
        ),
        pytest.param(
            "server:\n  host: ''\n",
            'config.yaml: server.host must be a non-empty string, got ""',
            id="empty-host",
        ),
        pytest.param(
            "storage:\n  path: 12\n",
            "config.yaml: storage.path must be a non-empty string, got 12",
            id="int-for-path",
        ),
        pytest.param(
            "storage:\n  backend: mysql\n",
            'config.yaml: storage.backend must be one of sqlite | postgresql, got "mysql"',
            id="unknown-backend",
        ),
        pytest.param(
            "storage:\n  backend: postgresql\n",
            "config.yaml: storage.url must be a libpq URL such as postgresql://kv@127.0.0.1:5432/kv when "
            "storage.backend is postgresql, got null",
            id="postgresql-without-url",
        ),
        pytest.param(
            "storage:\n  url: postgresql://kv@127.0.0.1/kv\n",
            "config.yaml: storage.url is only used with storage.backend: postgresql (storage.backend is sqlite); "
            "remove it or set the backend",
            id="url-without-postgresql",
        ),
        pytest.param(
            "storage:\n  backend: postgresql\n  url: 'mysql://kv:hunter2@db/kv'\n",
            "config.yaml: storage.url must be a libpq URL such as postgresql://kv@127.0.0.1:5432/kv, or null, "
            'got "mysql://kv:***@db/kv"',
            id="not-a-libpq-url-and-no-password-shown",
        ),
        pytest.param(
            "storage:\n  backend: postgresql\n  url: 5432\n",
            "config.yaml: storage.url must be a libpq URL such as postgresql://kv@127.0.0.1:5432/kv, or null, got 5432",
            id="int-for-url",
        ),
        pytest.param(
            "cache:\n  backend: redis\n",
            "config.yaml: cache.redis_url must be a Redis URL such as redis://127.0.0.1:6379/0 when cache.backend "
            "is redis, got null",
            id="redis-without-url",
        ),
        pytest.param(
            "cache:\n  redis_url: redis://127.0.0.1:6379/0\n",
            "config.yaml: cache.redis_url is only used with cache.backend: redis (cache.backend is memory); "
            "remove it or set the backend",
            id="redis-url-without-redis",
        ),
        pytest.param(
            "cache:\n  backend: redis\n  redis_url: 'http://u:hunter2@h/0'\n",
            "config.yaml: cache.redis_url must be a Redis URL such as redis://127.0.0.1:6379/0, or null, "
            'got "http://u:***@h/0"',
            id="not-a-redis-url-and-no-password-shown",
        ),
        pytest.param(
            "cache:\n  backend: redis\n  redis_url: 'redis://127.0.0.1:6379/notanumber'\n",
            "config.yaml: cache.redis_url must be a Redis URL such as redis://127.0.0.1:6379/0, or null, "
            'got "redis://127.0.0.1:6379/notanumber"',
            id="redis-url-with-a-database-that-is-not-a-number",
        ),
        pytest.param(
            "cache:\n  backend: memcached\n",
            'config.yaml: cache.backend must be one of memory | redis, got "memcached"',
            id="unknown-cache-backend",
        ),
        pytest.param(
            "cache:\n  reclaim_idle_ms: 0\n",
            "config.yaml: cache.reclaim_idle_ms must be an integer >= 1, got 0",
            id="reclaim-idle-zero",
        ),
        pytest.param(
            "server:\n  processes: 2\n",
            "config.yaml: server.processes must be 1 with cache.backend: memory (each process would hold its own "
            "cache), got 2; set cache.backend: redis to run several",
            id="processes-with-the-memory-cache",
        ),
        pytest.param(
            "server:\n  tls_cert: cert.pem\n",
            "config.yaml: server.tls_key must be set too when server.tls_cert is (both, or neither), got null",
            id="tls-cert-without-key",
        ),
        pytest.param(
            "server:\n  tls_key: key.pem\n",
            "config.yaml: server.tls_cert must be set too when server.tls_key is (both, or neither), got null",
            id="tls-key-without-cert",
        ),
        pytest.param(
            "server:\n  processes: -1\n",
            "config.yaml: server.processes must be an integer >= 0, got -1",
            id="negative-processes",
        ),
        pytest.param(
            "auth:\n  public_host: 'kv example.com'\n",
            'config.yaml: auth.public_host must be a host name without white space, or null, got "kv example.com"',
            id="public-host-with-space",
        ),
        pytest.param(
            "metrics:\n  port: 0\n",
            "config.yaml: metrics.port must be an integer between 1 and 65535, or null, got 0",
            id="metrics-port-zero",
        ),
        pytest.param(
            "metrics:\n  port: 65536\n",
            "config.yaml: metrics.port must be an integer between 1 and 65535, or null, got 65536",
            id="metrics-port-out-of-range",
        ),
        pytest.param(
            "metrics:\n  port: '9100'\n",
            'config.yaml: metrics.port must be an integer between 1 and 65535, or null, got "9100"',
            id="metrics-port-string",
        ),
        pytest.param(
            "metrics:\n  port: true\n",
            "config.yaml: metrics.port must be an integer between 1 and 65535, or null, got true",
            id="metrics-port-bool",
        ),
        pytest.param(
            "metrics:\n  path: /metrics\n",
            'config.yaml: unknown key "metrics.path"; expected one of metrics.port',
            id="unknown-metrics-key",
        ),
        pytest.param(
            "server:\n  port: 9100\nmetrics:\n  port: 9100\n",
            "config.yaml: metrics.port must differ from server.port (the metrics have no auth and never share the "
            "API's port), got 9100",
            id="metrics-on-the-api-port",
        ),
        pytest.param(
            "server:\n  processes: 0\ncache:\n  backend: redis\n  redis_url: redis://127.0.0.1:6379/0\n"
            "metrics:\n  port: 9100\n",
            "config.yaml: metrics.port must be null when server.processes is not 1 (the workers cannot share one "
            "metrics port), got 9100",
            id="metrics-with-several-processes",
        ),
        pytest.param(
            "- server\n- cache\n",
            'config.yaml: the top level must be a mapping of sections, got ["server", "cache"]',
            id="top-level-list",
        ),
    ],
)
def test_refusal_is_one_line_naming_the_key(tmp_path: Path, text: str, expected: str) -> None:
    assert refusal(write(tmp_path, text)) == expected


def test_postgresql_backend_with_its_url(tmp_path: Path) -> None:
    url = "postgresql://kv:secret@127.0.0.1:5432/kv?connect_timeout=3"
    cfg = load_config(write(tmp_path, f"storage:\n  backend: postgresql\n  url: '{url}'\n"))
    assert (cfg.storage.backend, cfg.storage.url) == ("postgresql", url)
    assert load_config(write(tmp_path, "storage:\n  synchronous: FULL\n")).storage.backend == "sqlite"


def test_invalid_yaml_is_one_line_with_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 8888\ncache: [1, 2\n")

    assert refusal(path) == "config.yaml: not valid YAML at line 4: expected ',' or ']', but got '<stream end>'"


@pytest.mark.parametrize(
    ("text", "prefix"),
    [
        pytest.param("server:\n\tport: 1\n", "config.yaml: not valid YAML at line 2: ", id="tab-indent"),
        pytest.param("server: port: 1\n", "config.yaml: not valid YAML at line 1: ", id="nested-colon"),
    ],
)
def test_invalid_yaml_names_the_line(tmp_path: Path, text: str, prefix: str) -> None:
    assert refusal(write(tmp_path, text)).startswith(prefix)


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert refusal(path) == f"{path}: config file not found"


def test_a_folder_is_not_a_config_file(tmp_path: Path) -> None:
    folder = tmp_path / "config.yaml"
    folder.mkdir()
    message = refusal(folder)
    assert message.startswith(f"{folder}: cannot read config file")


# --- paths -----------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    path = write(conf_dir, "auth:\n  secret_file: keys/kv.keys\nstorage:\n  path: ../data/kv.sqlite3\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    cfg = load_config(path)

    assert cfg.auth.secret_file == conf_dir.resolve() / "keys" / "kv.keys"
    assert cfg.storage.path.resolve() == (tmp_path / "data" / "kv.sqlite3").resolve()
    assert elsewhere.resolve() not in cfg.auth.secret_file.parents


def test_a_relative_config_path_is_resolved_before_its_folder_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "conf", "storage:\n  path: kv.db\n")
    monkeypatch.chdir(tmp_path)

    cfg = load_config("conf/config.yaml")
    # Moving away afterwards changes nothing: the paths are absolute.
    monkeypatch.chdir(tmp_path / "conf")

    assert cfg.storage.path.is_absolute()
    assert cfg.storage.path == (tmp_path / "conf" / "kv.db").resolve()
    assert cfg.auth.secret_file == (tmp_path / "conf" / ".secrets" / "kv.keys").resolve()
    assert cfg.source == (tmp_path / "conf" / "config.yaml").resolve()


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "other" / "kv.sqlite3"
    cfg = load_config(write(tmp_path / "conf", f"storage:\n  path: {target}\n"))
    assert cfg.storage.path == target


def test_conftest_make_config_is_rooted_in_tmp_path(tmp_path: Path, make_config: object, config: Config) -> None:
    assert config.storage.path == tmp_path.resolve() / "data" / "kv.sqlite3"
    assert config.auth.secret_file == tmp_path.resolve() / "keys" / "kv.keys"
    assert config.server.port == 0
