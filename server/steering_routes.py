"""/v1/steering over HTTP: build, list, describe, download, import and delete vectors. The work
is the steering service's (server/steering_service.py); this module parses and answers."""

from __future__ import annotations

import io

import numpy as np
from aiohttp import web

from .http import read_body, read_bytes
from .openapi import operation
from .protocol import SteeringCreateRequest, SteeringDownloadQuery, SteeringVectorInfo
from .state import STATE
from .steering_service import (
    control_vector_gguf,
    create_vector,
    delete_vector,
    find_vector,
    import_control_vector,
    list_vectors,
)


@operation("Build a steering vector (actadd, mean, pca)", SteeringCreateRequest,
           SteeringVectorInfo, stores=True)
async def create(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.ready()
    body = await read_body(request, SteeringCreateRequest)
    return web.json_response((await create_vector(state, body)).describe())


@operation("Stored steering vectors")
async def list_all(request: web.Request) -> web.Response:
    state = request.app[STATE]
    vectors, used = await list_vectors(state)
    return web.json_response({"object": "list", "data": [v.describe() for v in vectors],
                              "used_bytes": used, "max_bytes": state.steering.max_bytes})


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@operation("Describe (json) or download (npy, gguf) a vector", response=SteeringVectorInfo,
           query=SteeringDownloadQuery, binary=True)
async def describe_or_download(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    query = SteeringDownloadQuery.model_validate(dict(request.query))
    vec = await find_vector(state, request.match_info["id"])
    if query.format == "json":
        return web.json_response(vec.describe())
    if query.format == "npy":
        array = vec.rows if vec.kind == "actadd" else np.stack(
            [vec.directions[k] for k in sorted(vec.directions)])
        assert array is not None  # an "actadd" vector has rows
        return web.Response(body=await state.run(_npy, array),
                            content_type="application/octet-stream",
                            headers={"Content-Disposition": f'attachment; filename="{vec.id}.npy"',
                                     "X-Steering-Layers": ",".join(map(str, vec.layers))})
    return web.Response(body=await state.run(control_vector_gguf, state, vec),
                        content_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{vec.id}.gguf"'})


@operation("Import a llama.cpp control-vector GGUF (request body)", response=SteeringVectorInfo,
           upload=True, stores=True)
async def import_gguf(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.ready()
    vec = await import_control_vector(state, await read_bytes(request))
    return web.json_response(vec.describe())


@operation("Delete a vector")
async def delete(request: web.Request) -> web.Response:
    state = request.app[STATE]
    vid = request.match_info["id"]
    await delete_vector(state, vid)
    return web.json_response({"id": vid, "object": "steering.vector", "deleted": True})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/steering", create)
    router.add_get("/v1/steering", list_all)
    router.add_post("/v1/steering/import", import_gguf)
    router.add_get("/v1/steering/{id}", describe_or_download)
    router.add_delete("/v1/steering/{id}", delete)
