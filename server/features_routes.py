"""Hidden states over HTTP: POST /v1/features, OpenAI's /v1/embeddings, llama.cpp's /embedding.

All three run their inputs as prompt-only requests through the shared batch
(server/generation.py collect_states), so they interleave with generations and never disturb
them. Numbering (engine/layers.py): a `layers` entry of /v1/features and the `layer` of the
embeddings is a block index (0..n_layers-1, negative from the end); block l's `resid_pre` is
the stream steering calls layer l, its `resid_post` the stream steering calls layer l + 1.

Binary formats are written here: `.npz` by numpy, safetensors by `safetensors_bytes` (the
format is an 8-byte little-endian header length, a JSON header, then raw little-endian data).

Every response is bounded before any work by --max-feature-values (numbers in the response),
and tokenizing and encoding run on the worker pool: a response of millions of numbers takes
seconds to encode.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from typing import Literal, NamedTuple

import numpy as np
from aiohttp import web

from ..engine.engine import EngineError, SteeringTerm
from ..engine.forward import CAPTURE_POINTS
from ..engine.layers import normalize_block
from ..engine.lens import lens_logits, top_logprobs
from .errors import ApiError
from .generation import collect_states
from .http import dumps, encode_json, json_bytes, read_body
from .openapi import operation
from .prepare import input_ids
from .protocol import (
    EmbeddingsRequest,
    EmbeddingsResponse,
    FeatureInput,
    FeaturePoint,
    FeaturesRequest,
    FeaturesResponse,
    LlamaEmbeddingRequest,
    LlamaEmbeddingResponse,
)
from .runner import Runner
from .state import STATE, Model, ServerState
from .steering_service import request_steering, resolve_steering

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


def check_budget(state: ServerState, values: int, what: str, field: str) -> None:
    """A response of `values` numbers must fit --max-feature-values (400 naming the field)."""
    limit = state.config.max_feature_values
    if values > limit:
        raise ApiError(400, f"{field}: the response would hold {what} = {values} numbers; the "
                       f"server's limit is {limit} (--max-feature-values). Ask for fewer "
                       f"positions, layers or points, or split the request.", param=field,
                       code="response_too_large")


def check_finite(arrays: list[np.ndarray], steering: tuple[SteeringTerm, ...]) -> None:
    """Hidden states that overflowed (steering scaled far beyond the stream's own size) are a
    400, never NaN in a JSON body or a silently broken binary."""
    if all(np.isfinite(a).all() for a in arrays):
        return
    if steering:
        raise ApiError(400, "steering: the steered hidden states overflow to infinity or NaN; "
                       "use a smaller scale", param="steering", code="non_finite_result")
    raise ApiError(500, "the hidden states are not finite", "server_error",
                   code="non_finite_result")


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


_CHUNK = 8192  # numbers per json.dumps call


def json_floats(a: np.ndarray) -> str:
    """A float array as nested JSON lists, encoded a block of rows at a time.

    NOTE: json.dumps and tolist() are C calls that hold the GIL throughout: one call over
    millions of numbers would stall the event loop for a second even from a worker thread.
    Between calls of at most _CHUNK numbers the loop gets its turn.
    """
    if a.ndim < 2 or a.size <= _CHUNK:
        return dumps(a.tolist())
    rows = max(1, _CHUNK // max(1, a[0].size))
    if rows == 1:
        return "[" + ",".join(json_floats(x) for x in a) + "]"
    return "[" + ",".join(dumps(a[i:i + rows].tolist())[1:-1]
                          for i in range(0, len(a), rows)) + "]"


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
    hidden = await collect_states(model, runner, prompts, blocks, steering,
                                  final=layer is None)  # in waves of --parallel
    out: list[np.ndarray] = []
    for h in hidden:
        x = h.final if layer is None else h.states[_RESID_POST, 0]  # type: ignore[index]
        assert x is not None
        out.append(x.astype(np.float32))
    check_finite(out, steering)
    return out


def pool(x: np.ndarray, pooling: str) -> np.ndarray:
    """(T, dim) -> (dim,): the mean over tokens, or the first or last token's row."""
    if pooling == "mean":
        return x.mean(axis=0, dtype=np.float64).astype(np.float32)
    return x[0] if pooling == "first" else x[-1]


def embd_normalize(v: np.ndarray, p: int) -> np.ndarray:
    """llama.cpp's common_embd_normalize: -1 none, 0 max-abs scaled to the int16 range,
    1 taxicab, 2 Euclidean, p > 2 the p-norm. A zero vector stays zero.

    NOTE: computed on v / max|v|, whose entries are at most 1 in size: |x|**p then never
    overflows (p = 1000 would for any |x| > 2.03), and the largest entry keeps the sum >= 1.
    """
    if p < 0:
        return v.astype(np.float32)
    v64 = v.astype(np.float64)
    top = float(np.abs(v64).max()) if v64.size else 0.0
    if not top > 0:
        return np.zeros_like(v, dtype=np.float32)
    w = v64 / top
    if p == 0:
        return (w * 32760.0).astype(np.float32)
    if p == 1:
        norm = float(np.sum(np.abs(w)))
    elif p == 2:
        norm = float(np.sqrt(np.sum(w * w)))
    else:
        norm = float(np.sum(np.abs(w) ** p) ** (1.0 / p))
    return (w / norm).astype(np.float32)


# POST /v1/features ---------------------------------------------------------------------------


class _FeatureRequest(NamedTuple):
    ids: list[int]
    layers: list[int]
    positions: list[int]
    points: list[FeaturePoint]


def _prepare_features(state: ServerState, model: Model, runner: Runner,
                      body: FeaturesRequest) -> list[_FeatureRequest]:
    """Tokens, layers, positions and points of each input of a features request, within the
    budget (on the worker pool: the inputs are tokenized). A batch's inputs are named
    `inputs[i].input`, `inputs[i].positions`."""
    n_layers = model.engine.config.n_layers
    layers = list(range(n_layers)) if body.layers is None else [
        block_index(model, b, f"layers[{i}]") for i, b in enumerate(body.layers)]
    points = list(dict.fromkeys(body.points))  # repeated names once, in the order given
    dim = model.engine.config.dim
    n_points = sum(p != "logit_lens" for p in points)
    lens = 2 * body.top_k if "logit_lens" in points else 0  # ids and logprobs
    width = n_points * dim + lens

    def what(n: int) -> str:
        if lens:
            return (f"positions x layers x (points x width + 2 x top_k) = {n} x {len(layers)} "
                    f"x ({n_points} x {dim} + 2 x {body.top_k})")
        return f"positions x layers x points x width = {n} x {len(layers)} x {n_points} x {dim}"
    batch = body.inputs is not None
    given = body.inputs if body.inputs is not None else [
        FeatureInput.model_construct(input=body.input, positions=body.positions)]
    out: list[_FeatureRequest] = []
    total = 0
    for i, item in enumerate(given):
        where = f"inputs[{i}]." if batch else ""
        wanted = item.positions if item.positions is not None else body.positions
        if isinstance(wanted, list):  # known before the input is tokenized
            check_budget(state, total + len(wanted) * len(layers) * width, what(len(wanted)),
                         f"{where}positions")
        assert item.input is not None  # one of input and inputs: checked by the model
        ids = input_ids(model, runner, item.input, f"{where}input")
        positions = token_positions(wanted, len(ids))
        total += len(positions) * len(layers) * width
        check_budget(state, total, what(len(positions)), f"{where}positions")
        out.append(_FeatureRequest(ids, layers, positions, points))
    return out


def _lens(model: Model, req: _FeatureRequest, states: np.ndarray, blocks: list[int],
          top_k: int) -> dict[str, np.ndarray]:
    """The logit lens of each requested layer's resid_post at the positions (on the worker
    pool): ids and logprobs (len(layers), len(positions), top_k)."""
    c = model.engine.config
    rows = states[CAPTURE_POINTS.index("resid_post")][[blocks.index(b) for b in req.layers]]
    h = rows[:, req.positions].reshape(-1, c.dim)
    ids, lps = top_logprobs(lens_logits(model.engine.weights, c, h), top_k)
    shape = (len(req.layers), len(req.positions), top_k)
    return {"logit_lens.ids": ids.reshape(shape), "logit_lens.logprobs": lps.reshape(shape)}


def _encode_result(model: Model, req: _FeatureRequest, arrays: dict[str, np.ndarray],
                   fmt: str, prefix: str = "") -> tuple[bytes, dict[str, np.ndarray]]:
    """One input's JSON object (fmt json) or its named arrays (npz, safetensors: names
    prefixed with `prefix`, a batch's "i.")."""
    pieces = [_piece(model, t) for t in req.ids]
    index = {"tokens": np.asarray(req.ids, np.int64),
             "positions": np.asarray(req.positions, np.int64),
             "layers": np.asarray(req.layers, np.int64)}
    if fmt != "json":
        named = {**arrays, **index}
        if fmt == "npz":
            named["pieces"] = np.asarray(pieces, dtype=str)
        return b"", {prefix + k: v for k, v in named.items()}
    head = {"tokens": req.ids, "pieces": pieces, "layers": req.layers, "points": req.points,
            "positions": req.positions,
            "shape": [len(req.layers), len(req.positions), model.engine.config.dim]}
    if "logit_lens.ids" in arrays:
        ids = arrays["logit_lens.ids"]
        head["logit_lens"] = {
            "ids": ids.tolist(),
            "tokens": [[[_piece(model, int(t)) for t in row] for row in layer] for layer in ids],
            "logprobs": arrays["logit_lens.logprobs"].tolist()}
    encoded = encode_json(head)
    data = ",".join(f"{dumps(p)}:{json_floats(a)}" for p, a in arrays.items()
                    if not p.startswith("logit_lens"))
    return encoded[:-1] + f',"data":{{{data}}}}}'.encode(), {}  # finite: checked first


def _encode_features(model: Model, reqs: list[_FeatureRequest],
                     results: list[dict[str, np.ndarray]], fmt: str, batch: bool) -> bytes:
    """The response body in `fmt` (on the worker pool: millions of numbers take seconds)."""
    parts = [_encode_result(model, r, a, fmt, f"{i}." if batch else "")
             for i, (r, a) in enumerate(zip(reqs, results, strict=True))]
    if fmt == "npz":
        return _npz_bytes({k: v for _, named in parts for k, v in named.items()})
    if fmt == "safetensors":
        metadata = {"model": model.name, "model_key": model.key,
                    "pieces": json.dumps([[_piece(model, t) for t in r.ids] for r in reqs]
                                         if batch else [_piece(model, t) for t in reqs[0].ids])}
        return safetensors_bytes({k: v for _, named in parts for k, v in named.items()
                                  if v.dtype.kind != "U"}, metadata)
    model_field = encode_json({"model": model.name})[:-1]
    if batch:
        return model_field + b',"results":[' + b",".join(p for p, _ in parts) + b"]}"
    return model_field + b"," + parts[0][0][1:]


@operation("Hidden states (and the logit lens) of chosen layers, points and positions, of one "
           "input or a batch (json, npz or safetensors)", FeaturesRequest, FeaturesResponse,
           binary=True)
async def features(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model, runner = state.ready()
    body = await read_body(request, FeaturesRequest)
    reqs = await state.run(_prepare_features, state, model, runner, body)
    steering = await request_steering(state, body)
    each = [steering if item.steering is None else
            await resolve_steering(state, item.steering, f"inputs[{i}].steering")
            for i, item in enumerate(body.inputs or [])] or None
    blocks = sorted(set(reqs[0].layers))
    hidden = await collect_states(model, runner, [r.ids for r in reqs], blocks, steering,
                                  each=each)
    results = []
    for i, (req, captured) in enumerate(zip(reqs, hidden, strict=True)):
        states = captured.states  # (len(CAPTURE_POINTS), len(blocks), T, dim)
        assert states is not None
        rows = [blocks.index(b) for b in req.layers]
        arrays: dict[str, np.ndarray] = {
            p: np.ascontiguousarray(states[CAPTURE_POINTS.index(p)][rows][:, req.positions],
                                    dtype=np.float32) for p in req.points if p != "logit_lens"}
        check_finite([*arrays.values(), states], each[i] if each else steering)
        if "logit_lens" in req.points:
            arrays.update(await state.run(_lens, model, req, states, blocks, body.top_k))
        results.append(arrays)
    encoded = await state.run(_encode_features, model, reqs, results, body.format,
                              body.inputs is not None)
    if body.format == "json":
        return json_bytes(encoded)
    return _binary(encoded, f"features.{body.format}")


# POST /v1/embeddings (OpenAI) -------------------------------------------------------------------


def _openai_inputs(value: str | list) -> list[str | list[int]]:
    if isinstance(value, str) or all(isinstance(x, int) for x in value):
        return [value]  # one text, or one prompt as token ids
    return list(value)


def _embedding_ids(state: ServerState, model: Model, runner: Runner, inputs: list,
                   field: str, pooled: bool) -> list[list[int]]:
    """Each input's tokens, within the budget (on the worker pool)."""
    dim = model.engine.config.dim
    if pooled:
        check_budget(state, len(inputs) * dim, f"inputs x width = {len(inputs)} x {dim}", field)
    prompts = [input_ids(model, runner, p, field) for p in inputs]
    if not pooled:
        tokens = sum(len(p) for p in prompts)
        check_budget(state, tokens * dim, f"tokens x width = {tokens} x {dim}", field)
    return prompts


def _openai_body(model: Model, states: list[np.ndarray], body: EmbeddingsRequest,
                 n_tokens: int) -> bytes:
    data = []
    for i, x in enumerate(states):
        v = embd_normalize(pool(x, body.pooling), 2 if body.normalize else -1)
        encoded = (base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                   if body.encoding_format == "base64" else v.tolist())
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    return encode_json({"object": "list", "data": data, "model": model.name,
                        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


@operation("OpenAI embeddings (plus pooling, normalize, layer, steering)", EmbeddingsRequest,
           EmbeddingsResponse)
async def embeddings(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model, runner = state.ready()
    body = await read_body(request, EmbeddingsRequest)
    prompts = await state.run(_embedding_ids, state, model, runner,
                              _openai_inputs(body.input), "input", True)
    layer = None if body.layer is None else block_index(model, body.layer, "layer")
    steering = await request_steering(state, body)
    states = await final_states(state, prompts, layer, steering)
    n_tokens = sum(len(p) for p in prompts)
    return json_bytes(await state.run(_openai_body, model, states, body, n_tokens))


# POST /embedding (llama.cpp) -------------------------------------------------------------------


def _llama_inputs(value: str | list) -> list[str | list]:
    """llama.cpp's rule: a string, or a list holding any token id, is one prompt (strings and
    ids mixed); otherwise each element of the list is a prompt."""
    if isinstance(value, str) or any(isinstance(x, int) for x in value):
        return [value]
    return list(value)


def _llama_body(states: list[np.ndarray], pooling: str, p: int) -> bytes:
    out = []
    for i, x in enumerate(states):
        if pooling == "none":  # one vector per token, not normalized (as llama.cpp)
            vectors = json_floats(x)
        else:
            vectors = json_floats(embd_normalize(pool(x, pooling), p)[None])
        out.append(f'{{"index":{i},"embedding":{vectors}}}')
    return ("[" + ",".join(out) + "]").encode()  # finite: final_states checked them


@operation("llama.cpp embeddings", LlamaEmbeddingRequest, LlamaEmbeddingResponse)
async def llama_embedding(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model, runner = state.ready()
    body = await read_body(request, LlamaEmbeddingRequest)
    field = "content" if body.content is not None else "input"
    value = body.content if body.content is not None else body.input
    assert value is not None
    pooling = "first" if body.pooling == "cls" else body.pooling
    prompts = await state.run(_embedding_ids, state, model, runner, _llama_inputs(value), field,
                              pooling != "none")
    layer = None if body.layer is None else block_index(model, body.layer, "layer")
    steering = await request_steering(state, body)
    states = await final_states(state, prompts, layer, steering)
    return json_bytes(await state.run(_llama_body, states, pooling, body.embd_normalize))


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/features", features)
    router.add_post("/v1/embeddings", embeddings)
    router.add_post("/embedding", llama_embedding)
    router.add_post("/embeddings", llama_embedding)  # llama.cpp's alias, in its own format
