"""Exceptions: the server's OpenAI-shaped `{"error": {message, type, param, code}}` as types."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ConnectionError",
    "ContextLengthError",
    "NotFoundError",
    "ServerBusyError",
    "TillerError",
]


class TillerError(Exception):
    """An error reported by the server (or, for ConnectionError, on the way to it).

    `status` is the HTTP status (None for a transport failure, and for an error event inside a
    stream that does not say); `message`, `type`, `param` and `code` come from the error body.
    """

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else None
        detail = ", ".join(f"{k}={v}" for k, v in (("param", self.param), ("code", self.code))
                           if v is not None)
        parts = [p for p in (where, detail) if p]
        return f"{self.message} ({'; '.join(parts)})" if parts else self.message

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.message!r}, status={self.status!r}, "
                f"type={self.type!r}, param={self.param!r}, code={self.code!r})")


class BadRequestError(TillerError):
    """400: the request is invalid (`param` names the offending field when the server knows)."""


class ContextLengthError(BadRequestError):
    """400 with code context_length_exceeded: the prompt plus max_tokens do not fit the context."""


class AuthenticationError(TillerError):
    """401: missing or wrong API key."""


class NotFoundError(TillerError):
    """404: no such route (or model)."""


class ServerBusyError(TillerError):
    """503: the queue is full (code server_busy) or the model is still loading (model_loading).

    `retry_after` is the server's Retry-After in seconds, when it sent one.
    """

    def __init__(self, message: str, *, retry_after: float | None = None, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.retry_after = retry_after


class ConnectionError(TillerError):
    """The server could not be reached, timed out, or closed the connection mid-response.

    NOTE: the name shadows the builtin inside this package; it is a TillerError, not an OSError,
    so `except TillerError` catches every failure of a call.
    """


_BY_STATUS: dict[int, type[TillerError]] = {
    400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 503: ServerBusyError}
# error events inside a stream may carry no status: their type says what they are
_BY_TYPE: dict[str, type[TillerError]] = {
    "invalid_request_error": BadRequestError, "authentication_error": AuthenticationError,
    "not_found_error": NotFoundError, "unavailable_error": ServerBusyError}


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def error_from_body(body: Mapping[str, Any], status: int | None = None,
                    retry_after: float | None = None) -> TillerError:
    """The exception for an error body: `{"error": {...}}`, or the inner object itself."""
    inner = body.get("error", body)
    if not isinstance(inner, Mapping):  # {"error": "some text"}
        inner = {"message": str(inner)}
    code = inner.get("code")
    if isinstance(code, int) and not isinstance(code, bool):  # llama.cpp: code is the status
        status = status if status is not None else code
        code = None
    kind = _text(inner.get("type"))
    if status is None:
        cls = _BY_TYPE.get(kind or "", TillerError)
    else:
        cls = _BY_STATUS.get(status, TillerError)
    if code == "context_length_exceeded":
        cls = ContextLengthError
    message = _text(inner.get("message")) or f"HTTP {status} error"
    fields: dict[str, Any] = {"status": status, "type": kind, "param": _text(inner.get("param")),
                              "code": _text(code)}
    if issubclass(cls, ServerBusyError):
        return cls(message, retry_after=retry_after, **fields)
    return cls(message, **fields)


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either a number of seconds or an HTTP date."""
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


def error_from_response(response: httpx.Response) -> TillerError:
    """The exception for an HTTP error response (its body must have been read)."""
    retry_after = _retry_after(response.headers.get("Retry-After"))
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if not isinstance(body, Mapping):
        text = response.text.strip() or response.reason_phrase or "error"
        body = {"message": f"HTTP {response.status_code}: {text[:500]}"}
    return error_from_body(body, response.status_code, retry_after)


def connection_error(error: httpx.TransportError, url: object) -> ConnectionError:
    kind = "timed out" if isinstance(error, httpx.TimeoutException) else "failed"
    message = str(error) or type(error).__name__
    return ConnectionError(f"request to {url} {kind}: {message}", type="connection_error")


def stream_cut_short(url: object) -> ConnectionError:
    return ConnectionError(f"stream from {url} ended before [DONE]", type="connection_error")
