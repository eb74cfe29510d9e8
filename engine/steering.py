"""Steering vectors built from prompts, and their translation into the step's SteeringTerms.

Layers are numbered as engine/layers.py says: layer l is the residual stream entering block l,
layer n_layers the stream after the last block; adding at layer l changes what block l reads.

ActAdd (llama.cpp's steering experiment, PR #1472: --steering-add/-sub/-source/-layer/-mul):
both prompts are tokenized with BOS, the shorter is padded at its end with the newline token
(`<0x0A>`) until they have the same length, both run through the model in one step, and the
vector is `resid[source](add) - resid[source](sub)`, one row per position. During generation,
`mul x row p` is added at the injection layer to position p of the request's sequence, for the
positions the vector has rows for, and nothing beyond.

Control vectors (llama.cpp's --control-vector, repeng): one direction per layer, added at every
position. Built from contrastive prompt pairs: the hidden state of each prompt's last token at
each layer, then per layer either the mean of the (positive - negative) differences ("mean",
llama.cpp cvector-generator's mean method) or their first principal component ("pca", as
repeng's pca_diff and cvector-generator's pca method), signed so that positive prompts project
higher than negative ones on average.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from .engine import Engine, EngineError, SeqRequest, SteeringTerm
from .layers import capture_blocks, normalize_layer, stream_at
from .tokenizer import Tokenizer


def newline_token(tokenizer: Tokenizer) -> int:
    """The byte token for '\\n' (llama.cpp's llama_token_nl for SentencePiece vocabularies)."""
    for token_id in range(tokenizer.vocab_size):
        if tokenizer.piece(token_id) == "<0x0A>":
            return token_id
    ids = tokenizer.encode("\n", bos=False)
    return ids[-1]


def actadd_tokens(tokenizer: Tokenizer, add: str, sub: str) -> tuple[list[int], list[int]]:
    """Both prompts with BOS, the shorter padded at its end with the newline token."""
    a = tokenizer.encode(add, bos=True)
    s = tokenizer.encode(sub, bos=True)
    pad = newline_token(tokenizer)
    n = max(len(a), len(s))
    return a + [pad] * (n - len(a)), s + [pad] * (n - len(s))


def _check_layer(engine: Engine, layer: int, what: str) -> int:
    return normalize_layer(layer, engine.config.n_layers, what)


def directions_from_states(positive: np.ndarray, negative: np.ndarray, layers: Sequence[int],
                           method: str) -> dict[int, np.ndarray]:
    """Per-layer directions from last-token states (pairs, len(layers), dim) of each side."""
    diffs = (positive - negative).astype(np.float64)
    out = {}
    for i, layer in enumerate(layers):
        d = diffs[:, i, :]
        if method == "mean":
            direction = d.mean(axis=0)
        else:
            centered = d - d.mean(axis=0)
            # the first right singular vector: the principal axis of the differences
            _, _, vt = np.linalg.svd(centered if np.any(centered) else d, full_matrices=False)
            direction = vt[0]
            if (d @ direction).mean() < 0:  # positives project higher than negatives
                direction = -direction
        out[layer] = direction.astype(np.float32)
    return out


def check_control_request(positive: Sequence[str], negative: Sequence[str], method: str) -> None:
    if len(positive) != len(negative) or not positive:
        raise EngineError("positive and negative need the same, non-zero number of prompts")
    if method not in ("mean", "pca"):
        raise EngineError(f"method must be 'mean' or 'pca', got {method!r}")
    if method == "pca" and len(positive) < 2:
        raise EngineError("pca needs at least two prompt pairs")


def read_layers(engine: Engine, prompts: Sequence[list[int]], layers: Sequence[int]
                ) -> list[np.ndarray]:
    """Residual stream at `layers` for every position of each prompt, all prompts in one step.

    Returns one (len(layers), len(prompt), dim) array per prompt.
    """
    n_layers = engine.config.n_layers
    capture = capture_blocks(layers, n_layers)
    out = []
    total = sum(len(p) for p in prompts)
    if total > engine.max_tokens or any(len(p) > engine.config.max_seq_len for p in prompts):
        # too big for one step: one prompt at a time (chunked), same numbers
        batches = [[p] for p in prompts]
    else:
        batches = [list(prompts)]
    for batch in batches:
        seqs = [engine.new_sequence() for _ in batch]
        try:
            caps: list[list[np.ndarray]] = [[] for _ in batch]
            longest = max(len(p) for p in batch)
            for start in range(0, longest, engine.max_tokens):
                requests, who = [], []
                for i, (seq, prompt) in enumerate(zip(seqs, batch, strict=True)):
                    part = prompt[start:start + engine.max_tokens]
                    if part:
                        requests.append(SeqRequest(seq, part, logits="none",
                                                   capture_layers=capture))
                        who.append(i)
                for i, result in zip(who, engine.step(requests), strict=True):
                    assert result.captures is not None  # capture_layers is not empty
                    caps[i].append(result.captures)
            for i in range(len(batch)):
                cap = np.concatenate(caps[i], axis=2)  # (points, len(capture), T, dim)
                out.append(np.stack([stream_at(cap, capture, layer, n_layers)
                                     for layer in layers]))
        finally:
            for seq in seqs:
                engine.release(seq)
    return out


def build_actadd(engine: Engine, tokenizer: Tokenizer, add: str, sub: str,
                 source_layer: int) -> np.ndarray:
    """(P, dim) rows: resid[source](add) - resid[source](sub), position by position."""
    source = _check_layer(engine, source_layer, "source layer")
    a, s = actadd_tokens(tokenizer, add, sub)
    if len(a) > engine.config.max_seq_len:
        raise EngineError(f"steering prompts of {len(a)} tokens exceed the context of "
                          f"{engine.config.max_seq_len}")
    ra, rs = read_layers(engine, [a, s], [source])
    return (ra[0] - rs[0]).astype(np.float32)


def build_control(engine: Engine, tokenizer: Tokenizer, positive: Sequence[str],
                  negative: Sequence[str], layers: Sequence[int],
                  method: Literal["mean", "pca"] = "mean") -> dict[int, np.ndarray]:
    """One (dim,) direction per layer from contrastive prompt pairs (see the module docstring)."""
    check_control_request(positive, negative, method)
    layers = sorted({_check_layer(engine, layer, "layer") for layer in layers})
    if not layers:
        raise EngineError("no layers given")
    prompts = [tokenizer.encode(p, bos=True) for p in [*positive, *negative]]
    states = read_layers(engine, prompts, layers)
    last = np.stack([s[:, -1, :] for s in states])  # (2 x pairs, layers, dim): last tokens
    return directions_from_states(last[:len(positive)], last[len(positive):], layers, method)


def control_terms(directions: dict[int, np.ndarray], scale: float,
                  layers: Sequence[int] | None = None) -> list[SteeringTerm]:
    """SteeringTerms adding `scale x direction` at every position of the chosen layers."""
    chosen = directions if layers is None else {k: v for k, v in directions.items()
                                                if k in set(layers)}
    return [SteeringTerm(layer=layer, vectors=vec, scale=scale, every_position=True)
            for layer, vec in sorted(chosen.items())]


def actadd_term(rows: np.ndarray, layer: int, mul: float) -> SteeringTerm:
    return SteeringTerm(layer=layer, vectors=rows, scale=mul)
