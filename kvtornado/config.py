"""Configuration: ``config.yaml`` read into frozen dataclasses, every value checked.

Every key is optional. An unknown key, a wrong type or an out-of-range value raises
``ConfigError`` with one line naming the key, the value and what was expected.
Relative paths are resolved against the config file's own folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from kvtornado.errors import ConfigError

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL")
WRITES_WHILE_FAILING = ("refuse", "accept")
STORAGE_BACKENDS = ("sqlite", "postgresql")
CACHE_BACKENDS = ("memory", "redis")
# redis-py reads the path as the database number and silently takes 0 for anything else: only digits pass.
_REDIS_URL = re.compile(r"rediss?://[^/\s?#]*(?:/\d*)?(?:\?\S*)?|unix://\S+")
# A libpq URL (SPEC §10): what psycopg is handed as it is; whether it connects is known at start-up.
_PG_URL = re.compile(r"postgres(?:ql)?://\S*")
_PASSWORD = re.compile(r"(//[^/@:]*:)[^/@]*@")
# password=... as a key/value pair (host=h password=p) or a URL query parameter (?password=p), quoted or not
_PASSWORD_PARAM = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&]*)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` (or a key/value connection string) with any password replaced by ``***``: config errors and
    logs never show one."""
    return _PASSWORD_PARAM.sub(r"\1***", _PASSWORD.sub(r"\1***@", url))


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8888
    max_body_bytes: int = 2 * 1024 * 1024
    idle_timeout_s: int = 120  # an idle keep-alive connection, or one still sending its headers, is closed
    body_timeout_s: int = 60  # a body that takes longer than this to arrive is dropped
    max_connections: int = 10_000  # past this, a new connection gets 503 overloaded and is closed
    processes: int = 1  # workers sharing the port (0: one per core); other than 1 needs cache.backend: redis
    tls_cert: Path | None = None  # both set: HTTPS only (PEM files; SPEC §11)
    tls_key: Path | None = None


@dataclass(frozen=True)
class AuthConfig:
    secret_file: Path = Path(".secrets/kv.keys")
    max_skew_s: int = 300
    max_nonces: int = 1_000_000
    public_host: str | None = None


@dataclass(frozen=True)
class StorageConfig:
    backend: str = "sqlite"  # sqlite | postgresql (SPEC §10)
    path: Path = Path("data/kv.sqlite3")  # sqlite's file; with postgresql, where the nonce journal is kept beside
    synchronous: str = "FULL"
    url: str | None = None  # postgresql: a libpq URL (may hold a password: never logged)


@dataclass(frozen=True)
class CacheConfig:
    backend: str = "memory"  # memory (this process) | redis (shared by every process and host, SPEC §10)
    redis_url: str | None = None  # redis: redis://host:port/db (may hold a password: never logged)
    reclaim_idle_ms: int = 30_000  # redis: a dead flusher's log entries are taken over after this
    max_entries: int = 100_000
    max_bytes: int = 256 * 1024 * 1024  # clean key+value bytes kept (LRU)
    flush_interval_ms: int = 100
    flush_batch_size: int = 5000
    max_dirty: int = 100_000
    max_dirty_bytes: int = 256 * 1024 * 1024  # pending key+value bytes, the batch in flight included
    writes_while_failing: str = "refuse"  # G9: refuse | accept
    durable_timeout_ms: int = 5000
    shutdown_timeout_s: int = 30


@dataclass(frozen=True)
class LimitsConfig:
    max_key_bytes: int = 512
    max_value_bytes: int = 1024 * 1024
    max_batch_ops: int = 1000  # ops in one POST /batch
    max_ttl_s: int = 315_360_000  # ten years: the longest ?ttl= a save may ask for


@dataclass(frozen=True)
class MetricsConfig:
    port: int | None = None  # when set: Prometheus text at http://server.host:port/metrics, no auth (SPEC §11)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: Path | None = None  # the file this came from; None for built-in defaults


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "auth": AuthConfig,
    "storage": StorageConfig,
    "cache": CacheConfig,
    "limits": LimitsConfig,
    "metrics": MetricsConfig,
}


def _show(value: Any) -> str:
    """Render a rejected value the way it would be written in YAML/JSON."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


class _Checker:
    def __init__(self, label: str, base_dir: Path) -> None:
        self.label = label
        self.base_dir = base_dir

    def fail(self, name: str, expected: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.label}: {name} must be {expected}, got {_show(value)}")

    def integer(self, name: str, value: Any, low: int, high: int | None = None) -> int:
        # bool is an int subclass in Python; "true" is never a number here.
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise self.fail(name, f"an integer {bound}", value)
        return value

    def text(self, name: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(name, "a non-empty string", value)
        return value

    def path(self, name: str, value: Any) -> Path:
        p = Path(self.text(name, value)).expanduser()
        return p if p.is_absolute() else self.base_dir / p


# Integer keys and their bounds (low, high or None); everything else is checked by name below.
_INT_BOUNDS: dict[str, tuple[int, int | None]] = {
    "server.port": (0, 65535),
    "server.max_body_bytes": (1, None),
    "server.idle_timeout_s": (1, None),
    "server.body_timeout_s": (1, None),
    "server.max_connections": (1, None),
    "server.processes": (0, None),
    "auth.max_skew_s": (1, None),
    "auth.max_nonces": (1, None),
    "cache.max_entries": (1, None),
    "cache.max_bytes": (1, None),
    "cache.max_dirty_bytes": (1, None),
    "cache.flush_interval_ms": (1, None),
    "cache.flush_batch_size": (1, None),
    "cache.max_dirty": (1, None),
    "cache.durable_timeout_ms": (1, None),
    "cache.shutdown_timeout_s": (1, None),
    "cache.reclaim_idle_ms": (1, None),
    "limits.max_key_bytes": (1, None),
    "limits.max_value_bytes": (1, None),
    "limits.max_batch_ops": (1, None),
    "limits.max_ttl_s": (1, None),
}


_CHOICES: dict[str, tuple[str, ...]] = {
    "storage.backend": STORAGE_BACKENDS,
    "cache.backend": CACHE_BACKENDS,
    "cache.writes_while_failing": WRITES_WHILE_FAILING,
}
# URL keys: the pattern a value must match, and how the refusal describes it.
_URLS: dict[str, tuple[re.Pattern[str], str]] = {
    "storage.url": (_PG_URL, "a libpq URL such as postgresql://kv@127.0.0.1:5432/kv"),
    "cache.redis_url": (_REDIS_URL, "a Redis URL such as redis://127.0.0.1:6379/0"),
}


def _check_value(name: str, value: Any, c: _Checker) -> Any:
    if name in _INT_BOUNDS:
        low, high = _INT_BOUNDS[name]
        return c.integer(name, value, low, high)
    if name in ("auth.secret_file", "storage.path"):
        return c.path(name, value)
    if name in ("server.tls_cert", "server.tls_key"):
        return None if value is None else c.path(name, value)
    if name == "storage.synchronous":
        # YAML 1.1 reads a bare OFF (or off/no/false) as the boolean false: that is what the user wrote.
        if value is False:
            value = "OFF"
        if not isinstance(value, str) or value.upper() not in SYNCHRONOUS_MODES:
            raise c.fail(name, "one of " + " | ".join(SYNCHRONOUS_MODES), value)
        return value.upper()
    if name in _CHOICES:
        if value not in _CHOICES[name]:
            raise c.fail(name, "one of " + " | ".join(_CHOICES[name]), value)
        return value
    if name in _URLS:
        pattern, example = _URLS[name]
        if value is None:
            return None
        if not isinstance(value, str) or not pattern.fullmatch(value):
            shown = redact_url(value) if isinstance(value, str) else value
            raise c.fail(name, f"{example}, or null", shown)
        return value
    if name == "metrics.port":
        # No 0 ("any free port"): Prometheus has to be told where to scrape.
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise c.fail(name, "an integer between 1 and 65535, or null", value)
        return value
    if name == "auth.public_host":
        if value is None:
            return None
        host = c.text(name, value)
        if any(ch.isspace() for ch in host):
            raise c.fail(name, "a host name without white space, or null", value)
        return host.lower()
    return c.text(name, value)  # server.host


# Backends that need a URL: section -> (the backend, its URL key, the default backend).
_URL_BACKENDS = {
    "storage": ("postgresql", "url", StorageConfig.backend),
    "cache": ("redis", "redis_url", CacheConfig.backend),
}


def _check_backend_url(section: str, values: dict[str, Any], label: str) -> None:
    """A backend's URL and the backend only make sense together: postgresql (redis) needs its url, and a url
    needs its backend (so a url without the backend never silently serves sqlite or the memory cache)."""
    needs, key, default = _URL_BACKENDS[section]
    backend, url = values.get("backend", default), values.get(key)
    if backend == needs and url is None:
        raise ConfigError(f"{label}: {section}.{key} must be {_URLS[f'{section}.{key}'][1]} "
                          f"when {section}.backend is {needs}, got null")
    if backend != needs and url is not None:
        raise ConfigError(f"{label}: {section}.{key} is only used with {section}.backend: {needs} "
                          f"({section}.backend is {backend}); remove it or set the backend")


def _check_tls(cfg: Config, label: str) -> None:
    """HTTPS needs both files: one alone would serve plain HTTP where the operator asked for TLS."""
    cert, key = cfg.server.tls_cert, cfg.server.tls_key
    if (cert is None) != (key is None):
        given, missing = ("server.tls_cert", "server.tls_key") if key is None else ("server.tls_key", "server.tls_cert")
        raise ConfigError(f"{label}: {missing} must be set too when {given} is (both, or neither), got null")


def _check_processes(cfg: Config, label: str) -> None:
    """SPEC §10: several workers need the shared cache; per-process memory caches would disagree."""
    if cfg.server.processes != 1 and cfg.cache.backend != "redis":
        raise ConfigError(f"{label}: server.processes must be 1 with cache.backend: {cfg.cache.backend} "
                          f"(each process would hold its own cache), got {cfg.server.processes}; "
                          "set cache.backend: redis to run several")


def _check_metrics(cfg: Config, label: str) -> None:
    """The metrics have no auth, so never on the API port; and forked workers cannot all bind one port."""
    port = cfg.metrics.port
    if port is None:
        return
    if port == cfg.server.port:
        raise ConfigError(f"{label}: metrics.port must differ from server.port (the metrics have no auth and "
                          f"never share the API's port), got {port}")
    if cfg.server.processes != 1:
        raise ConfigError(f"{label}: metrics.port must be null when server.processes is not 1 (the workers "
                          f"cannot share one metrics port), got {port}")


def parse_config(data: Any, *, label: str = "config.yaml", base_dir: Path | None = None) -> Config:
    """Validate an already-parsed YAML document (``None`` means empty) into a ``Config``."""
    base = (base_dir or Path.cwd()).resolve()
    c = _Checker(label, base)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of sections, got {_show(data)}")
    sections: dict[str, Any] = {}
    for section, raw in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{label}: unknown key {_show(section)}; expected one of {', '.join(_SECTIONS)}")
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise c.fail(section, "a mapping", raw)
        cls = _SECTIONS[section]
        known = [f.name for f in fields(cls)]
        for key in raw:
            if key not in known:
                raise ConfigError(
                    f"{label}: unknown key {_show(f'{section}.{key}')}; expected one of "
                    + ", ".join(f"{section}.{k}" for k in known)
                )
        values = {key: _check_value(f"{section}.{key}", value, c) for key, value in raw.items()}
        if section == "auth" and "secret_file" not in values:
            values["secret_file"] = base / AuthConfig.secret_file
        if section == "storage" and "path" not in values:
            values["path"] = base / StorageConfig.path
        if section in _URL_BACKENDS:
            _check_backend_url(section, values, label)
        sections[section] = cls(**values)
    sections.setdefault("auth", AuthConfig(secret_file=base / AuthConfig.secret_file))
    sections.setdefault("storage", StorageConfig(path=base / StorageConfig.path))
    cfg = Config(**sections)
    _check_processes(cfg, label)
    _check_tls(cfg, label)
    _check_metrics(cfg, label)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raises ``ConfigError`` with one line on any problem."""
    p = Path(path).expanduser()
    label = p.name
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config file ({exc.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{label}: not valid YAML{where}: {problem}") from None
    cfg = parse_config(data, label=label, base_dir=p.resolve().parent)
    return replace(cfg, source=p.resolve())
