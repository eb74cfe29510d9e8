"""The steering playground: its page at `/` and its assets at `/webui/<name>`.

The files are package data (tiller/webui/: plain JavaScript modules and CSS, no build step),
read once when the app is built, so a request is a dictionary lookup: no path from a request
ever reaches the file system. They are public (no API key: the page asks for the key and sends
it as a Bearer token with each API call), and they are the only public routes besides /health
and /v1/models.

Every answer carries an ETag (a hash of the bytes) and `Cache-Control: no-cache`: browsers and
proxies keep the files but revalidate them on each load (a 304 without a body), so an upgraded
server never runs with yesterday's scripts. The Content-Security-Policy allows scripts, styles
and connections from this origin only: no inline script, no script from elsewhere, no
`eval`, and the page cannot be framed. The page builds its DOM with textContent (model output
and vector names are never parsed as HTML); the policy is the second line of defence.

The page uses relative URLs only (`webui/app.js`, `v1/models`), so it works behind a proxy that
serves tiller under a path (`location /tiller/ { proxy_pass http://tiller/; }`).
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from aiohttp import web

from .errors import ApiError
from .openapi import operation

# NOTE: a module script is refused unless it comes as JavaScript; mimetypes' answer depends on
# the host's /etc/mime.types, so the types the page uses are fixed here
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
INDEX = "index.html"


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str  # quoted, as the header carries it


def webui_dir() -> Path:
    """tiller/webui inside the installed package (a checkout's folder in an editable install)."""
    return Path(str(resources.files("tiller") / "webui"))


def load_assets(folder: Path) -> dict[str, Asset]:
    """Every file of `folder` (not recursive) by name. A file of a type the table above does
    not know, or a folder without index.html, is a ValueError naming it: a packaging mistake
    found when the server starts, not when a browser asks."""
    assets = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None:
            raise ValueError(f"{path}: no content type for {path.suffix!r} files "
                             f"(known: {', '.join(CONTENT_TYPES)}; "
                             f"mimetypes says {mimetypes.guess_type(path.name)[0]})")
        body = path.read_bytes()
        assets[path.name] = Asset(body, content_type,
                                  f'"{hashlib.sha256(body).hexdigest()[:32]}"')
    if INDEX not in assets:
        raise ValueError(f"{folder}: the web UI has no {INDEX}")
    return assets


def _matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 If-None-Match: `*` or a list of entity tags, compared weakly (W/ ignored)."""
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


def _answer(request: web.Request, asset: Asset) -> web.Response:
    headers = {**HEADERS, "ETag": asset.etag}
    if _matches(request.headers.get("If-None-Match", ""), asset.etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})


def add_routes(router: web.UrlDispatcher, folder: Path | None = None) -> None:
    """GET / (the page) and GET /webui/{name} (its scripts and styles), public."""
    assets = load_assets(folder if folder is not None else webui_dir())

    @operation("The steering playground (web UI)", public=True)
    async def page(request: web.Request) -> web.Response:
        return _answer(request, assets[INDEX])

    @operation("A script, style or image of the web UI", public=True)
    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        found = assets.get(name)
        if found is None:
            raise ApiError(404, f"no web UI file {name!r}", "not_found_error")
        return _answer(request, found)

    router.add_get("/", page)
    router.add_get("/webui/{name}", asset)
