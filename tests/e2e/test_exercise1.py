"""Exercise 1 over real HTTP: ``GET /ping`` and the JSON answers for everything else."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from tornado.web import Application

from kvtornado.app import make_app
from kvtornado.config import Config, ServerConfig
from tests.e2e.helpers import (
    FRAMING_ERRORS,
    RawConnection,
    assert_error,
    assert_json,
    fetch,
    host_of,
    pipelined_behind_framing_error,
    raw_head,
    send,
    serving,
)


@pytest.fixture
def app(config: Config) -> Application:
    return make_app(config)


@pytest.mark.gen_test
async def test_ping_answers_pong(http_client: Any, base_url: str) -> None:
    resp = await send(http_client, base_url, "GET", "/ping")
    assert assert_json(resp, 200) == {"ping": "pong"}
    assert resp.header("Cache-Control") == "no-store"


@pytest.mark.parametrize("query", ["x=1", "x=1&y", "key=a"])
@pytest.mark.gen_test
async def test_ping_takes_no_query_parameters(http_client: Any, base_url: str, query: str) -> None:
    resp = await send(http_client, base_url, "GET", "/ping", query=query)
    assert_error(resp, 400, "bad_request")


@pytest.mark.gen_test
async def test_ping_keeps_the_connection_alive(http_server: Any, http_port: int) -> None:
    head = raw_head("GET", "/ping", {"Host": f"127.0.0.1:{http_port}"})
    async with RawConnection(http_port) as conn:
        for _ in range(3):  # three requests, one connection
            await conn.send(head)
            assert assert_json(await conn.read_reply(), 200) == {"ping": "pong"}


@pytest.mark.gen_test
async def test_ping_with_a_huge_content_length_is_413_before_the_body(http_server: Any, http_port: int) -> None:
    head = raw_head("GET", "/ping", {"Host": f"127.0.0.1:{http_port}", "Content-Length": str(10**12)})
    async with RawConnection(http_port) as conn:
        await conn.send(head)
        assert_error(await conn.read_reply(), 413, "too_large")
        assert await conn.closed_by_server()


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.gen_test
async def test_wrong_method_on_ping_is_405_json(http_client: Any, base_url: str, method: str) -> None:
    resp = await send(http_client, base_url, method, "/ping", body=b"{}" if method != "DELETE" else b"",
                      content_type="application/json")
    assert_error(resp, 405, "method_not_allowed")
    assert resp.header("Allow") == "GET, HEAD"


@pytest.mark.gen_test
async def test_head_on_ping_is_200_without_a_body(http_server: Any, http_port: int) -> None:
    async with RawConnection(http_port) as conn:
        await conn.send(raw_head("HEAD", "/ping", {"Host": f"127.0.0.1:{http_port}"}))
        resp = await conn.read_reply(to_head=True)
        assert resp.status == 200
        # The connection stays usable: had a body been sent, it would be read as the next answer's head.
        await conn.send(raw_head("GET", "/ping", {"Host": f"127.0.0.1:{http_port}"}))
        assert assert_json(await conn.read_reply(), 200) == {"ping": "pong"}


@pytest.mark.gen_test
@pytest.mark.parametrize("method", ["PROPFIND", "TRACE", "CONNECT"])
async def test_a_method_tornado_does_not_know_is_405_json(
    http_client: Any, base_url: str, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    resp = await fetch(http_client, base_url, method, "/ping", {"Host": host_of(base_url)}, b"")
    assert_error(resp, 405, "method_not_allowed")
    assert resp.header("Allow") == "GET, HEAD"
    # A client's choice, not a failure of the server: the access line at INFO, no error, no traceback.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.text


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", ["/nowhere", "/ping/", "/PING", "/authorize", "/save", "/get", "/a/b/c", "/%ff"])
@pytest.mark.gen_test
async def test_unknown_route_is_404_json(http_client: Any, base_url: str, method: str, path: str) -> None:
    # Exercise 1 has no /authorize or data routes: they are unknown here, whatever the method.
    body = b"{}" if method in ("POST", "PUT", "PATCH") else b""
    resp = await send(http_client, base_url, method, path, body=body, content_type="application/json")
    assert_error(resp, 404, "not_found")


@pytest.mark.parametrize("framing", list(FRAMING_ERRORS.values()), ids=list(FRAMING_ERRORS))
@pytest.mark.gen_test
async def test_nothing_behind_a_framing_error_is_answered(http_server: Any, http_port: int, framing: str) -> None:
    hidden = raw_head("GET", "/ping", {"Host": f"127.0.0.1:{http_port}"})
    replies = await pipelined_behind_framing_error(http_port, framing, hidden)
    assert [r.status for r in replies] == [400], replies
    assert_error(replies[0], 400, "bad_request")


async def _ping_on(conn: RawConnection, port: int) -> None:
    await conn.send(raw_head("GET", "/ping", {"Host": f"127.0.0.1:{port}"}))
    assert assert_json(await conn.read_reply(), 200) == {"ping": "pong"}


@pytest.mark.gen_test
async def test_past_max_connections_a_new_connection_gets_503_and_is_closed(config: Config) -> None:
    async with serving(make_app(config), ServerConfig(max_connections=2)) as url:
        port = int(url.rsplit(":", 1)[1])
        async with RawConnection(port) as first, RawConnection(port) as second:
            await _ping_on(first, port)
            await _ping_on(second, port)
            async with RawConnection(port) as third:
                await third.send(raw_head("GET", "/ping", {"Host": f"127.0.0.1:{port}"}))
                resp = await third.read_reply()
                assert_error(resp, 503, "overloaded")
                assert resp.header("Retry-After") == "1"
                assert resp.header("Connection") == "close"
                assert await third.closed_by_server()
            await _ping_on(first, port)  # the connections under the cap are untouched
        # Both closed: their slots are free again once the server has seen them go.
        deadline = asyncio.get_running_loop().time() + 4
        while True:
            async with RawConnection(port) as conn:
                await conn.send(raw_head("GET", "/ping", {"Host": f"127.0.0.1:{port}"}))
                if (await conn.read_reply()).status == 200:
                    break
            assert asyncio.get_running_loop().time() < deadline, "the closed connections were never released"


@pytest.mark.gen_test
async def test_an_idle_connection_is_closed_after_idle_timeout_s(config: Config) -> None:
    async with serving(make_app(config), ServerConfig(idle_timeout_s=1)) as url:
        port = int(url.rsplit(":", 1)[1])
        async with RawConnection(port) as silent:  # never sends a byte
            assert await silent.closed_by_server()
        async with RawConnection(port) as kept_alive:  # idle after one answer
            await _ping_on(kept_alive, port)
            assert await kept_alive.closed_by_server()
        async with RawConnection(port) as slow_headers:  # headers that never end
            await slow_headers.send(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
            assert await slow_headers.closed_by_server()


@pytest.mark.gen_test
async def test_a_body_slower_than_body_timeout_s_is_dropped(config: Config) -> None:
    async with serving(make_app(config), ServerConfig(body_timeout_s=1, idle_timeout_s=60)) as url:
        port = int(url.rsplit(":", 1)[1])
        async with RawConnection(port) as conn:
            await conn.send(raw_head("POST", "/ping", {"Host": f"127.0.0.1:{port}", "Content-Length": "10"}), b"abc")
            assert await conn.closed_by_server()
