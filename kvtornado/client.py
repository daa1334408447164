"""A signing client: a Python API (blocking and Tornado-async) and a command line.

    python -m kvtornado.client [--config config.yaml] save KEY VALUE [--json] [--durable]
    python -m kvtornado.client get KEY | delete KEY | authorize | ping | flush | stats

The command line reads the same config and keys file as the server, so nobody signs by hand.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from kvtornado.auth import new_nonce, sign_request

JSON = "application/json"


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class KVClientError(Exception):
    """A non-2xx answer: ``status``, ``code`` (the server's error code) and ``message``."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


@dataclass
class Signer:
    """Signs requests for one key; clock and nonce source are injectable."""

    key_id: str
    secret: bytes = field(repr=False)  # never shown in a repr, a log or a traceback
    clock: Callable[[], float] = time.time
    nonce: Callable[[], str] = new_nonce

    def authorization(self, method: str, host: str, path: str, query: str, body: bytes) -> str:
        return sign_request(
            self.secret, key_id=self.key_id, method=method, host=host, path=path, query=query, body=body,
            ts=int(self.clock()), nonce=self.nonce(),
        )


def encode_query(params: Mapping[str, Any] | None) -> str:
    """``key=...`` with ``%20`` for spaces: the exact text that is both sent and signed."""
    return urlencode({k: str(v) for k, v in (params or {}).items()}, quote_via=quote) if params else ""


def _check(resp: Response) -> Any:
    doc: Any = None
    try:
        doc = resp.json()
    except ValueError:
        pass
    if 200 <= resp.status < 300:
        return doc
    if isinstance(doc, dict) and "error" in doc:
        raise KVClientError(resp.status, str(doc["error"]), str(doc.get("message", "")), resp.headers)
    raise KVClientError(resp.status, "http_error", resp.body[:200].decode("utf-8", "replace"), resp.headers)


class _Api:
    """The endpoint methods, on top of a ``call`` that subclasses make blocking or async."""

    def _save_args(self, key: str, value: Any, durable: bool) -> tuple[str, str, dict[str, Any], bytes]:
        body = json.dumps({"key": key, "value": value}, ensure_ascii=False, separators=(",", ":")).encode()
        return "POST", "/save", {"durable": 1} if durable else {}, body


class KVClient(_Api):
    """Blocking client over one keep-alive ``http.client`` connection."""

    def __init__(self, base_url: str, signer: Signer | None, *, timeout_s: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host_header = parts.netloc
        self.signer = signer
        conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._conn = conn_cls(parts.hostname, parts.port, timeout=timeout_s)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> KVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, *, params: Mapping[str, Any] | None = None, body: bytes = b"",
        content_type: str | None = None, headers: Mapping[str, str] | None = None, sign: bool = True,
    ) -> Response:
        query = encode_query(params)
        hdrs = {"Host": self.host_header}
        if body or method in ("POST", "PUT", "PATCH"):
            hdrs["Content-Type"] = content_type or JSON
        hdrs.update(headers or {})
        target = path + ("?" + query if query else "")
        for attempt in (1, 2):
            if sign and self.signer is not None and not (headers and "Authorization" in headers):
                # Signed afresh on every attempt: a retry with the same nonce would be refused as a replay.
                hdrs["Authorization"] = self.signer.authorization(method, self.host_header, path, query, body)
            try:
                self._conn.request(method, target, body=body or None, headers=hdrs)
                r = self._conn.getresponse()
                return Response(r.status, {k: v for k, v in r.getheaders()}, r.read())
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # The server closed an idle keep-alive connection; one fresh try (the request was not seen).
                self._conn.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def ping(self) -> Any:
        return _check(self.request("GET", "/ping", sign=False))

    def authorize(self) -> Any:
        return _check(self.request("GET", "/authorize"))

    def save(self, key: str, value: Any, *, durable: bool = False) -> Any:
        method, path, params, body = self._save_args(key, value, durable)
        return _check(self.request(method, path, params=params, body=body))

    def get(self, key: str) -> Any:
        return _check(self.request("GET", "/get", params={"key": key}))["value"]

    def delete(self, key: str, *, durable: bool = False) -> Any:
        params: dict[str, Any] = {"key": key, **({"durable": 1} if durable else {})}
        return _check(self.request("DELETE", "/delete", params=params))

    def flush(self) -> Any:
        return _check(self.request("POST", "/flush"))

    def stats(self) -> Any:
        return _check(self.request("GET", "/stats"))


class AsyncKVClient(_Api):
    """Tornado ``AsyncHTTPClient`` flavour, for code already on an event loop (tests, bench)."""

    def __init__(self, base_url: str, signer: Signer | None, *, timeout_s: float = 30.0) -> None:
        from tornado.httpclient import AsyncHTTPClient

        parts = urlsplit(base_url)
        self.base_url = base_url.rstrip("/")
        self.host_header = parts.netloc
        self.signer = signer
        self.timeout_s = timeout_s
        self._http = AsyncHTTPClient()

    async def request(
        self, method: str, path: str, *, params: Mapping[str, Any] | None = None, body: bytes = b"",
        content_type: str | None = None, headers: Mapping[str, str] | None = None, sign: bool = True,
    ) -> Response:
        query = encode_query(params)
        hdrs = {"Host": self.host_header}
        if body or method in ("POST", "PUT", "PATCH"):
            hdrs["Content-Type"] = content_type or JSON
        if sign and self.signer is not None:
            hdrs["Authorization"] = self.signer.authorization(method, self.host_header, path, query, body)
        hdrs.update(headers or {})
        url = self.base_url + path + ("?" + query if query else "")
        r = await self._http.fetch(
            url, method=method, headers=hdrs, body=body if method in ("POST", "PUT", "PATCH") else None,
            allow_nonstandard_methods=True, raise_error=False, request_timeout=self.timeout_s,
        )
        return Response(r.code, dict(r.headers.get_all()), r.body or b"")

    async def ping(self) -> Any:
        return _check(await self.request("GET", "/ping", sign=False))

    async def authorize(self) -> Any:
        return _check(await self.request("GET", "/authorize"))

    async def save(self, key: str, value: Any, *, durable: bool = False) -> Any:
        method, path, params, body = self._save_args(key, value, durable)
        return _check(await self.request(method, path, params=params, body=body))

    async def get(self, key: str) -> Any:
        return _check(await self.request("GET", "/get", params={"key": key}))["value"]

    async def delete(self, key: str, *, durable: bool = False) -> Any:
        params: dict[str, Any] = {"key": key, **({"durable": 1} if durable else {})}
        return _check(await self.request("DELETE", "/delete", params=params))

    async def flush(self) -> Any:
        return _check(await self.request("POST", "/flush"))

    async def stats(self) -> Any:
        return _check(await self.request("GET", "/stats"))


# --- command line --------------------------------------------------------------------------------


def _default_config() -> Path:
    return Path(__file__).resolve().parent.parent / "config.yaml"


def cli(argv: list[str] | None = None) -> int:
    from kvtornado.auth import load_keys
    from kvtornado.config import load_config
    from kvtornado.errors import ConfigError

    p = argparse.ArgumentParser(prog="python -m kvtornado.client", description="Signed requests to kvtornado.")
    p.add_argument("--config", type=Path, default=_default_config(), help="config file (default: %(default)s)")
    p.add_argument("--url", help="server URL (default: from the config's server.host and server.port)")
    p.add_argument("--key-id", help="key id to sign with (default: the first in the keys file)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save", help="save KEY VALUE (VALUE is a string unless --json)")
    s.add_argument("key")
    s.add_argument("value")
    s.add_argument("--json", action="store_true", help="parse VALUE as JSON")
    s.add_argument("--durable", action="store_true", help="answer only once committed to sqlite")
    g = sub.add_parser("get", help="print the value of KEY as JSON")
    g.add_argument("key")
    d = sub.add_parser("delete", help="delete KEY")
    d.add_argument("key")
    d.add_argument("--durable", action="store_true")
    for name in ("authorize", "ping", "flush", "stats"):
        sub.add_parser(name)
    args = p.parse_args(argv)

    try:
        cfg = load_config(args.config)
        keys = load_keys(cfg.auth.secret_file, create=False)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    key_id = args.key_id or next(iter(keys))
    if key_id not in keys:
        print(f"error: key id {key_id!r} is not in {cfg.auth.secret_file}", file=sys.stderr)
        return 2
    # A server bound to every interface is reached on loopback.
    host = cfg.server.host if cfg.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"  # noqa: S104
    url = args.url or f"http://{host}:{cfg.server.port}"
    try:
        with KVClient(url, Signer(key_id, keys[key_id])) as c:
            if args.command == "save":
                value = json.loads(args.value) if args.json else args.value
                out = c.save(args.key, value, durable=args.durable)
            elif args.command == "get":
                out = c.get(args.key)
            elif args.command == "delete":
                out = c.delete(args.key, durable=args.durable)
            else:
                out = getattr(c, args.command)()
    except KVClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
