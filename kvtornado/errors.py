"""Domain errors: each carries its HTTP status and its stable error code.

Handlers raise these and never format an error themselves; the base handler's
``write_error`` renders every one as ``{"error": code, "message": message}``, plus its ``extra`` fields
(``current_version`` of a 412, ``index`` of the batch op that failed).
"""

from __future__ import annotations


class KVError(Exception):
    """Base of every error a client can be told about."""

    status = 500
    code = "internal_error"
    default_message = "The server could not complete the request."

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None) -> None:
        self.message = message or self.default_message
        self.headers: dict[str, str] = dict(headers or {})
        self.extra: dict[str, int] = {}  # more fields of the error body, after error and message
        super().__init__(self.message)

    def at(self, index: int) -> KVError:
        """This error, as the failure of batch op number ``index``."""
        self.extra["index"] = index
        return self


class InvalidJSON(KVError):
    status = 400
    code = "invalid_json"
    default_message = "The request body is not valid JSON."


class InvalidKey(KVError):
    status = 400
    code = "invalid_key"
    default_message = "The key must be a non-empty string."


class MissingKey(KVError):
    status = 400
    code = "missing_key"
    default_message = "The request has no key."


class MissingValue(KVError):
    status = 400
    code = "missing_value"
    default_message = "The request has no value."


class BadRequest(KVError):
    status = 400
    code = "bad_request"
    default_message = "The request is not understood."


class AuthError(KVError):
    """A 401; ``code`` is one of the KV-HMAC-SHA256 failure codes."""

    status = 401
    code = "unauthorized"

    def __init__(self, code: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        self.code = code
        self.headers["WWW-Authenticate"] = f'KV-HMAC-SHA256 error="{code}"'


class Forbidden(KVError):
    status = 403
    code = "forbidden"
    default_message = "This key id may not do that."


class NotFound(KVError):
    status = 404
    code = "not_found"
    default_message = "No such key."


class MethodNotAllowed(KVError):
    status = 405
    code = "method_not_allowed"
    default_message = "This method is not allowed on this path."

    def __init__(self, message: str | None = None, *, allow: list[str]) -> None:
        super().__init__(message, headers={"Allow": ", ".join(allow)})


class NotAnInteger(KVError):
    status = 409
    code = "not_an_integer"
    default_message = "The stored value is not a JSON integer, or the result would leave the safe range."


class VersionMismatch(KVError):
    status = 412
    code = "version_mismatch"
    default_message = "The key's current version is not the one the condition names."

    def __init__(self, current_version: int, wanted: int) -> None:
        super().__init__(f"if_version={wanted} does not hold: the key's current version is {current_version}"
                         + (" (it does not exist)." if current_version == 0 else "."))
        self.extra["current_version"] = current_version


class TooLarge(KVError):
    status = 413
    code = "too_large"
    default_message = "The request is too large."


class UnsupportedMediaType(KVError):
    status = 415
    code = "unsupported_media_type"
    default_message = "Send the body as application/json or application/x-www-form-urlencoded."


class Overloaded(KVError):
    status = 503
    code = "overloaded"
    default_message = "The server has too many unwritten changes; retry shortly."

    def __init__(self, message: str | None = None, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class DurableTimeout(KVError):
    status = 504
    code = "durable_timeout"
    default_message = "The write was accepted but not committed in time; it stays pending and will be written."


# The generic error of each status: what an HTTP status raised outside our code (Tornado's own ``HTTPError``)
# is answered as. A 405 is built by the handler, which knows the route's methods for ``Allow``.
_BY_STATUS: dict[int, type[KVError]] = {
    cls.status: cls for cls in (BadRequest, NotFound, TooLarge, UnsupportedMediaType, Overloaded, DurableTimeout)
}


def for_status(status: int) -> KVError:
    """The ``KVError`` to answer for a bare HTTP status: its class here, else a generic one of that status."""
    cls = _BY_STATUS.get(status)
    if cls is not None:
        return cls()
    error = BadRequest() if 400 <= status < 500 else KVError()
    error.status = status
    return error


class StorageError(Exception):
    """A sqlite operation failed (locked, disk full, I/O error); never shown to clients as is."""


class ConfigError(Exception):
    """A start-up refusal: one line that names the culprit and never contains a secret."""
