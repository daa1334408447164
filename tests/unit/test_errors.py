"""errors.py: every class's status and code, and the table a bare HTTP status is answered from."""

from __future__ import annotations

import pytest

from kvtornado import errors


@pytest.mark.parametrize(("status", "cls"), [
    (400, errors.BadRequest), (404, errors.NotFound), (413, errors.TooLarge),
    (415, errors.UnsupportedMediaType), (503, errors.Overloaded), (504, errors.DurableTimeout),
])
def test_a_known_status_is_answered_with_its_generic_class(status: int, cls: type[errors.KVError]) -> None:
    error = errors.for_status(status)
    assert type(error) is cls
    assert (error.status, error.message) == (status, cls.default_message)


@pytest.mark.parametrize(("status", "code"), [(411, "bad_request"), (431, "bad_request"), (502, "internal_error")])
def test_an_unknown_status_keeps_its_number_with_a_generic_code(status: int, code: str) -> None:
    error = errors.for_status(status)
    assert (error.status, error.code) == (status, code)
    assert errors.KVError.status == 500 and errors.BadRequest.status == 400  # the classes are left alone


def test_every_error_class_has_a_distinct_code_and_a_client_status() -> None:
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.KVError) and c is not errors.KVError]
    codes = [c.code for c in classes if c is not errors.AuthError]
    assert len(codes) == len(set(codes))
    assert all(400 <= c.status < 600 for c in classes)


def test_overloaded_carries_retry_after_of_at_least_one_second() -> None:
    assert errors.Overloaded(retry_after_s=0).headers == {"Retry-After": "1"}
    assert errors.Overloaded(retry_after_s=7).headers == {"Retry-After": "7"}


def test_method_not_allowed_names_the_allowed_methods() -> None:
    assert errors.MethodNotAllowed(allow=["GET", "HEAD"]).headers == {"Allow": "GET, HEAD"}


def test_an_auth_error_carries_its_code_in_www_authenticate() -> None:
    error = errors.AuthError("bad_signature", "The signature does not match.")
    assert (error.status, error.code, error.message) == (401, "bad_signature", "The signature does not match.")
    assert error.headers == {"WWW-Authenticate": 'KV-HMAC-SHA256 error="bad_signature"'}
