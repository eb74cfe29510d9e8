"""HTTP plumbing every route uses: reading JSON bodies, server-sent events, and the middlewares
that turn failures into OpenAI-shaped errors (the one place errors are mapped), check API keys
and write the access log."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from pydantic import ValidationError

from .errors import ApiError, GenerationError, error_response
from .runner import QueueFull
from .state import STATE, TOKENS

log = logging.getLogger("tiller.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

async def read_json(request: web.Request) -> dict:
    try:
        body = await request.json(loads=json.loads)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e.msg} at position {e.pos}") from e
    except UnicodeDecodeError as e:
        raise ApiError(400, "request body is not valid UTF-8") from e
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


class SSE:
    """A server-sent events response: `data: <json>` lines, flushed as they are written."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.started = False
        self.failed = False
        self.response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass events through unbuffered
        })

    async def start(self) -> None:
        await self.response.prepare(self.request)
        self.started = True

    async def send(self, data: dict | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        await self.response.write(f"data: {text}\n\n".encode())

    async def close(self) -> web.StreamResponse:
        await self.response.write_eof()
        return self.response

    async def fail(self, error: ApiError) -> web.StreamResponse:
        """After the stream has started an error can only be an event: OpenAI's clients raise
        on a `data: {"error": ...}` event, and so does tiller_client."""
        self.failed = True
        await self.send({"error": {"message": error.message, "type": error.type,
                                   "param": error.param, "code": error.code}})
        return await self.close()


# middlewares --------------------------------------------------------------------------------

_ESCAPES = {"\\": "\\\\", "\r": "\\r", "\n": "\\n", "\t": "\\t"}


def printable(text: str) -> str:
    """Request-derived text for a log line, with control and other non-printing characters
    (CR, LF, NUL, ESC, line separators, bidi overrides) as visible escapes, so that a request
    cannot forge log lines or hide part of its own; backslashes are doubled, so that an escape
    cannot be forged either. A path carries them percent-encoded: request.path is decoded."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes an OpenAI-shaped JSON error; the mapping lives here only."""
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e)
    except ValidationError as e:
        first = e.errors()[0]
        path = [str(p) for p in first["loc"] if not _is_type_tag(p)]
        param = path[0] if path else None
        message = first["msg"].removeprefix("Value error, ")
        if path and not message.startswith(path[0]):
            message = f"{'.'.join(path)}: {message}"
        return error_response(ApiError(400, message, param=param))
    except QueueFull as e:
        response = error_response(ApiError(503, f"server busy: {e}", "unavailable_error",
                                           code="server_busy"))
        response.headers["Retry-After"] = "1"
        return response
    except GenerationError as e:
        return error_response(ApiError(500, str(e), "server_error"))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = {401: "authentication_error", 404: "not_found_error"}.get(e.status,
                                                                         "invalid_request_error")
        return error_response(ApiError(e.status, e.reason, kind), headers=e.headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in %s %s", printable(request.method),
                      printable(request.path))
        return error_response(ApiError(500, "internal server error", "server_error"))


def _is_type_tag(part: object) -> bool:
    """pydantic names the union member in an error's location ('str', 'list[int]'): drop it."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict")
                                      or "[" in part or "-" in part)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    keys = request.app[STATE].config.api_keys
    op = getattr(request.match_info.handler, "__openapi__", None)  # server/openapi.py
    if keys and not (op is not None and op.public):
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        token = token or request.headers.get("X-Api-Key", "")
        if token not in keys:
            raise ApiError(401, "invalid or missing API key", "authentication_error",
                           code="invalid_api_key")
    return await handler(request)


@web.middleware
async def log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # client closed the connection (nginx's convention)
        raise
    finally:
        seconds = time.perf_counter() - start
        route = request.match_info.route.resource
        path = route.canonical if route is not None else "unmatched"
        tokens = request.get(TOKENS, "")
        request.app[STATE].metrics.count_request(path, status, seconds)
        log.info("%s %s %d %s %.1fms", printable(request.method), printable(request.path),
                 status, f"tokens={tokens}" if tokens != "" else "-", seconds * 1000)


MIDDLEWARES = [log_middleware, errors_middleware, auth_middleware]
