"""The engine: a loaded model, its KV cache, and `step()`, which runs one batched forward pass.

Callers (the CLI's generate loop, the server's scheduler) own the policy: which sequences run,
how many tokens each contributes. The engine owns correctness: it validates a batch completely
before touching any state, flattens it into arrays and runs forward_step once.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from typing import Literal

import numba
import numpy as np

from .config import GROUP_SIZE, ModelConfig
from .forward import CAPTURE_POINTS, Workspace, forward_step
from .interventions import (
    OPS,
    Condition,
    Op,
    Positions,
    Readout,
    SeqInterventions,
    StepLayouts,
)
from .kernels import ATT_ROWS
from .kvcache import KV_BLOCK, CacheFull, KVCache, blocks_for
from .prefix import Span, block_key, row_anchor, steering_spans
from .weight_cache import load_or_build
from .weights import DTYPES, Progress, Weights, padded

__all__ = ["CAPTURE_POINTS", "MAX_STEERING_NORM", "BatchError", "CacheFull", "Condition",
           "Engine", "EngineError", "Readout", "SeqRequest", "SeqResult", "Sequence",
           "SteeringTerm"]


# The largest L2 norm the steering of one position may have, summed over the layers it is added
# at. RMSNorm squares and sums the residual stream in float32 (kernels.rmsnorm_row), which
# overflows to inf -- and the sequence's logits to NaN -- once the stream's norm nears 1.8e19.
# 1e9 keeps that sum below ~1e18 (the model's own additions are bounded: each block reads a
# normalized stream) and is far above useful steering: Llama residual norms are ~1e1-1e4.
MAX_STEERING_NORM = 1e9


class EngineError(ValueError):
    """A request the engine cannot run as given (the message says which part is wrong)."""


class BatchError(EngineError):
    """A batch that is malformed or too large for one step."""


@dataclass(frozen=True)
class SteeringTerm:
    """A vector added to the residual stream entering `layer`, times `scale`.

    `layer` runs from 0 to n_layers: n_layers is the stream after the last layer (before the
    final norm), so that a vector can follow any layer's output as llama.cpp's control vectors do.

    `vectors` is (P, dim): row p is added at position p for p < P, nothing beyond (ActAdd).
    With `every_position`, it is (dim,) or (1, dim) and added at every position (control vector).

    engine/interventions.py: `op` ("add", "ablate", "clamp", "cap"; the last three need a
    direction, not ActAdd rows) with `value` (clamp, cap) and `norm_match`; `positions` limits
    the entry to "prompt", "generated" or a [start, end) range of absolute positions (None:
    every position, or an ActAdd vector's own); `when` makes it conditional (CAST).
    """

    layer: int
    vectors: np.ndarray
    scale: float = 1.0
    every_position: bool = False
    op: str = "add"
    value: float = 0.0
    norm_match: bool = False
    positions: Positions = None
    when: Condition | None = None

    @property
    def plain(self) -> bool:
        """An addition everywhere it applies, folded with the others."""
        return (self.op == "add" and self.positions in (None, "all") and self.when is None
                and not self.norm_match)


@dataclass(frozen=True, eq=False)
class FoldedSteering:
    """A sequence's steering terms, validated and summed once when the sequence is created: for
    each steered layer, one vector added at every position and rows added at the first ones."""

    layers: np.ndarray  # (n,) steered layers
    every: np.ndarray  # (n, dim) float32
    rows: np.ndarray  # (n, P, dim) float32, P = the longest ActAdd (0 without one)


@dataclass(eq=False)
class Sequence:
    """One sequence's place in the KV cache (its length so far and the blocks holding it) and
    the steering it was created with, which it keeps for its whole life.

    For the prefix cache (engine/prefix.py): the tokens computed so far, the content keys of
    its full blocks, its steering as spans, and whether it may reuse cached blocks at all (not
    with prompt conditions, whose decision needs the prompt's own hidden states)."""

    id: int
    length: int = 0
    blocks: list[int] = field(default_factory=list)
    steering: FoldedSteering | None = field(default=None, repr=False)
    interventions: SeqInterventions | None = field(default=None, repr=False)
    tokens: list[int] = field(default_factory=list, repr=False)
    keys: list[bytes] = field(default_factory=list, repr=False)
    spans: tuple[Span, ...] = field(default=(), repr=False)
    reusable: bool = True
    prompt_len: int = 0


@dataclass
class SeqRequest:
    """What one sequence contributes to a step: new tokens continuing it, and its captures.

    capture_final: the stream after the final norm (what the classifier reads), per token.
    """

    seq: Sequence
    tokens: list[int] | np.ndarray
    logits: Literal["last", "all", "none"] = "last"
    capture_layers: tuple[int, ...] | list[int] = ()
    capture_final: bool = False


@dataclass
class SeqResult:
    logits: np.ndarray | None  # (vocab,) for "last", (n_tokens, vocab) for "all"
    captures: np.ndarray | None  # (len(CAPTURE_POINTS), n_capture_layers, n_tokens, dim)
    final: np.ndarray | None = None  # (n_tokens, dim) with capture_final
    # (n_tokens, n_readouts, 2): projection on the unit direction and cosine, per token
    readouts: np.ndarray | None = None
    # (n_tokens, n_conditions, 2): token conditions' cosine and 1/0 (NaN: not evaluated)
    gates: np.ndarray | None = None


def default_threads() -> int:
    return numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]


class Engine:
    def __init__(self, config: ModelConfig, weights: Weights, *, max_tokens: int = 256,
                 kv_tokens: int | None = None, kv_sequences: int = 4,
                 threads: int | None = None, prefix_cache: bool = True,
                 cache_type_k: str | None = None, cache_type_v: str | None = None) -> None:
        """max_tokens: tokens per step. The KV cache holds kv_tokens positions in all, by
        default kv_sequences full contexts (max_seq_len each), shared through paging.
        prefix_cache: full blocks are kept by content key for `attach_prefix` to reuse.
        cache_type_k / cache_type_v: "f32", or "bf16" (half the memory; queries and keys, and
        attention weights and values, multiplied as bfloat16 pairs into float32 sums); by
        default bf16 with Q8_0 weights (whose activations are rounded to 8 bits anyway) where
        the head width allows it, f32 with f32 weights (the exact reference)."""
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        max_threads: int = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
        if threads is not None and not 1 <= threads <= max_threads:
            raise ValueError(f"threads must be in 1..{max_threads}, got {threads}")
        self.config = config
        self.weights = weights
        self.dtype = "f32" if weights.wqkv.dtype == np.float32 else "q8_0"
        self.max_tokens = max_tokens
        self.threads = threads or default_threads()
        kv_tokens = kv_tokens or kv_sequences * config.max_seq_len
        auto = "bf16" if self.dtype == "q8_0" and config.head_dim % 16 == 0 else "f32"
        self.cache = KVCache(config, blocks_for(kv_tokens), cache_type_k or auto,
                             cache_type_v or auto)
        self.max_blocks_per_seq = blocks_for(config.max_seq_len)
        self.prefix_cache = prefix_cache
        self._ids = itertools.count()
        self._workspace = self._make_workspace(max_tokens)
        c = config
        self._dims = (c.n_layers, c.dim, c.hidden_dim, c.n_heads, c.n_kv_heads, c.head_dim)
        self._no_steer = np.zeros((1, c.dim), np.float32)
        self._no_capture = np.zeros((len(CAPTURE_POINTS), 1, 1, c.dim), np.float32)
        self._no_final = np.zeros((1, c.dim), np.float32)
        self._layouts = StepLayouts(c.n_layers, c.dim)

    def _make_workspace(self, T: int) -> Workspace:
        c = self.config
        max_pad = max(padded(n, self.dtype) for n in (c.dim, c.hidden_dim, c.q_dim))
        act_dtype = np.int8 if self.dtype == "q8_0" else np.float32
        q8 = self.dtype == "q8_0"
        f = np.float32
        n_threads: int = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
        # NOTE: rows of 32: simd.bf16_weights converts 32 scores at a time
        scores = np.zeros((n_threads, ATT_ROWS, -(-c.max_seq_len // 32) * 32), f)
        bf16_v, bf16_k = self.cache.type_v == "bf16", self.cache.type_k == "bf16"
        return Workspace(
            x=np.zeros((T, c.dim), f), xb=np.zeros((T, c.dim), f),
            xa=np.zeros((T, max_pad), act_dtype),
            xs=np.zeros((T, max_pad // GROUP_SIZE if q8 else 0), f),
            xc=np.zeros((T, max_pad // GROUP_SIZE if q8 else 0), np.int32),
            qkv=np.zeros((T, c.q_dim + 2 * c.kv_dim), f), att=np.zeros((T, c.q_dim), f),
            proj=np.zeros((T, c.dim), f), h13=np.zeros((T, 2 * c.hidden_dim), f),
            hact=np.zeros((T, c.hidden_dim), f),
            scores=scores,
            weights=np.zeros(scores.shape, np.uint16) if bf16_v else scores,
            qb=np.zeros((T, c.q_dim if bf16_k else 0), np.uint16),
        )

    def prefault(self) -> None:
        """Write every page of the KV cache and the step's workspace now, not in the steps
        that first use them (KVCache.prefault): for a server's steady latency."""
        self.cache.prefault()
        for array in self._workspace:
            array.fill(0)

    @classmethod
    def load(cls, path: str | os.PathLike[str], dtype: str = "q8_0",
             progress: Progress | None = None, weight_cache: bool = True, **kwargs) -> Engine:
        from .loader import load_checkpoint

        return cls.from_checkpoint(load_checkpoint(path), dtype, progress, weight_cache,
                                   **kwargs)

    @classmethod
    def from_checkpoint(cls, checkpoint, dtype: str = "q8_0", progress: Progress | None = None,
                        weight_cache: bool = True, **kwargs) -> Engine:
        """`progress(done, total, name)` follows the conversion of the file's tensors.
        `weight_cache`: map the weights from (and keep them in) the weight cache
        (engine/weight_cache.py) when the file is large enough for it to pay."""
        if dtype not in DTYPES:  # NOTE: before the cache names a file after it
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        weights = load_or_build(checkpoint, dtype, progress, use_cache=weight_cache)
        return cls(checkpoint.config, weights, **kwargs)

    # sequences -------------------------------------------------------------------------------

    def new_sequence(self, steering: SequenceOf[SteeringTerm] = (),
                     readouts: SequenceOf[Readout] = (),
                     prompt_len: int | None = None) -> Sequence:
        """A new, empty sequence with its steering and readouts, validated (EngineError) and
        folded here. `prompt_len` places the "prompt"/"generated" scopes and prompt conditions."""
        plain = [t for t in steering if t.plain]
        for i, term in enumerate(steering):
            self._validate_term(i, term)
        folded = self._fold_steering(plain) if plain else None
        extra = self._interventions(steering, readouts, prompt_len)
        scopes = [self._scope(i, t.positions, prompt_len) for i, t in enumerate(steering)]
        spans = steering_spans(steering, scopes, prompt_len or 0)
        reusable = not any(t.when is not None and t.when.scope == "prompt" for t in steering)
        return Sequence(id=next(self._ids), steering=folded, interventions=extra, spans=spans,
                        reusable=reusable, prompt_len=prompt_len or 0)

    def _interventions(self, terms: SequenceOf[SteeringTerm], readouts: SequenceOf[Readout],
                       prompt_len: int | None) -> SeqInterventions | None:
        """The terms that are not plain additions as Ops, their conditions, the readouts."""
        c = self.config
        ops: list[Op] = []
        conds: list[Condition] = []
        cond_entries: list[int] = []
        for i, term in enumerate(terms):
            if term.plain:
                continue
            rows = term.op == "add" and not term.every_position  # ActAdd: row p at position p
            v = np.asarray(term.vectors, np.float32)
            v = v.reshape(-1, c.dim) if rows else v.reshape(c.dim)
            if term.op == "add":
                v = (np.float32(term.scale) * v).astype(np.float32)
            else:
                v = (v / np.float32(np.linalg.norm(v.astype(np.float64)))).astype(np.float32)
            start, end = self._scope(i, term.positions, prompt_len)
            cond = -1
            if term.when is not None:
                if term.when.scope == "prompt" and prompt_len is None:
                    raise EngineError(f"steering[{i}]: a prompt condition needs the prompt")
                conds.append(term.when)
                cond_entries.append(i)
                cond = len(conds) - 1
            ops.append(Op(i, term.layer, OPS.index(term.op), v, rows, float(term.value),
                          term.norm_match, start, end, cond))
        for j, ro in enumerate(readouts):
            if not 0 <= ro.block < c.n_layers or ro.point not in CAPTURE_POINTS:
                raise EngineError(f"readouts[{j}]: block {ro.block} outside 0..{c.n_layers - 1}"
                                  f" or point {ro.point!r} not one of {CAPTURE_POINTS}")
            self._check_direction(f"readouts[{j}]", ro.vector)
        if not ops and not readouts:
            return None
        return SeqInterventions(ops, conds, cond_entries, list(readouts), prompt_len or 0,
                                np.zeros((len(conds), c.dim), np.float64))

    def _scope(self, i: int, positions: Positions, prompt_len: int | None) -> tuple[int, int]:
        """[start, end) of absolute positions an entry applies at."""
        n = self.config.max_seq_len
        if positions is None or positions == "all":
            return 0, n
        if isinstance(positions, str):
            if prompt_len is None:
                raise EngineError(f"steering[{i}]: positions {positions!r} needs the prompt")
            return (0, prompt_len) if positions == "prompt" else (prompt_len, n)
        start, end = positions
        if not 0 <= start < end:
            raise EngineError(f"steering[{i}]: positions [{start}, {end}) is empty or negative")
        if end > n:
            raise EngineError(f"steering[{i}]: positions [{start}, {end}) go past the context "
                              f"of {n}")
        return start, end

    def _check_direction(self, where: str, v: np.ndarray) -> None:
        c = self.config
        if not isinstance(v, np.ndarray) or v.size != c.dim:
            raise EngineError(f"{where}: a direction must have {c.dim} values (the model's "
                              f"width), got shape {getattr(v, 'shape', None)}")
        if not np.isfinite(v).all() or not np.any(v):
            raise EngineError(f"{where}: a direction must be finite and not zero")

    def release(self, seq: Sequence) -> None:
        """Give the sequence's KV blocks back to the pool; the sequence is empty afterwards.
        Its full blocks stay cached (evictable) for later sequences with the same prefix, and
        its last, partial one offers its rows (a conversation's next turn continues there)."""
        if self.prefix_cache:
            self._offer_partial(seq)
        self.cache.release(seq.blocks)
        seq.blocks = []
        seq.length = 0
        seq.tokens = []
        seq.keys = []

    # the prefix cache ------------------------------------------------------------------------

    def attach_prefix(self, seq: Sequence, prompt: SequenceOf[int]) -> int:
        """Before a sequence's first step: take the cached blocks that hold the longest prefix
        of `prompt` (same tokens, same steering at those positions), as if computed; returns
        the tokens reused. The last prompt token is always left to compute (its logits are the
        first draw's), and nothing is reused with prompt conditions (Sequence.reusable)."""
        if seq.length or seq.blocks:
            raise EngineError("attach_prefix: the sequence has already started")
        if not self.prefix_cache or not seq.reusable:
            return 0
        stats = self.cache.stats
        stats.lookups += len(prompt)
        parent = b""
        for i in range((len(prompt) - 1) // KV_BLOCK):
            tokens = list(prompt[i * KV_BLOCK:(i + 1) * KV_BLOCK])
            key = block_key(parent, tokens, i, seq.spans)
            block = self.cache.lookup(key)
            if block is None:
                break
            self.cache.acquire(block)
            seq.blocks.append(block)
            seq.keys.append(key)
            seq.tokens.extend(tokens)
            parent = key
        stats.hit_blocks += len(seq.blocks)
        self._copy_rows(seq, prompt, parent)
        seq.length = len(seq.tokens)
        stats.hit_tokens += seq.length
        return seq.length

    def _copy_rows(self, seq: Sequence, prompt: SequenceOf[int], parent: bytes) -> None:
        """Past the shared blocks: the first rows of a cached block that holds the prompt's
        next tokens (not all 16 of them, or the whole block would have been shared) are copied
        into a block of the sequence's own, which it then fills on."""
        index = len(seq.blocks)
        lo = index * KV_BLOCK
        wanted = tuple(prompt[lo:min(lo + KV_BLOCK - 1, len(prompt) - 1)])
        if not wanted:
            return
        hit = self.cache.best_rows(row_anchor(parent, index, seq.spans), wanted)
        if hit is None:
            return
        source, n = hit
        self.cache.acquire(source)  # NOTE: so that allocating cannot evict it
        try:
            block = self.cache.allocate(1)[0]
        except CacheFull:  # the scheduler reserves the sequence's blocks; but not worth failing
            return
        finally:
            self.cache.release([source])
        self.cache.copy_rows(source, block, n)
        seq.blocks.append(block)
        seq.tokens.extend(wanted[:n])
        self.cache.stats.row_hits += 1

    def _offer_partial(self, seq: Sequence) -> None:
        """Let the rows of the sequence's last block, partly filled, be copied by others."""
        index, n = divmod(seq.length, KV_BLOCK)
        if n == 0 or index >= len(seq.blocks):
            return
        parent = seq.keys[index - 1] if index else b""
        self.cache.offer(seq.blocks[index], row_anchor(parent, index, seq.spans),
                         tuple(seq.tokens[index * KV_BLOCK:seq.length]))

    def _register(self, seq: Sequence) -> None:
        """Key the blocks a step filled; a key another block already holds leaves ours private
        (the cached one keeps serving hits)."""
        for i in range(len(seq.keys), seq.length // KV_BLOCK):
            key = block_key(seq.keys[-1] if seq.keys else b"",
                            seq.tokens[i * KV_BLOCK:(i + 1) * KV_BLOCK], i, seq.spans)
            anchor = row_anchor(seq.keys[-1] if seq.keys else b"", i, seq.spans)
            seq.keys.append(key)
            self.cache.register(seq.blocks[i], key)
            # its first rows too: a prompt ending inside it, sent again, copies them
            self.cache.offer(seq.blocks[i], anchor,
                             tuple(seq.tokens[i * KV_BLOCK:(i + 1) * KV_BLOCK]))

    # the step --------------------------------------------------------------------------------

    def _validate(self, requests: list[SeqRequest]) -> None:
        c = self.config
        if not requests:
            raise BatchError("a step needs at least one sequence")
        seen: set[int] = set()
        total = 0
        new_blocks = 0
        for i, r in enumerate(requests):
            if r.seq.id in seen:
                raise BatchError(f"sequence {r.seq.id} appears twice in one step")
            seen.add(r.seq.id)
            n = len(r.tokens)
            if n == 0:
                raise BatchError(f"request {i}: no tokens")
            tokens = np.asarray(r.tokens)
            if tokens.dtype.kind not in "iu" or tokens.min() < 0 or tokens.max() >= c.vocab_size:
                raise EngineError(f"request {i}: token ids must be integers in [0, {c.vocab_size})")
            if r.seq.length + n > c.max_seq_len:
                raise EngineError(
                    f"request {i}: {r.seq.length} + {n} tokens exceed the context of "
                    f"{c.max_seq_len}")
            if r.logits not in ("last", "all", "none"):
                raise EngineError(f"request {i}: logits must be 'last', 'all' or 'none'")
            for layer in r.capture_layers:
                if not 0 <= layer < c.n_layers:
                    raise EngineError(
                        f"request {i}: capture layer {layer} outside 0..{c.n_layers - 1}")
            total += n
            # NOTE: a sequence may hold blocks a failed step allocated: they count, never below 0
            new_blocks += max(0, blocks_for(r.seq.length + n) - len(r.seq.blocks))
        if total > self.max_tokens:
            raise BatchError(f"{total} tokens in one step exceed max_tokens={self.max_tokens}")
        if new_blocks > self.cache.free_blocks:
            raise CacheFull(f"step needs {new_blocks} more KV blocks, "
                            f"{self.cache.free_blocks} free of {self.cache.n_blocks}")

    def _validate_term(self, i: int, term: SteeringTerm) -> None:
        c = self.config
        if not 0 <= term.layer <= c.n_layers:
            raise EngineError(
                f"steering[{i}]: steering layer {term.layer} outside 0..{c.n_layers}")
        v = term.vectors
        if not isinstance(v, np.ndarray) or v.shape[-1] != c.dim or v.ndim not in (1, 2) \
                or (term.every_position and v.ndim == 2 and v.shape[0] != 1):
            raise EngineError(f"steering[{i}]: steering vectors must have shape (P, {c.dim})"
                              f"{' or (dim,)' if term.every_position else ''}")
        if not math.isfinite(term.scale) or not np.isfinite(v).all():
            raise EngineError(f"steering[{i}]: steering values must be finite")
        if term.op not in OPS:
            raise EngineError(f"steering[{i}]: unknown op {term.op!r} (one of {', '.join(OPS)})")
        if not math.isfinite(term.value):
            raise EngineError(f"steering[{i}]: value must be finite")
        if term.op != "add":
            if not term.every_position and v.ndim == 2 and v.shape[0] != 1:
                raise EngineError(f"steering[{i}]: {term.op} needs a direction (one vector); "
                                  "an ActAdd vector has one row per position")
            self._check_direction(f"steering[{i}]", v)
        elif not term.plain:
            with np.errstate(over="ignore", invalid="ignore"):
                norm = float(abs(term.scale)
                             * np.linalg.norm(v.astype(np.float64), axis=-1).max())
            if norm > MAX_STEERING_NORM:
                raise EngineError(f"steering[{i}]: a norm of {norm:.3g}; at most "
                                  f"{MAX_STEERING_NORM:.0e} is allowed, or the residual stream "
                                  "would overflow float32")
        w = term.when
        if w is not None:
            if not 0 <= w.layer <= c.n_layers:
                raise EngineError(f"steering[{i}]: when.layer {w.layer} outside 0..{c.n_layers}")
            if w.scope not in ("prompt", "token") or w.comparison not in ("greater", "less"):
                raise EngineError(f"steering[{i}]: when.scope must be 'prompt' or 'token' and "
                                  "when.comparison 'greater' or 'less'")
            if not math.isfinite(w.threshold):
                raise EngineError(f"steering[{i}]: when.threshold must be finite")
            if w.scope == "token" and w.layer > term.layer:
                raise EngineError(f"steering[{i}]: a token condition at layer {w.layer} comes "
                                  f"after the entry's layer {term.layer}: it must be at or "
                                  "before it")
            self._check_direction(f"steering[{i}].when", np.asarray(w.vector))

    def _fold_steering(self, terms: SequenceOf[SteeringTerm]) -> FoldedSteering:
        c = self.config
        layers = sorted({term.layer for term in terms})
        n_rows = max((term.vectors.shape[0] for term in terms
                      if not term.every_position and term.vectors.ndim == 2), default=0)
        every = np.zeros((len(layers), c.dim), np.float32)
        rows = np.zeros((len(layers), n_rows, c.dim), np.float32)
        # NOTE: finite terms can still sum (or scale) past float32: checked on the result below
        with np.errstate(over="ignore", invalid="ignore"):
            for term in terms:
                k = layers.index(term.layer)
                v = np.asarray(term.vectors, np.float32)
                if term.every_position:
                    every[k] += np.float32(term.scale) * v.reshape(c.dim)
                else:
                    v = v.reshape(-1, c.dim)
                    rows[k, :len(v)] += np.float32(term.scale) * v
        folded = FoldedSteering(np.array(layers, np.int64), every, rows)
        self._check_folded(folded)
        return folded

    @staticmethod
    def _check_folded(folded: FoldedSteering) -> None:
        """The summed steering must be finite and its norm per position, summed over layers,
        at most MAX_STEERING_NORM, so that it cannot overflow the sequence's residual stream."""
        for k, layer in enumerate(folded.layers):
            if not (np.isfinite(folded.every[k]).all() and np.isfinite(folded.rows[k]).all()):
                raise EngineError(f"the steering summed at layer {layer} overflows float32")
        every = folded.every.astype(np.float64)  # float64: the norms of huge values stay finite
        # positions the ActAdd rows cover, then every later one (the every-position part alone)
        per_position = np.linalg.norm(every[:, None, :] + folded.rows, axis=-1).sum(axis=0)
        beyond = float(np.linalg.norm(every, axis=-1).sum())
        norms = np.append(per_position, beyond)
        worst = int(np.argmax(norms))
        if norms[worst] > MAX_STEERING_NORM:
            where = f"position {worst}" if worst < len(per_position) else (
                f"positions {worst} and beyond" if worst else "every position")
            raise EngineError(
                f"the steering added at {where} has a norm of {norms[worst]:.3g}, summed over "
                f"its layers; at most {MAX_STEERING_NORM:.0e} is allowed, or the residual "
                "stream would overflow float32")

    def step(self, requests: list[SeqRequest]) -> list[SeqResult]:
        """Run one forward pass over every request's new tokens; append them to the sequences.

        A step that raises leaves every sequence as it was, so the same requests may be run
        again (the server re-runs a failed step in parts to find the request at fault): it
        validates before touching any state; the KV blocks it allocates are kept by their
        sequences and counted when the step is re-run (no second allocation); the K/V rows it
        wrote lie at positions >= each sequence's length, which no step reads before writing
        them again; and sequence lengths advance only once everything else has succeeded.
        """
        self._validate(requests)
        c = self.config
        for r in requests:  # validated above: cannot run out midway
            need = blocks_for(r.seq.length + len(r.tokens)) - len(r.seq.blocks)
            if need > 0:
                r.seq.blocks.extend(self.cache.allocate(need))
        T = sum(len(r.tokens) for r in requests)
        S = len(requests)
        tokens = np.concatenate([np.asarray(r.tokens, np.int32) for r in requests])
        positions = np.concatenate(
            [np.arange(r.seq.length, r.seq.length + len(r.tokens), dtype=np.int32)
             for r in requests])
        seq_index = np.repeat(np.arange(S, dtype=np.int32), [len(r.tokens) for r in requests])
        block_tables = np.zeros((S, self.max_blocks_per_seq), np.int32)
        for s, r in enumerate(requests):
            block_tables[s, :len(r.seq.blocks)] = r.seq.blocks
        want = np.zeros(T, np.bool_)
        starts = np.cumsum([0] + [len(r.tokens) for r in requests])
        for s, r in enumerate(requests):
            if r.logits == "all":
                want[starts[s]:starts[s + 1]] = True
            elif r.logits == "last":
                want[starts[s + 1] - 1] = True
        logits = np.empty((max(int(want.sum()), 1), c.vocab_size), np.float32)
        steer_index, steer_vecs = self._steering_arrays(requests, positions, starts)
        cap_slot, cap_rows, cap_out, layer_slots = self._capture_arrays(requests, starts, T)
        final_rows, final_out = self._final_arrays(requests, starts, T)
        layout = self._layouts([r.seq.interventions for r in requests], positions, starts)

        numba.set_num_threads(self.threads)  # thread-local in numba: set on the calling thread
        forward_step(self.weights, self._workspace, self._dims, np.float32(c.norm_eps), tokens,
                     positions, seq_index, block_tables, self.cache.k, self.cache.v, steer_index,
                     steer_vecs, cap_slot, cap_rows, cap_out, final_rows, final_out, want,
                     logits, layout.iv)

        results = []
        readings = layout.readings()
        row = 0
        for s, r in enumerate(requests):
            n_rows = int(want[starts[s]:starts[s + 1]].sum())
            out_logits = None
            if r.logits == "last":
                out_logits = logits[row]
            elif r.logits == "all":
                out_logits = logits[row:row + n_rows]
            row += n_rows
            captures = None
            if r.capture_layers:
                slots = [layer_slots[layer] for layer in r.capture_layers]
                rows = cap_rows[starts[s]:starts[s + 1]]
                captures = cap_out[:, slots][:, :, rows]
            final = None
            if r.capture_final:
                final = final_out[final_rows[starts[s]:starts[s + 1]]]
            results.append(SeqResult(out_logits, captures, final, *readings[s]))
        for r in requests:  # last, so that a step that raised can be run again (docstring)
            r.seq.length += len(r.tokens)
            r.seq.tokens.extend(r.tokens)
            if self.prefix_cache:
                self._register(r.seq)
                if r.seq.length == r.seq.prompt_len:  # the prompt's end: n choices copy it
                    self._offer_partial(r.seq)
        for s, r in enumerate(requests):
            self._decide(r.seq, layout.iv.sums, layout.sums[s])
        return results

    @staticmethod
    def _decide(seq: Sequence, sums: np.ndarray, rows: list[tuple[int, int]]) -> None:
        """Prompt conditions: add the step's prompt sums; decide once the prompt has run."""
        si = seq.interventions
        if si is None:
            return
        for k, row in rows:
            si.sums[k] += sums[row]
        if seq.length < si.prompt_len:
            return
        for k, cond in enumerate(si.conditions):
            if cond.scope != "prompt" or k in si.decisions:
                continue
            v = np.asarray(cond.vector, np.float64).reshape(-1)
            total = si.sums[k]
            denom = float(np.linalg.norm(total) * np.linalg.norm(v))
            cos = float(total @ v) / denom if denom > 0 else 0.0
            si.decisions[k] = (cos, cos < cond.threshold if cond.comparison == "less"
                               else cos > cond.threshold)

    def _steering_arrays(self, requests, positions, starts):
        """Each steered token's vector per layer as rows of steer_vecs, indexed (T, L + 1)."""
        c = self.config
        T = len(positions)
        index = np.full((T, c.n_layers + 1), -1, np.int32)
        if not any(r.seq.steering for r in requests):
            return index, self._no_steer
        blocks: list[np.ndarray] = []
        n_rows = 0
        for s, r in enumerate(requests):
            folded = r.seq.steering
            if folded is None:
                continue
            pos = positions[starts[s]:starts[s + 1]]
            block = np.repeat(folded.every[:, None, :], len(pos), axis=1)  # (layers, T_s, dim)
            if folded.rows.shape[1]:
                hit = pos < folded.rows.shape[1]
                block[:, hit] += folded.rows[:, pos[hit]]
            k = np.arange(len(folded.layers))
            index[starts[s]:starts[s + 1], folded.layers] = (
                n_rows + k[None, :] * len(pos) + np.arange(len(pos))[:, None])
            blocks.append(block.reshape(-1, c.dim))
            n_rows += block.shape[0] * block.shape[1]
        return index, np.concatenate(blocks)

    def _capture_arrays(self, requests, starts, T):
        c = self.config
        layers = sorted({layer for r in requests for layer in r.capture_layers})
        cap_slot = np.full(c.n_layers, -1, np.int32)
        cap_rows = np.full(T, -1, np.int32)
        if not layers:
            return cap_slot, cap_rows, self._no_capture, {}
        layer_slots = {layer: i for i, layer in enumerate(layers)}
        cap_slot[layers] = np.arange(len(layers), dtype=np.int32)
        n = 0
        for s, r in enumerate(requests):
            if r.capture_layers:
                k = starts[s + 1] - starts[s]
                cap_rows[starts[s]:starts[s + 1]] = np.arange(n, n + k)
                n += k
        cap_out = np.zeros((len(CAPTURE_POINTS), len(layers), n, c.dim), np.float32)
        return cap_slot, cap_rows, cap_out, layer_slots

    def _final_arrays(self, requests, starts, T):
        """Rows of final_out (the stream after the final norm) for tokens that capture it."""
        final_rows = np.full(T, -1, np.int32)
        n = 0
        for s, r in enumerate(requests):
            if r.capture_final:
                k = starts[s + 1] - starts[s]
                final_rows[starts[s]:starts[s + 1]] = np.arange(n, n + k)
                n += k
        if n == 0:
            return final_rows, self._no_final
        return final_rows, np.zeros((n, self.config.dim), np.float32)

    # conveniences ----------------------------------------------------------------------------

    def forward_all(self, tokens: list[int], steering: SequenceOf[SteeringTerm] = (),
                    capture_layers: SequenceOf[int] = (), capture_final: bool = False
                    ) -> SeqResult:
        """Teacher-forced logits for every position of one new sequence (for tests and tools)."""
        seq = self.new_sequence(steering, prompt_len=len(tokens))
        try:
            parts: list[np.ndarray] = []
            caps: list[np.ndarray] = []
            finals: list[np.ndarray] = []
            for i in range(0, len(tokens), self.max_tokens):
                res = self.step([SeqRequest(seq, tokens[i:i + self.max_tokens], logits="all",
                                            capture_layers=tuple(capture_layers),
                                            capture_final=capture_final)])[0]
                assert res.logits is not None  # logits="all"
                parts.append(res.logits)
                if res.captures is not None:
                    caps.append(res.captures)
                if res.final is not None:
                    finals.append(res.final)
            return SeqResult(np.concatenate(parts), np.concatenate(caps, axis=2) if caps else None,
                             np.concatenate(finals) if finals else None)
        finally:
            self.release(seq)



