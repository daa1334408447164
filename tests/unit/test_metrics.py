"""kvtornado/metrics.py: what each metric counts, the cache's figures read from ``stats()`` at scrape time for both
caches, one registry per app, bounded labels and no secret in the scrape. Over real HTTP: tests/e2e/test_metrics.py."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtornado.auth import Authenticator
from kvtornado.cache import WriteBehindCache
from kvtornado.config import CacheConfig
from kvtornado.metrics import OTHER_ROUTE, Metrics
from kvtornado.rediscache import RedisCache
from tests.conftest import TEST_KEY_ID, TEST_SECRET
from tests.unit.fakes import FakeStore, ManualClock

REDIS_PASSWORD = "hunter2-never-shown"  # a test value, looked for in the scrape


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, parsed by prometheus-client's own parser: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics.scrape().decode()).get((name, frozenset(labels.items())))


def memory_cache() -> WriteBehindCache:
    return WriteBehindCache(FakeStore(), CacheConfig(), clock=ManualClock())


def redis_cache() -> RedisCache:
    # Never connected: stats() reads what the last round saw, and the URL's password must never show.
    return RedisCache(FakeStore(), CacheConfig(), url=f"redis://kv:{REDIS_PASSWORD}@127.0.0.1:1/0")


CACHE_FIGURES = {  # metric -> (stats section, field)
    "kvtornado_cache_hits_total": ("cache", "hits"),
    "kvtornado_cache_misses_total": ("cache", "misses"),
    "kvtornado_cache_evictions_total": ("cache", "evictions"),
    "kvtornado_cache_entries": ("cache", "entries"),
    "kvtornado_cache_dirty_keys": ("cache", "dirty"),
    "kvtornado_cache_dirty_bytes": ("cache", "dirty_bytes"),
    "kvtornado_flushes_total": ("flush", "count"),
    "kvtornado_flush_rows_total": ("flush", "rows"),
    "kvtornado_flush_errors_total": ("flush", "errors"),
}


@pytest.mark.parametrize("make", [memory_cache, redis_cache], ids=["memory", "redis"])
def test_the_cache_figures_are_its_stats_at_scrape_time(make: Any) -> None:
    cache = make()
    metrics = Metrics(cache=cache)
    for name, (section, field) in CACHE_FIGURES.items():
        assert value(metrics, name) == cache.stats()[section][field], name
    if isinstance(cache, WriteBehindCache):
        cache.stats_.hits = 7
        cache.stats_.flush.rows = 3
    else:
        cache.hits, cache.flush_rows = 7, 3
    assert value(metrics, "kvtornado_cache_hits_total") == 7  # read again: no copy to keep in step
    assert value(metrics, "kvtornado_flush_rows_total") == 3
    text = metrics.scrape().decode()
    assert REDIS_PASSWORD not in text and "redis://" not in text


@pytest.mark.parametrize("make", [memory_cache, redis_cache], ids=["memory", "redis"])
def test_each_flush_is_one_observation_of_the_duration_histogram(make: Any) -> None:
    cache = make()
    metrics = Metrics(cache=cache)
    assert cache.on_flush is not None
    cache.on_flush(0.003)
    cache.on_flush(0.2)
    assert value(metrics, "kvtornado_flush_duration_seconds_count") == 2
    assert value(metrics, "kvtornado_flush_duration_seconds_sum") == pytest.approx(0.203)
    assert value(metrics, "kvtornado_flush_duration_seconds_bucket", le="0.005") == 1


def test_requests_by_route_and_status_with_latency_and_refusals_by_code() -> None:
    metrics = Metrics()
    metrics.request("/save", 200, 0.002)
    metrics.request("/save", 200, 0.004)
    metrics.request("/save", 503, 0.001)
    metrics.request(None, 404, 0.001)  # a path that is no route
    metrics.auth_refused("bad_signature")
    assert value(metrics, "kvtornado_requests_total", route="/save", status="200") == 2
    assert value(metrics, "kvtornado_requests_total", route="/save", status="503") == 1
    assert value(metrics, "kvtornado_requests_total", route=OTHER_ROUTE, status="404") == 1
    assert value(metrics, "kvtornado_request_duration_seconds_count", route="/save") == 3
    assert value(metrics, "kvtornado_request_duration_seconds_sum", route="/save") == pytest.approx(0.007)
    assert value(metrics, "kvtornado_auth_refusals_total", code="bad_signature") == 1
    # Without a cache there are no cache figures (exercises 1 to 3), and no flush histogram.
    names = {name for name, _ in samples(metrics.scrape().decode())}
    assert not {n for n in names if n.startswith(("kvtornado_cache", "kvtornado_flush"))}


def test_every_app_has_its_own_registry() -> None:
    one, two = Metrics(cache=memory_cache()), Metrics(cache=memory_cache())  # no "duplicated timeseries"
    one.request("/get", 200, 0.001)
    assert value(one, "kvtornado_requests_total", route="/get", status="200") == 1
    assert value(two, "kvtornado_requests_total", route="/get", status="200") is None


def test_the_nonce_store_size_and_the_open_connections() -> None:
    auth = Authenticator({TEST_KEY_ID: TEST_SECRET}, clock=lambda: 1000.0)
    metrics = Metrics(authenticator=auth)
    assert value(metrics, "kvtornado_nonces") == 0
    auth.remember([(1000, TEST_KEY_ID, "n1"), (1000, TEST_KEY_ID, "n2")])
    assert value(metrics, "kvtornado_nonces") == 2
    assert value(metrics, "kvtornado_open_connections") == 0  # no API server yet

    class Api:
        open_connections = 3

    metrics.api = Api()
    assert value(metrics, "kvtornado_open_connections") == 3
    assert TEST_SECRET.decode() not in metrics.scrape().decode()


def test_no_nonce_gauge_when_the_nonces_are_in_redis() -> None:
    auth = Authenticator({TEST_KEY_ID: TEST_SECRET})

    async def claim(key_id: str, nonce: str, ts: int, window_s: int) -> bool:
        return True

    auth.shared_nonces = claim  # what _serve does with the Redis cache: the local store stays unused
    assert value(Metrics(authenticator=auth), "kvtornado_nonces") is None
