"""kvtornado/rediscache.py against a throwaway redis-server (tests/services.py; skipped without the binary):
two ``RedisCache``s on one Redis and one shared store stand for two servers. Conditions and increments
across them, the miss that must not install an older record, cluster-wide limits, the shared failing state,
a dead flusher's entries taken over, versions after Redis loses its memory, nonces, the eviction-policy
check, and an outage as a bounded 503."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from kvtornado import rediscache
from kvtornado.auth import PENDING_CLAIM, NonceClaim
from kvtornado.config import CacheConfig
from kvtornado.errors import (
    AuthError,
    ConfigError,
    DurableTimeout,
    NotAnInteger,
    Overloaded,
    StorageError,
    VersionMismatch,
)
from kvtornado.ops import Op, Record
from kvtornado.rediscache import GROUP, K_LOG, RedisCache
from kvtornado.store import SqliteStore
from tests.unit.fakes import Gate, wait_until


class Servers:
    """Caches sharing one Redis database and one sqlite store (shared mode), like servers of one cluster."""

    def __init__(self, folder: Path, url: str) -> None:
        self.url = url
        self.store = SqliteStore(folder / "kv.sqlite3", shared=True)
        self.caches: list[RedisCache] = []

    async def cache(self, **config: Any) -> RedisCache:
        config.setdefault("flush_interval_ms", 60_000)  # flushes only when a test asks
        cache = RedisCache(self.store, CacheConfig(**config), url=self.url)
        await cache.start()
        self.caches.append(cache)
        return cache

    async def close(self) -> None:
        for cache in self.caches:
            await cache.stop(5)
        await self.store.close()


@pytest.fixture
def servers(io_loop: Any, tmp_path: Path, redis_url: str) -> Iterator[Servers]:
    s = Servers(tmp_path, redis_url)
    io_loop.run_sync(s.store.open)
    try:
        yield s
    finally:
        io_loop.run_sync(s.close)


def raw(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url)


@pytest.mark.gen_test(timeout=30)
async def test_every_server_sees_the_others_writes_conditions_and_deletes(servers: Servers) -> None:
    a, b = await servers.cache(), await servers.cache()
    v1 = await a.put("k", '"one"')
    assert await b.get_record("k") == Record('"one"', v1)
    v2 = await b.put("k", '"two"', if_version=v1)
    with pytest.raises(VersionMismatch):
        await a.put("k", '"three"', if_version=v1)
    assert await a.delete("k", if_version=v2)
    assert await b.get_record("k") is None
    assert not await b.delete("k")


@pytest.mark.gen_test(timeout=30)
async def test_racing_creates_have_one_winner_and_increments_end_exact(servers: Servers) -> None:
    a, b = await servers.cache(), await servers.cache()

    async def create(cache: RedisCache, value: str) -> bool:
        try:
            await cache.put("once", value, if_version=0)
        except VersionMismatch:
            return False
        return True

    won = await asyncio.gather(*(create(c, f'"{i}"') for i, c in enumerate([a, b] * 10)))
    assert won.count(True) == 1
    await asyncio.gather(*(c.apply([Op("incr", "n")]) for c in [a, b] * 100))
    assert (await a.get_record("n")).value == "200"  # type: ignore[union-attr]
    await a.put("text", '"x"')
    with pytest.raises(NotAnInteger):
        await b.apply([Op("save", "new", value="1"), Op("incr", "text")], batch=True)
    assert await a.get_record("new") is None  # all or nothing


@pytest.mark.gen_test(timeout=30)
async def test_a_miss_whose_store_read_returns_after_a_commit_is_not_kept(servers: Servers) -> None:
    a, b = await servers.cache(), await servers.cache()
    r = raw(servers.url)
    v1 = await a.put("k", '"old"')
    await a.flush()
    await r.delete(b"kv:r:k")  # evicted: the next read misses
    gate = Gate()
    gate.close()
    read = servers.store.read

    async def slow_read(key: str) -> Record | None:
        found = await read(key)  # the snapshot is taken now...
        await gate.pass_through()  # ...and returned after the write below has been committed and evicted
        return found

    servers.store.read = slow_read  # type: ignore[method-assign]
    miss = asyncio.ensure_future(b.get_record("k"))
    await wait_until(lambda: gate.waiting, "the miss to read the store")
    servers.store.read = read  # type: ignore[method-assign]
    v2 = await a.put("k", '"new"')
    await a.flush()
    await r.delete(b"kv:r:k")
    gate.open()
    assert await miss == Record('"old"', v1)  # it began before the write: the older value is a fair answer
    assert await b.get_record("k") == Record('"new"', v2)  # but it was not kept in Redis over the newer one
    await r.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_max_dirty_and_max_dirty_bytes_count_every_server(servers: Servers) -> None:
    a, b = await servers.cache(max_dirty=3), await servers.cache(max_dirty=3)
    await a.put("k1", "1")
    await a.put("k2", "2")
    await b.put("k3", "3")
    with pytest.raises(Overloaded):
        await b.put("k4", "4")
    await b.put("k1", "11")  # an overwrite is not a new pending key
    assert await a.flush() == 4
    await b.put("k4", "4")
    c = await servers.cache(max_dirty_bytes=20)
    await c.flush()
    with pytest.raises(Overloaded):
        await c.put("big", '"' + "x" * 30 + '"')
    assert c.stats()["cache"]["dirty"] == 0


@pytest.mark.gen_test(timeout=30)
async def test_a_failed_flush_makes_every_server_refuse_until_a_success_or_the_mark_expires(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await servers.cache(), await servers.cache(durable_timeout_ms=300)
    write_rows = servers.store.write_rows

    async def failing(rows: Any) -> None:
        raise StorageError("disk full")

    monkeypatch.setattr(servers.store, "write_rows", failing)
    await a.put("k", "1")
    with pytest.raises(Overloaded):
        await a.flush()
    with pytest.raises(Overloaded, match="store is failing"):
        await b.put("other", "2")  # G9 across servers
    with pytest.raises(DurableTimeout):
        await b.flush()  # a holds the entries (and retries them); b's rounds see the shared mark
    assert "refused on every server" in (await b.readiness() or "")  # /readyz: 503 on every server
    flush = b.stats()["flush"]
    assert flush["refusing_writes"] and flush["failing"] and flush["pending_retry"] == 1
    with pytest.raises(DurableTimeout):
        await b.put("durable", "3", durable=True)  # applied, not committed: it stays pending (504, not 503)
    assert (await a.get_record("durable")).value == "3"  # type: ignore[union-attr]
    monkeypatch.setattr(servers.store, "write_rows", write_rows)
    assert await a.flush() == 2  # its failed round's entries are its own to retry (b would wait for them)
    await a.put("other", "2")
    assert await servers.store.read("durable") == await a.get_record("durable")
    assert await b.flush() == 1  # a's write of "other"
    assert not b.stats()["flush"]["refusing_writes"]
    assert await b.readiness() is None
    # A flusher that fails and then dies: the mark expires by itself.
    monkeypatch.setattr(rediscache, "FAILING_MS", 300)
    monkeypatch.setattr(servers.store, "write_rows", failing)
    await a.put("again", "5")
    with pytest.raises(Overloaded):
        await a.flush()
    monkeypatch.setattr(servers.store, "write_rows", write_rows)
    with pytest.raises(Overloaded):
        await b.put("later", "4")
    deadline = time.monotonic() + 5
    while True:
        try:
            await b.put("later", "4")
            break
        except Overloaded:
            assert time.monotonic() < deadline, "the failing mark did not expire"
            await asyncio.sleep(0.05)  # polling for the mark's expiry, with the deadline above


@pytest.mark.gen_test(timeout=30)
async def test_a_dead_flushers_entries_are_taken_over_and_nothing_is_lost(servers: Servers) -> None:
    a = await servers.cache(reclaim_idle_ms=50)
    for i in range(20):
        await a.put(f"k{i}", str(i))
    r = raw(servers.url)
    taken = await r.xreadgroup(GROUP, b"dead-flusher", {K_LOG: ">"}, count=100)  # claims them, then "dies"
    assert len(taken[0][1]) == 20
    assert await a.flush() == 20  # waits for them, and takes them over once idle for reclaim_idle_ms
    assert [await servers.store.read(f"k{i}") for i in range(20)] == [await a.get_record(f"k{i}") for i in range(20)]
    assert await r.xlen(K_LOG) == 0
    await r.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_versions_stay_above_every_one_handed_out_when_redis_loses_its_memory(servers: Servers) -> None:
    a = await servers.cache()
    versions = [await a.put(f"k{i}", str(i)) for i in range(5)]
    await a.flush()
    r = raw(servers.url)
    await r.flushdb()  # Redis restarted without persistence, under running servers
    await r.aclose()
    again = await a.put("k0", '"again"')
    assert again > max(versions)
    assert (await a.get_record("k1")).value == "1"  # type: ignore[union-attr]  # from the store
    assert await a.flush() == 1  # the log and its group are made again by themselves
    assert await servers.store.read("k0") == Record('"again"', again)
    await a.put("k2", "3")  # and writes are not refused afterwards


@pytest.mark.gen_test(timeout=30)
async def test_a_durable_write_is_in_the_store_before_it_returns(servers: Servers) -> None:
    a = await servers.cache()
    version = await a.put("d", '"x"', durable=True)
    assert await servers.store.read("d") == Record('"x"', version)
    assert a.stats()["cache"]["dirty"] == 0 or await a.flush() >= 0


@pytest.mark.gen_test(timeout=30)
async def test_nonces_are_claimed_once_across_servers_under_either_policy(servers: Servers) -> None:
    a, b = await servers.cache(), await servers.cache()
    now = int(time.time())
    assert await a.claim_nonce("kid", "n" * 16, now, 300)
    assert not await b.claim_nonce("kid", "n" * 16, now, 300)
    assert await b.claim_nonce("other", "n" * 16, now, 300)
    r = raw(servers.url)
    await r.config_set("maxmemory-policy", "volatile-lru")
    try:
        c = await servers.cache()
        assert c.policy == "volatile-lru"
        assert await c.claim_nonce("kid", "z" * 16, now, 300)
        assert not await c.claim_nonce("kid", "z" * 16, now, 300)
        assert await r.ttl(b"kv:nonces") == -1  # under volatile-*, only clean entries have a time to live
    finally:
        await r.config_set("maxmemory-policy", "noeviction")
        await r.aclose()


async def _with_claim(key_id: str, nonce: str, step: Any) -> NonceClaim:
    """Run ``step()`` as a request whose nonce is deferred (``authenticate(defer=True)``), in a task of its own
    as Tornado runs each request; the claim it carried."""
    claim = NonceClaim(key_id, nonce, int(time.time()), 300)

    async def request() -> None:
        PENDING_CLAIM.set(claim)
        await step()

    await asyncio.ensure_future(request())
    return claim


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("policy", ["noeviction", "volatile-lru"])
async def test_a_deferred_nonce_is_claimed_by_the_data_script_and_a_replay_changes_nothing(
    servers: Servers, policy: str
) -> None:
    r = raw(servers.url)
    await r.config_set("maxmemory-policy", policy)
    try:
        a, b = await servers.cache(), await servers.cache()
        await a.put("k", '"v"')
        calls: list[Any] = []

        async def counted(*args: Any) -> bool:  # the separate claim: never needed when the data goes to Redis
            calls.append(args)
            return True

        a.claim_nonce = b.claim_nonce = counted  # type: ignore[method-assign]
        get = await _with_claim("kid", "g" * 16, lambda: a.get_record("k"))
        save = await _with_claim("kid", "s" * 16, lambda: a.put("k", '"w"'))
        assert get.done and save.done and calls == []
        # The same nonces again, through another server: refused before the data is touched.
        for nonce, step in [("g" * 16, lambda: b.get_record("k")), ("s" * 16, lambda: b.put("k", '"x"')),
                            ("s" * 16, lambda: b.apply([Op("incr", "n", by=1)]))]:
            with pytest.raises(AuthError) as err:
                await _with_claim("kid", nonce, step)
            assert err.value.code == "replayed_nonce"
        assert (await b.get_record("k")).value == '"w"'  # type: ignore[union-attr]
        assert await b.get_record("n") is None
        assert calls == []
    finally:
        await r.config_set("maxmemory-policy", "noeviction")
        await r.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_an_eviction_policy_that_could_evict_a_pending_write_is_refused(servers: Servers) -> None:
    r = raw(servers.url)
    await r.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(ConfigError) as err:
            await servers.cache()
    finally:
        await r.config_set("maxmemory-policy", "noeviction")
        await r.aclose()
    assert "maxmemory-policy is allkeys-lru" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.gen_test(timeout=30)
async def test_pending_writes_have_no_expiry_and_clean_ones_do(servers: Servers) -> None:
    a = await servers.cache()
    r = raw(servers.url)
    await a.put("k", "1", ttl=100)
    assert await r.pttl(b"kv:r:k") == -1
    await a.flush()
    assert 0 < await r.pttl(b"kv:r:k") <= 100_000
    await a.put("j", "1")
    await a.flush()
    assert 0 < await r.pttl(b"kv:r:j") <= rediscache.CLEAN_TTL_MS
    await r.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_redis_down_is_a_bounded_503_and_service_resumes(servers: Servers, redis_server: Any) -> None:
    a = await servers.cache()
    await a.put("k", "1", durable=True)
    await asyncio.to_thread(redis_server.stop)
    try:
        started = time.monotonic()
        with pytest.raises(Overloaded, match="Redis"):
            await a.get_record("k")
        with pytest.raises(Overloaded, match="Redis"):
            await a.put("w", "2")
        assert "Redis" in (await a.readiness() or "")
        assert time.monotonic() - started < 4 * rediscache.SOCKET_TIMEOUT_S
    finally:
        await asyncio.to_thread(redis_server.start)
    # This throwaway Redis keeps nothing across a restart: the cache makes its counter and group again itself.
    assert (await a.get_record("k")).value == "1"  # type: ignore[union-attr]  # the durable write, from the store
    await a.put("w", "2")


@pytest.mark.gen_test(timeout=30)
async def test_absent_keys_are_remembered_briefly_and_a_stop_does_not_wait_for_newer_writes(
    servers: Servers
) -> None:
    a, b = await servers.cache(), await servers.cache()
    r = raw(servers.url)
    assert await a.get_record("nothing") is None
    assert 0 < await r.pttl(b"kv:r:nothing") <= rediscache.ABSENT_TTL_MS
    await a.put("mine", "1")
    writing = True

    async def keep_writing() -> None:
        i = 0
        while writing:
            i += 1
            await b.put(f"b{i % 50}", str(i))

    other = asyncio.ensure_future(keep_writing())
    try:
        assert await a.stop(10) == 0  # its own write (and what was in the log) committed; b's later ones not waited for
    finally:
        writing = False
        await other
    servers.caches.remove(a)
    assert await servers.store.read("mine") == await b.get_record("mine")
    await r.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_a_batch_refusal_names_a_version_no_write_ever_had(servers: Servers) -> None:
    a = await servers.cache()
    v = await a.put("cv", "1")
    with pytest.raises(VersionMismatch) as err:
        await a.apply([Op("save", "cv", value="2"), Op("save", "cv", value="3", if_version=v)], batch=True)
    assert err.value.extra["current_version"] > v  # what the first op would have had, as on the memory cache
    assert await a.put("other", "1") > v
    assert (await a.get_record("cv")) == Record("1", v)  # nothing written


@pytest.mark.gen_test(timeout=30)
async def test_stats_have_the_fields_every_cache_has(servers: Servers) -> None:
    a = await servers.cache()
    await a.put("k", "1")
    await a.flush()
    stats = a.stats()
    assert {"entries", "hits", "misses", "evictions", "dirty"} <= set(stats["cache"])
    assert stats["cache"]["entries"] >= 1 and stats["flush"]["pending_retry"] == 0


@pytest.mark.gen_test(timeout=30)
async def test_on_flush_hears_each_flush_and_failure_but_no_idle_round(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await servers.cache(flush_interval_ms=10, durable_timeout_ms=300)
    durations: list[float] = []
    a.on_flush = durations.append  # what the metrics' flush duration histogram observes
    await wait_until(lambda: a.last_ms > 0, "an idle round")
    assert durations == []  # a round that found the log empty is a poll, not a flush
    await a.put("k", "1")
    await a.flush()  # (or the tick has flushed it already: 10 ms)
    await wait_until(lambda: len(durations) >= 1, "the flush to be heard")

    async def failing(rows: Any) -> None:
        raise StorageError("disk full")

    write_rows = servers.store.write_rows
    monkeypatch.setattr(servers.store, "write_rows", failing)
    seen = len(durations)
    await a.put("k", "2")
    await wait_until(lambda: len(durations) > seen, "a failed flush to be heard")
    assert a.stats()["flush"]["errors"] >= 1
    monkeypatch.setattr(servers.store, "write_rows", write_rows)
    await a.flush()
    assert all(d >= 0 for d in durations)
    assert (await servers.store.read("k")).value == "2"  # type: ignore[union-attr]
