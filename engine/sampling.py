"""Token sampling: pure functions over one sequence's logits (float32, shape (vocab,)).

The chain follows llama.cpp's default order:

    penalties -> top_k -> top_p -> min_p -> temperature -> draw

The draw is defined on a deterministic candidate order: descending logit, ties by ascending
token id (a stable sort). Survivors of the filters are weighted by a float64 softmax at the
requested temperature, and one uniform u in [0, 1) picks the first token, in that order, whose
running weight exceeds u * (total weight) -- inverse-CDF sampling. When no filter truncates
(top_k 0, top_p 1, min_p 0) the order is token-id order instead: the same distribution, drawn
without sorting the vocabulary. Temperature 0 is greedy: the
argmax of the penalized logits, ties to the lowest id; it consumes no randomness.

`Sampler.sample` and `sample_batch` (every row of a step in one call) run the compiled kernel in
engine/sample_kernel.py, which picks the same token as `apply_penalties` + `sample_token` here;
these numpy functions are the plain reference it is tested against, and `sampling_probs`,
`logprobs` and `top_logprobs` (computed only when a request asks) stay numpy.

Randomness is per request: `Sampler` owns a `numpy.random.Generator(PCG64(seed))` and takes
exactly one uniform per sampled token, so a request's tokens depend only on its seed and its
logits, never on other requests, batch composition or thread count.

Penalty semantics (a choice, since the two APIs differ):
  * repetition_penalty is llama.cpp's `repeat_penalty`: every distinct token in the penalty
    window -- the last `repeat_last_n` tokens of the context, prompt included (-1 = the whole
    context, 0 = no window) -- has its logit divided by the penalty if positive, multiplied if not.
  * frequency_penalty / presence_penalty use OpenAI's formula,
        logit -= count * frequency_penalty + (count > 0) * presence_penalty,
    with `count` taken over the *generated* tokens inside the same window. The prompt never
    counts, as in OpenAI; with repeat_last_n = -1 this is exactly OpenAI's definition. (llama.cpp
    also counts prompt tokens in the window; that difference is deliberate.)
  Repetition is applied before frequency/presence, as in llama.cpp.
"""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .sample_kernel import N_PARAMS, OK, error_message, param_row, sample_rows

# The progressive search sorts only the top of the candidate list and widens it when the
# answer lies deeper: a full stable sort of 128k logits costs ~20 ms, a partition ~1 ms.
_FIRST_CHUNK = 128
_CHUNK_GROWTH = 4

# Penalty bounds, so that a request's parameters can never turn its logits non-finite (which
# would fail its sampling): repetition divides or multiplies a logit by at most 10 (float32
# logits below ~3e37 stay finite; a penalty of 1e-300 rounds to 0 in float32 and divides by
# it), and frequency/presence subtract at most 2 per occurrence (OpenAI's range). Temperature
# needs no bound: it divides float64 differences <= 0, which at worst round to -inf or 0.
REPETITION_PENALTY_RANGE = (0.1, 10.0)
PENALTY_RANGE = (-2.0, 2.0)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0         # 0 = greedy
    top_k: int = 0                   # 0 = off
    top_p: float = 1.0               # 1.0 = off
    min_p: float = 0.0               # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64          # penalty window; -1 = whole context, 0 = penalties off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None          # None = fresh seed from OS entropy (see Sampler.seed)

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                     "presence_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("top_k", "repeat_last_n"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise ValueError(f"repetition_penalty must be in [{low}, {high}] (1 = off), got "
                             f"{self.repetition_penalty!r}")
        low, high = PENALTY_RANGE
        for name in ("frequency_penalty", "presence_penalty"):
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be in [{low}, {high}] (0 = off), got "
                                 f"{getattr(self, name)!r}")
        if self.repeat_last_n < -1:
            raise ValueError(
                f"repeat_last_n must be >= -1 (-1 = whole context), got {self.repeat_last_n!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repeat_last_n != 0 and (
            self.repetition_penalty != 1 or self.frequency_penalty != 0
            or self.presence_penalty != 0)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array, got shape {logits.shape}")
    # NOTE: -inf is a legitimate mask (logit bias, grammar); NaN and +inf have no meaning.
    if not (logits < np.inf).all():
        raise ValueError("logits contain NaN or +inf")
    return logits


# ---------------------------------------------------------------------------------------------
# penalties

def apply_penalties(logits: np.ndarray, params: SamplingParams, context: np.ndarray,
                    n_prompt: int) -> np.ndarray:
    """Penalized copy of `logits` (vocab,) float32; `logits` itself is returned if nothing applies.

    `context` holds the sequence's tokens so far, the first `n_prompt` of them from the prompt.
    Semantics are in the module docstring.
    """
    logits = _check_logits(logits)
    if not params.has_penalties:
        return logits
    context = np.asarray(context, dtype=np.int64).reshape(-1)
    if not 0 <= n_prompt <= context.size:
        raise ValueError(f"n_prompt ({n_prompt}) must be in [0, len(context)={context.size}]")
    start = 0 if params.repeat_last_n == -1 else max(0, context.size - params.repeat_last_n)
    window = context[start:]
    if window.size == 0:
        return logits
    if window.min() < 0 or window.max() >= logits.size:
        raise ValueError(f"context holds token ids outside [0, {logits.size})")
    out = logits.copy()
    if params.repetition_penalty != 1:
        ids = np.unique(window)
        v = out[ids]
        pen = np.float32(params.repetition_penalty)
        out[ids] = np.where(v > 0, v / pen, v * pen)
    if params.frequency_penalty != 0 or params.presence_penalty != 0:
        generated = context[max(start, n_prompt):]
        if generated.size:
            ids, counts = np.unique(generated, return_counts=True)
            out[ids] -= (counts.astype(np.float32) * np.float32(params.frequency_penalty)
                         + np.float32(params.presence_penalty))
    return out


# ---------------------------------------------------------------------------------------------
# candidate order and filters

def _top_order(vals: np.ndarray, m: int) -> np.ndarray:
    """Positions of the m largest `vals` (n,), sorted by descending value, ties by position.

    Equal to the first m entries of a full stable sort, for every m: the tie at the cut keeps
    the lowest positions, so widening m only appends.
    """
    n = vals.size
    if m >= n:
        return np.argsort(-vals, kind="stable")
    cut = np.partition(vals, n - m)[n - m]           # the m-th largest value
    above = np.flatnonzero(vals > cut)
    tied = np.flatnonzero(vals == cut)[: m - above.size]
    sel = np.concatenate((above, tied))
    return sel[np.lexsort((sel, -vals[sel]))]


def _first_passing(vals: np.ndarray, weights: np.ndarray, target: float, limit: int,
                   strict: bool, is_sorted: bool) -> tuple[np.ndarray, int]:
    """Walk `vals` in candidate order, summing `weights` (float64, same positions as `vals`).

    Returns (order, i): `order` are positions in candidate order (at least i + 1 of them) and i
    is the first index whose running sum is > target (strict) or >= target, searched within the
    first `limit` entries; i = -1 when rounding keeps the sum from ever passing.
    """
    m = limit if is_sorted else min(limit, _FIRST_CHUNK)
    while True:
        order = np.arange(m) if is_sorted else _top_order(vals, m)
        running = np.cumsum(weights[order])        # sequential, so prefixes agree for every m
        i = int(np.searchsorted(running, target, side="right" if strict else "left"))
        if i < m:
            return order, i
        if m >= limit:
            return order, -1
        m = min(limit, m * _CHUNK_GROWTH)


def _filter(logits: np.ndarray, params: SamplingParams
            ) -> tuple[np.ndarray | None, np.ndarray, bool]:
    """top_k -> top_p -> min_p on checked logits -> (ids, vals, is_sorted).

    `vals` are the survivors' logits; `ids` their token ids (None = position is the id).
    `is_sorted` says whether they are already in candidate order; otherwise in id order.
    """
    if (logits > -np.inf).all():
        ids, vals = None, logits
    else:
        ids = np.flatnonzero(logits > -np.inf)
        if ids.size == 0:
            raise ValueError("all logits are -inf: no token can be sampled")
        vals = logits[ids]
    is_sorted = False

    if 0 < params.top_k < vals.size:
        order = _top_order(vals, params.top_k)
        ids = order if ids is None else ids[order]
        vals, is_sorted = vals[order], True

    if params.top_p == 1 and params.min_p == 0:
        return ids, vals, is_sorted
    shifted = vals.astype(np.float64) - np.float64(vals.max())   # <= 0, max exactly 0
    limit = vals.size
    if params.min_p > 0:
        # min_p keeps p >= min_p * p_max, a prefix of candidate order, so it commutes with
        # top_p's prefix and only shortens the search below.
        limit = int(np.count_nonzero(shifted >= math.log(params.min_p)))

    if params.top_p < 1:
        # NOTE: top_p normalizes over the candidates left by top_k, before min_p, at
        # temperature 1, as llama.cpp does.
        w = np.exp(shifted)
        order, i = _first_passing(vals, w, params.top_p * w.sum(), limit, strict=False,
                                  is_sorted=is_sorted)
        keep = order[: limit if i < 0 else i + 1]
    elif limit < vals.size:
        keep = np.arange(limit) if is_sorted else _top_order(vals, limit)
    else:
        return ids, vals, is_sorted
    return (keep if ids is None else ids[keep]), vals[keep], True


def candidates(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Token ids surviving top_k, top_p and min_p, in candidate order (int64).

    Takes already-penalized logits. Sorts every survivor, so it is for inspection (tests,
    post-filter probabilities) rather than the hot path.
    """
    logits = _check_logits(logits)
    ids, vals, is_sorted = _filter(logits, params)
    order = np.arange(vals.size) if is_sorted else _top_order(vals, vals.size)
    return (order if ids is None else ids[order]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# the draw

def _unfiltered(params: SamplingParams, vocab: int) -> bool:
    return (params.top_k == 0 or params.top_k >= vocab) and params.top_p >= 1 \
        and params.min_p == 0


def _draw_in_id_order(logits: np.ndarray, temperature: float, u: float) -> int:
    """The draw when nothing is filtered out: inverse CDF over token ids in id order.

    The distribution is the softmax either way; the order only decides which u picks which
    token, and id order needs no sort -- O(vocab) instead of a sort of the whole vocabulary,
    which a flat distribution (an untrained or high-temperature model) would otherwise cost.
    """
    if logits.max() == -np.inf:
        raise ValueError("all logits are -inf: no token can be sampled")
    w = _weights(logits, temperature)
    running = np.cumsum(w)
    i = int(np.searchsorted(running, u * running[-1], side="right"))
    if i >= running.size:  # rounding left the sum short of u * total: the last token with weight
        i = int(np.flatnonzero(w > 0)[-1])
    return i


def _weights(vals: np.ndarray, temperature: float) -> np.ndarray:
    """Unnormalized float64 softmax weights of `vals` at `temperature` (the largest is 1): the
    one formula both the draw and `sampling_probs` use."""
    with np.errstate(over="ignore"):  # a tiny temperature: -inf, a weight of 0 (as it should)
        return np.exp((vals.astype(np.float64) - np.float64(vals.max())) / temperature)


def sample_token(logits: np.ndarray, params: SamplingParams, u: float) -> int:
    """One token id from already-penalized logits (vocab,) and a uniform u in [0, 1).

    Pure: the same logits, params and u give the same token, bitwise. Greedy ignores u.
    """
    logits = _check_logits(logits)
    if params.greedy:
        best = int(np.argmax(logits))                # first maximum = lowest id
        if logits[best] == -np.inf:
            raise ValueError("all logits are -inf: no token can be sampled")
        return best
    if not 0 <= u < 1:
        raise ValueError(f"u must be in [0, 1), got {u!r}")
    if _unfiltered(params, logits.size):
        return _draw_in_id_order(logits, params.temperature, u)
    ids, vals, is_sorted = _filter(logits, params)
    w = _weights(vals, params.temperature)
    order, i = _first_passing(vals, w, u * w.sum(), vals.size, strict=True,
                              is_sorted=is_sorted)
    if i < 0:
        # Rounding left the running sum short of u * total: take the last token with weight;
        # weights fall along candidate order, so those form a prefix.
        i = int(np.count_nonzero(w[order] > 0)) - 1
    pos = int(order[i])
    return pos if ids is None else int(ids[pos])


def sampling_probs(logits: np.ndarray, params: SamplingParams, token: int, n: int
                   ) -> tuple[float, list[tuple[int, float]]]:
    """The distribution `sample_token` draws from, for llama.cpp's `post_sampling_probs`:
    `token`'s probability and the n most probable candidates as (id, prob), most probable first.

    Takes already-penalized logits. The candidates are the survivors of top_k, top_p and min_p,
    weighted at the request's temperature and normalized over the survivors alone; tokens the
    draw can never pick (filtered out, or of weight 0) are not listed and have probability 0.
    Greedy is the limit of temperature -> 0: the argmax alone, with probability 1.
    """
    if not _is_int(n) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    logits = _check_logits(logits)
    if params.greedy:
        best = sample_token(logits, params, 0.0)
        return float(token == best), [(best, 1.0)][:n]
    ids, vals, is_sorted = _filter(logits, params)
    w = _weights(vals, params.temperature)
    total = w.sum()
    m = min(n, int(np.count_nonzero(w > 0)))
    order = np.arange(m) if is_sorted or m == 0 else _top_order(vals, m)
    top = [(int(pos if ids is None else ids[pos]), float(w[pos] / total)) for pos in order]
    if ids is None:
        pos = token if 0 <= token < vals.size else -1
    else:
        found = np.flatnonzero(ids == token)
        pos = int(found[0]) if found.size else -1
    return (float(w[pos] / total) if pos >= 0 else 0.0), top


class Sampler:
    """Per-request sampling state: params, a seeded generator and the penalty context."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int] | np.ndarray = ()) -> None:
        self.params = params
        # NOTE: drawn seeds are 32-bit like llama.cpp's, so clients can echo them back anywhere.
        self.seed: int = params.seed if params.seed is not None else secrets.randbits(32)
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        prompt = np.asarray(prompt, dtype=np.int64).reshape(-1)
        self.n_prompt = prompt.size
        self._penalized = params.has_penalties
        # Tokens seen so far (prompt, then generated); only kept when a penalty needs them.
        self._tokens = prompt.copy() if self._penalized else np.empty(0, np.int64)
        self._n = self._tokens.size
        # the kernel's parameter row, built once per request rather than once per token
        self._row = param_row(params.temperature, params.top_k, params.top_p, params.min_p,
                              params.repetition_penalty, params.frequency_penalty,
                              params.presence_penalty)

    def sample(self, logits: np.ndarray) -> int:
        """Next token for this sequence's logits (vocab,); call `accept` with what is kept."""
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 1 or logits.size == 0:
            raise ValueError(f"logits must be a non-empty 1-D array, got shape {logits.shape}")
        # NOTE: one thread: waking a pool costs more than it could save on a single row
        tokens, errors = sample_batch([self], logits[None], threads=1)
        if errors[0] is not None:
            raise ValueError(errors[0])
        return int(tokens[0])

    def window(self) -> tuple[np.ndarray, int]:
        """The penalty window (a view of the context: the last repeat_last_n tokens, empty
        when no penalty applies) and the index in it where the generated tokens start."""
        if not self._penalized:
            return _NO_TOKENS, 0
        n = self._n
        start = 0 if self.params.repeat_last_n == -1 else max(0, n - self.params.repeat_last_n)
        return self._tokens[start:n], max(start, self.n_prompt) - start

    def draw(self) -> float:
        """This token's uniform: one per sampled token, none for greedy."""
        return 0.0 if self.params.greedy else float(self.rng.random())

    def probs(self, logits: np.ndarray, token: int, n: int
              ) -> tuple[float, list[tuple[int, float]]]:
        """`sampling_probs` for the logits `sample` was just given: call it before `accept`,
        so that the penalties are the ones the draw saw."""
        logits = apply_penalties(logits, self.params, self._tokens[: self._n], self.n_prompt)
        return sampling_probs(logits, self.params, token, n)

    def accept(self, token: int) -> None:
        """Record a generated token in the penalty context."""
        if not self._penalized:
            return
        if self._n == self._tokens.size:             # amortized doubling
            grown = np.empty(max(16, 2 * self._tokens.size), np.int64)
            grown[: self._n] = self._tokens[: self._n]
            self._tokens = grown
        self._tokens[self._n] = token
        self._n += 1


_NO_TOKENS = np.empty(0, np.int64)


def sample_batch(samplers: Sequence[Sampler], logits: np.ndarray, threads: int | None = None
                 ) -> tuple[np.ndarray, list[str | None]]:
    """Sample every row of `logits` (rows, vocab) float32, row r for `samplers[r]`, in one
    compiled call -> (tokens (rows,) int64, error message or None per row).

    Each sampler draws its own uniform (none when greedy), so a row's token depends only on
    its sampler and its logits, whatever else is in the batch and whatever `threads` is. A
    row with an error (NaN or +inf logits, nothing allowed) has token -1 and its message; its
    uniform is spent, which does not matter as its request ends there.
    """
    rows = len(samplers)
    if logits.shape[0] != rows:
        raise ValueError(f"{rows} samplers for {logits.shape[0]} rows of logits")
    params = np.empty((rows, N_PARAMS), np.float64)
    starts = np.zeros(rows + 1, np.int64)
    generated = np.empty(rows, np.int64)
    u = np.empty(rows, np.float64)
    windows = []
    for r, sampler in enumerate(samplers):
        params[r] = sampler._row
        window, offset = sampler.window()
        windows.append(window)
        generated[r] = starts[r] + offset
        starts[r + 1] = starts[r] + window.size
        u[r] = sampler.draw()
    # NOTE: one C-level concatenation of the windows (at most repeat_last_n tokens each, or the
    # whole context with -1); no Python work per context token
    context = np.concatenate(windows) if starts[-1] else _NO_TOKENS
    tokens, codes = sample_rows(logits, params, context, starts, generated, u, threads)
    errors = [None if c == OK else error_message(c, logits.shape[1]) for c in codes.tolist()]
    return tokens, errors


# ---------------------------------------------------------------------------------------------
# log-probabilities

def logprobs(logits: np.ndarray) -> np.ndarray:
    """log-softmax of `logits` (vocab,) -> float32 (vocab,); -inf logits give -inf.

    Pass the model's raw logits: OpenAI's `logprobs` (and what we report for llama.cpp's
    `n_probs`) describe the model's distribution at temperature 1, before penalties and the
    top_k / top_p / min_p filters.
    """
    logits = _check_logits(logits)
    x = logits.astype(np.float64)
    mx = x.max()
    if mx == -np.inf:
        raise ValueError("all logits are -inf: the distribution is undefined")
    shifted = x - mx                                 # largest term is exp(0): no overflow
    return (shifted - np.log(np.exp(shifted).sum())).astype(np.float32)


def top_logprobs(logits: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n most likely tokens of the raw distribution as (id, logprob), most likely first.

    Ties go to the lowest id. Tokens of probability zero (-inf logits) are never listed, so
    fewer than n come back when fewer have positive probability. Same distribution as `logprobs`.
    """
    if not _is_int(n) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    logits = _check_logits(logits)
    lp = logprobs(logits)
    n = min(n, int(np.count_nonzero(lp > -np.inf)))
    if n == 0:
        return []
    # Order by the logits, not the rounded logprobs, so float32 rounding cannot invent ties.
    order = _top_order(logits, n)
    return [(int(t), float(lp[t])) for t in order]
