"""The web UI's routes in process (server/webui_routes.py): public files, content types, ETag
revalidation as RFC 9110 defines If-None-Match, the Content-Security-Policy, 404s, an API key
that still guards the API, and asset folders that cannot be served refused at start."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from tiller.server.app import ServerConfig, create_app
from tiller.server.webui_routes import load_assets, webui_dir

from tiller import BUILTIN_MODEL

KEY = "sk-webui"


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ServerConfig:
    return ServerConfig(model_path=BUILTIN_MODEL, parallel=1, api_keys=(KEY,),
                        steering_dir=tmp_path_factory.mktemp("steering"))


async def test_page_and_assets_are_public_and_typed(client):
    folder = webui_dir()
    page = await client.get("/")
    assert page.status == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert await page.read() == (folder / "index.html").read_bytes()
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = await client.get(f"/webui/{name}")
        assert response.status == 200, name
        assert response.headers["Content-Type"] == f"{kind}; charset=utf-8"
        body = await response.read()
        assert body == (folder / name).read_bytes()
        # the tag is the content's: an independent hash of the file names the same bytes
        assert response.headers["ETag"].strip('"') == hashlib.sha256(body).hexdigest()[:32]
    # the API behind the page still wants the key; the page sends it as a Bearer token
    assert (await client.get("/v1/steering")).status == 401
    ok = await client.get("/v1/steering", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status == 200


async def test_csp_forbids_scripts_from_elsewhere(client):
    response = await client.get("/")
    policy = dict(part.strip().split(" ", 1) for part in
                  response.headers["Content-Security-Policy"].split(";"))
    assert policy["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval', no hosts
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'" and policy["base-uri"] == "'none'"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-cache"


@pytest.mark.parametrize("header, fresh", [
    ("{tag}", True), ("W/{tag}", True), ('"other", {tag}', True), ("*", True),
    ('"other"', False), ("", False)])
async def test_if_none_match(client, header, fresh):
    tag = (await client.get("/webui/app.js")).headers["ETag"]
    headers = {"If-None-Match": header.format(tag=tag)} if header else {}
    response = await client.get("/webui/app.js", headers=headers)
    if fresh:
        assert response.status == 304 and await response.read() == b""
        assert response.headers["ETag"] == tag
    else:
        assert response.status == 200 and len(await response.read()) > 0


async def test_head_and_unknown_files(client):
    head = await client.head("/webui/app.js")
    assert head.status == 200 and head.headers["Content-Type"].startswith("text/javascript")
    for path in ("/webui/missing.js", "/webui/..%2Fapp.py", "/webui/.%2E%2Fcli.py"):
        response = await client.get(path)
        assert response.status == 404, path
        assert (await response.json())["error"]["type"] == "not_found_error"


def test_asset_folders_that_cannot_be_served_are_refused(tmp_path: Path):
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.txt: no content type for '\.txt'"):
        load_assets(tmp_path)
    (tmp_path / "notes.txt").unlink()
    assert set(load_assets(tmp_path)) == {"index.html"}
    (tmp_path / "index.html").unlink()
    with pytest.raises(ValueError, match="has no index.html"):
        load_assets(tmp_path)


async def test_no_webui(aiohttp_client, config, model):
    from dataclasses import replace

    client = await aiohttp_client(create_app(replace(config, webui=False), model=model))
    assert (await client.get("/")).status in (401, 404)  # no route: the key is asked first
    assert (await client.get("/", headers={"Authorization": f"Bearer {KEY}"})).status == 404
    assert (await client.get("/v1/models")).status == 200
