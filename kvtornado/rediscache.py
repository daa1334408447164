"""Redis as the shared cache, pending-write log and nonce store (SPEC §10, ``cache.backend: redis``).

Every kvtornado process and host points at one Redis; the state is there, not in a process, so any server
answers for every other. Per key, a hash ``kv:r:<key>``: ``n`` the version, ``v`` the value's JSON text
(absent: a tombstone, or a key the store does not have), ``x`` the expiry, and ``p`` the key+value bytes
while the write is pending (no ``p``: clean, committed).

- **Writes**: ``ops.apply_ops`` decides, as for the other caches, over the records read from Redis (and the
  store on a miss); then one Lua script (``_WRITE``) does the rest as one atomic step across every server:
  it checks that every record the ops looked at is still the one they saw (else they run again on the fresh
  records: compare-and-set, like etcd's transactions), checks G9's shared failing state and G5's
  cluster-wide ``max_dirty``/``max_dirty_bytes``, draws the versions from one counter (``kv:ver``), writes
  the records without an expiry, adds each key to the ordered set of pending keys (``kv:pending``) and appends
  one entry per key to the log (the stream ``kv:log``). The answer is sent after that script.
- **Versions** never exceed a ceiling (``kv:ceil``) reserved in the store first (``reserve_versions``), so a
  Redis that lost its memory restarts its counter above every version ever handed out (G10).
- **Misses** read the store and keep the record in Redis as a clean entry (``_FILL``), unless a commit
  happened meanwhile (``kv:gen`` moved): a read that returns after a newer write never installs the older one.
  A key the store does not have is kept as a clean marker of version 0, so conditions on absent keys have a
  record to compare too.
- **The flusher** (one per server, on the ``FlushScheduler``'s tick) reads the log through a consumer group:
  its own unacknowledged entries first (a failed round's), then those another flusher left idle longer
  than ``cache.reclaim_idle_ms`` (``XAUTOCLAIM``: that flusher died), then new ones. It writes each key's
  current pending record to the store, idempotently and in version order (the store keeps tombstones and
  only replaces an older version), marks the records clean (``_COMMITTED``: a record written again
  meanwhile stays pending) and only then acknowledges and deletes the entries. Clean entries get a time to
  live, pending ones never do, so only clean ones can be evicted.
- **Durable writes** are written to the store by the server that took them before the answer.
- **Nonces**: ``SET NX`` with the window as expiry under ``noeviction``; under a ``volatile-*`` policy, where
  only clean entries may have a time to live, a sorted set scored by timestamp that the servers prune.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from kvtornado.auth import PENDING_CLAIM, NonceClaim, replayed
from kvtornado.config import CacheConfig, redact_url
from kvtornado.errors import ConfigError, DurableTimeout, Overloaded, StorageError
from kvtornado.ops import SAVE, WRITES, Op, Outcome, Record, apply_ops
from kvtornado.scheduler import Clock, FlushScheduler, LoopClock
from kvtornado.store import VERSION_BLOCK, Row, Store, unanswered

log = logging.getLogger("kvtornado.rediscache")

K_VER, K_CEIL, K_LOG, K_PENDING, K_BYTES, K_FAILING, K_GEN = (
    b"kv:ver", b"kv:ceil", b"kv:log", b"kv:pending", b"kv:dirty_bytes", b"kv:failing", b"kv:gen")
K_NONCES = b"kv:nonces"
RECORD = b"kv:r:"
NONCE = b"kv:n:"
GROUP = b"flushers"
# A clean entry lives at most this long in Redis (so it can be evicted, and the store stays the truth; under
# noeviction this is what bounds the clean entries' memory). A key the store does not have is remembered for
# less: a client reading many absent keys must not fill Redis with markers.
CLEAN_TTL_MS = 3_600_000
ABSENT_TTL_MS = 60_000
# G9 across servers: a failed flush marks the store failing for this long, unless a flusher succeeds first
# (or fails again, which extends it): a flusher that died cannot leave every server refusing writes.
FAILING_MS = 60_000
SOCKET_TIMEOUT_S = 2.0
# A write whose records changed under it runs again at most this many times (each retry means another write
# to one of its keys succeeded meanwhile).
MAX_ATTEMPTS = 64
SWEEP_INTERVAL_S = 10.0
FLUSH_POLL_S = 0.02  # POST /flush looks at the log this often while other flushers hold its entries
SAFE_POLICIES = ("noeviction", "volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl")

# The prologue of _READ and _WRITE: the request's nonce claimed first, in the same step as its data (SPEC §10;
# one round trip instead of two). The last key and the last four ARGV: nonce-key mode member ts limit, where
# mode is '0' (nothing to claim, and no nonce key), 's' (SET NX with limit as the seconds to live: noeviction)
# or 'z' (the sorted set, pruned below limit, the horizon: volatile-*). Answers {'REPLAY'} when it was seen.
_CLAIM = """
local nkeys, nargv = #KEYS, #ARGV
local cmode = ARGV[nargv - 3]
if cmode ~= '0' then
  local ck = KEYS[nkeys]
  nkeys = nkeys - 1
  if cmode == 's' then
    if not redis.call('SET', ck, ARGV[nargv - 1], 'NX', 'EX', ARGV[nargv]) then return {'REPLAY'} end
  else
    redis.call('ZREMRANGEBYSCORE', ck, '-inf', '(' .. ARGV[nargv])
    if redis.call('ZADD', ck, 'NX', ARGV[nargv - 1], ARGV[nargv - 2]) == 0 then return {'REPLAY'} end
  end
end
"""

# KEYS: ver ceil log pending bytes failing, then one record key per touched key (then _CLAIM's).
# ARGV: refuse durable max_dirty max_dirty_bytes ndraw nchecks [kidx token]* nwrites
#       [kidx key size rel hasv value expires]* -- kidx: the record's index in KEYS; rel: the write's version
#       relative to the first drawn (1..ndraw); expires: '' for none (then _CLAIM's four).
# Answers {'OK', base} (version = base + rel), {'CONFLICT', n v x per checked key (the records now)},
# {'FAILING', ms}, {'FULL', what, held}, {'REPLAY'} (_CLAIM),
# {'NOINIT'} (no counter: Redis lost its memory) or {'NEEDBLOCK'} (the reserved versions are used up).
_WRITE = _CLAIM + """
local function int(n) return string.format('%d', n) end
local refuse, durable = ARGV[1] == '1', ARGV[2] == '1'
local max_dirty, max_bytes, ndraw = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local a = 7
for i = 1, tonumber(ARGV[6]) do
  if redis.call('HGET', KEYS[tonumber(ARGV[a])], 'n') ~= ARGV[a + 1] then
    local fresh, c = {'CONFLICT'}, 7
    for j = 1, tonumber(ARGV[6]) do
      local r = redis.call('HMGET', KEYS[tonumber(ARGV[c])], 'n', 'v', 'x')
      fresh[#fresh + 1] = r[1]; fresh[#fresh + 1] = r[2]; fresh[#fresh + 1] = r[3]
      c = c + 2
    end
    return fresh
  end
  a = a + 2
end
local nwrites = tonumber(ARGV[a])
a = a + 1
if nwrites == 0 then return {'OK', 0} end
if refuse and not durable then
  local until_ms = redis.call('GET', KEYS[6])
  if until_ms then
    local t = redis.call('TIME')
    local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    if tonumber(until_ms) > now_ms then return {'FAILING', tonumber(until_ms) - now_ms} end
  end
end
local grows, fresh, w = 0, 0, a
for i = 1, nwrites do
  local old = redis.call('HGET', KEYS[tonumber(ARGV[w])], 'p')
  if old then grows = grows + tonumber(ARGV[w + 2]) - tonumber(old)
  else grows = grows + tonumber(ARGV[w + 2]); fresh = fresh + 1 end
  w = w + 7
end
local held = tonumber(redis.call('GET', KEYS[5]) or '0')
if grows > 0 and held + grows > max_bytes then return {'FULL', 'bytes', held} end
local pending = redis.call('ZCARD', KEYS[4])
if fresh > 0 and pending + fresh > max_dirty then return {'FULL', 'keys', pending} end
local ver = redis.call('GET', KEYS[1])
if not ver then return {'NOINIT'} end
ver = tonumber(ver)
if ver + ndraw > tonumber(redis.call('GET', KEYS[2]) or '0') then return {'NEEDBLOCK'} end
redis.call('SET', KEYS[1], int(ver + ndraw))
redis.call('INCRBY', KEYS[5], grows)
w = a
for i = 1, nwrites do
  local rk, key, size = KEYS[tonumber(ARGV[w])], ARGV[w + 1], ARGV[w + 2]
  local n = ver + tonumber(ARGV[w + 3])
  redis.call('DEL', rk)
  redis.call('HSET', rk, 'n', int(n), 'p', size)
  if ARGV[w + 4] == '1' then redis.call('HSET', rk, 'v', ARGV[w + 5]) end
  if ARGV[w + 6] ~= '' then redis.call('HSET', rk, 'x', ARGV[w + 6]) end
  redis.call('ZADD', KEYS[4], 0, key)
  redis.call('XADD', KEYS[3], '*', 'k', key, 'n', int(n))
  w = w + 7
end
return {'OK', int(ver)}
"""

# A miss's store read, kept as a clean entry unless a commit happened since the read began (KEYS[2], the
# commit generation, moved) or the key is in Redis already. KEYS: record gen. ARGV: gen0 n hasv value
# expires ttl_ms. Answers 1 when kept.
_FILL = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'n', ARGV[2])
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'v', ARGV[4]) end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'x', ARGV[5]) end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
"""

# After a commit: each record still at the committed version becomes clean (its bytes leave the count, its
# key the pending set, and it gets a time to live); one written again meanwhile stays pending. KEYS: pending
# bytes gen, then one record key per row. ARGV: [key version ttl_ms]* (ttl_ms 0: expired, removed).
_COMMITTED = """
local freed, a = 0, 1
for i = 4, #KEYS do
  local rk = KEYS[i]
  local have = redis.call('HMGET', rk, 'n', 'p')
  if have[1] == ARGV[a + 1] and have[2] then
    freed = freed + tonumber(have[2])
    redis.call('ZREM', KEYS[1], ARGV[a])
    if ARGV[a + 2] == '0' then redis.call('DEL', rk)
    else redis.call('HDEL', rk, 'p'); redis.call('PEXPIRE', rk, ARGV[a + 2]) end
  end
  a = a + 3
end
if freed > 0 then redis.call('DECRBY', KEYS[2], freed) end
redis.call('INCR', KEYS[3])
return freed
"""

# Acknowledge and delete log entries once their rows are committed. KEYS: log. ARGV: group id*.
_ACK = """
local group = table.remove(ARGV, 1)
redis.call('XACK', KEYS[1], group, unpack(ARGV))
return redis.call('XDEL', KEYS[1], unpack(ARGV))
"""

# Versions reserved in the store: the ceiling rises to them; a missing counter (a Redis that lost its memory)
# starts right below them. KEYS: ver ceil. ARGV: first last.
_SEED = """
if not redis.call('GET', KEYS[1]) then redis.call('SET', KEYS[1], string.format('%d', tonumber(ARGV[1]) - 1)) end
if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[2]) then redis.call('SET', KEYS[2], ARGV[2]) end
return 1
"""

# Records and the two counters in one atomic step (one command: a MULTI/EXEC pipeline costs redis-py five).
# KEYS: ver gen, then one record key per key (then _CLAIM's). Answers ver, gen, then n v x per record key;
# or {'REPLAY'} (_CLAIM).
_READ = _CLAIM + """
local out = {redis.call('GET', KEYS[1]) or '0', redis.call('GET', KEYS[2]) or '0'}
for i = 3, nkeys do
  local r = redis.call('HMGET', KEYS[i], 'n', 'v', 'x')
  out[#out + 1] = r[1]; out[#out + 1] = r[2]; out[#out + 1] = r[3]
end
return out
"""

# A nonce in the sorted set (volatile-* policies): prune what left the window, then add if new.
# KEYS: nonces. ARGV: member ts horizon. Answers 1 when new.
_NONCE_ZSET = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
return redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
"""


def _b(text: str) -> bytes:
    """Keys and values as Redis holds them: UTF-8, lone surrogates (valid in a JSON text's escapes) kept."""
    return text.encode("utf-8", "surrogatepass")


def _s(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


def _record(fields: Sequence[bytes | None]) -> Record | None:
    """``(n, v, x)`` as read from a record hash; None when the hash does not exist."""
    n, v, x = fields
    if n is None:
        return None
    return Record(None if v is None else _s(v), int(n), None if x is None else float(x))


def _clean_ttl_ms(record: Record, now: float) -> int:
    """A clean entry's time to live in Redis: at most ``CLEAN_TTL_MS``, and not past its expiry (0: expired)."""
    if record.expires_at is None:
        return CLEAN_TTL_MS
    left = math.ceil((record.expires_at - now) * 1000)
    return max(0, min(CLEAN_TTL_MS, left))


def _expires(record: Record) -> bytes:
    return b"" if record.expires_at is None else repr(record.expires_at).encode()


class KeyLocks:
    """Per-key locks of one process: at most one compare-and-set attempt per key is in flight here, so a
    conflict can only come from another server (without them, 200 increments of one key from one process
    retried each other out). A lock exists while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, keys: Sequence[str]) -> AsyncIterator[None]:
        ordered = sorted(set(keys))  # one order for every caller: no deadlock between batches
        for key in ordered:
            lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
            self._locks[key] = (lock, users + 1)
        taken: list[asyncio.Lock] = []
        try:
            for key in ordered:
                lock = self._locks[key][0]
                await lock.acquire()
                taken.append(lock)
            yield
        finally:
            for lock in taken:
                lock.release()
            for key in ordered:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


class Conflict(Exception):
    """A record the ops looked at changed before their script ran: apply them again, on ``fresh`` (the records
    Redis holds now, None where it holds none), which the script returned, so the retry needs no read first:
    it then wins the next round against a server that must read before writing."""

    def __init__(self, fresh: list[Record | None]) -> None:
        super().__init__()
        self.fresh = fresh


class RedisCache:
    """The ``KeyValue`` the handlers use, with its state in Redis (module docstring), over a ``store.Store``
    opened in shared mode (tombstones, version-ordered writes) as the store of record."""

    def __init__(self, store: Store, config: CacheConfig, *, url: str, clock: Clock | None = None,
                 wall: Callable[[], float] | None = None) -> None:
        self.store = store
        self.config = config
        self.url = url
        self.where = redact_url(url)
        self.clock: Clock = clock if clock is not None else LoopClock()
        self.wall: Callable[[], float] = wall if wall is not None else getattr(store, "clock", time.time)
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}".encode()
        # Any: redis-py's annotations cannot say what a reply holds (bytes here: no decode_responses).
        self.redis: Any = aioredis.Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S,
            retry_on_timeout=False, health_check_interval=30)
        self._write = self.redis.register_script(_WRITE)
        self._fill = self.redis.register_script(_FILL)
        self._committed_script = self.redis.register_script(_COMMITTED)
        self._ack = self.redis.register_script(_ACK)
        self._seed = self.redis.register_script(_SEED)
        self._nonce_zset = self.redis.register_script(_NONCE_ZSET)
        self._read_script = self.redis.register_script(_READ)
        self.policy = "noeviction"
        self._seeding: asyncio.Task[None] | None = None
        self._log_len = 0  # entries in the whole log as of the last round (a write here adds its own at once)
        # A graceful stop waits for the entries in the log when it began (the other servers may go on writing):
        # the newest entry's id then, and the oldest entry's id as of the last round.
        self._stop_upto: tuple[int, int] | None = None
        self._oldest: tuple[int, int] | None = None
        self._snapshot: dict[str, Any] = {"dirty": 0, "dirty_bytes": 0, "log": 0, "failing": False, "entries": 0,
                                          "evictions": 0}
        self._counter_seen = 0  # the version counter as last read (see _apply)
        self.hits = self.misses = self.conflicts = 0
        self.flush_count = self.flush_rows = self.flush_errors = 0
        self.last_ms = 0.0
        # Called with each flush's duration in seconds: a round that took log entries or failed (idle polls are
        # not flushes, as flush.count does not count them either).
        self.on_flush: Callable[[float], None] | None = None
        self._full = False  # the last round took a whole batch: another one follows at once
        self._stopping = False
        self._round_lock = asyncio.Lock()  # one round at a time in this process (the tick's, or POST /flush's)
        self._key_locks = KeyLocks()
        self._sweeper: asyncio.Task[None] | None = None
        # Every tick polls the log (other servers' writes are in it too); a stopping server until it is empty.
        self.scheduler = FlushScheduler(
            self.clock, config.flush_interval_ms,
            begin=lambda: self._round(),
            has_work=lambda: not self._stopping or self._unfinished(),
            wants_next=lambda: self._full,
        )

    # -- life cycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Check Redis (reachable, an eviction policy that cannot evict a pending write), create the log's
        consumer group, seed the version counter. ``ConfigError`` (one line) when Redis cannot be used."""
        try:
            try:
                policy = (await self.redis.config_get("maxmemory-policy")).get("maxmemory-policy")
            except ResponseError:
                policy = None  # CONFIG renamed or refused (a managed Redis): the INFO section says it too
            if policy is None:
                policy = (await self.redis.info("memory")).get("maxmemory_policy")
            if isinstance(policy, bytes):
                policy = policy.decode()
            if policy not in SAFE_POLICIES:
                raise ConfigError(f"{self.where}: maxmemory-policy is {policy}, which can evict pending writes; "
                                  "set noeviction or a volatile-* policy (only clean entries have a time to live)")
            self.policy = policy
            await self._create_group()
            await self._reserve()
            self._log_len = await self.redis.xlen(K_LOG)
        except RedisError as exc:
            raise ConfigError(f"cache.redis_url: cannot use Redis at {self.where} ({self._why(exc)})") from None
        except StorageError as exc:
            raise ConfigError(f"cannot reserve versions in the store ({exc})") from None

    async def start(self) -> None:
        try:
            await self.open()
        except BaseException:
            await self.redis.aclose()
            raise
        self.scheduler.start()
        self._sweeper = asyncio.ensure_future(self._sweep_forever())

    def _unfinished(self) -> bool:
        """Stopping: some entry that was in the log when the stop began may still be uncommitted."""
        if self._stop_upto is None:
            return self._log_len > 0  # the newest id could not be read (Redis down): the whole log then
        return self._oldest is not None and self._oldest <= self._stop_upto

    async def stop(self, timeout_s: float) -> int:
        """Flush what the log holds now (with the other servers, up to ``timeout_s``), not what they write
        meanwhile; returns the entries left in the log when that could not be done."""
        self._stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        try:
            newest = await self.redis.xrevrange(K_LOG, count=1)
            self._stop_upto = _id(newest[0][0]) if newest else (0, 0)
            self._oldest = None
            if newest:
                self._log_len = max(self._log_len, 1)
                oldest = await self.redis.xrange(K_LOG, count=1)
                self._oldest = _id(oldest[0][0]) if oldest else None
        except RedisError as exc:
            log.warning("shutdown: Redis cannot be read (%s)", self._why(exc))
        await self.scheduler.finish(timeout_s)
        left = self._log_len if self._unfinished() else 0
        if left:
            log.error("shutdown: %d log entries are still pending in Redis (another server, or the next start, "
                      "flushes them)", left)
        await self.redis.aclose()
        return left

    # -- reads ----------------------------------------------------------------------------------

    def _rk(self, key: str) -> bytes:
        return RECORD + _b(key)

    @staticmethod
    def _why(exc: BaseException) -> str:
        return " ".join(str(exc).split()) or exc.__class__.__name__

    def _unreachable(self, exc: BaseException) -> Overloaded:
        return Overloaded(f"Redis at {self.where} cannot be used ({self._why(exc)}); retry shortly.")

    async def _read(self, keys: Sequence[str]) -> tuple[list[Record | None], int]:
        """The records Redis holds for ``keys`` (None: not there) and the commit generation, in one step."""
        claim, claim_key, claim_args = self._claim_parts()
        try:
            replies = await self._read_script(keys=[K_VER, K_GEN, *(self._rk(key) for key in keys), *claim_key],
                                              args=claim_args)
        except RedisError as exc:
            raise self._unreachable(exc) from None
        _claimed(claim, replies)
        self._counter_seen = max(self._counter_seen, int(replies[0]))
        # Lua turns a nil inside a table into false, which redis-py hands back as None.
        records = [_record(replies[i:i + 3]) for i in range(2, len(replies), 3)]
        return records, int(replies[1])

    async def _load(self, keys: Sequence[str]) -> dict[str, Record]:
        """Every key's current record, as a condition may compare it: from Redis, or read from the store and
        kept in Redis (a key the store does not have as a version-0 marker). Keys whose fill lost a race with a
        commit are read again."""
        out: dict[str, Record] = {}
        todo = list(keys)
        for _ in range(MAX_ATTEMPTS):
            records, gen = await self._read(todo)
            missing = []
            for key, record in zip(todo, records, strict=True):
                if record is None:
                    missing.append(key)
                else:
                    out[key] = record
            if not missing:
                return out
            self.misses += len(missing)
            found = await asyncio.gather(*(self.store.read(k) for k in missing))
            now = self.wall()
            todo = []
            for key, record in zip(missing, found, strict=True):
                if record is None or record.value is None:
                    record = Record(None, 0)
                if not await self._keep(key, record, gen, now):
                    todo.append(key)  # a commit landed meanwhile: what was read may be older than Redis
                else:
                    out[key] = record
            if not todo:
                return out
        raise Overloaded("The keys changed too often to be read; retry shortly.")

    async def _keep(self, key: str, record: Record, gen: int, now: float) -> bool:
        ttl = _clean_ttl_ms(record, now) if record.value is not None else ABSENT_TTL_MS
        if ttl == 0:
            record = Record(None, 0)  # expired: kept as absent (the store's row is swept later)
            ttl = ABSENT_TTL_MS
        try:
            kept = await self._fill(keys=[self._rk(key), K_GEN], args=[
                gen, record.version, 1 if record.value is not None else 0,
                b"" if record.value is None else _b(record.value), _expires(record), ttl])
        except RedisError as exc:
            raise self._unreachable(exc) from None
        return bool(kept)

    async def get_record(self, key: str) -> Record | None:
        """The key's live record, or None."""
        records, gen = await self._read([key])
        record = records[0]
        if record is None:
            self.misses += 1
            record = await self.store.read(key)
            if record is not None and record.value is not None:
                await self._keep(key, record, gen, self.wall())
            else:
                await self._keep(key, Record(None, 0), gen, self.wall())
        else:
            self.hits += 1
        return record if record is not None and record.live(self.wall()) else None

    async def get(self, key: str) -> str | None:
        record = await self.get_record(key)
        return None if record is None else record.value

    # -- writes ---------------------------------------------------------------------------------

    async def put(self, key: str, value: str, *, durable: bool = False, ttl: int | None = None,
                  if_version: int | None = None) -> int:
        outcomes = await self.apply([Op(SAVE, key, value=value, ttl=ttl, if_version=if_version)], durable=durable)
        return outcomes[0].record.version  # type: ignore[union-attr]  # a save always has its record

    async def delete(self, key: str, *, durable: bool = False, if_version: int | None = None) -> bool:
        outcomes = await self.apply([Op("delete", key, if_version=if_version)], durable=durable, batch=True)
        return outcomes[0].done

    async def apply(self, ops: Sequence[Op], *, durable: bool = False, batch: bool = False) -> list[Outcome]:
        """Apply ``ops`` all or nothing, as one atomic step in Redis (module docstring); with ``durable``, the
        rows are committed to the store before it returns."""
        need = list(dict.fromkeys(op.key for op in ops if op.needs_current))
        if not need:
            return await self._apply(ops, need, {}, durable, batch)
        async with self._key_locks.hold(need):
            return await self._apply(ops, need, await self._load(need), durable, batch)

    async def _apply(self, ops: Sequence[Op], need: list[str], current: dict[str, Record], durable: bool,
                     batch: bool) -> list[Outcome]:
        for _ in range(MAX_ATTEMPTS):
            draws = 0
            # Versions are drawn by the script; until then they count on from the counter as last read, so a
            # refusal that names one (a batch's 412 after an earlier op) names a version never handed out.
            guess = self._counter_seen

            def draw(guess: int = guess) -> int:
                nonlocal draws
                draws += 1
                return guess + draws

            outcomes, writes = apply_ops(ops, current.get, self.wall(), draw, batch=batch)
            if not writes and not need:
                return outcomes
            try:
                base = await self._commit(current, writes, draws, guess, durable)
            except Conflict as conflict:
                self.conflicts += 1
                current = dict(zip(current, conflict.fresh, strict=True))  # type: ignore[arg-type]
                gone = [k for k, r in current.items() if r is None]
                if gone:  # evicted or expired meanwhile: from the store again
                    current.update(await self._load(gone))
                continue
            fresh = {id(r): r for r in writes.values()}
            for outcome in outcomes:
                if outcome.op.kind in WRITES and outcome.record is not None:
                    fresh[id(outcome.record)] = outcome.record
            for record in fresh.values():
                record.version += base - guess
            self._log_len += len(writes)
            if writes and durable:
                try:
                    await self._commit_rows(list(writes.items()))
                except (StorageError, Overloaded) as exc:
                    # Applied in Redis (so acknowledged to every reader): it stays pending and is flushed later.
                    raise DurableTimeout(f"The write was applied but could not be committed now ({exc}); it "
                                         "stays pending and will be written.") from None
            return outcomes
        raise Overloaded("Too many concurrent writes to these keys; retry shortly.")

    async def _commit(self, seen: dict[str, Record], writes: dict[str, Record], draws: int, guess: int,
                      durable: bool) -> int:
        """Run ``_WRITE``: the base of the drawn versions; ``Conflict`` when a record it saw changed."""
        keys = [K_VER, K_CEIL, K_LOG, K_PENDING, K_BYTES, K_FAILING]
        index: dict[str, int] = {}

        def kidx(key: str) -> int:
            if key not in index:
                keys.append(self._rk(key))
                index[key] = len(keys)  # Lua's KEYS is 1-based
            return index[key]

        args: list[Any] = [1 if self.config.writes_while_failing == "refuse" else 0, 1 if durable else 0,
                           self.config.max_dirty, self.config.max_dirty_bytes, draws, len(seen)]
        for key, record in seen.items():
            args += [kidx(key), record.version]
        args.append(len(writes))
        for key, record in writes.items():
            raw_key = _b(key)
            raw_value = b"" if record.value is None else _b(record.value)
            args += [kidx(key), raw_key, len(raw_key) + len(raw_value), record.version - guess,
                     0 if record.value is None else 1, raw_value, _expires(record)]
        for _ in range(3):
            claim, claim_key, claim_args = self._claim_parts()  # the first attempt claims it (or finds a replay)
            try:
                reply = await self._write(keys=keys + claim_key, args=args + claim_args)
            except RedisError as exc:
                raise self._unreachable(exc) from None
            _claimed(claim, reply)
            status = reply[0]
            if status == b"OK":
                return int(reply[1])
            if status == b"CONFLICT":
                raise Conflict([_record(reply[i:i + 3]) for i in range(1, len(reply), 3)])
            if status == b"FAILING":
                raise Overloaded("The store is failing: writes are refused until a flush succeeds; retry shortly.",
                                 retry_after_s=min(5, max(1, int(reply[1]) // 1000)))
            if status == b"FULL":
                self.scheduler.trigger()
                what = "bytes of writes are" if reply[1] == b"bytes" else "writes are"
                raise Overloaded(f"{int(reply[2])} {what} waiting for the store across the servers; retry shortly.")
            await self._reserve()  # NOINIT or NEEDBLOCK: versions from the store, then again
        raise Overloaded("No versions could be reserved; retry shortly.")

    async def _reserve(self) -> None:
        """A block of versions from the store (one reservation at a time in this process)."""
        if self._seeding is None:
            self._seeding = asyncio.ensure_future(self._seed_block())
        task = self._seeding
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and self._seeding is task:
                self._seeding = None

    async def _seed_block(self) -> None:
        first, last = await self.store.reserve_versions(VERSION_BLOCK)
        try:
            await self._seed(keys=[K_VER, K_CEIL], args=[first, last])
        except RedisError as exc:
            raise self._unreachable(exc) from None

    async def _commit_rows(self, rows: list[Row]) -> None:
        """Write rows to the store, then mark them clean in Redis (what is newer there stays pending)."""
        ordered = sorted(rows, key=lambda row: row[0])
        await self.store.write_rows(ordered)
        now = self.wall()
        keys = [K_PENDING, K_BYTES, K_GEN] + [self._rk(k) for k, _ in ordered]
        args: list[Any] = []
        for key, record in ordered:
            args += [_b(key), record.version, _clean_ttl_ms(record, now) if record.value is not None
                     else ABSENT_TTL_MS]
        try:
            await self._committed_script(keys=keys, args=args)
            await self.redis.delete(K_FAILING)
        except RedisError as exc:
            raise self._unreachable(exc) from None

    # -- listing --------------------------------------------------------------------------------

    async def list_keys(self, prefix: str, after: str | None, limit: int) -> list[Row]:
        """Live keys under ``prefix`` after ``after``, in order: the store's rows merged with the pending keys
        (read first: a key committed meanwhile is then in the store's later snapshot)."""
        out: list[Row] = []
        pos = after
        while len(out) < limit:
            rows, pos, more = await self._list_round(prefix, pos, limit - len(out))
            out.extend(rows)
            if not more:
                break
        return out[:limit]

    async def _list_round(self, prefix: str, pos: str | None, want: int) -> tuple[list[Row], str | None, bool]:
        low = b"[" + _b(prefix) if pos is None or pos < prefix else b"(" + _b(pos)
        high = b"(" + _b(prefix) + b"\xff"
        try:
            raw = await self.redis.zrangebylex(K_PENDING, low, high, start=0, num=want)
        except RedisError as exc:
            raise self._unreachable(exc) from None
        pending_keys = [_s(k) for k in raw]
        records, _ = await self._read(pending_keys) if pending_keys else ([], 0)
        now = self.wall()
        committed = await self.store.range(prefix, pos, want, now)
        # Both lists are complete up to the smaller of their last keys when full; beyond it, the next round.
        cut: str | None = None
        if len(pending_keys) >= want:
            cut = pending_keys[-1]
        if len(committed) >= want:
            cut = committed[-1][0] if cut is None else min(cut, committed[-1][0])
        merged: dict[str, Record | None] = {key: record for key, record in committed}
        for key, record in zip(pending_keys, records, strict=True):
            if record is not None:
                merged[key] = record  # the pending write (or a newer one) is newer than the row
        rows = [(key, merged[key]) for key in sorted(merged) if cut is None or key <= cut]
        live = [(k, r) for k, r in rows if r is not None and r.live(now)][:want]
        if len(live) >= want:
            return live, live[-1][0], True
        return live, cut, cut is not None

    # -- flushing -------------------------------------------------------------------------------

    async def flush(self) -> int:
        """Wait until every log entry pending at the call is committed (by any flusher); how many there were."""
        try:
            n = await self.redis.xlen(K_LOG)
            last = await self.redis.xrevrange(K_LOG, count=1)
        except RedisError as exc:
            raise self._unreachable(exc) from None
        if not n:
            return 0
        upto = last[0][0]
        deadline = time.monotonic() + self.config.durable_timeout_ms / 1000
        while True:
            await self._round(fail_fast=True)
            try:
                oldest = await self.redis.xrange(K_LOG, count=1)
            except RedisError as exc:
                raise self._unreachable(exc) from None
            if not oldest or _id(oldest[0][0]) > _id(upto):
                return int(n)
            if time.monotonic() >= deadline:
                raise DurableTimeout(f"The log was not committed within {self.config.durable_timeout_ms} ms; "
                                     "pending writes stay pending and will be written.")
            if not self._full:
                # Entries another flusher holds: it commits them (or dies, and they are taken over once idle).
                await asyncio.sleep(FLUSH_POLL_S)

    async def _round(self, *, fail_fast: bool = False) -> None:
        """One flusher round: take up to ``flush_batch_size`` entries, commit their keys, acknowledge them."""
        async with self._round_lock:
            await self._round_once(fail_fast)

    async def _round_once(self, fail_fast: bool) -> None:
        started = time.perf_counter()
        self._full = False
        flushed = False  # entries were taken, or the round failed: a flush for on_flush
        try:
            entries = await self._take(self.config.flush_batch_size)
            flushed = bool(entries)
            if entries:
                await self._write_entries(entries)
            await self._refresh()
        except (StorageError, Overloaded) as exc:
            flushed = True
            self.flush_errors += 1
            self.scheduler.failed()
            if self.scheduler.streak == 1:
                log.warning("flush failed (%s); the log keeps its entries, retrying with backoff from %d ms",
                            exc, self.scheduler.backoff_ms)
            await self._mark_failing()
            with contextlib.suppress(Overloaded):
                await self._refresh()  # /stats shows the failure (unless Redis is what failed)
            if fail_fast:
                raise Overloaded(f"The flush failed ({exc}); pending writes stay pending and will be retried.",
                                 retry_after_s=self.scheduler.retry_after_s()) from None
            return
        finally:
            elapsed_s = time.perf_counter() - started
            self.last_ms = elapsed_s * 1000
            if flushed and self.on_flush is not None:
                self.on_flush(elapsed_s)
        if self.scheduler.streak:
            log.info("flush recovered after %d failed attempts", self.scheduler.streak)
        self.scheduler.succeeded()

    async def _mark_failing(self) -> None:
        if self.config.writes_while_failing != "refuse":
            return
        try:
            t = await self.redis.time()
            await self.redis.set(K_FAILING, int(t[0]) * 1000 + int(t[1]) // 1000 + FAILING_MS)
        except RedisError:
            pass  # Redis is what fails: writes are refused by that already

    async def _take(self, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """This flusher's own unacknowledged entries, then a dead flusher's, then new ones."""
        try:
            return await self._take_entries(count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise self._unreachable(exc) from None
        # Redis lost its memory (a restart without persistence): the log and its group are created again, and
        # the version counter restarts above the store's mark; what was in the lost log is what Redis lost.
        log.warning("Redis at %s has no flushers' group (it lost its data): creating it again", self.where)
        try:
            await self._create_group()
        except RedisError as exc:
            raise self._unreachable(exc) from None
        await self._reserve()
        return await self._take_entries(count)

    async def _create_group(self) -> None:
        try:
            await self.redis.xgroup_create(K_LOG, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _take_entries(self, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        try:
            got: list[tuple[bytes, dict[bytes, bytes]]] = []
            own = await self.redis.xreadgroup(GROUP, self.consumer, {K_LOG: "0"}, count=count)
            got += [e for e in (own[0][1] if own else []) if e[1]]
            if len(got) < count:
                claimed = await self.redis.xautoclaim(K_LOG, GROUP, self.consumer, self.config.reclaim_idle_ms,
                                                      "0-0", count=count - len(got))
                got += [e for e in claimed[1] if e[1]]
            if len(got) < count:
                new = await self.redis.xreadgroup(GROUP, self.consumer, {K_LOG: ">"}, count=count - len(got))
                got += new[0][1] if new else []
        except ResponseError:
            raise  # NOGROUP, for _take
        except RedisError as exc:
            raise self._unreachable(exc) from None
        self._full = len(got) >= count
        return got

    async def _write_entries(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        keys = list(dict.fromkeys(_s(fields[b"k"]) for _, fields in entries))
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(self._rk(key), b"n", b"v", b"x", b"p")
                replies = await pipe.execute()
        except RedisError as exc:
            raise self._unreachable(exc) from None
        rows: list[Row] = []
        for key, fields in zip(keys, replies, strict=True):
            record = _record(fields[:3])
            if record is not None and fields[3] is not None:  # still pending: its newest write goes in
                rows.append((key, record))
        for start in range(0, len(rows), self.config.flush_batch_size):
            await self._commit_rows(rows[start:start + self.config.flush_batch_size])
        self.flush_rows += len(rows)
        self.flush_count += 1
        ids = [entry_id for entry_id, _ in entries]
        try:
            await self._ack(keys=[K_LOG], args=[GROUP, *ids])
        except RedisError as exc:
            raise self._unreachable(exc) from None

    async def _refresh(self) -> None:
        """The cluster-wide figures ``stats`` shows (as of this round), and what a stop waits for."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xlen(K_LOG)
                pipe.zcard(K_PENDING)
                pipe.get(K_BYTES)
                pipe.get(K_FAILING)
                pipe.time()
                pipe.xrange(K_LOG, count=1)
                pipe.dbsize()
                pipe.info("stats")
                log_len, dirty, dirty_bytes, failing, now, oldest, entries, info = await pipe.execute()
        except RedisError as exc:
            raise self._unreachable(exc) from None
        self._log_len = int(log_len)
        self._oldest = _id(oldest[0][0]) if oldest else None
        now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
        self._snapshot = {"dirty": int(dirty), "dirty_bytes": int(dirty_bytes or 0), "log": int(log_len),
                          "failing": failing is not None and int(failing) > now_ms,
                          "entries": int(entries), "evictions": int(info.get("evicted_keys", 0))}

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            await self.sweep()

    async def sweep(self) -> int:
        """Reclaim the store's expired rows and its tombstones no log entry can still be older than."""
        try:
            await self.store.sweep_expired(self.wall())
            oldest = await self.redis.xrange(K_LOG, count=1)
            floor = int(oldest[0][1][b"n"]) if oldest else int(await self.redis.get(K_VER) or 0) + 1
            await self.store.reclaim_tombstones(floor)
        except (StorageError, RedisError) as exc:
            log.debug("sweep failed: %s", exc)
        return 0

    async def readiness(self) -> str | None:
        """SPEC §11 ``/readyz``: Redis and the store answer and no flusher's failure refuses writes."""
        try:
            failing = await self.redis.get(K_FAILING)
            if failing is not None and self.config.writes_while_failing == "refuse":
                now = await self.redis.time()
                if int(failing) > int(now[0]) * 1000 + int(now[1]) // 1000:
                    return "The store is failing: writes are refused on every server until a flush succeeds."
        except RedisError as exc:
            return f"Redis at {self.where} does not answer ({self._why(exc)})."
        return await unanswered(self.store)

    def stats(self) -> dict[str, Any]:
        snap = self._snapshot
        failing = bool(snap["failing"]) or self.scheduler.streak > 0
        return {
            # entries: every key Redis holds (records, the log, nonces...); evictions: Redis's evicted_keys.
            "cache": {"backend": "redis", "entries": snap["entries"], "hits": self.hits, "misses": self.misses,
                      "evictions": snap["evictions"], "conflicts": self.conflicts, "dirty": snap["dirty"],
                      "dirty_bytes": snap["dirty_bytes"], "log_entries": snap["log"],
                      "max_dirty": self.config.max_dirty, "max_dirty_bytes": self.config.max_dirty_bytes},
            "flush": {"count": self.flush_count, "rows": self.flush_rows, "errors": self.flush_errors,
                      "last_ms": round(self.last_ms, 3), "failing": failing,
                      # acknowledged writes waiting for a retry after a failed flush, cluster-wide (0 when healthy)
                      "pending_retry": snap["dirty"] if failing else 0,
                      "refusing_writes": failing and self.config.writes_while_failing == "refuse",
                      "interval_ms": self.config.flush_interval_ms},
        }

    # -- nonces ---------------------------------------------------------------------------------

    def _claim_parts(self) -> tuple[NonceClaim | None, list[bytes], list[Any]]:
        """The request's unclaimed nonce (``auth.PENDING_CLAIM``) as _CLAIM's key and arguments."""
        claim = PENDING_CLAIM.get()
        if claim is None or claim.done:
            return None, [], [b"0", b"", b"", b""]
        member = f"{claim.key_id} {claim.nonce}".encode()
        if self.policy == "noeviction":
            return claim, [NONCE + member], [b"s", member, claim.ts, 2 * claim.window_s + 1]
        return claim, [K_NONCES], [b"z", member, claim.ts, int(self.wall()) - claim.window_s]

    async def claim_nonce(self, key_id: str, nonce: str, ts: int, window_s: int) -> bool:
        """Remember a nonce for every server; False when some server has seen it already."""
        member = f"{key_id} {nonce}".encode()
        try:
            if self.policy == "noeviction":
                return bool(await self.redis.set(NONCE + member, ts, nx=True, ex=2 * window_s + 1))
            horizon = int(self.wall()) - window_s
            return bool(await self._nonce_zset(keys=[K_NONCES], args=[member, ts, horizon]))
        except RedisError as exc:
            raise self._unreachable(exc) from None


def _claimed(claim: NonceClaim | None, reply: Sequence[Any]) -> None:
    """After a script that carried ``claim``: it is made, and a replay is refused (401)."""
    if claim is not None:
        claim.done = True
        if reply[0] == b"REPLAY":
            raise replayed()


def _id(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq)

