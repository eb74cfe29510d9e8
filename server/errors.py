"""API errors: one exception type, rendered as OpenAI's error body by one function."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web


class ApiError(Exception):
    """An error for the client: HTTP status and OpenAI's {message, type, param, code}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code


def error_response(error: ApiError, headers: Mapping[str, str] | None = None) -> web.Response:
    body = {"error": {"message": error.message, "type": error.type, "param": error.param,
                      "code": error.code}}
    keep = {k: v for k, v in (headers or {}).items() if k.lower() in ("allow", "retry-after")}
    return web.json_response(body, status=error.status, headers=keep)


class GenerationError(RuntimeError):
    """The engine failed on a request (a bug, logged on the engine thread): a 500."""
