"""HTTP plumbing every route uses: reading JSON bodies, server-sent events, and the middlewares
that turn failures into OpenAI-shaped errors (the one place errors are mapped), check API keys
and write the access log."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from json.encoder import encode_basestring
from typing import TypeVar

import numpy as np
from aiohttp import web
from pydantic import BaseModel, ValidationError

from .errors import ApiError, GenerationError, error_response
from .runner import QueueFull
from .state import STATE, TOKENS

log = logging.getLogger("tiller.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
B = TypeVar("B", bound=BaseModel)

MAX_JSON_DEPTH = 32  # nested arrays and objects in a request body (the deepest we use is ~5)
_OPEN, _CLOSE, _QUOTE, _BACKSLASH = (frozenset(b"[{"), frozenset(b"]}"), ord('"'), ord("\\"))

# JSON bodies never hold NaN or Infinity: they are not JSON, and strict parsers refuse them
dumps = partial(json.dumps, allow_nan=False)


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, in linear time and memory.

    NOTE: json.loads and pydantic recurse once per level, so a body of 100k `[` is a
    RecursionError; this scan needs no recursion. Brackets inside strings do not count: a quote
    opens or closes a string unless an odd run of backslashes precedes it (valid JSON has
    backslashes only inside strings).
    """
    b = np.frombuffer(raw, np.uint8)
    if not b.size:
        return 0
    index = np.arange(b.size)
    # the backslashes directly before each byte: position minus the last non-backslash before it
    last_other = np.maximum.accumulate(np.where(b != _BACKSLASH, index, -1))
    run = np.concatenate(([0], index[:-1] - last_other[:-1]))
    quote = (b == _QUOTE) & (run % 2 == 0)
    in_string = (np.cumsum(quote) % 2 == 1) | quote
    step = np.zeros(b.size, np.int64)
    step[np.isin(b, list(_OPEN)) & ~in_string] = 1
    step[np.isin(b, list(_CLOSE)) & ~in_string] = -1
    return int(np.cumsum(step).max())


def decode_json(raw: bytes) -> dict:
    """A request body as a JSON object (400 for anything else). Runs on the worker pool."""
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"request body nests arrays and objects {depth} deep; the limit is "
                       f"{MAX_JSON_DEPTH}", code="json_too_deep")
    try:
        # NOTE: NaN and Infinity are parsed (Python's json does) so that the field holding one
        # is named: every float field refuses them (allow_inf_nan=False in protocol.py)
        body = json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e.msg} at position {e.pos}") from e
    except UnicodeDecodeError as e:
        raise ApiError(400, "request body is not valid UTF-8") from e
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def too_large(request: web.Request) -> ApiError:
    limit = request.app[STATE].config.max_body_bytes
    return ApiError(413, f"request body exceeds the server's limit of {limit} bytes "
                    f"({limit / 2**20:g} MiB, --max-body-mb)", code="request_too_large")


async def read_bytes(request: web.Request) -> bytes:
    """The raw body, at most --max-body-mb (aiohttp's client_max_size): else a JSON 413."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise too_large(request) from e


def _parse(model: type[B], raw: bytes) -> B:
    return model.model_validate(decode_json(raw))


async def read_body(request: web.Request, model: type[B]) -> B:
    """The body validated as `model`; decoding and validation run on the worker pool (an 8 MB
    body takes a good part of a second)."""
    raw = await read_bytes(request)
    return await request.app[STATE].run(_parse, model, raw)


def encode_json(data: object) -> bytes:
    """A response body as JSON; a non-finite number in it is an error, never a bare NaN."""
    try:
        return dumps(data).encode()
    except ValueError as e:
        raise ApiError(500, "the result holds numbers JSON cannot carry (NaN or infinity)",
                       "server_error", code="non_finite_result") from e


def json_response(data: object, status: int = 200) -> web.Response:
    """A JSON response, encoded on the event loop: for bodies of a few kilobytes. Large ones
    (hidden states) are encoded on the worker pool with encode_json."""
    return json_bytes(encode_json(data), status)


def json_bytes(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


class Sent(enum.Enum):
    """How much of a frame SocketWriter.write put in the socket."""

    ALL = "all"
    PART = "part"  # the rest is in SocketWriter.unsent, for the event loop to write first
    NONE = "none"  # nothing: the socket is full, gone, or the writer closed


class SocketWriter:
    """Writes an SSE stream's frames straight into its client's socket from the engine thread,
    as HTTP chunks (or raw, for an HTTP/1.0 client), so that a token needs no hop through the
    event loop: no wake-up, no task switches, no aiohttp write (generation.stream_directly).

    NOTE: the socket is used through a descriptor of its own (a dup), closed only under the lock
    the writes hold: if the event loop closes the connection meanwhile, a write meets a socket
    its peer has left (an error), never a descriptor number the loop has since given to another
    client. The socket is non-blocking (the flag belongs to the socket, shared by the dup): a
    write never waits; what a full socket did not take is left in `unsent`, and the writer
    writes nothing more until the event loop has written that (SSE.flush).
    """

    def __init__(self, fd: int, chunked: bool) -> None:
        self._fd = os.dup(fd)
        self._chunked = chunked
        self._lock = threading.Lock()
        self.unsent = b""

    def write(self, frame: bytes) -> Sent:
        data = b"%x\r\n%b\r\n" % (len(frame), frame) if self._chunked else frame
        with self._lock:
            if self._fd < 0 or self.unsent:  # the event loop writes what is left first
                return Sent.NONE
            try:
                n = os.write(self._fd, data)
            except BlockingIOError:
                return Sent.NONE
            except OSError:  # the client went away: the event loop's write will say so
                self._close()
                return Sent.NONE
            if n == len(data):
                return Sent.ALL
            self.unsent = data[n:]
            return Sent.PART

    def close(self) -> None:
        with self._lock:
            self._close()

    def __del__(self) -> None:  # a way out of a stream that forgot close(): never leak the fd
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SSE:
    """A server-sent events response: `data: <json>` frames.

    NOTE: frames are buffered and written together by `flush()`, which `generation.merged`
    calls whenever no further event is ready (before it waits), and by `close()`: a burst of
    tokens that reached the event loop together goes out in one write (one send() and one
    HTTP chunk) instead of one per token, and nothing is held back while the stream waits.
    aiohttp's write() itself only waits for the socket when more than 64 KiB are unsent.
    """

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.started = False
        self.failed = False
        self._frames: list[bytes] = []
        self._writer: SocketWriter | None = None
        self.response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass events through unbuffered
        })

    async def start(self) -> None:
        await self.response.prepare(self.request)
        self.started = True

    async def send(self, data: dict | str) -> None:
        """Queue one event (a dict is encoded as JSON, a str sent as it is)."""
        text = data if isinstance(data, str) else dumps(data, ensure_ascii=False)
        self._frames.append(f"data: {text}\n\n".encode())

    def send_frame(self, frame: bytes) -> None:
        """Queue a frame already encoded (`FrameTemplate.frame`)."""
        self._frames.append(frame)

    async def flush(self) -> None:
        """Write every queued frame, in one write (after what the socket writer left)."""
        if self._writer is not None and self._writer.unsent:
            transport = self.request.transport
            if transport is not None and not transport.is_closing():
                transport.write(self._writer.unsent)  # already framed as the HTTP chunk it was
            self._writer.unsent = b""
        if self._frames:
            frames, self._frames = self._frames, []
            await self.response.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def socket_writer(self) -> SocketWriter | None:
        """A writer to the client's socket for another thread, once the headers are out: None
        when this connection cannot take one (TLS, compression, a transport that is not a
        plain socket's)."""
        if self._writer is not None:
            return self._writer
        writer = getattr(self.response, "_payload_writer", None)  # NOTE: aiohttp's, private
        transport = self.request.transport
        chunked = getattr(writer, "chunked", None)
        if (not self.started or writer is None or transport is None or transport.is_closing()
                or not isinstance(chunked, bool) or getattr(writer, "_compress", None) is not None
                or transport.get_extra_info("sslcontext") is not None):
            return None
        sock = transport.get_extra_info("socket")
        if os.name != "posix" or sock is None or sock.family not in (
                socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            return None  # NOTE: a Windows socket handle is no file descriptor for os.write
        send_headers = getattr(writer, "send_headers", None)
        if send_headers is not None:  # aiohttp >= 3.12 holds them back for the first write
            send_headers()
        self._writer = SocketWriter(sock.fileno(), chunked)
        return self._writer

    def idle(self) -> bool:
        """Everything queued so far is in the socket: another thread may write next."""
        transport = self.request.transport
        return (not self._frames and transport is not None and not transport.is_closing()
                and transport.get_write_buffer_size() == 0
                and (self._writer is None or not self._writer.unsent))

    async def close(self) -> web.StreamResponse:
        await self.flush()
        await self.response.write_eof()
        return self.response

    async def fail(self, error: ApiError) -> web.StreamResponse:
        """After the stream has started an error can only be an event: OpenAI's clients raise
        on a `data: {"error": ...}` event, and so does tiller_client."""
        self.failed = True
        await self.send({"error": {"message": error.message, "type": error.type,
                                   "param": error.param, "code": error.code}})
        return await self.close()


_SLOT = "\x00tiller-slot\x00"


class FrameTemplate:
    """One SSE frame of a stream's per-token chunks, encoded once around the fields that change:
    per token only those values are encoded (a string by json's C string encoder, an int by
    str()), and the bytes are exactly those `SSE.send` writes for the whole object. Build it
    from the chunk with `FrameTemplate.SLOT` as each changing value, `slots` of them, in the
    order json.dumps writes them; `frame()` takes the values in that order."""

    SLOT = _SLOT

    def __init__(self, data: dict, slots: int = 1) -> None:
        parts = dumps(data, ensure_ascii=False).split(dumps(_SLOT, ensure_ascii=False))
        if len(parts) != slots + 1:
            raise ValueError(f"a FrameTemplate's object holds FrameTemplate.SLOT "
                             f"{len(parts) - 1} times, not {slots}")
        parts[0] = f"data: {parts[0]}"
        parts[-1] = f"{parts[-1]}\n\n"
        self.parts = [p.encode() for p in parts]
        self.head, self.tail = self.parts[0], self.parts[-1]

    def frame(self, *values: str | int) -> bytes:
        if len(values) == 1 and isinstance(values[0], str) and len(self.parts) == 2:
            return self.head + encode_basestring(values[0]).encode() + self.tail
        out = [self.parts[0]]
        for value, part in zip(values, self.parts[1:], strict=True):
            if isinstance(value, str):
                out.append(encode_basestring(value).encode())
            elif type(value) is int:  # NOTE: not bool, whose str() is no JSON
                out.append(str(value).encode())
            else:
                raise TypeError(f"a FrameTemplate slot takes a str or an int, not "
                                f"{type(value).__name__}")
            out.append(part)
        return b"".join(out)


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
        message = first["msg"].removeprefix("Value error, ")
        # a model-level check has no location: its message starts with the field it is about
        named = re.match(r"(\w+)(?:[\[.:]|$)", message) if not path else None
        param = path[0] if path else named.group(1) if named and ":" in message else None
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
    except web.HTTPRequestEntityTooLarge:
        return error_response(too_large(request))
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
        scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
        token = credentials.strip() if scheme.lower() == "bearer" else ""  # RFC 7235: any case
        token = token or request.headers.get("X-Api-Key", "")
        if token not in keys:
            response = error_response(ApiError(401, "invalid or missing API key",
                                               "authentication_error", code="invalid_api_key"))
            response.headers["WWW-Authenticate"] = 'Bearer realm="tiller"'  # RFC 6750
            return response
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

