"""Scoped keys (SPEC §4) over real HTTP on real ``exercise3.py`` and ``exercise4.py`` processes: what each role
may call, and that a key id with a prefix can name no key outside it by any route — query, JSON body, form body,
each op of a batch, ``/keys?prefix=`` — with the checks in SPEC §4's order (401, 405, role 403, validation,
prefix 403, the operation). Every refused request is shown to have changed nothing.

One server per exercise serves the module; each test uses its own key names.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import pytest

from kvtornado.client import KVClient, Response, Signer
from tests.conftest import TEST_KEY_ID, TEST_SECRET, write_config, write_keys
from tests.e2e.cache_helpers import header
from tests.e2e.helpers import ServerProcess

# key id -> (secret, options on its line of the keys file)
KEYS: dict[str, tuple[bytes, str]] = {
    TEST_KEY_ID: (TEST_SECRET, ""),  # no options: admin, no prefix (the keys files of earlier versions)
    "reader": (b"r" * 40, "role=read"),
    "writer": (b"w" * 40, "role=write"),
    "admin2": (b"m" * 40, "role=admin"),
    "app": (b"p" * 40, "role=write prefix=app/"),
    "appread": (b"q" * 40, "prefix=app/ role=read"),
    "appadmin": (b"s" * 40, "prefix=app/"),
    "team": (b"t" * 40, "role=write prefix=team%20a/"),
    "uni": (b"u" * 40, "role=write prefix=%C3%A9t%C3%A9/"),  # "été/", composed (NFC)
}
ROLE_OF = {"read": "reader", "write": "writer", "admin": "admin2"}
JSON_CT = "application/json"
FORM_CT = "application/x-www-form-urlencoded"


def keys_lines() -> list[str]:
    return [f"{kid} {secret.decode()} {options}".rstrip() for kid, (secret, options) in KEYS.items()]


@dataclass(frozen=True)
class Served:
    exercise: int
    proc: ServerProcess

    @property
    def base_url(self) -> str:
        return self.proc.base_url


@pytest.fixture(scope="module", params=[3, 4], ids=["exercise3", "exercise4"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp(f"scopes{request.param}")
    write_keys(folder / "keys" / "kv.keys", keys_lines())
    with ServerProcess.start(request.param, write_config(folder)) as srv:
        srv.wait_listening()
        yield Served(request.param, srv)
        assert srv.stop() == 0, srv.lines


class As:
    """Requests signed as one key id, answered whatever their status."""

    def __init__(self, srv: Served, key_id: str) -> None:
        self.kv = KVClient(srv.base_url, Signer(key_id, KEYS[key_id][0]), timeout_s=15.0)

    def __call__(self, method: str, path: str, *, params: dict[str, Any] | None = None, body: Any = None,
                 form: dict[str, str] | None = None, raw: bytes | None = None, ct: str = JSON_CT) -> Response:
        data = b""
        if body is not None:
            data = json.dumps(body).encode()
        elif form is not None:
            data, ct = urlencode(form).encode(), FORM_CT
        elif raw is not None:
            data = raw
        return self.kv.request(method, path, params=params, body=data, content_type=ct if data else None)


@pytest.fixture
def who(server: Served) -> Iterator[dict[str, As]]:
    clients = {kid: As(server, kid) for kid in KEYS}
    yield clients
    for c in clients.values():
        c.kv.close()


def status(resp: Response) -> tuple[int, str | None]:
    doc = resp.json()
    return resp.status, doc.get("error") if isinstance(doc, dict) else None


def state(admin: As, keys: list[str]) -> dict[str, Any]:
    """What the admin key sees of ``keys``: (value, version) or None for each."""
    out = {}
    for k in keys:
        r = admin("GET", "/get", params={"key": k})
        out[k] = (r.json()["value"], r.json()["version"]) if r.status == 200 else r.status
    return out


# --- roles ---------------------------------------------------------------------------------------------------

# Each call, made on keys under its own name; "writes" says whether it would change anything.
CALLS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "authorize": ("GET", "/authorize", {}),
    "authorize-post": ("POST", "/authorize", {}),
    "get": ("GET", "/get", {"params": {"key": "{k}"}}),
    "keys": ("GET", "/keys", {"params": {"prefix": "{k}"}}),
    "batch-of-gets": ("POST", "/batch", {"body": {"ops": [{"op": "get", "key": "{k}"}]}}),
    "batch-with-a-save": ("POST", "/batch", {"body": {"ops": [{"op": "get", "key": "{k}"},
                                                              {"op": "save", "key": "{k}", "value": 2}]}}),
    "batch-with-a-delete": ("POST", "/batch", {"body": {"ops": [{"op": "delete", "key": "{k}"}]}}),
    "batch-with-an-incr": ("POST", "/batch", {"body": {"ops": [{"op": "incr", "key": "{k}"}]}}),
    "save": ("POST", "/save", {"body": {"key": "{k}", "value": 2}}),
    "save-form": ("POST", "/save", {"form": {"key": "{k}", "value": "2"}}),
    "delete": ("DELETE", "/delete", {"params": {"key": "{k}"}}),
    "delete-post": ("POST", "/delete", {"body": {"key": "{k}"}}),
    "incr": ("POST", "/incr", {"body": {"key": "{k}"}}),
    "flush": ("POST", "/flush", {}),
    "stats": ("GET", "/stats", {}),
}
WRITES = {"batch-with-a-save", "batch-with-a-delete", "batch-with-an-incr", "save", "save-form", "delete",
          "delete-post", "incr"}
ADMIN_ONLY = {"flush", "stats"}
ALLOWED = {
    "read": set(CALLS) - WRITES - ADMIN_ONLY,
    "write": set(CALLS) - ADMIN_ONLY,
    "admin": set(CALLS),
}


def fill(template: Any, k: str) -> Any:
    if isinstance(template, str):
        return template.replace("{k}", k)
    if isinstance(template, dict):
        return {name: fill(v, k) for name, v in template.items()}
    if isinstance(template, list):
        return [fill(v, k) for v in template]
    return template


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("role", ["read", "write", "admin"])
def test_each_role_may_call_exactly_its_routes(server: Served, who: dict[str, As], role: str,
                                               call: str) -> None:
    k = f"roles/{role}/{call}"
    assert who[TEST_KEY_ID]("POST", "/save", body={"key": k, "value": 1}).status == 200
    before = state(who[TEST_KEY_ID], [k])
    method, path, kwargs = CALLS[call]

    resp = who[ROLE_OF[role]](method, path, **fill(kwargs, k))

    if call in ADMIN_ONLY and server.exercise == 3:
        assert status(resp) == (404, "not_found")  # exercise 3 has no /flush or /stats for anyone
    elif call in ALLOWED[role]:
        assert resp.status == 200, resp.body
        if call in WRITES:
            assert state(who[TEST_KEY_ID], [k]) != before
    else:
        assert status(resp) == (403, "forbidden"), resp.body
        assert state(who[TEST_KEY_ID], [k]) == before  # nothing of it was applied


@pytest.mark.parametrize("key_id", list(KEYS))
def test_authorize_reports_the_role_and_the_decoded_prefix(who: dict[str, As], key_id: str) -> None:
    expected = {TEST_KEY_ID: ("admin", None), "reader": ("read", None), "writer": ("write", None),
                "admin2": ("admin", None), "app": ("write", "app/"), "appread": ("read", "app/"),
                "appadmin": ("admin", "app/"), "team": ("write", "team a/"), "uni": ("write", "été/")}
    resp = who[key_id]("GET", "/authorize")
    assert resp.status == 200
    role, prefix = expected[key_id]
    assert resp.json() == {"authorized": True, "key_id": key_id, "role": role, "prefix": prefix}


def test_a_prefixed_admin_may_flush_and_read_stats(server: Served, who: dict[str, As]) -> None:
    expected = 200 if server.exercise == 4 else 404  # exercise 3 has no /flush or /stats
    assert who["appadmin"]("POST", "/flush").status == expected
    assert who["appadmin"]("GET", "/stats").status == expected


# --- the order of the checks ------------------------------------------------------------------------------


def test_the_method_is_checked_before_the_role(who: dict[str, As]) -> None:
    resp = who["reader"]("PUT", "/save", body={"key": "order/k", "value": 1})
    assert status(resp) == (405, "method_not_allowed") and header(resp, "Allow") == "POST"


@pytest.mark.parametrize(
    ("name", "method", "path", "kwargs"),
    [
        ("invalid JSON", "POST", "/save", {"raw": b"{not json"}),
        ("unknown parameter", "POST", "/save", {"params": {"bogus": "1"}, "body": {"key": "order/k", "value": 1}}),
        ("form body on /incr (415)", "POST", "/incr", {"form": {"key": "order/k"}}),
        ("batch save without a value", "POST", "/batch", {"body": {"ops": [{"op": "save", "key": "order/k"}]}}),
        ("batch save as text/plain (415)", "POST", "/batch",
         {"raw": b'{"ops": [{"op": "save", "key": "order/k", "value": 1}]}', "ct": "text/plain"}),
        ("batch get then an unknown op", "POST", "/batch",
         {"body": {"ops": [{"op": "get", "key": "order/k"}, {"op": "frobnicate", "key": "order/k"}]}}),
        ("batch holding a non-object op", "POST", "/batch", {"body": {"ops": [{"op": "get", "key": "a"}, 7]}}),
        ("batch naming ops twice, a save in one", "POST", "/batch",
         {"raw": b'{"ops": [{"op": "save", "key": "order/k", "value": 1}], "ops": [{"op": "get", "key": "a"}]}'}),
        ("an op naming op twice", "POST", "/batch",
         {"raw": b'{"ops": [{"op": "get", "key": "order/k", "op": "save", "value": 1}]}'}),
        ("flush with a body", "POST", "/flush", {"body": {"x": 1}}),
    ],
)
def test_a_read_key_is_refused_by_role_before_its_request_is_validated(
    server: Served, who: dict[str, As], name: str, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    resp = who["reader"](method, path, **kwargs)
    if path == "/flush" and server.exercise == 3:
        assert resp.status == 404
    else:
        assert status(resp) == (403, "forbidden"), (name, resp.body)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("a get without a key", {"body": {"ops": [{"op": "get"}]}}, (400, "missing_key")),
        ("not {ops: [...]}", {"body": {"op": "get", "key": "a"}}, (400, "bad_request")),
        ("no ops", {"body": {"ops": []}}, (400, "bad_request")),
        ("not JSON", {"raw": b"[["}, (400, "invalid_json")),
        ("gets as a form", {"form": {"ops": "get"}}, (415, "unsupported_media_type")),
    ],
)
def test_a_read_keys_batch_of_gets_is_validated_as_usual(who: dict[str, As], name: str, kwargs: dict[str, Any],
                                                        expected: tuple[int, str]) -> None:
    assert status(who["reader"]("POST", "/batch", **kwargs)) == expected, name


@pytest.mark.parametrize(
    ("name", "method", "path", "kwargs", "expected"),
    [
        ("invalid JSON", "POST", "/save", {"raw": b'{"key": "elsewhere/k", '}, (400, "invalid_json")),
        ("unknown parameter", "GET", "/get", {"params": {"key": "elsewhere/k", "bogus": "1"}}, (400, "bad_request")),
        ("value over the limit", "POST", "/save", {"body": {"key": "elsewhere/k", "value": "x" * 1_048_577}},
         (413, "too_large")),
        ("bad limit on /keys", "GET", "/keys", {"params": {"prefix": "elsewhere/", "limit": "0"}},
         (400, "bad_request")),
        ("bad op later in a batch", "POST", "/batch",
         {"body": {"ops": [{"op": "save", "key": "elsewhere/k", "value": 1}, {"op": "get"}]}},
         (400, "missing_key")),
        ("an absent key outside is 403, not 404", "GET", "/get", {"params": {"key": "elsewhere/absent"}},
         (403, "forbidden")),
        ("a condition outside is 403, not 412", "DELETE", "/delete",
         {"params": {"key": "elsewhere/absent", "if_version": "5"}}, (403, "forbidden")),
        ("incr of a non-integer outside is 403, not 409", "POST", "/incr", {"body": {"key": "elsewhere/text"}},
         (403, "forbidden")),
    ],
)
def test_validation_comes_before_the_prefix_and_the_prefix_before_the_operation(
    who: dict[str, As], name: str, method: str, path: str, kwargs: dict[str, Any], expected: tuple[int, str]
) -> None:
    who[TEST_KEY_ID]("POST", "/save", body={"key": "elsewhere/text", "value": "text"})
    assert status(who["app"](method, path, **kwargs)) == expected, name


def test_a_refused_request_used_up_its_nonce(server: Served) -> None:
    kv = KVClient(server.base_url, Signer("reader", KEYS["reader"][0]))
    req = kv.build("POST", "/save", body=b'{"key": "nonce/k", "value": 1}', content_type=JSON_CT)
    kv.close()
    answers = []
    for _ in range(2):
        conn = http.client.HTTPConnection(urlsplit(server.base_url).netloc, timeout=15)
        conn.request(req.method, req.target, body=req.body, headers=dict(req.headers))
        resp = conn.getresponse()
        answers.append((resp.status, json.loads(resp.read())["error"]))
        conn.close()
    assert answers == [(403, "forbidden"), (401, "replayed_nonce")]


# --- prefixes: every way a key reaches the server -----------------------------------------------------------

# (route, how the key is sent); "{k}" is the key. Each is refused for a key outside the prefix, allowed inside.
WAYS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "get, query": ("GET", "/get", {"params": {"key": "{k}"}}),
    "save, JSON body": ("POST", "/save", {"body": {"key": "{k}", "value": 1}}),
    "save, form body": ("POST", "/save", {"form": {"key": "{k}", "value": "1"}}),
    "delete, query": ("DELETE", "/delete", {"params": {"key": "{k}"}}),
    "delete, POST query": ("POST", "/delete", {"params": {"key": "{k}"}}),
    "delete, JSON body": ("POST", "/delete", {"body": {"key": "{k}"}}),
    "delete, form body": ("POST", "/delete", {"form": {"key": "{k}"}}),
    "incr, JSON body": ("POST", "/incr", {"body": {"key": "{k}", "by": 2}}),
    "keys, prefix": ("GET", "/keys", {"params": {"prefix": "{k}"}}),
}
BATCH_OPS = {
    "get": {"op": "get", "key": "{k}"},
    "save": {"op": "save", "key": "{k}", "value": 1, "ttl": 60},
    "delete": {"op": "delete", "key": "{k}"},
    "incr": {"op": "incr", "key": "{k}"},
}


@pytest.mark.parametrize("way", list(WAYS))
def test_a_prefixed_key_can_name_no_key_outside_its_prefix(who: dict[str, As], way: str) -> None:
    tag = way.replace(", ", "-").replace(" ", "-")
    outside, inside = f"elsewhere/{tag}", f"app/{tag}"
    for k in (outside, inside):
        who[TEST_KEY_ID]("POST", "/save", body={"key": k, "value": 5})
    before = state(who[TEST_KEY_ID], [outside, inside])
    method, path, kwargs = WAYS[way]

    assert status(who["app"](method, path, **fill(kwargs, outside))) == (403, "forbidden")
    assert status(who["appread"]("GET", "/get", params={"key": outside})) == (403, "forbidden")
    assert state(who[TEST_KEY_ID], [outside, inside]) == before

    resp = who["app"](method, path, **fill(kwargs, inside))
    assert resp.status == 200, resp.body


@pytest.mark.parametrize("kind", list(BATCH_OPS))
def test_a_batch_with_one_op_outside_the_prefix_is_refused_whole_with_its_index(who: dict[str, As],
                                                                                kind: str) -> None:
    outside, inside = f"elsewhere/batch-{kind}", f"app/batch-{kind}"
    who[TEST_KEY_ID]("POST", "/save", body={"key": outside, "value": 5})
    before = state(who[TEST_KEY_ID], [outside, inside])
    ops = [{"op": "save", "key": inside, "value": "first"}, fill(BATCH_OPS[kind], outside),
           {"op": "incr", "key": inside + "-n"}]

    resp = who["app"]("POST", "/batch", body={"ops": ops})

    assert status(resp) == (403, "forbidden") and resp.json()["index"] == 1
    assert state(who[TEST_KEY_ID], [outside, inside, inside + "-n"]) == {**before, inside + "-n": 404}
    ops[1] = fill(BATCH_OPS[kind], inside + "-2")
    assert who["app"]("POST", "/batch", body={"ops": ops}).status == 200


def test_a_key_equal_to_the_prefix_is_inside_it_and_a_shorter_one_is_not(who: dict[str, As]) -> None:
    app = who["app"]
    assert app("POST", "/save", body={"key": "app/", "value": "root"}).status == 200
    assert app("GET", "/get", params={"key": "app/"}).json()["value"] == "root"
    for k in ("app", "ap", "App/", "app\\"):
        assert status(app("POST", "/save", body={"key": k, "value": 1})) == (403, "forbidden"), k
    assert status(app("GET", "/keys", params={"prefix": "ap"})) == (403, "forbidden")


def test_keys_lists_only_under_the_prefix_and_its_cursor_belongs_to_it(who: dict[str, As]) -> None:
    admin, app = who[TEST_KEY_ID], who["app"]
    for k in ("app/list/a", "app/list/b", "app/list/c", "apple/list", "zz/list"):
        admin("POST", "/save", body={"key": k, "value": 1})
    # absent and empty prefix alike mean the key id's own prefix
    for params in ({}, {"prefix": ""}):
        listed, cursor = [], None
        while True:
            page = app("GET", "/keys", params={**params, "limit": "2", **({"cursor": cursor} if cursor else {})})
            assert page.status == 200, page.body
            listed += [item["key"] for item in page.json()["keys"]]
            cursor = page.json()["cursor"]
            if cursor is None:
                break
        assert listed and all(k.startswith("app/") for k in listed)
        assert {"app/list/a", "app/list/b", "app/list/c"} <= set(listed) and "apple/list" not in listed
    first = app("GET", "/keys", params={"limit": "1"}).json()
    # the cursor names a position under app/: usable with prefix=app/ spelled out, not by a key listing everything
    assert app("GET", "/keys", params={"prefix": "app/", "limit": "1", "cursor": first["cursor"]}).status == 200
    assert status(admin("GET", "/keys", params={"cursor": first["cursor"]})) == (400, "bad_request")
    sub = app("GET", "/keys", params={"prefix": "app/list/", "values": "1"}).json()
    assert [item["key"] for item in sub["keys"]] == ["app/list/a", "app/list/b", "app/list/c"]


def test_a_percent_encoded_prefix_is_compared_decoded_with_no_normalisation(who: dict[str, As]) -> None:
    team, uni, admin = who["team"], who["uni"], who[TEST_KEY_ID]
    # the keys file says team%20a/: the prefix is "team a/", a space
    assert team("POST", "/save", body={"key": "team a/x", "value": 1}).status == 200
    assert status(team("POST", "/save", body={"key": "team%20a/x", "value": 1})) == (403, "forbidden")
    # a query is percent-decoded before it is compared, as the key is before it is stored
    resp = team.kv.request("GET", "/get", params={"key": "team a/x"})
    assert resp.status == 200 and resp.json()["key"] == "team a/x"
    assert admin("GET", "/get", params={"key": "team a/x"}).json()["value"] == 1
    assert status(team("GET", "/get", params={"key": "team%20a/x"})) == (403, "forbidden")  # sent as %2520
    listed = team("GET", "/keys", params={"prefix": "team a/"}).json()["keys"]
    assert [item["key"] for item in listed] == ["team a/x"]
    # unicode: the composed "été/" only; the decomposed spelling and other cases are other keys
    assert uni("POST", "/save", body={"key": "été/x", "value": 1}).status == 200
    for k in ("e\u0301te\u0301/x", "ÉTÉ/x", "ete/x"):
        assert status(uni("POST", "/save", body={"key": k, "value": 1})) == (403, "forbidden"), k
    assert uni("GET", "/keys", params={"prefix": quote("été/")}).status == 403  # "%C3%A9t..." sent encoded twice


# --- exercise 2 ---------------------------------------------------------------------------------------------


def test_exercise2_reads_the_options_and_authorize_shows_them(tmp_path: Path) -> None:
    write_keys(tmp_path / "keys" / "kv.keys", keys_lines())
    with ServerProcess.start(2, write_config(tmp_path)) as srv:
        srv.wait_listening()
        for key_id, role, prefix in (("appread", "read", "app/"), (TEST_KEY_ID, "admin", None)):
            with KVClient(srv.base_url, Signer(key_id, KEYS[key_id][0])) as kv:
                assert kv.authorize() == {"authorized": True, "key_id": key_id, "role": role, "prefix": prefix}
        assert srv.stop() == 0, srv.lines
