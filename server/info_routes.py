"""What the server says about itself: /health, /v1/models, /metrics, /openapi.json."""

from __future__ import annotations

from aiohttp import web

from .errors import ApiError
from .openapi import build_spec, operation
from .protocol import ModelList
from .state import STATE


@operation("200 once the model is loaded, 503 before", public=True)
async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.model is None:
        raise ApiError(503, state.load_error or "Loading model", "unavailable_error",
                       code="model_loading")
    return web.json_response({"status": "ok"})


@operation("The loaded model", response=ModelList, public=True)
async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    data = []
    if state.model is not None:
        m = state.model
        c = m.engine.config
        data.append({"id": m.name, "object": "model", "created": m.created,
                     "owned_by": "tiller",
                     "meta": {"key": m.key, "uuid": m.uuid, "n_ctx_train": c.max_seq_len,
                              "n_embd": c.dim, "n_layer": c.n_layers, "n_vocab": c.vocab_size,
                              "dtype": m.engine.dtype}})
    return web.json_response({"object": "list", "data": data})


@operation("Prometheus metrics (text exposition)")
async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[STATE].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


@operation("This document")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(build_spec(request.app))


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/health", health)
    router.add_get("/v1/models", models)
    router.add_get("/models", models)
    router.add_get("/metrics", metrics)
    router.add_get("/openapi.json", openapi)
