"""The steering service: a request's `steering` field resolved into the engine's SteeringTerms,
and steering vectors built, imported and stored. Routes call it; it knows no HTTP routes.

Vectors are built through the shared batch like any request (generation.collect_states):
building an ActAdd vector is one forward pass of its two prompts. Tokenizing, the vector math
(an SVD for pca) and reading or writing GGUF files run on the worker pool (ServerState.run).

The store is reached on worker threads (`_store`): a file write waits for fsync and a Redis
call for the network, and neither may hold up the event loop and every other request with it.
A store that is down is a 503 for the requests that need it, and only for them.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import blake3
import numpy as np

from ..engine.cvec import ControlVector, read_control_vector, write_control_vector
from ..engine.engine import Condition, EngineError, Readout, SteeringTerm
from ..engine.interventions import Positions
from ..engine.layers import capture_blocks, normalize_block, normalize_layer, stream_at
from ..engine.steering import actadd_tokens, check_control_request, directions_from_states
from .errors import ApiError
from .generation import collect_states
from .prepare import check_text_length
from .protocol import ReadoutSpec, SteeringCondition, SteeringCreateRequest, SteeringEntry
from .runner import Captured, Runner
from .state import Model, ServerState
from .steering_store import SteeringVector, StoreFull, StoreUnavailable, vector_id

T = TypeVar("T")


def layer_number(model: Model, layer: int, field: str) -> int:
    """tiller's layer number (negative: from the end, -1 = after the last block), checked."""
    try:
        return normalize_layer(layer, model.engine.config.n_layers)
    except EngineError as e:
        raise ApiError(400, f"{field}: {e}", param=field.split(".")[0].split("[")[0]) from e


async def _store(fn: Callable[..., T], *args: Any, param: str | None = None) -> T:
    """A store call on a worker thread, its failures as API errors."""
    try:
        return await asyncio.to_thread(fn, *args)
    except StoreFull as e:
        raise ApiError(507, str(e), "insufficient_storage", param=param,
                       code="steering_store_full") from e
    except StoreUnavailable as e:
        raise ApiError(503, str(e), "unavailable_error", param=param,
                       code="steering_store_unavailable") from e


async def _save(state: ServerState, vec: SteeringVector,
                param: str | None = None) -> SteeringVector:
    return await _store(state.steering.put, vec, param=param)


async def get_vector(state: ServerState, vid: str,
                     param: str | None = None) -> SteeringVector | None:
    return await _store(state.steering.get, vid, param=param)


def _states(captured: Captured) -> np.ndarray:
    """A prompt's hidden states, there whenever blocks were captured (collect_states)."""
    assert captured.states is not None
    return captured.states


async def find_vector(state: ServerState, vid: str) -> SteeringVector:
    vec = await get_vector(state, vid)
    if vec is None:
        raise ApiError(404, f"no steering vector {vid!r}", "not_found_error",
                       code="steering_vector_not_found")
    return vec


async def list_vectors(state: ServerState) -> tuple[list[SteeringVector], int]:
    """The vectors of the loaded model (all of them while it loads), and the bytes used."""
    store = state.steering
    key = state.model.key if state.model is not None else None

    def read() -> tuple[list[SteeringVector], int]:
        return store.list(key), store.used_bytes

    return await _store(read)


async def delete_vector(state: ServerState, vid: str) -> None:
    if not await _store(state.steering.delete, vid):
        raise ApiError(404, f"no steering vector {vid!r}", "not_found_error",
                       code="steering_vector_not_found")


def _actadd_prompts(model: Model, runner: Runner, add: str, sub: str, where: str
                    ) -> tuple[list[int], list[int]]:
    """Both ActAdd prompts tokenized (on the worker pool), each checked against the context
    under its own name (`add`, `sub`; `steering[i].add` for an inline entry)."""
    limit = runner.context_limit()
    for name, text in (("add", add), ("sub", sub)):
        field = f"{where}.{name}" if where else name
        check_text_length(model, runner, text, field)  # before tokenizing: it may be huge
        n = len(model.tokenizer.encode(text, bos=True))
        if n > limit:
            raise ApiError(400, f"{field}: a steering prompt of {n} tokens exceeds the context "
                           f"of {limit}", param=field.split("[")[0].split(".")[0],
                           code="context_length_exceeded")
    return actadd_tokens(model.tokenizer, add, sub)


async def actadd_vector(state: ServerState, add: str, sub: str, source: int,
                        field: str = "layer", param: str | None = None, where: str = ""
                        ) -> SteeringVector:
    """The ActAdd vector for (add, sub, source layer): from the store, or built and stored.
    `field` names the source layer in errors, `param` the request field that needs the store,
    `where` the entry (prefix of `add` and `sub`)."""
    model, runner = state.ready()
    source = layer_number(model, source, field)
    spec = {"method": "actadd", "add": add, "sub": sub, "layer": source}
    vid = vector_id(model.key, spec)
    found = await get_vector(state, vid, param)
    if found is not None:
        return found
    a, s = await state.run(_actadd_prompts, model, runner, add, sub, where)
    n = model.engine.config.n_layers
    blocks = capture_blocks([source], n)
    hidden = await collect_states(model, runner, [a, s], blocks)
    rows = (stream_at(_states(hidden[0]), blocks, source, n)
            - stream_at(_states(hidden[1]), blocks, source, n))
    return await _save(state, SteeringVector(vid, "actadd", model.key, model.engine.config.dim,
                                             spec, rows=rows.astype(np.float32),
                                             source_layer=source), param)


class Steered(Protocol):
    """A request body with a `steering` field (completions, chat, embeddings, features)."""

    @property
    def steering(self) -> list[SteeringEntry]: ...

    @property
    def model_fields_set(self) -> set[str]: ...


async def request_steering(state: ServerState, body: Steered) -> tuple[SteeringTerm, ...]:
    """The steering a request runs with. The rule: a request that gives `steering` gets exactly
    that (`[]`: none at all); one that omits it gets the server's start-up control vectors
    (`--control-vector`), as every llama-server request does."""
    if "steering" in body.model_fields_set:
        return await resolve_steering(state, body.steering)
    model, _ = state.ready()
    return model.default_steering


async def resolve_steering(state: ServerState, entries: list[SteeringEntry],
                           field: str = "steering") -> tuple[SteeringTerm, ...]:
    """A request's `steering` entries as the engine's SteeringTerms (400/404 naming the entry),
    each with its operator, scope and condition."""
    if not entries:
        return ()
    model, _ = state.ready()
    terms: list[SteeringTerm] = []
    for i, e in enumerate(entries):
        where = f"{field}[{i}]"
        base = await _entry_terms(state, model, e, where, field)
        when = None if e.when is None else await _condition(state, model, e.when, i,
                                                            f"{where}.when", field)
        positions: Positions = ((e.positions[0], e.positions[1])
                                if isinstance(e.positions, list) else e.positions)
        if e.op != "add" and any(not t.every_position and t.vectors.ndim == 2
                                 and t.vectors.shape[0] != 1 for t in base):
            raise ApiError(400, f"{where}.op: {e.op} needs a direction; an ActAdd vector has "
                           "one row per position (use a control vector or `direction`)",
                           param=field)
        terms.extend(replace(t, op=e.op, value=e.value or 0.0, norm_match=e.norm_match,
                             positions=positions, when=when) for t in base)
    return tuple(terms)


async def _condition(state: ServerState, model: Model, c: SteeringCondition, entry: int,
                     where: str, field: str) -> Condition:
    layer = layer_number(model, c.layer, f"{where}.layer")
    vector = await direction(state, model, c.vector, layer, where, field)
    return Condition(vector, layer, c.threshold, c.comparison, c.scope, entry)


async def direction(state: ServerState, model: Model, given: str | list[float], layer: int,
                    where: str, field: str) -> np.ndarray:
    """A direction: floats of the model's width, or a stored control vector's at `layer` (its
    only one if it has one)."""
    dim = model.engine.config.dim
    if not isinstance(given, str):
        if len(given) != dim:
            raise ApiError(400, f"{where}.vector: a direction of {len(given)} values; the model's "
                           f"width is {dim}", param=field)
        v = np.asarray(given, np.float32)
        if not np.isfinite(v).all() or not v.any():
            raise ApiError(400, f"{where}.vector: a direction must be finite and not zero",
                           param=field)
        return v
    found = await _stored(state, model, given, f"{where}.vector", field)
    if found.kind != "control":
        raise ApiError(400, f"{where}.vector: {given} is an ActAdd vector (one row per "
                       "position); a direction needs a control vector", param=field)
    if len(found.directions) == 1:
        return next(iter(found.directions.values()))
    if layer not in found.directions:
        raise ApiError(400, f"{where}.vector: {given} has no direction for layer {layer} (it "
                       f"has {sorted(found.directions)})", param=field)
    return found.directions[layer]


async def _stored(state: ServerState, model: Model, vid: str, where: str, field: str
                  ) -> SteeringVector:
    found = await get_vector(state, vid, field)
    if found is None:
        raise ApiError(404, f"{where}: no steering vector {vid!r}", "not_found_error",
                       param=field, code="steering_vector_not_found")
    if found.model_key != model.key or found.dim != model.engine.config.dim:
        raise ApiError(400, f"{where}: {vid} was made for another model "
                       f"(key {found.model_key[:16]}..., width {found.dim})", param=field,
                       code="steering_model_mismatch")
    return found


async def resolve_readouts(state: ServerState, specs: list[ReadoutSpec]
                           ) -> tuple[Readout, ...]:
    """A request's `readouts` as the engine's (400 naming `readouts`). A stored control vector
    gives its direction at the stream the point reads (resid_pre: the block's layer; the others:
    the layer after it), or its only one."""
    if not specs:
        return ()
    model, _ = state.ready()
    n = model.engine.config.n_layers
    out = []
    names = set()
    for i, spec in enumerate(specs):
        where = f"readouts[{i}]"
        if spec.name in names:
            raise ApiError(400, f"{where}.name: {spec.name!r} is used twice", param="readouts")
        names.add(spec.name)
        try:
            block = normalize_block(spec.layer, n, "layer")
        except EngineError as e:
            raise ApiError(400, f"{where}.layer: {e}", param="readouts") from e
        stream = block if spec.point == "resid_pre" else block + 1
        out.append(Readout(await direction(state, model, spec.vector, stream, where, "readouts"),
                           block, spec.point))
    return tuple(out)


async def _entry_terms(state: ServerState, model: Model, e: SteeringEntry, where: str,
                       field: str) -> list[SteeringTerm]:
    """An entry's vectors as plain SteeringTerms (one per layer)."""
    terms: list[SteeringTerm] = []
    if e.direction is not None:
        wanted = e.layers if e.layers else [e.layer]
        v = await direction(state, model, e.direction, 0, where, field)
        for x in wanted:
            assert x is not None  # checked by the model
            terms.append(SteeringTerm(layer_number(model, x, f"{where}.layers"), v, e.scale,
                                      every_position=True))
        return terms
    if e.vector is None:  # inline ActAdd, llama.cpp's flags
        assert e.add is not None and e.sub is not None and e.layer is not None
        source = e.source_layer if e.source_layer is not None else e.layer
        vec = await actadd_vector(state, e.add, e.sub, source, f"{where}.source_layer",
                                  field, where)
        mul = e.mul if e.mul is not None else e.scale
        assert vec.rows is not None
        terms.append(SteeringTerm(layer_number(model, e.layer, f"{where}.layer"), vec.rows,
                                  mul))
        return terms
    found = await _stored(state, model, e.vector, f"{where}.vector", field)
    if found.kind == "actadd":
        assert found.rows is not None and found.source_layer is not None
        layer = layer_number(model, e.layer if e.layer is not None else found.source_layer,
                             f"{where}.layer")
        terms.append(SteeringTerm(layer, found.rows, e.scale))
        return terms
    wanted = e.layers if e.layers is not None else (
        [e.layer] if e.layer is not None else list(found.directions))
    for layer in (layer_number(model, x, f"{where}.layers") for x in wanted):
        if layer not in found.directions:
            raise ApiError(400, f"{where}.layers: {e.vector} has no direction for layer "
                           f"{layer} (it has {sorted(found.directions)})", param=field)
        terms.append(SteeringTerm(layer, found.directions[layer], e.scale,
                                  every_position=True))
    return terms


async def create_vector(state: ServerState, body: SteeringCreateRequest) -> SteeringVector:
    """POST /v1/steering: an ActAdd vector, or a control vector from contrastive pairs."""
    model, runner = state.ready()
    n = model.engine.config.n_layers
    if body.method == "actadd":
        assert body.add is not None and body.sub is not None and body.layer is not None
        return await actadd_vector(state, body.add, body.sub, body.layer)
    assert body.positive is not None and body.negative is not None  # checked by the model
    try:
        check_control_request(body.positive, body.negative, body.method)
    except ValueError as e:
        raise ApiError(400, str(e), param="positive") from e
    # default: every layer a llama.cpp control-vector file can hold (2..n_layers: engine/cvec.py)
    default = range(2, n + 1) if n > 1 else range(1, n + 1)
    layers = sorted({layer_number(model, x, "layers") for x in (body.layers or default)})
    spec = {"method": body.method, "positive": body.positive, "negative": body.negative,
            "layers": layers}
    vid = vector_id(model.key, spec)
    found = await get_vector(state, vid)
    if found is not None:
        return found
    prompts = await state.run(_pair_prompts, model, runner, body.positive, body.negative)
    blocks = capture_blocks(layers, n)
    hidden = await collect_states(model, runner, prompts, blocks)  # in waves of --parallel
    last = np.stack([np.stack([stream_at(_states(h), blocks, layer, n)[-1] for layer in layers])
                     for h in hidden])
    pairs = len(body.positive)
    directions = await state.run(directions_from_states, last[:pairs], last[pairs:], layers,
                                 body.method)
    return await _save(state, SteeringVector(vid, "control", model.key, model.engine.config.dim,
                                             spec, directions=directions))


def _pair_prompts(model: Model, runner: Runner, positive: list[str], negative: list[str]
                  ) -> list[list[int]]:
    """The contrastive prompts tokenized with BOS (on the worker pool), each within the context
    (400 naming `positive[i]` or `negative[i]`)."""
    limit = runner.context_limit()
    out = []
    for side, texts in (("positive", positive), ("negative", negative)):
        for i, text in enumerate(texts):
            check_text_length(model, runner, text, f"{side}[{i}]")
            ids = model.tokenizer.encode(text, bos=True)
            if len(ids) > limit:
                raise ApiError(400, f"{side}[{i}]: a prompt of {len(ids)} tokens exceeds the "
                               f"context of {limit}", param=side, code="context_length_exceeded")
            out.append(ids)
    return out


async def import_control_vector(state: ServerState, data: bytes) -> SteeringVector:
    """A llama.cpp control-vector GGUF (from llama.cpp or repeng), stored as a control vector."""
    model, _ = state.ready()
    return await _save(state, await state.run(_read_import, model, data))


def _read_import(model: Model, data: bytes) -> SteeringVector:
    """An uploaded control-vector GGUF, read and checked (on the worker pool)."""
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
    return SteeringVector(vector_id(model.key, spec), "control", model.key, config.dim, spec,
                          directions={k: np.asarray(v, np.float32)
                                      for k, v in cv.directions.items()})


def control_vector_gguf(state: ServerState, vec: SteeringVector) -> bytes:
    """A stored control vector as llama.cpp's control-vector GGUF file."""
    model, _ = state.ready()
    if vec.kind != "control":
        raise ApiError(400, "format: an ActAdd vector has one row per position; llama.cpp's "
                       "control-vector GGUF holds one per layer: download it as npy",
                       param="format")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{vec.id}.gguf"
        try:
            write_control_vector(path, ControlVector(dict(vec.directions), "llama"),
                                 model.engine.config.n_layers)
        except ValueError as e:
            raise ApiError(400, f"format: {e}", param="format") from e
        return path.read_bytes()
