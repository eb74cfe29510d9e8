"""Steering over HTTP: /v1/steering (build, list, describe, download, import, delete) and the
`steering` field every generation, chat, features and embeddings request accepts.

Vectors are built through the shared batch like any request (server/serving.py
collect_states): building an ActAdd vector is one forward pass of its two prompts.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import blake3
import numpy as np
from aiohttp import web

from engine.engine import EngineError, SteeringTerm
from engine.steering import (
    actadd_tokens,
    capture_blocks,
    check_control_request,
    directions_from_states,
    normalize_layer,
    stream_at,
)
from server.app import STATE, Model, read_json
from server.errors import ApiError
from server.protocol import SteeringCreateRequest, SteeringEntry
from server.serving import collect_states
from server.steering_store import SteeringStore, SteeringVector, StoreFull, vector_id


def _store(request: web.Request) -> SteeringStore:
    store = request.app[STATE].steering
    if store is None:
        raise ApiError(503, "the steering store is not open", "unavailable_error")
    return store


def _layer(model: Model, layer: int, field: str) -> int:
    """tiller's layer number (negative: from the end, -1 = after the last block), checked."""
    try:
        return normalize_layer(layer, model.engine.config.n_layers)
    except EngineError as e:
        raise ApiError(400, f"{field}: {e}", param=field.split(".")[0].split("[")[0]) from e


def _save(store: SteeringStore, vec: SteeringVector) -> SteeringVector:
    try:
        return store.put(vec)
    except StoreFull as e:
        raise ApiError(507, str(e), "insufficient_storage", code="steering_store_full") from e


async def actadd_vector(request: web.Request, add: str, sub: str, source: int,
                        field: str = "layer") -> SteeringVector:
    """The ActAdd vector for (add, sub, source layer): from the store, or built and stored."""
    model, runner = request.app[STATE].ready()
    store = _store(request)
    source = _layer(model, source, field)
    spec = {"method": "actadd", "add": add, "sub": sub, "layer": source}
    vid = vector_id(model.key, spec)
    found = store.get(vid)
    if found is not None:
        return found
    a, s = actadd_tokens(model.tokenizer, add, sub)
    limit = runner.context_limit()
    if len(a) > limit:
        raise ApiError(400, f"{field.split('.')[0]}: steering prompts of {len(a)} tokens exceed "
                       f"the context of {limit}", param=field.split(".")[0].split("[")[0],
                       code="context_length_exceeded")
    n = model.engine.config.n_layers
    blocks = capture_blocks([source], n)
    states = await collect_states(request, [a, s], blocks)
    rows = stream_at(states[0], blocks, source, n) - stream_at(states[1], blocks, source, n)
    return _save(store, SteeringVector(vid, "actadd", model.key, model.engine.config.dim, spec,
                                       rows=rows.astype(np.float32), source_layer=source))


async def resolve_steering(request: web.Request, entries: list[SteeringEntry],
                           field: str = "steering") -> tuple[SteeringTerm, ...]:
    """A request's `steering` entries as the engine's SteeringTerms (400/404 naming the entry)."""
    if not entries:
        return ()
    model, _ = request.app[STATE].ready()
    store = _store(request)
    terms: list[SteeringTerm] = []
    for i, e in enumerate(entries):
        where = f"{field}[{i}]"
        if e.vector is None:  # inline ActAdd, llama.cpp's flags
            source = e.source_layer if e.source_layer is not None else e.layer
            vec = await actadd_vector(request, e.add, e.sub, source, f"{where}.source_layer")
            mul = e.mul if e.mul is not None else e.scale
            terms.append(SteeringTerm(_layer(model, e.layer, f"{where}.layer"), vec.rows, mul))
            continue
        vec = store.get(e.vector)
        if vec is None:
            raise ApiError(404, f"{where}.vector: no steering vector {e.vector!r}",
                           "not_found_error", param=field, code="steering_vector_not_found")
        if vec.model_key != model.key or vec.dim != model.engine.config.dim:
            raise ApiError(400, f"{where}.vector: {e.vector} was made for another model "
                           f"(key {vec.model_key[:16]}..., width {vec.dim})", param=field,
                           code="steering_model_mismatch")
        if vec.kind == "actadd":
            layer = _layer(model, e.layer if e.layer is not None else vec.source_layer,
                           f"{where}.layer")
            terms.append(SteeringTerm(layer, vec.rows, e.scale))
            continue
        wanted = e.layers if e.layers is not None else (
            [e.layer] if e.layer is not None else list(vec.directions))
        for layer in (_layer(model, x, f"{where}.layers") for x in wanted):
            if layer not in vec.directions:
                raise ApiError(400, f"{where}.layers: {e.vector} has no direction for layer "
                               f"{layer} (it has {sorted(vec.directions)})", param=field)
            terms.append(SteeringTerm(layer, vec.directions[layer], e.scale,
                                      every_position=True))
    return tuple(terms)


# /v1/steering ----------------------------------------------------------------------------------


async def create(request: web.Request) -> web.Response:
    model, _ = request.app[STATE].ready()
    store = _store(request)
    body = SteeringCreateRequest.model_validate(await read_json(request))
    n = model.engine.config.n_layers
    if body.method == "actadd":
        vec = await actadd_vector(request, body.add, body.sub, body.layer)
        return web.json_response(vec.describe())
    try:
        check_control_request(body.positive, body.negative, body.method)
    except ValueError as e:
        raise ApiError(400, str(e), param="positive") from e
    # default: every layer a llama.cpp control-vector file can hold (2..n_layers: engine/cvec.py)
    default = range(2, n + 1) if n > 1 else range(1, n + 1)
    layers = sorted({_layer(model, x, "layers") for x in (body.layers or default)})
    spec = {"method": body.method, "positive": body.positive, "negative": body.negative,
            "layers": layers}
    vid = vector_id(model.key, spec)
    found = store.get(vid)
    if found is not None:
        return web.json_response(found.describe())
    prompts = [model.tokenizer.encode(p, bos=True) for p in [*body.positive, *body.negative]]
    blocks = capture_blocks(layers, n)
    states = await collect_states(request, prompts, blocks)
    last = np.stack([np.stack([stream_at(s, blocks, layer, n)[-1] for layer in layers])
                     for s in states])
    pairs = len(body.positive)
    directions = directions_from_states(last[:pairs], last[pairs:], layers, body.method)
    vec = _save(store, SteeringVector(vid, "control", model.key, model.engine.config.dim, spec,
                                      directions=directions))
    return web.json_response(vec.describe())


async def list_vectors(request: web.Request) -> web.Response:
    store = _store(request)
    model = request.app[STATE].model
    vectors = store.list(model.key if model is not None else None)
    return web.json_response({"object": "list", "data": [v.describe() for v in vectors],
                              "used_bytes": store.used_bytes, "max_bytes": store.max_bytes})


def _get(request: web.Request) -> SteeringVector:
    vid = request.match_info["id"]
    vec = _store(request).get(vid)
    if vec is None:
        raise ApiError(404, f"no steering vector {vid!r}", "not_found_error",
                       code="steering_vector_not_found")
    return vec


async def describe_or_download(request: web.Request) -> web.StreamResponse:
    vec = _get(request)
    fmt = request.query.get("format", "json")
    if fmt == "json":
        return web.json_response(vec.describe())
    if fmt == "npy":
        array = vec.rows if vec.kind == "actadd" else np.stack(
            [vec.directions[k] for k in sorted(vec.directions)])
        buf = io.BytesIO()
        np.save(buf, array)
        return web.Response(body=buf.getvalue(), content_type="application/octet-stream",
                            headers={"Content-Disposition": f'attachment; filename="{vec.id}.npy"',
                                     "X-Steering-Layers": ",".join(map(str, vec.layers))})
    if fmt == "gguf":
        if vec.kind != "control":
            raise ApiError(400, "format: an ActAdd vector has one row per position; llama.cpp's "
                           "control-vector GGUF holds one per layer: download it as npy",
                           param="format")
        from engine.cvec import ControlVector, write_control_vector

        model, _ = request.app[STATE].ready()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{vec.id}.gguf"
            try:
                write_control_vector(path, ControlVector(dict(vec.directions), "llama"),
                                     model.engine.config.n_layers)
            except ValueError as e:
                raise ApiError(400, f"format: {e}", param="format") from e
            data = path.read_bytes()
        return web.Response(body=data, content_type="application/octet-stream",
                            headers={"Content-Disposition":
                                     f'attachment; filename="{vec.id}.gguf"'})
    raise ApiError(400, f"format: expected json, npy or gguf, got {fmt!r}", param="format")


async def import_gguf(request: web.Request) -> web.Response:
    """POST /v1/steering/import: a llama.cpp control-vector GGUF as the request body."""
    from engine.cvec import read_control_vector

    model, _ = request.app[STATE].ready()
    store = _store(request)
    data = await request.read()
    if not data:
        raise ApiError(400, "the body must be a control-vector GGUF file")
    config = model.engine.config
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload.gguf"
        path.write_bytes(data)
        try:
            cv = read_control_vector(path, config.dim, config.n_layers)
        except ValueError as e:
            raise ApiError(400, str(e).replace(str(path), "upload"), param="file") from e
    spec = {"method": "import", "blake3": blake3.blake3(data).hexdigest()}
    vec = SteeringVector(vector_id(model.key, spec), "control", model.key, config.dim, spec,
                         directions={k: np.asarray(v, np.float32)
                                     for k, v in cv.directions.items()})
    return web.json_response(_save(store, vec).describe())


async def delete(request: web.Request) -> web.Response:
    vec = _get(request)
    _store(request).delete(vec.id)
    return web.json_response({"id": vec.id, "object": "steering.vector", "deleted": True})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/steering", create)
    router.add_get("/v1/steering", list_vectors)
    router.add_post("/v1/steering/import", import_gguf)
    router.add_get("/v1/steering/{id}", describe_or_download)
    router.add_delete("/v1/steering/{id}", delete)
