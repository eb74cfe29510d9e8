"""Hidden states over HTTP: POST /v1/features, OpenAI's /v1/embeddings, llama.cpp's /embedding.

All three run their inputs as prompt-only requests through the shared batch
(server/generation.py collect_states), so they interleave with generations and never disturb
them. Numbering (engine/layers.py): a `layers` entry of /v1/features and the `layer` of the
embeddings is a block index (0..n_layers-1, negative from the end); block l's `resid_pre` is
the stream steering calls layer l, its `resid_post` the stream steering calls layer l + 1.

Binary formats are written here: `.npz` by numpy, safetensors by `safetensors_bytes` (the
format is an 8-byte little-endian header length, a JSON header, then raw little-endian data).
"""

from __future__ import annotations

import base64
import io
import json
import struct
from typing import Literal

import numpy as np
from aiohttp import web

from ..engine.engine import EngineError, SteeringTerm
from ..engine.forward import CAPTURE_POINTS
from ..engine.layers import normalize_block
from .errors import ApiError
from .generation import collect_states
from .http import read_json
from .openapi import operation
from .prepare import input_ids
from .protocol import (
    EmbeddingsRequest,
    EmbeddingsResponse,
    FeaturesRequest,
    FeaturesResponse,
    LlamaEmbeddingRequest,
)
from .state import STATE, Model, ServerState
from .steering_service import resolve_steering

_RESID_POST = CAPTURE_POINTS.index("resid_post")
_SAFETENSORS_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<i8"): "I64"}


# validation ------------------------------------------------------------------------------------


def block_index(model: Model, block: int, field: str) -> int:
    """A block index, negative from the end (-1: the last block), checked."""
    try:
        return normalize_block(block, model.engine.config.n_layers)
    except EngineError as e:
        raise ApiError(400, f"{field}: {e}", param=field.split("[")[0]) from e


def token_positions(positions: Literal["all", "last"] | list[int], n_tokens: int) -> list[int]:
    if positions == "all":
        return list(range(n_tokens))
    if positions == "last":
        return [n_tokens - 1]
    out = []
    for i, p in enumerate(positions):
        if not -n_tokens <= p < n_tokens:
            raise ApiError(400, f"positions[{i}]: position {p} outside 0..{n_tokens - 1} (or "
                           f"-{n_tokens}..-1) for an input of {n_tokens} tokens",
                           param="positions")
        out.append(p % n_tokens)
    return out


def _piece(model: Model, token: int) -> str:
    """The token's text (control tokens as their vocabulary piece, as /tokenize shows BOS)."""
    tok = model.tokenizer
    raw = tok.piece_bytes(token) or tok.piece(token).encode()
    return raw.decode("utf-8", errors="replace")


# binary formats ----------------------------------------------------------------------------------


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The safetensors file of `tensors` (float32 or int64), in the order given."""
    header: dict = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        data = array.tobytes()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # NOTE: the data then starts 8-byte aligned, as the spec allows
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _binary(body: bytes, filename: str) -> web.Response:
    return web.Response(body=body, content_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="{filename}"'})


# hidden states ----------------------------------------------------------------------------------


async def final_states(state: ServerState, prompts: list[list[int]], layer: int | None,
                       steering: tuple[SteeringTerm, ...]) -> list[np.ndarray]:
    """Each prompt's (T, dim) states: block `layer`'s output, or (None) the stream after the
    model's final norm (steering after the last block included) -- what llama.cpp embeds."""
    model, runner = state.ready()
    blocks = [] if layer is None else [layer]
    out: list[np.ndarray] = []
    wave = max(1, state.config.parallel)  # NOTE: a long input list must not fill the queue
    for start in range(0, len(prompts), wave):
        hidden = await collect_states(model, runner, prompts[start:start + wave], blocks,
                                      steering, final=layer is None)
        for h in hidden:
            x = h.final if layer is None else h.states[_RESID_POST, 0]  # type: ignore[index]
            assert x is not None
            out.append(x.astype(np.float32))
    return out


def pool(x: np.ndarray, pooling: str) -> np.ndarray:
    """(T, dim) -> (dim,): the mean over tokens, or the first or last token's row."""
    if pooling == "mean":
        return x.mean(axis=0, dtype=np.float64).astype(np.float32)
    return x[0] if pooling == "first" else x[-1]


def embd_normalize(v: np.ndarray, p: int) -> np.ndarray:
    """llama.cpp's common_embd_normalize: -1 none, 0 max-abs scaled to the int16 range,
    1 taxicab, 2 Euclidean, p > 2 the p-norm. A zero vector stays zero."""
    v64 = v.astype(np.float64)
    if p < 0:
        return v.astype(np.float32)
    if p == 0:
        norm = np.abs(v64).max() / 32760.0
    elif p == 2:
        norm = np.sqrt(np.sum(v64 * v64))
    else:
        norm = np.sum(np.abs(v64) ** p) ** (1.0 / p)
    return (v64 * (1.0 / norm if norm > 0 else 0.0)).astype(np.float32)


# POST /v1/features ---------------------------------------------------------------------------


@operation("Hidden states of chosen layers, points and positions (json, npz or safetensors)",
           FeaturesRequest, FeaturesResponse)
async def features(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model, runner = state.ready()
    body = FeaturesRequest.model_validate(await read_json(request))
    ids = input_ids(model, runner, body.input, "input")
    n_layers = model.engine.config.n_layers
    layers = list(range(n_layers)) if body.layers is None else [
        block_index(model, b, f"layers[{i}]") for i, b in enumerate(body.layers)]
    positions = token_positions(body.positions, len(ids))
    points = list(dict.fromkeys(body.points))  # repeated names once, in the order given
    steering = await resolve_steering(state, body.steering)
    blocks = sorted(set(layers))
    (hidden,) = await collect_states(model, runner, [ids], blocks, steering)
    states = hidden.states  # (len(CAPTURE_POINTS), len(blocks), T, dim)
    assert states is not None
    rows = [blocks.index(b) for b in layers]
    arrays: dict[str, np.ndarray] = {
        p: np.ascontiguousarray(states[CAPTURE_POINTS.index(p)][rows][:, positions],
                                dtype=np.float32) for p in points}
    pieces = [_piece(model, t) for t in ids]
    index = {"tokens": np.asarray(ids, np.int64), "positions": np.asarray(positions, np.int64),
             "layers": np.asarray(layers, np.int64)}
    if body.format == "npz":
        return _binary(_npz_bytes({**arrays, **index, "pieces": np.asarray(pieces, dtype=str)}),
                       "features.npz")
    if body.format == "safetensors":
        metadata = {"model": model.name, "model_key": model.key, "pieces": json.dumps(pieces)}
        return _binary(safetensors_bytes({**arrays, **index}, metadata), "features.safetensors")
    return web.json_response({
        "model": model.name, "tokens": ids, "pieces": pieces, "layers": layers, "points": points,
        "positions": positions, "shape": [len(layers), len(positions), model.engine.config.dim],
        "data": {p: a.tolist() for p, a in arrays.items()}})


# POST /v1/embeddings (OpenAI) -------------------------------------------------------------------


def _openai_inputs(value: str | list) -> list[str | list[int]]:
    if isinstance(value, str) or all(isinstance(x, int) for x in value):
        return [value]  # one text, or one prompt as token ids
    return list(value)


@operation("OpenAI embeddings (plus pooling, normalize, layer, steering)", EmbeddingsRequest,
           EmbeddingsResponse)
async def embeddings(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model, runner = state.ready()
    body = EmbeddingsRequest.model_validate(await read_json(request))
    prompts = [input_ids(model, runner, p, "input") for p in _openai_inputs(body.input)]
    layer = None if body.layer is None else block_index(model, body.layer, "layer")
    steering = await resolve_steering(state, body.steering)
    states = await final_states(state, prompts, layer, steering)
    data = []
    for i, x in enumerate(states):
        v = embd_normalize(pool(x, body.pooling), 2 if body.normalize else -1)
        encoded = (base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                   if body.encoding_format == "base64" else v.tolist())
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    n_tokens = sum(len(p) for p in prompts)
    return web.json_response({"object": "list", "data": data, "model": model.name,
                              "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


# POST /embedding (llama.cpp) -------------------------------------------------------------------


def _llama_inputs(value: str | list) -> list[str | list]:
    """llama.cpp's rule: a string, or a list holding any token id, is one prompt (strings and
    ids mixed); otherwise each element of the list is a prompt."""
    if isinstance(value, str) or any(isinstance(x, int) for x in value):
        return [value]
    return list(value)


@operation("llama.cpp embeddings", LlamaEmbeddingRequest)
async def llama_embedding(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model, runner = state.ready()
    body = LlamaEmbeddingRequest.model_validate(await read_json(request))
    field = "content" if body.content is not None else "input"
    value = body.content if body.content is not None else body.input
    assert value is not None
    prompts = [input_ids(model, runner, p, field) for p in _llama_inputs(value)]
    layer = None if body.layer is None else block_index(model, body.layer, "layer")
    steering = await resolve_steering(state, body.steering)
    states = await final_states(state, prompts, layer, steering)
    pooling = "first" if body.pooling == "cls" else body.pooling
    out = []
    for i, x in enumerate(states):
        if pooling == "none":  # one vector per token, not normalized (as llama.cpp)
            vectors = x.tolist()
        else:
            vectors = [embd_normalize(pool(x, pooling), body.embd_normalize).tolist()]
        out.append({"index": i, "embedding": vectors})
    return web.json_response(out)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/features", features)
    router.add_post("/v1/embeddings", embeddings)
    router.add_post("/embedding", llama_embedding)
    router.add_post("/embeddings", llama_embedding)  # llama.cpp's alias, in its own format
