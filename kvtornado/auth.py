"""``KV-HMAC-SHA256``: pre-shared keys, a MAC over the raw request, a clock window, one-time nonces.

The string to sign is nine fields joined by ``\\n``: the scheme, key id, timestamp, nonce, method,
host, raw path, raw query and the SHA-256 of the raw body. Signing the request line and body bytes
exactly as sent avoids the canonicalisation and re-serialisation pitfalls of other schemes.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import heapq
import hmac
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from kvtornado.errors import AuthError, ConfigError
from kvtornado.locks import LockHeld, lock_path, take_lock
from kvtornado.policy import ADMIN_GRANT, Grant, encode_prefix, parse_options

SCHEME = "KV-HMAC-SHA256"
EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()
KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")
SIG_RE = re.compile(r"[0-9a-f]{64}")
# A timestamp is a base-10 integer in its one canonical form (no leading zero, no "-0"): the server signs the
# number back as text, so "0170…" and "170…" must not both pass. 20 digits is far past any real clock.
TS_RE = re.compile(r"0|-?[1-9][0-9]{0,19}")
MIN_SECRET_CHARS = 32
# The canonical header, exactly as authorization_header() writes it (its classes exclude CR and LF).
_CANONICAL_HEADER = re.compile(
    r"KV-HMAC-SHA256 keyid=([A-Za-z0-9._-]{1,64}), ts=(0|-?[1-9][0-9]{0,19}), "
    r"nonce=([A-Za-z0-9_-]{16,64}), sig=([0-9a-f]{64})"
)
_PARAMS = ("keyid", "ts", "nonce", "sig")

log = logging.getLogger("kvtornado.auth")


# --- keys file -------------------------------------------------------------------------------


def _is_secret_text(s: str) -> bool:
    # printable ASCII without white space: '!' (0x21) .. '~' (0x7e)
    return all("!" <= ch <= "~" for ch in s)


@dataclass(frozen=True)
class Keys:
    """A keys file: each key id's secret (the HMAC key) and its grant (role and prefix, SPEC §4)."""

    secrets: dict[str, bytes]
    grants: dict[str, Grant]


_OPTION_RE = re.compile(r"(role|prefix)=")


def parse_keys(text: str, *, label: str) -> Keys:
    """Parse ``<key_id> <secret> [role=...] [prefix=...]`` lines; errors name the line, never the secret."""
    secrets_: dict[str, bytes] = {}
    grants: dict[str, Grant] = {}
    # Only LF ends a line and only spaces and tabs separate fields, so a stray control character can
    # neither shift the line numbers in errors nor split a secret.
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r").strip(" \t")
        if not line or line.startswith("#"):
            continue
        parts = [p for p in re.split(r"[ \t]+", line) if p]
        if len(parts) < 2:
            raise ConfigError(f"{label} line {lineno}: expected '<key_id> <secret> [role=R] [prefix=P]' "
                              "(fields separated by spaces)")
        key_id, secret = parts[:2]
        if not KEY_ID_RE.fullmatch(key_id):
            raise ConfigError(f"{label} line {lineno}: key id must match [A-Za-z0-9._-]{{1,64}}")
        # A first field as long as a secret may be one (a line missing its key id): never quoted.
        of = f" for key id {key_id!r}" if len(key_id) < MIN_SECRET_CHARS else ""
        if _OPTION_RE.match(secret) and len(secret) < MIN_SECRET_CHARS:
            raise ConfigError(f"{label} line {lineno}: the second field is an option; expected "
                              "'<key_id> <secret> [role=R] [prefix=P]' (is the key id missing?)")
        if not _is_secret_text(secret):
            raise ConfigError(f"{label} line {lineno}: secret{of} must be printable ASCII")
        if len(secret) < MIN_SECRET_CHARS:
            raise ConfigError(
                f"{label} line {lineno}: secret{of} is too short "
                f"({len(secret)} characters, need at least {MIN_SECRET_CHARS})"
            )
        if key_id in secrets_:
            raise ConfigError(f"{label} line {lineno}: duplicate key id {key_id!r}")
        grants[key_id] = parse_options(parts[2:], where=f"{label} line {lineno}")
        secrets_[key_id] = secret.encode("ascii")
    if not secrets_:
        raise ConfigError(f"{label}: no keys (add a line '<key_id> <secret>')")
    return Keys(secrets_, grants)


def create_keys_file(path: Path) -> None:
    """Create the keys file (folder 0700, file 0600) with one fresh key named ``default``."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    line = f"default {secrets.token_hex(32)}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, line.encode("ascii"))
    finally:
        os.close(fd)


def key_line(key_id: str, secret: str, grant: Grant) -> str:
    """One keys-file line, the role always written out and the prefix percent-encoded (``encode_prefix``)."""
    prefix = "" if grant.prefix is None else f" prefix={encode_prefix(grant.prefix)}"
    return f"{key_id} {secret} role={grant.role}{prefix}"


def _has_keys(text: str) -> bool:
    return any((line := raw.strip(" \t\r")) and not line.startswith("#") for raw in text.split("\n"))


def add_key(path: Path, key_id: str, grant: Grant, *, secret: str | None = None) -> tuple[str, bool]:
    """Append a key for ``key_id`` to the keys file: ``(secret, created)``, the secret fresh unless given.

    A missing file is created (folder 0700, file 0600); an existing one must pass what start-up checks (mode
    0600, every line well formed) and must not have ``key_id`` yet. The file is flocked from the read to the
    append, so two of these at once never both add one id. A running server reads the file at start-up only."""
    if not KEY_ID_RE.fullmatch(key_id):
        raise ConfigError(f"key id must match [A-Za-z0-9._-]{{1,64}}, got {key_id!r}")
    secret = secrets.token_hex(32) if secret is None else secret
    line = key_line(key_id, secret, grant)
    parse_keys(line, label="the new key")  # what is written reads back as the same key (never shows a secret)
    created = not path.exists()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open or create the keys file ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: keys file is not a regular file")
        if st.st_mode & 0o077:  # never appended to as it is: the new secret would be readable too
            raise ConfigError(f"{path}: keys file is accessible by group or others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: keys file must be ASCII text") from None
        if _has_keys(text) and key_id in parse_keys(text, label=str(path)).secrets:
            raise ConfigError(f"{path}: key id {key_id!r} is already there; choose another id "
                              "(or remove its line first)")
        lead = "\n" if text and not text.endswith("\n") else ""
        os.write(fd, (lead + line + "\n").encode("ascii"))
        os.fsync(fd)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the keys file ({exc.strerror})") from None
    finally:
        os.close(fd)
    return secret, created


def load_keys(path: Path, *, create: bool = True) -> Keys:
    """Load the keys file, creating it with one fresh key when missing (``create``)."""
    if not path.exists() and create:
        try:
            create_keys_file(path)
        except FileExistsError:
            if not path.exists():  # e.g. its folder is a file: nothing was created by anyone
                raise ConfigError(
                    f"{path}: keys file is missing and cannot be created (a parent is not a folder)"
                ) from None
            # else another process created it between our check and open: use theirs
        except OSError as exc:
            raise ConfigError(f"{path}: keys file is missing and cannot be created ({exc.strerror})") from None
        else:
            log.info("created keys file %s with one new key 'default'", path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{path}: keys file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read keys file ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: keys file is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{path}: keys file is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: keys file must be ASCII text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read keys file ({exc.strerror})") from None
    return parse_keys(text, label=str(path))


# --- signing ---------------------------------------------------------------------------------


def body_sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest() if body else EMPTY_BODY_SHA256


def string_to_sign(
    *, key_id: str, ts: int | str, nonce: str, method: str, host: str, path: str, query: str, body_hash: str
) -> str:
    """The nine fields, joined by ``\\n`` with no trailing newline."""
    return "\n".join((SCHEME, key_id, str(ts), nonce, method.upper(), host.lower(), path, query, body_hash))


def signature(secret: bytes, sts: str) -> str:
    return hmac.digest(secret, sts.encode("utf-8"), "sha256").hex()


def authorization_header(*, key_id: str, ts: int, nonce: str, sig: str) -> str:
    return f"{SCHEME} keyid={key_id}, ts={ts}, nonce={nonce}, sig={sig}"


def new_nonce() -> str:
    return secrets.token_hex(16)


def sign_request(
    secret: bytes,
    *,
    key_id: str,
    method: str,
    host: str,
    path: str,
    query: str = "",
    body: bytes = b"",
    ts: int | None = None,
    nonce: str | None = None,
) -> str:
    """Return the ``Authorization`` header value for one request."""
    ts = int(time.time()) if ts is None else ts
    nonce = new_nonce() if nonce is None else nonce
    sts = string_to_sign(
        key_id=key_id, ts=ts, nonce=nonce, method=method, host=host, path=path, query=query,
        body_hash=body_sha256(body),
    )
    return authorization_header(key_id=key_id, ts=ts, nonce=nonce, sig=signature(secret, sts))


# --- verification ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthParams:
    key_id: str
    ts: int
    nonce: str
    sig: str


def _malformed(message: str) -> AuthError:
    return AuthError("malformed_auth", message)


def parse_authorization(value: str | None) -> AuthParams:
    """Parse the header; raises ``AuthError`` ``missing_auth`` or ``malformed_auth``."""
    if value is None:
        raise AuthError("missing_auth", "This endpoint needs an Authorization: KV-HMAC-SHA256 header.")
    m = _CANONICAL_HEADER.fullmatch(value)
    if m is not None:  # the form every client of ours sends: one regex instead of the general parse
        return AuthParams(m[1], int(m[2]), m[3], m[4])
    if "\r" in value or "\n" in value:
        raise _malformed("The Authorization header must not contain CR or LF.")
    scheme, _, rest = value.strip().partition(" ")
    if scheme != SCHEME:
        raise _malformed("The Authorization scheme must be KV-HMAC-SHA256.")
    found: dict[str, str] = {}
    for part in rest.split(","):
        name, eq, val = part.strip().partition("=")
        name, val = name.strip(), val.strip()
        if not eq or name not in _PARAMS:
            raise _malformed("Authorization parameters must be keyid, ts, nonce and sig, as name=value.")
        if name in found:
            raise _malformed(f"The Authorization parameter {name} appears more than once.")
        found[name] = val
    missing = [p for p in _PARAMS if p not in found]
    if missing:
        raise _malformed(f"The Authorization header lacks {', '.join(missing)}.")
    if not KEY_ID_RE.fullmatch(found["keyid"]):
        raise _malformed("keyid must match [A-Za-z0-9._-]{1,64}.")
    if not TS_RE.fullmatch(found["ts"]):
        raise _malformed("ts must be a base-10 integer of unix seconds, without leading zeros.")
    if not NONCE_RE.fullmatch(found["nonce"]):
        raise _malformed("nonce must match [A-Za-z0-9_-]{16,64}.")
    if not SIG_RE.fullmatch(found["sig"]):
        raise _malformed("sig must be 64 lowercase hex characters.")
    return AuthParams(found["keyid"], int(found["ts"]), found["nonce"], found["sig"])


def replayed() -> AuthError:
    return AuthError("replayed_nonce", "This nonce has been used already; sign each request anew.")


@dataclass
class NonceClaim:
    """A verified request's nonce, not yet claimed in the nonce store every server shares (SPEC §10). The
    request's first step in Redis claims it in the same script (``RedisCache``), which saves a round trip;
    ``Authenticator.settle`` claims it on its own when nothing did, before any answer leaves. ``done`` once
    claimed, by either."""

    key_id: str
    nonce: str
    ts: int
    window_s: int
    done: bool = False


# The unclaimed nonce of the request being served: set by ``authenticate(defer=True)`` in the request's task
# (each request has its own: Tornado runs every handler in a task of its own), read by the cache it calls. A
# task started from there sees the same ``NonceClaim`` object, so a claim is made once whoever makes it.
PENDING_CLAIM: ContextVar[NonceClaim | None] = ContextVar("kvtornado_pending_claim", default=None)


class NonceStore:
    """Remembers ``(key_id, nonce)`` while its timestamp is inside the window, never more than ``max_entries``.

    When full it drops the entries with the oldest timestamp and raises ``floor``: a timestamp at or below
    the highest dropped one is refused from then on, so a dropped nonce can never be replayed.
    Entries are grouped by timestamp, so expiry and dropping remove whole seconds at a time, and each entry
    costs one string and one dict slot.
    """

    def __init__(self, *, max_entries: int, max_skew_s: int) -> None:
        self.max_entries = max_entries
        self.max_skew_s = max_skew_s
        self.floor: int | None = None
        self._seen: dict[str, int] = {}  # "key_id nonce" -> ts (key ids and nonces hold no space)
        self._by_ts: dict[int, list[str]] = {}
        self._ts_heap: list[int] = []  # the distinct timestamps in _by_ts, oldest first

    def __len__(self) -> int:
        return len(self._seen)

    def entries(self) -> list[tuple[int, str, str]]:
        """Every remembered ``(ts, key_id, nonce)``."""
        out = []
        for entry, ts in self._seen.items():
            key_id, nonce = entry.split(" ", 1)
            out.append((ts, key_id, nonce))
        return out

    def below_floor(self, ts: int) -> bool:
        return self.floor is not None and ts <= self.floor

    def seen(self, key_id: str, nonce: str) -> bool:
        return f"{key_id} {nonce}" in self._seen

    def _drop_oldest_second(self) -> int:
        ts = heapq.heappop(self._ts_heap)
        for entry in self._by_ts.pop(ts):
            del self._seen[entry]
        return ts

    def add(self, key_id: str, nonce: str, ts: int, now: float) -> None:
        """Remember a nonce; the caller has checked ``seen`` and the window."""
        # Entries whose timestamp has left the window can go: such a timestamp is refused as stale anyway.
        horizon = now - self.max_skew_s
        while self._ts_heap and self._ts_heap[0] < horizon:
            self._drop_oldest_second()
        if len(self._seen) >= self.max_entries:
            dropped = self._drop_oldest_second()
            self.floor = dropped if self.floor is None else max(self.floor, dropped)
            if ts <= dropped:
                return  # its own second was just dropped: the floor now refuses this timestamp anyway
        entry = f"{key_id} {nonce}"
        self._seen[entry] = ts
        bucket = self._by_ts.get(ts)
        if bucket is None:
            self._by_ts[ts] = [entry]
            heapq.heappush(self._ts_heap, ts)
        else:
            bucket.append(entry)


Entry = tuple[int, str, str]  # (ts, key_id, nonce)


class NonceJournal:
    """The nonce store across restarts (SPEC §4), in one file beside the keys file.

    - A graceful stop writes every nonce still inside the window, then a last line ``clean``; the next start
      loads them all, so a request accepted before the stop is refused as ``replayed_nonce`` after it.
    - After a ``kill -9`` there is no ``clean`` line, so the next start refuses every request dated at or
      before its start-up second (``stale_timestamp``, with ``X-KV-Server-Time``: the client signs anew).
      That leaves the requests dated later than that second, which only a client whose clock runs ahead
      sends: their nonces are appended here (fsync'd, on a thread of its own) before they are served, and
      loaded at start-up. So no request is ever accepted twice, after either kind of stop.
    A torn last line (a crash mid-append) is skipped. An entry dated at or before the current second is never
    needed again after a crash (any later start-up's floor covers it), so compaction drops those. One process
    a journal: ``open`` takes an exclusive ``flock`` on ``<path>.lock`` first (the kernel drops it at exit).
    """

    COMPACT_EVERY = 10_000  # appends between rewrites that drop the entries a floor would cover
    CLEAN = "clean"

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._ahead: list[Entry] = []  # the appended entries a start after a crash may still need
        self._appends = 0
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-nonce-journal")
        self.was_clean: bool | None = None  # what ``open`` found: the earlier process stopped cleanly

    def _take_lock(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = take_lock(self.path)
        except LockHeld:
            raise ConfigError(f"{self.path}: another server is using this nonce journal (it holds "
                              f"{lock_path(self.path).name}); stop it first") from None
        except OSError as exc:
            raise ConfigError(f"{lock_path(self.path)}: cannot open the nonce journal's lock file "
                              f"({exc.strerror})") from None

    def open(self) -> tuple[list[Entry], bool]:
        """Read what an earlier process left: ``(entries, clean)``; then start the file anew for this one.
        Runs before serving (start-up, not on the event loop)."""
        self._take_lock()
        try:
            text = self.path.read_text(encoding="ascii", errors="replace")
        except FileNotFoundError:
            text = self.CLEAN  # a first start: no earlier process accepted anything here
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read the nonce journal ({exc.strerror})") from None
        lines = [line for line in text.split("\n") if line]
        clean = bool(lines) and lines[-1] == self.CLEAN
        self.was_clean = clean
        entries: list[Entry] = []
        for line in lines:
            parts = line.split(" ")
            if (len(parts) == 3 and TS_RE.fullmatch(parts[0]) and KEY_ID_RE.fullmatch(parts[1])
                    and NONCE_RE.fullmatch(parts[2])):
                entries.append((int(parts[0]), parts[1], parts[2]))
        now_s = int(self.clock())
        self._ahead = [e for e in entries if e[0] > now_s]
        try:
            self._rewrite(self._ahead, clean=False)
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot write the nonce journal ({exc.strerror})") from None
        return entries, clean

    def _rewrite(self, entries: list[Entry], *, clean: bool) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        text = "".join(f"{ts} {k} {n}\n" for ts, k, n in entries) + (self.CLEAN + "\n" if clean else "")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not clean:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def _append(self, entry: Entry) -> None:
        self._ahead.append(entry)
        self._appends += 1
        if self._appends >= self.COMPACT_EVERY:
            now_s = int(self.clock())
            self._ahead = [e for e in self._ahead if e[0] > now_s]
            self._appends = 0
            self._rewrite(self._ahead, clean=False)
            return
        assert self._fd is not None
        os.write(self._fd, "{} {} {}\n".format(*entry).encode("ascii"))
        os.fsync(self._fd)

    async def record(self, key_id: str, nonce: str, ts: int) -> None:
        """Append one entry and fsync, off the event loop; ``OSError`` when the disk refuses."""
        await asyncio.get_running_loop().run_in_executor(self._io, self._append, (ts, key_id, nonce))

    def close(self, entries: list[Entry] | None = None) -> None:
        """Stop; with ``entries`` (a graceful stop: every nonce still in the window), write them and ``clean``."""
        self._io.shutdown(wait=True)
        try:
            if entries is not None:
                self._rewrite(entries, clean=True)
        finally:
            for attr in ("_fd", "_lock_fd"):
                fd = getattr(self, attr)
                if fd is not None:
                    os.close(fd)
                    setattr(self, attr, None)


class Authenticator:
    """Verifies ``KV-HMAC-SHA256`` requests in the order of SPEC §4; the clock is injectable.

    ``started_s`` (the start-up second after an unclean stop) refuses every request dated at or before it as
    ``stale_timestamp``: whatever was accepted before a ``kill -9`` cannot be replayed after it. ``journal``
    keeps the nonces of requests dated later than the current second (see ``NonceJournal``); ``authenticate``
    records them there before the request is served.
    """

    def __init__(
        self,
        keys: dict[str, bytes],
        *,
        grants: dict[str, Grant] | None = None,
        max_skew_s: int = 300,
        max_nonces: int = 1_000_000,
        public_host: str | None = None,
        clock: Callable[[], float] = time.time,
        started_s: int | None = None,
        journal: NonceJournal | None = None,
    ) -> None:
        self.keys = dict(keys)
        self.grants = dict(grants or {})  # a key id without one is an admin with no prefix (SPEC §4)
        self.max_skew_s = max_skew_s
        self.public_host = public_host.lower() if public_host else None
        self.clock = clock
        self.started_s = started_s
        self.journal = journal
        # SPEC §10: with the Redis cache, nonces are claimed in Redis (``RedisCache.claim_nonce``), so a request
        # accepted by one server is refused by every other; the local store and journal are then unused.
        self.shared_nonces: Callable[[str, str, int, int], Awaitable[bool]] | None = None
        self.nonces = NonceStore(max_entries=max_nonces, max_skew_s=max_skew_s)

    def restore(self, entries: list[Entry], *, clean: bool) -> None:
        """Take in what the journal kept from before a restart; after an unclean stop, refuse from now on every
        request dated at or before the current second."""
        if not clean:
            self.started_s = int(self.clock())
        self.remember(entries)

    def remember(self, entries: list[Entry]) -> None:
        """Take in ``(ts, key_id, nonce)`` entries (those outside the window are dropped as they come)."""
        now = self.clock()
        for ts, key_id, nonce in entries:
            if abs(now - ts) <= self.max_skew_s and not self.nonces.seen(key_id, nonce):
                self.nonces.add(key_id, nonce, ts, now)

    def grant(self, key_id: str) -> Grant:
        """What an authenticated key id may do."""
        return self.grants.get(key_id, ADMIN_GRANT)

    async def authenticate(
        self, *, authorization: str | None, method: str, host: str, path: str, query: str, body: bytes,
        defer: bool = False,
    ) -> str:
        """``verify``, and for a request dated ahead of the current second, its nonce on disk before the answer
        (``AuthError``s as ``verify``; ``OSError`` when the journal cannot be written: the request is refused).
        With shared nonces and ``defer``, the nonce is left in ``PENDING_CLAIM``: the caller must ``settle``
        before it answers anything."""
        params = self._verify(authorization=authorization, method=method, host=host, path=path, query=query,
                              body=body, now=None)
        if self.shared_nonces is not None:
            if defer:
                PENDING_CLAIM.set(NonceClaim(params.key_id, params.nonce, params.ts, self.max_skew_s))
            elif not await self.shared_nonces(params.key_id, params.nonce, params.ts, self.max_skew_s):
                raise replayed()
            return params.key_id
        if self.journal is not None and params.ts > int(self.clock()):
            await self.journal.record(params.key_id, params.nonce, params.ts)
        return params.key_id

    async def settle(self) -> None:
        """Claim the request's deferred nonce if nothing claimed it yet: ``replayed_nonce`` when some server
        has seen it."""
        claim = PENDING_CLAIM.get()
        if claim is None or claim.done:
            return
        claim.done = True
        assert self.shared_nonces is not None  # only authenticate(defer=True) with shared nonces sets one
        if not await self.shared_nonces(claim.key_id, claim.nonce, claim.ts, claim.window_s):
            raise replayed()

    def verify(
        self,
        *,
        authorization: str | None,
        method: str,
        host: str,
        path: str,
        query: str,
        body: bytes,
        now: float | None = None,
    ) -> str:
        """Return the key id of a valid request, or raise ``AuthError`` with its SPEC §4 code."""
        if self.shared_nonces is not None:
            raise RuntimeError("nonces are claimed in Redis: use authenticate()")
        return self._verify(authorization=authorization, method=method, host=host, path=path, query=query,
                            body=body, now=now).key_id

    def _verify(
        self, *, authorization: str | None, method: str, host: str, path: str, query: str, body: bytes,
        now: float | None,
    ) -> AuthParams:
        params = parse_authorization(authorization)
        secret = self.keys.get(params.key_id)
        if secret is None:
            raise AuthError("unknown_key", "The key id is not known to this server.")
        sts = string_to_sign(
            key_id=params.key_id, ts=params.ts, nonce=params.nonce, method=method,
            host=self.public_host or host, path=path, query=query, body_hash=body_sha256(body),
        )
        if not hmac.compare_digest(signature(secret, sts), params.sig):
            raise AuthError("bad_signature", "The signature does not match the request.")
        now = self.clock() if now is None else now
        if abs(now - params.ts) > self.max_skew_s:
            raise AuthError(
                "stale_timestamp",
                f"The timestamp is outside the accepted window of {self.max_skew_s} s; see X-KV-Server-Time.",
                headers={"X-KV-Server-Time": str(int(now))},
            )
        if self.started_s is not None and params.ts <= self.started_s:
            raise AuthError(
                "stale_timestamp",
                "The server restarted after this request was signed; sign it anew (see X-KV-Server-Time).",
                headers={"X-KV-Server-Time": str(int(now))},
            )
        if self.shared_nonces is not None:
            return params  # ``authenticate`` claims the nonce in Redis
        if self.nonces.below_floor(params.ts):
            raise AuthError(
                "stale_timestamp",
                "The timestamp is too old for the replay protection (the nonce store is full); sign anew.",
                headers={"X-KV-Server-Time": str(int(now))},
            )
        if self.nonces.seen(params.key_id, params.nonce):
            raise replayed()
        self.nonces.add(params.key_id, params.nonce, params.ts, now)
        return params
