"""Cross-origin resource sharing (the Fetch standard's CORS protocol) for `--cors-origin`.

The rules, as aiohttp-cors and Starlette's CORSMiddleware apply them:
- No `--cors-origin`: no CORS at all (browsers refuse cross-origin reads), the safe default.
- An allowed origin (listed, or any origin with `*`) gets `Access-Control-Allow-Origin` on every
  response -- successes, errors from the error middleware, 401s, server-sent event streams --
  because the headers are added in `on_response_prepare`, which aiohttp calls for every
  response just before its headers are sent (a stream too, whose headers go out first).
- A preflight (OPTIONS with `Origin` and `Access-Control-Request-Method`) is answered here,
  before authentication (browsers never send credentials on a preflight): 204 with the allowed
  methods and headers and `Access-Control-Max-Age`. From an origin not allowed it is a 403
  with an OpenAI-shaped error and no CORS headers, as aiohttp-cors answers (Starlette: 400).
- Requests from origins not allowed are served as ever but carry no CORS headers, so the
  browser keeps the response from the page.

NOTE: with `*` the answer is a literal `*` and never `Access-Control-Allow-Credentials`: API
keys travel in the Authorization header, which a page sets itself; no cookies are involved.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from .errors import ApiError, error_response

OnPrepare = Callable[[web.Request, web.StreamResponse], Awaitable[None]]

METHODS = "GET, POST, DELETE, OPTIONS"
# always allowed; a preflight's own list (e.g. the OpenAI SDK's x-stainless-* headers) is
# allowed too, since the server reads none of them for authority but Authorization/X-Api-Key
HEADERS = ("Authorization", "Content-Type", "X-Api-Key", "Accept")
# headers a page may read from a response: the ones tiller sets for clients to act on
EXPOSE = "Retry-After, X-Queue-Waiting, X-KV-Blocks-Used, WWW-Authenticate"
MAX_AGE = "600"  # seconds a browser may cache a preflight (Chromium caps it at 7200)
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: a header name


def normalize_origins(origins: Iterable[str]) -> tuple[str, ...]:
    """`--cors-origin` values as browsers serialize an Origin (scheme://host[:port], lower
    case, no path or trailing slash), or `*`; anything else is a ValueError naming it."""
    out = []
    for origin in origins:
        value = origin.strip().rstrip("/").lower()
        if value != "*" and not _ORIGIN.fullmatch(value):
            raise ValueError(f"--cors-origin {origin!r}: expected scheme://host[:port] "
                             "(e.g. http://localhost:3000) or *")
        out.append(value)
    return tuple(dict.fromkeys(out))


def allowed(origins: tuple[str, ...], origin: str | None) -> str | None:
    """The Access-Control-Allow-Origin value for a request's Origin, or None if not allowed."""
    if not origins or not origin:
        return None
    if "*" in origins:
        return "*"
    return origin if origin.lower() in origins else None


def _allowed_headers(requested: str) -> str:
    names = [h.strip() for h in requested.split(",") if _TOKEN.fullmatch(h.strip())]
    seen = {h.lower() for h in HEADERS}
    return ", ".join([*HEADERS, *(h for h in names if h.lower() not in seen)])


def preflight_middleware(origins: tuple[str, ...]) -> Middleware:
    """Answers preflights; every other request goes on (its headers come in `add_headers`)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        is_preflight = (request.method == hdrs.METH_OPTIONS and hdrs.ORIGIN in request.headers
                        and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers)
        if not is_preflight:
            return await handler(request)
        if allowed(origins, request.headers[hdrs.ORIGIN]) is None:
            return error_response(ApiError(403, f"origin {request.headers[hdrs.ORIGIN]!r} is "
                                           "not allowed (--cors-origin)", "permission_error",
                                           code="cors_origin_not_allowed"))
        requested = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "")
        return web.Response(status=204, headers={
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: METHODS,
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS: _allowed_headers(requested),
            hdrs.ACCESS_CONTROL_MAX_AGE: MAX_AGE})

    return middleware


def add_headers(origins: tuple[str, ...]) -> OnPrepare:
    """An on_response_prepare handler: the CORS headers on every response to an allowed
    origin (`Vary: Origin` on all of them, so a cache never serves one origin's answer to
    another)."""

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        value = allowed(origins, request.headers.get(hdrs.ORIGIN))
        vary = [v.strip() for v in response.headers.get(hdrs.VARY, "").split(",") if v.strip()]
        if not any(v.lower() in ("origin", "*") for v in vary):
            response.headers[hdrs.VARY] = ", ".join([*vary, hdrs.ORIGIN])
        if value is None:
            return
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = value
        if request.method != hdrs.METH_OPTIONS:
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSE

    return on_prepare


def install(app: web.Application, origins: tuple[str, ...]) -> None:
    """The CORS headers for `origins` (normalized) on every response; nothing without any."""
    if origins:
        app.on_response_prepare.append(add_headers(origins))


def middlewares(origins: tuple[str, ...]) -> list[Middleware]:
    """The preflight middleware for `origins`, or none: it goes outside authentication."""
    return [preflight_middleware(origins)] if origins else []
