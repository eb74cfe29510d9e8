"""Hidden states over HTTP: POST /v1/features, OpenAI's /v1/embeddings, llama.cpp's /embedding.

All three run their inputs as prompt-only requests through the shared batch
(server/serving.py collect_states), so they interleave with generations and never disturb
them. Numbering: a `layers` entry of /v1/features and the `layer` of the embeddings is a block
index (0..n_layers-1, negative from the end); block l's `resid_pre` is the stream steering
calls layer l, its `resid_post` the stream steering calls layer l + 1.

Binary formats are written here: `.npz` by numpy, safetensors by `safetensors_bytes` (the
format is an 8-byte little-endian header length, a JSON header, then raw little-endian data).
"""

from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
from aiohttp import web

from engine.forward import CAPTURE_POINTS
from server.app import STATE, Model, read_json
from server.errors import ApiError
from server.protocol import EmbeddingsRequest, FeaturesRequest, LlamaEmbeddingRequest
from server.serving import collect_states, tokenize_prompt
from server.steering_routes import resolve_steering

_RESID_POST = CAPTURE_POINTS.index("resid_post")
_SAFETENSORS_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<i8"): "I64"}


# validation ------------------------------------------------------------------------------------


def input_ids(request: web.Request, prompt: str | list, field: str) -> list[int]:
    """Text (with BOS) or token ids -> ids that fit the context (else context_length_exceeded)."""
    model, runner = request.app[STATE].ready()
    ids = tokenize_prompt(model, prompt, field)
    limit = runner.context_limit()
    if len(ids) > limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, "
                       f"{field} has {len(ids)} tokens. Please reduce the input.", param=field,
                       code="context_length_exceeded")
    return ids


def block_index(model: Model, block: int, field: str) -> int:
    """A block index, negative from the end (-1: the last block), checked."""
    n = model.engine.config.n_layers
    if not -n <= block < n:
        raise ApiError(400, f"{field}: block {block} outside 0..{n - 1} (or -{n}..-1)",
                       param=field.split("[")[0])
    return block % n


def token_positions(positions: str | list[int], n_tokens: int) -> list[int]:
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
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _binary(body: bytes, filename: str) -> web.Response:
    return web.Response(body=body, content_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="{filename}"'})


# hidden states ----------------------------------------------------------------------------------


async def final_states(request: web.Request, prompts: list[list[int]], layer: int | None,
                       steering: tuple) -> list[np.ndarray]:
    """Each prompt's (T, dim) states: block `layer`'s output, or (None) the last block's output
    after the model's final RMSNorm -- what llama.cpp embeds."""
    state = request.app[STATE]
    model, _ = state.ready()
    eng = model.engine
    block = eng.config.n_layers - 1 if layer is None else layer
    out: list[np.ndarray] = []
    wave = max(1, state.config.parallel)  # NOTE: a long input list must not fill the queue
    for start in range(0, len(prompts), wave):
        states = await collect_states(request, prompts[start:start + wave], [block], steering)
        out.extend(s[_RESID_POST, 0].astype(np.float32) for s in states)
    if layer is None:
        dim = eng.config.dim
        weight = np.asarray(eng.weights.final_norm[:dim], dtype=np.float32)
        out = [rms_norm(final_steering(x, steering, eng.config.n_layers), weight,
                        eng.config.norm_eps) for x in out]
    return out


def final_steering(x: np.ndarray, steering: tuple, n_layers: int) -> np.ndarray:
    """x (T, dim), the last block's output, plus the steering at layer n_layers, which the
    engine adds after the capture and before the final norm (summed as Engine.step sums it)."""
    acc = np.zeros_like(x)
    for term in steering:
        if term.layer != n_layers:
            continue
        v = np.asarray(term.vectors, np.float32)
        if term.every_position:
            acc += np.float32(term.scale) * v.reshape(x.shape[1])
        else:
            n = min(len(v), len(x))
            acc[:n] += np.float32(term.scale) * v[:n]
    return x + acc


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (T, dim) -> x / sqrt(mean(x^2) + eps) * weight, the mean taken in float64."""
    ms = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    return (x * (1.0 / np.sqrt(ms + eps)) * weight).astype(np.float32)


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


async def features(request: web.Request) -> web.Response:
    model, _ = request.app[STATE].ready()
    body = FeaturesRequest.model_validate(await read_json(request))
    ids = input_ids(request, body.input, "input")
    n_layers = model.engine.config.n_layers
    layers = list(range(n_layers)) if body.layers is None else [
        block_index(model, b, f"layers[{i}]") for i, b in enumerate(body.layers)]
    positions = token_positions(body.positions, len(ids))
    points = list(dict.fromkeys(body.points))  # repeated names once, in the order given
    steering = await resolve_steering(request, body.steering)
    blocks = sorted(set(layers))
    (states,) = await collect_states(request, [ids], blocks, steering)  # (4, blocks, T, dim)
    rows = [blocks.index(b) for b in layers]
    arrays = {p: np.ascontiguousarray(states[CAPTURE_POINTS.index(p)][rows][:, positions],
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


async def embeddings(request: web.Request) -> web.Response:
    model, _ = request.app[STATE].ready()
    body = EmbeddingsRequest.model_validate(await read_json(request))
    prompts = [input_ids(request, p, "input") for p in _openai_inputs(body.input)]
    layer = None if body.layer is None else block_index(model, body.layer, "layer")
    steering = await resolve_steering(request, body.steering)
    states = await final_states(request, prompts, layer, steering)
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


async def llama_embedding(request: web.Request) -> web.Response:
    model, _ = request.app[STATE].ready()
    body = LlamaEmbeddingRequest.model_validate(await read_json(request))
    field = "content" if body.content is not None else "input"
    value = body.content if body.content is not None else body.input
    prompts = [input_ids(request, p, field) for p in _llama_inputs(value)]
    layer = None if body.layer is None else block_index(model, body.layer, "layer")
    steering = await resolve_steering(request, body.steering)
    states = await final_states(request, prompts, layer, steering)
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
