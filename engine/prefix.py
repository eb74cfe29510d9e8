"""Content keys of KV blocks for the prefix cache (engine/kvcache.py shares blocks by key).

A full block's K/V depend on its tokens, every token before it, and whatever steering touched
those positions -- nothing else, since the engine is batch-invariant. So a block's key chains
its parent's: key = BLAKE3(parent key, its KV_BLOCK token ids, the digest of the steering at
its positions). A sequence's steering is reduced once, when it is created, to `Span`s: the
[start, end) of absolute positions an entry can change, and a digest of everything about the
entry that decides how (op, layer, vectors, scale, value, norm_match, its condition). Readouts
change no K/V and are left out; so is any span that misses a block, which is why a request
steered only on its generated positions still shares its prompt with unsteered ones.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence as SequenceOf
from typing import NamedTuple, Protocol

import numpy as np
from blake3 import blake3

from .interventions import Condition, Positions
from .kvcache import KV_BLOCK


class Term(Protocol):
    """What a key needs of an engine.SteeringTerm (the engine imports this module)."""

    @property
    def layer(self) -> int: ...
    @property
    def vectors(self) -> np.ndarray: ...
    @property
    def scale(self) -> float: ...
    @property
    def every_position(self) -> bool: ...
    @property
    def op(self) -> str: ...
    @property
    def value(self) -> float: ...
    @property
    def norm_match(self) -> bool: ...
    @property
    def positions(self) -> Positions: ...
    @property
    def when(self) -> Condition | None: ...
    @property
    def plain(self) -> bool: ...


class Span(NamedTuple):
    """Positions [start, end) one steering entry may change, and the entry's digest."""

    start: int
    end: int
    digest: bytes


def _array(h: blake3, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a, np.float32)
    h.update(struct.pack("<q", a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape))
    h.update(a.tobytes())


def _condition(h: blake3, when: Condition, prompt_len: int) -> None:
    h.update(struct.pack("<qd", when.layer, when.threshold))
    h.update(f"{when.comparison}/{when.scope}".encode())
    if when.scope == "prompt":  # decided from the prompt's stream: its length is part of it
        h.update(struct.pack("<q", prompt_len))
    _array(h, np.asarray(when.vector))


def steering_spans(terms: SequenceOf[Term], scopes: SequenceOf[tuple[int, int]],
                   prompt_len: int) -> tuple[Span, ...]:
    """Each entry's span and digest, in entry order (the order folding and ops follow).

    `scopes[i]`: the [start, end) Engine._scope resolved for entry i. A plain ActAdd changes
    [0, P) of it; a prompt-conditioned entry only positions past the prompt."""
    spans = []
    for term, (start, end) in zip(terms, scopes, strict=True):
        v = np.asarray(term.vectors)
        if term.op == "add" and not term.every_position:  # ActAdd: row p at position p
            end = min(end, len(v.reshape(-1, v.shape[-1])))
        if term.when is not None and term.when.scope == "prompt":
            start = max(start, prompt_len)
        if start >= end:
            continue
        h = blake3()
        # NOTE: not the entry's index: order counts only among the spans that meet a block,
        # and block_key keeps that order
        h.update(struct.pack("<q?d?d", term.layer, term.every_position, term.scale,
                             term.norm_match, term.value))
        h.update(f"{term.op}/{term.plain}".encode())
        _array(h, v)
        if term.when is not None:
            _condition(h, term.when, prompt_len)
        spans.append(Span(start, end, h.digest()))
    return tuple(spans)


def _spans_at(h: blake3, index: int, spans: SequenceOf[Span]) -> None:
    lo, hi = index * KV_BLOCK, (index + 1) * KV_BLOCK
    for span in spans:
        if span.start < hi and lo < span.end:
            # NOTE: clipped to the block: what changed here is the same whatever the span's
            # extent beyond it (a "prompt" scope of a longer prompt, say)
            h.update(struct.pack("<qq", max(span.start, lo), min(span.end, hi)) + span.digest)


def block_key(parent: bytes, tokens: SequenceOf[int], index: int,
              spans: SequenceOf[Span]) -> bytes:
    """The key of block `index` (positions index * KV_BLOCK ...) holding `tokens`."""
    h = blake3(parent)
    h.update(np.asarray(tokens, "<i4").tobytes())
    _spans_at(h, index, spans)
    return h.digest()


def row_anchor(parent: bytes, index: int, spans: SequenceOf[Span]) -> bytes:
    """What the first rows of block `index` depend on besides their own tokens: the parent
    block's key (every token before) and the steering at the block's positions. Blocks with
    one anchor hold the same K/V rows for as long as their tokens agree (KVCache.best_rows)."""
    h = blake3(b"rows" + parent)
    h.update(struct.pack("<q", index))
    _spans_at(h, index, spans)
    return h.digest()
